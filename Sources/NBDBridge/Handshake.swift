import Glibc
import SystemPackage

/// What a connection agreed on during the handshake.
struct NegotiatedSession: Sendable {
    var structuredReplies = false
    /// `base:allocation` was selected with NBD_OPT_SET_META_CONTEXT.
    var baseAllocation = false
}

/// What the handshake tells clients about the one export.
struct ExportDescription: Sendable {
    var name: String
    var description: String
    var size: UInt64
    var transmissionFlags: UInt16
    var minimumBlockSize: UInt32
    var preferredBlockSize: UInt32
    var maximumBlockSize: UInt32
}

/// The fixed-newstyle negotiation (proto.md "Newstyle negotiation"), with blocking I/O on the
/// connection's socket: it happens once per connection, before the io_uring loop takes over.
/// Follows nbdkit's server/protocol-handshake-newstyle.c in spirit: each option checks its own
/// length before reading anything, and replies ERR_INVALID / ERR_UNSUP / ERR_UNKNOWN as the spec says.
struct Handshake {
    /// Options longer than this are refused; their data is skipped up to `discardLimit`, beyond it the
    /// connection is closed (a client that sends 4 GiB of option data is not worth reading).
    static let maxOptionLength: UInt32 = 64 * 1024
    static let discardLimit: UInt32 = 1 << 20
    static let maxOptions = 4096

    enum Outcome {
        case transmission(NegotiatedSession)
        case closed(String)
    }

    let fd: Int32
    let export: ExportDescription

    /// Runs the negotiation to its end: transmission, or a closed connection with the reason.
    func run() -> Outcome {
        do {
            return try negotiate()
        } catch {
            return .closed(error.message)
        }
    }

