/// An acknowledgement (`ack`): the receiver has durably applied a stream up to a point. Used for
/// flow control (the sender bounds unacknowledged bytes) and as the resume point after a drop.
///
/// Layout (24 bytes): `u8 stream, u8 reserved, u16 reserved, u32 streamID, u64 sequence, u64 offset`.
public struct Ack: Hashable, Sendable {
    /// Which stream.
    public var stream: StreamKind
    /// Disk id, region id, or 0.
    public var streamID: UInt32
    /// Highest frame sequence number applied (all lower ones too).
    public var sequence: UInt64
    /// Byte offset (disk, VM state) or page index (memory) applied up to, or 0 if not meaningful.
    public var offset: UInt64

    public init(stream: StreamKind, streamID: UInt32, sequence: UInt64, offset: UInt64) {
        self.stream = stream; self.streamID = streamID; self.sequence = sequence; self.offset = offset
    }

    /// The source's last frame after a completed migration: it has the destination's `complete`,
    /// so the destination need not answer a reconnect with it again (control stream, all ones).
    public static let goodbye = Ack(stream: .control, streamID: 0, sequence: .max, offset: .max)

    static func decode(from r: inout ByteReader) throws(WireError) -> Ack {
        let kindAt = r.frameOffset
        let rawKind = try r.u8("stream")
        guard let kind = StreamKind(rawValue: rawKind) else { throw r.invalid("stream", rawKind, at: kindAt) }
        try r.reserved(3, "reserved")
        return Ack(stream: kind, streamID: try r.u32("streamID"), sequence: try r.u64("sequence"),
                   offset: try r.u64("offset"))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int { 24 }

    func write(to w: inout ByteWriter) {
        w.u8(stream.rawValue); w.zeros(3); w.u32(streamID); w.u64(sequence); w.u64(offset)
    }
}

/// A liveness probe and RTT sample (`keepalive`). The receiver of a probe (`isEcho` false) sends it
/// back unchanged but with `isEcho` true; the prober's RTT is now - `timestampNanoseconds`.
///
/// Layout (16 bytes): `u64 timestampNanoseconds, u8 isEcho (0 or 1), u8 reserved, u16 reserved, u32 reserved`.
public struct Keepalive: Hashable, Sendable {
    /// The prober's monotonic clock, in nanoseconds, when it sent the probe.
    public var timestampNanoseconds: UInt64
    /// False for a probe, true for its echo.
    public var isEcho: Bool

