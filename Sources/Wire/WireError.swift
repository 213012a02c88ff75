/// Everything that can be wrong with a frame, or with a message the encoder is asked to write.
///
/// Offsets are byte offsets from the start of the frame (the header is bytes 0-11).
public enum WireError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The header declares a frame (header included) larger than the decoder's maximum.
    case frameTooLarge(length: Int, max: Int)
    /// The header's version byte is not ``FrameHeader/currentVersion``.
    case unsupportedVersion(UInt8)
    /// The header's type byte names no ``MessageType``.
    case unknownMessageType(UInt8)
    /// Reserved header flag bits are set (the value shows all flags).
    case reservedFlags(UInt16)
    /// The frame's declared length ends before a field does.
    case truncated(type: MessageType, field: String, offset: Int, needed: Int, available: Int)
    /// Bytes are left inside the frame after the message ended.
    case trailingBytes(type: MessageType, offset: Int, count: Int)
    /// A field holds a value the protocol forbids (unknown enum value, zero count, overflow...).
    case invalidValue(type: MessageType, field: String, offset: Int, value: UInt64)
    /// A reserved field is not zero.
    case reservedNonZero(type: MessageType, field: String, offset: Int)
    /// The bulk payload is not the size the metadata describes.
    case payloadLengthMismatch(type: MessageType, expected: UInt64, actual: Int)
    /// A string field is not valid UTF-8.
    case invalidUTF8(type: MessageType, field: String, offset: Int)
    /// A count or string is longer than the protocol allows (decoder or encoder).
    case limitExceeded(type: MessageType, field: String, value: Int, max: Int)
    /// The encoder's output buffer is too small for the frame.
    case outputTooSmall(needed: Int, available: Int)

    public var description: String {
        switch self {
        case let .frameTooLarge(length, max):
            return "frame of \(length) bytes exceeds the maximum of \(max) bytes"
        case let .unsupportedVersion(v):
            return "unsupported frame version \(v) at offset 4 (this side speaks version \(FrameHeader.currentVersion))"
        case let .unknownMessageType(t):
            return "unknown message type 0x\(String(t, radix: 16)) at offset 5"
        case let .reservedFlags(f):
            return "reserved flag bits set at offset 6: flags 0x\(String(f, radix: 16)) (only 0x\(String(FrameFlags.known.rawValue, radix: 16)) defined)"
        case let .truncated(type, field, offset, needed, available):
            return "\(type) frame truncated: field '\(field)' at offset \(offset) needs \(needed) bytes, \(available) left in the frame"
        case let .trailingBytes(type, offset, count):
            return "\(type) frame has \(count) trailing bytes at offset \(offset)"
        case let .invalidValue(type, field, offset, value):
            return "\(type) frame: invalid \(field) \(value) (0x\(String(value, radix: 16))) at offset \(offset)"
        case let .reservedNonZero(type, field, offset):
            return "\(type) frame: reserved field '\(field)' at offset \(offset) is not zero"
        case let .payloadLengthMismatch(type, expected, actual):
            return "\(type) frame: metadata describes \(expected) payload bytes but \(actual) are present"
        case let .invalidUTF8(type, field, offset):
            return "\(type) frame: field '\(field)' at offset \(offset) is not valid UTF-8"
        case let .limitExceeded(type, field, value, max):
            return "\(type) frame: \(field) of \(value) exceeds the limit of \(max)"
        case let .outputTooSmall(needed, available):
            return "output buffer too small: frame needs \(needed) bytes, \(available) available"
        }
    }
}