    private func negotiate() throws(NBDBridgeError) -> Outcome {
        var hello = ByteWriter()
        hello.u64(NBDProtocol.nbdMagic)
        hello.u64(NBDProtocol.optionMagic)
        hello.u16(NBDProtocol.flagFixedNewstyle | NBDProtocol.flagNoZeroes)
        try send(hello.bytes)

        let clientFlags = try readU32()
        let known = NBDProtocol.clientFixedNewstyle | NBDProtocol.clientNoZeroes
        if clientFlags & ~known != 0 {
            return .closed("client flags 0x\(String(clientFlags, radix: 16)) carry unknown bits")
        }
        let noZeroes = clientFlags & NBDProtocol.clientNoZeroes != 0
        var session = NegotiatedSession()

        for _ in 0..<Handshake.maxOptions {
            let magic = try readU64()
            if magic != NBDProtocol.optionMagic {
                return .closed("option magic 0x\(String(magic, radix: 16)) is not IHAVEOPT")
            }
            let option = try readU32()
            let length = try readU32()
            if length > Handshake.maxOptionLength {
                if length > Handshake.discardLimit {
                    return .closed("option \(option) length \(length) beyond \(Handshake.discardLimit)")
                }
                try discard(Int(length))
                try reply(option, NBDProtocol.repErrTooBig, message: "option length \(length) exceeds \(Handshake.maxOptionLength)")
                continue
            }
            let data = try readBytes(Int(length))

            switch option {
            case NBDProtocol.optExportName:
                let name = String(decoding: data, as: UTF8.self)
                guard matches(name) else { return .closed("unknown export '\(name)' in NBD_OPT_EXPORT_NAME") }
                var w = ByteWriter()
                w.u64(export.size)
                w.u16(export.transmissionFlags)
                if !noZeroes { w.bytes.append(contentsOf: repeatElement(0, count: 124)) }
                try send(w.bytes)
                return .transmission(session)

            case NBDProtocol.optAbort:
                try? reply(option, NBDProtocol.repAck)
                return .closed("client sent NBD_OPT_ABORT")

            case NBDProtocol.optList:
                if length != 0 { try reply(option, NBDProtocol.repErrInvalid, message: "NBD_OPT_LIST takes no data"); continue }
                var w = ByteWriter()
                w.u32(UInt32(export.name.utf8.count))
                w.bytes.append(contentsOf: export.name.utf8)
                try reply(option, NBDProtocol.repServer, data: w.bytes)
                try reply(option, NBDProtocol.repAck)

            case NBDProtocol.optInfo, NBDProtocol.optGo:
                if try infoOrGo(option, data) && option == NBDProtocol.optGo {
                    return .transmission(session)
                }

            case NBDProtocol.optStructuredReply:
                if length != 0 { try reply(option, NBDProtocol.repErrInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data"); continue }
                session.structuredReplies = true
                try reply(option, NBDProtocol.repAck)

            case NBDProtocol.optListMetaContext, NBDProtocol.optSetMetaContext:
                try metaContext(option, data, &session)

            case NBDProtocol.optStartTLS:
                try reply(option, NBDProtocol.repErrPolicy, message: "TLS is not offered by this server")

            default:
                try reply(option, NBDProtocol.repErrUnsup, message: "option \(option) is not supported")
            }
        }
        return .closed("more than \(Handshake.maxOptions) options")
    }

    /// The default export ("") and the export's own name always match; a server whose export has
    /// no name of its own serves it under any name, as nbdkit does with one export (QEMU's
    /// `export=`, `nbd+unix:///NAME?socket=` then just work).
    private func matches(_ name: String) -> Bool { name.isEmpty || export.name.isEmpty || name == export.name }

    /// NBD_OPT_INFO and NBD_OPT_GO: returns true when the export was accepted.
    private func infoOrGo(_ option: UInt32, _ data: [UInt8]) throws(NBDBridgeError) -> Bool {
        var r = ByteReader(data)
        guard let nameLength = r.u32(), nameLength <= UInt32(NBDProtocol.maxString),
              let nameBytes = r.take(Int(nameLength)), let count = r.u16(),
              r.remaining == Int(count) * 2 else {
            try reply(option, NBDProtocol.repErrInvalid, message: "malformed NBD_OPT_INFO/GO of \(data.count) bytes")
            return false
        }
        var requests: [UInt16] = []
        for _ in 0..<count { if let t = r.u16() { requests.append(t) } }
        let name = String(decoding: nameBytes, as: UTF8.self)
        guard matches(name) else {
            try reply(option, NBDProtocol.repErrUnknown, message: "unknown export '\(name)'")
            return false
        }
        var info = ByteWriter()
        info.u16(NBDProtocol.infoExport); info.u64(export.size); info.u16(export.transmissionFlags)
        try reply(option, NBDProtocol.repInfo, data: info.bytes)
        // Block sizes are always sent: the spec allows it and clients honour them.
        var sizes = ByteWriter()
        sizes.u16(NBDProtocol.infoBlockSize)
        sizes.u32(export.minimumBlockSize); sizes.u32(export.preferredBlockSize); sizes.u32(export.maximumBlockSize)
        try reply(option, NBDProtocol.repInfo, data: sizes.bytes)
        if requests.contains(NBDProtocol.infoName) {
            var w = ByteWriter(); w.u16(NBDProtocol.infoName); w.bytes.append(contentsOf: export.name.utf8)
            try reply(option, NBDProtocol.repInfo, data: w.bytes)
        }
        if requests.contains(NBDProtocol.infoDescription), !export.description.isEmpty {
            var w = ByteWriter(); w.u16(NBDProtocol.infoDescription); w.bytes.append(contentsOf: export.description.utf8)
            try reply(option, NBDProtocol.repInfo, data: w.bytes)
        }
        try reply(option, NBDProtocol.repAck)
        return true
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT with the one context `base:allocation`.
    private func metaContext(_ option: UInt32, _ data: [UInt8], _ session: inout NegotiatedSession) throws(NBDBridgeError) {
        let isSet = option == NBDProtocol.optSetMetaContext
        if isSet && !session.structuredReplies {
            try reply(option, NBDProtocol.repErrInvalid, message: "NBD_OPT_SET_META_CONTEXT needs structured replies first")
            return
        }
        var r = ByteReader(data)
        guard let nameLength = r.u32(), nameLength <= UInt32(NBDProtocol.maxString),
              let nameBytes = r.take(Int(nameLength)), let queryCount = r.u32() else {
            try reply(option, NBDProtocol.repErrInvalid, message: "malformed meta context option of \(data.count) bytes")
            return
        }
        var queries: [String] = []
        for _ in 0..<queryCount {
            guard let l = r.u32(), l <= UInt32(NBDProtocol.maxString), let q = r.take(Int(l)) else {
                try reply(option, NBDProtocol.repErrInvalid, message: "malformed meta context query list (\(queryCount) queries in \(data.count) bytes)")
                return
            }
            queries.append(String(decoding: q, as: UTF8.self))
        }
        if r.remaining != 0 {
            try reply(option, NBDProtocol.repErrInvalid, message: "\(r.remaining) trailing bytes after meta context queries")
            return
        }
        let name = String(decoding: nameBytes, as: UTF8.self)
        guard matches(name) else {
            try reply(option, NBDProtocol.repErrUnknown, message: "unknown export '\(name)'")
            return
        }
        var selected = false
        if isSet {
            selected = queries.contains(NBDProtocol.baseAllocation)
        } else {
            // LIST: no queries means "all"; "base:" lists every context of the namespace.
            selected = queries.isEmpty || queries.contains { $0 == NBDProtocol.baseAllocation || $0 == "base:" }
        }
        if selected {
            var w = ByteWriter()
            w.u32(isSet ? NBDProtocol.baseAllocationID : 0)
            w.bytes.append(contentsOf: NBDProtocol.baseAllocation.utf8)
            try reply(option, NBDProtocol.repMetaContext, data: w.bytes)
        }
        if isSet { session.baseAllocation = selected }
        try reply(option, NBDProtocol.repAck)
    }

    // MARK: blocking socket I/O (handshake only)

    private func reply(_ option: UInt32, _ type: UInt32, data: [UInt8] = [], message: String? = nil) throws(NBDBridgeError) {
        var payload = data
        if let message { payload = Array(message.utf8.prefix(NBDProtocol.maxString)) }
        var w = ByteWriter()
        w.u64(NBDProtocol.optionReplyMagic); w.u32(option); w.u32(type); w.u32(UInt32(payload.count))
        w.bytes.append(contentsOf: payload)
        try send(w.bytes)
    }

    private func send(_ bytes: [UInt8]) throws(NBDBridgeError) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw NBDBridgeError(Errno(rawValue: errno), "handshake send of \(bytes.count) bytes failed after \(sent)")
            }
            sent += n
        }
    }