    public init(timestampNanoseconds: UInt64, isEcho: Bool) {
        self.timestampNanoseconds = timestampNanoseconds; self.isEcho = isEcho
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> Keepalive {
        let ts = try r.u64("timestampNanoseconds")
        let echoAt = r.frameOffset
        let echo = try r.u8("isEcho")
        if echo > 1 { throw r.invalid("isEcho", echo, at: echoAt) }
        try r.reserved(7, "reserved")
        return Keepalive(timestampNanoseconds: ts, isEcho: echo == 1)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int { 16 }

    func write(to w: inout ByteWriter) { w.u64(timestampNanoseconds); w.u8(isEcho ? 1 : 0); w.zeros(7) }
}

/// The reason code of an `error` frame. Codes this version does not know are kept as ``unknown(_:)``
/// so they can be logged and forwarded unchanged. docs/wire.md says what each side does on each.
public enum ErrorCode: Hashable, Sendable, CustomStringConvertible {
    /// The peer sent a frame the decoder rejected or one that is out of order for the phase.
    case protocolViolation
    /// No common protocol version.
    case unsupportedVersion
    /// The HMAC proof did not verify (wrong key, or a tampered handshake).
    case authenticationFailed
    /// A required feature or the cipher suite is not supported by the peer.
    case featureMismatch
    /// A resume named a session this side does not hold (or no longer can resume).
    case unknownSession
    /// The destination cannot take a layout (disk too big, page size unsupported, region clash).
    case layoutMismatch
    /// Reading or writing disk or memory failed on the sender of the error.
    case storageFailure
    /// The destination ran out of space.
    case outOfSpace
    /// The digests in `complete` do not agree.
    case digestMismatch
    /// The operator or a policy aborted the migration.
    case aborted
    /// A peer-side timeout (no progress, no keepalive echo, switchover too slow).
    case timeout
    /// The destination is busy with another session.
    case busy
    /// The destination could not start the VM after switchover.
    case vmStartFailed
    /// A bug or unexpected condition on the sender of the error.
    case internalError
    /// A code this version does not know.
    case unknown(UInt16)

    /// Maps a wire value to a code, keeping unknown values.
    public init(rawValue: UInt16) {
        switch rawValue {
        case 1: self = .protocolViolation
        case 2: self = .unsupportedVersion
        case 3: self = .authenticationFailed
        case 4: self = .featureMismatch
        case 5: self = .unknownSession
        case 6: self = .layoutMismatch
        case 7: self = .storageFailure
        case 8: self = .outOfSpace
        case 9: self = .digestMismatch
        case 10: self = .aborted
        case 11: self = .timeout
        case 12: self = .busy
        case 13: self = .vmStartFailed
        case 14: self = .internalError
        default: self = .unknown(rawValue)
        }
    }

    /// The wire value.
    public var rawValue: UInt16 {
        switch self {
        case .protocolViolation: return 1
        case .unsupportedVersion: return 2
        case .authenticationFailed: return 3
        case .featureMismatch: return 4
        case .unknownSession: return 5
        case .layoutMismatch: return 6
        case .storageFailure: return 7
        case .outOfSpace: return 8
        case .digestMismatch: return 9
        case .aborted: return 10
        case .timeout: return 11
        case .busy: return 12
        case .vmStartFailed: return 13
        case .internalError: return 14
        case .unknown(let v): return v
        }
    }

    /// Whether the migration may be retried by reconnecting and resuming (see docs/wire.md).
    public var isRetryable: Bool {
        switch self {
        case .timeout, .busy: return true
        default: return false
        }
    }

    /// The code's name as used in docs/wire.md.
    public var name: String {
        switch self {
        case .protocolViolation: return "protocolViolation"
        case .unsupportedVersion: return "unsupportedVersion"
        case .authenticationFailed: return "authenticationFailed"
        case .featureMismatch: return "featureMismatch"
        case .unknownSession: return "unknownSession"
        case .layoutMismatch: return "layoutMismatch"
        case .storageFailure: return "storageFailure"
        case .outOfSpace: return "outOfSpace"
        case .digestMismatch: return "digestMismatch"
        case .aborted: return "aborted"
        case .timeout: return "timeout"
        case .busy: return "busy"
        case .vmStartFailed: return "vmStartFailed"
        case .internalError: return "internalError"
        case .unknown: return "unknown"
        }
    }

    public var description: String { "\(name)(\(rawValue))" }
}

/// A fatal or informational error (`error`): a code and a human-readable reason. The sender closes
/// the connection after sending it unless the code says otherwise (docs/wire.md).
///
/// Layout (4 bytes + reason): `u16 code, u16 reasonLength, reasonLength bytes of UTF-8 (≤ 1024)`.
public struct ErrorMessage: Hashable, Sendable {
    /// Longest reason in UTF-8 bytes.
    public static let maxReasonLength = 1024

    /// What went wrong.
    public var code: ErrorCode
    /// Details for the operator's log: what failed, with numbers.
    public var reason: String

    public init(code: ErrorCode, reason: String) { self.code = code; self.reason = reason }

    /// Makes an error message whose reason is cut (at a character boundary) to fit ``maxReasonLength``.
    public static func truncating(code: ErrorCode, reason: String) -> ErrorMessage {
        if reason.utf8.count <= maxReasonLength { return ErrorMessage(code: code, reason: reason) }
        var cut = ""
        var bytes = 0
        for ch in reason {
            let n = ch.utf8.count
            if bytes + n > maxReasonLength { break }
            cut.append(ch); bytes += n
        }
        return ErrorMessage(code: code, reason: cut)
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> ErrorMessage {
        let code = ErrorCode(rawValue: try r.u16("code"))
        let length = try r.u16("reasonLength")
        return ErrorMessage(code: code, reason: try r.string(length: length, max: maxReasonLength, "reason"))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        let n = reason.utf8.count
        if n > ErrorMessage.maxReasonLength {
            throw .limitExceeded(type: type, field: "reason", value: n, max: ErrorMessage.maxReasonLength)
        }
        return 4 + n
    }

    func write(to w: inout ByteWriter) { w.u16(code.rawValue); w.u16(UInt16(reason.utf8.count)); w.utf8(reason) }
}
