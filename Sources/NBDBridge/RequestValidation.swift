/// One request header as it arrived (proto.md "Request message").
struct RequestHeader {
    var flags: UInt16
    var command: UInt16
    var cookie: UInt64
    var offset: UInt64
    var length: UInt32

    /// Decodes the 28 bytes at `p`; nil when the magic is wrong (the connection must then close).
    @inline(__always)
    init?(_ p: UnsafeRawPointer) {
        guard UInt32(bigEndian: p.loadUnaligned(as: UInt32.self)) == NBDProtocol.requestMagic else { return nil }
        flags = UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        command = UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        cookie = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        offset = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        length = UInt32(bigEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt32.self))
    }
}

/// The checks every request passes before dispatch (nbdkit's server/protocol.c `validate_request`):
/// known command, allowed flags, permission, range, alignment and size. Pure: no I/O.
enum RequestValidation {
    struct Limits {
        var exportSize: UInt64
        var readOnly: Bool
        var minimumBlockSize: UInt32
        var maximumBlockSize: UInt32
        var structuredReplies: Bool
        var baseAllocation: Bool
    }

    /// The error to answer with, or `.ok` when the request may run.
    @inline(__always)
    static func check(_ r: RequestHeader, _ l: Limits) -> NBDErrorCode {
        let allowed: UInt16
        switch r.command {
        case NBDProtocol.cmdRead: allowed = l.structuredReplies ? NBDProtocol.cmdFlagDF : 0
        case NBDProtocol.cmdWrite, NBDProtocol.cmdTrim: allowed = NBDProtocol.cmdFlagFUA
        case NBDProtocol.cmdWriteZeroes:
            allowed = NBDProtocol.cmdFlagFUA | NBDProtocol.cmdFlagNoHole | NBDProtocol.cmdFlagFastZero
        case NBDProtocol.cmdBlockStatus: allowed = NBDProtocol.cmdFlagReqOne
        case NBDProtocol.cmdFlush, NBDProtocol.cmdCache, NBDProtocol.cmdDisc: allowed = 0
        default: return .einval                                    // unknown command (RESIZE included)
        }
        if r.flags & ~allowed != 0 { return .einval }

        switch r.command {
        case NBDProtocol.cmdDisc:
            return .ok
        case NBDProtocol.cmdFlush:
            return r.offset == 0 && r.length == 0 ? .ok : .einval
        default:
            break
        }
        let isWrite = r.command == NBDProtocol.cmdWrite || r.command == NBDProtocol.cmdTrim
            || r.command == NBDProtocol.cmdWriteZeroes
        if isWrite && l.readOnly { return .eperm }
        if r.command == NBDProtocol.cmdBlockStatus && !(l.structuredReplies && l.baseAllocation) { return .einval }
        if r.length == 0 { return .einval }
        let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
        if overflow || end > l.exportSize {
            return r.command == NBDProtocol.cmdWrite || r.command == NBDProtocol.cmdWriteZeroes ? .enospc : .einval
        }
        if l.minimumBlockSize > 1 {
            let mask = UInt64(l.minimumBlockSize - 1)
            if r.offset & mask != 0 || UInt64(r.length) & mask != 0 { return .einval }
        }
        if (r.command == NBDProtocol.cmdRead || r.command == NBDProtocol.cmdWrite) && r.length > l.maximumBlockSize {
            return r.command == NBDProtocol.cmdRead && l.structuredReplies ? .eoverflow : .einval
        }
        return .ok
    }
}