    private func readBytes(_ count: Int) throws(NBDBridgeError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n == 0 { throw NBDBridgeError(.connectionReset, "client closed during handshake with \(count - got) of \(count) bytes unread") }
            if n < 0 {
                if errno == EINTR { continue }
                throw NBDBridgeError(Errno(rawValue: errno), "handshake recv of \(count) bytes failed after \(got)")
            }
            got += n
        }
        return bytes
    }

    private func discard(_ count: Int) throws(NBDBridgeError) {
        var left = count
        while left > 0 {
            let chunk = min(left, 65536)
            _ = try readBytes(chunk)
            left -= chunk
        }
    }

    private func readU32() throws(NBDBridgeError) -> UInt32 {
        var r = ByteReader(try readBytes(4)); return r.u32()!
    }

    private func readU64() throws(NBDBridgeError) -> UInt64 {
        var r = ByteReader(try readBytes(8)); return r.u64()!
    }
}

/// Big-endian encoding into a byte array (handshake messages only; not a hot path).
struct ByteWriter {
    var bytes: [UInt8] = []
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
}

/// Big-endian decoding from a byte array, returning nil instead of reading past the end.
struct ByteReader {
    let bytes: [UInt8]
    var position = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var remaining: Int { bytes.count - position }
    mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard n >= 0, n <= remaining else { return nil }
        defer { position += n }
        return bytes[position..<position + n]
    }
    mutating func u16() -> UInt16? { take(2).map { $0.reduce(0) { $0 << 8 | UInt16($1) } } }
    mutating func u32() -> UInt32? { take(4).map { $0.reduce(0) { $0 << 8 | UInt32($1) } } }
    mutating func u64() -> UInt64? { take(8).map { $0.reduce(0) { $0 << 8 | UInt64($1) } } }
}
