/// The fixed 12-byte header that starts every Ferry frame (all fields little-endian).
///
/// | offset | size | field          | meaning                                                        |
/// |-------:|-----:|----------------|----------------------------------------------------------------|
/// | 0      | 4    | payloadLength  | bytes that follow the header (metadata + payload [+ AEAD tag]) |
/// | 4      | 1    | version        | frame format version, ``FrameHeader/currentVersion`` (2)       |
/// | 5      | 1    | type           | ``MessageType``                                                |
/// | 6      | 2    | flags          | ``FrameFlags``: bit 0 urgent lane, bits 1-15 reserved (zero)   |
/// | 8      | 4    | sequence       | sender's frame sequence number for acks and resume (0 = none)  |
public struct FrameHeader: Equatable, Hashable, Sendable {
    /// Size of the encoded header in bytes.
    public static let size = 12
    /// The only frame format version this module reads and writes.
    public static let currentVersion: UInt8 = 2

    /// Bytes that follow the header: the message's metadata and its bulk payload.
    public var payloadLength: UInt32
    /// Frame format version; always ``currentVersion`` for frames this module accepts.
    public var version: UInt8
    /// What the frame carries.
    public var type: MessageType
    /// Lane and reserved bits.
    public var flags: FrameFlags
    /// The sender's sequence number for this frame (see docs/wire.md, "Sequence numbers and acks").
    public var sequence: UInt32

    /// Makes a header; `version` defaults to ``currentVersion``.
    public init(payloadLength: UInt32, type: MessageType, flags: FrameFlags = [],
                sequence: UInt32 = 0, version: UInt8 = FrameHeader.currentVersion) {
        self.payloadLength = payloadLength
        self.version = version
        self.type = type
        self.flags = flags
        self.sequence = sequence
    }

    /// Total size of the frame this header starts: header plus payload.
    public var frameSize: Int { FrameHeader.size + Int(payloadLength) }

    /// Writes the 12 header bytes at `pointer` (which must have room for ``size`` bytes).
    @inlinable
    public func store(to pointer: UnsafeMutableRawPointer) {
        pointer.storeBytes(of: payloadLength.littleEndian, toByteOffset: 0, as: UInt32.self)
        pointer.storeBytes(of: version, toByteOffset: 4, as: UInt8.self)
        pointer.storeBytes(of: type.rawValue, toByteOffset: 5, as: UInt8.self)
        pointer.storeBytes(of: flags.rawValue.littleEndian, toByteOffset: 6, as: UInt16.self)
        pointer.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt32.self)
    }
}

/// Bits of the header's `flags` field.
public struct FrameFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// The frame belongs to the urgent lane (post-copy requests and replies): a sender
    /// queues it ahead of bulk frames, on a separate connection where one exists.
    public static let urgent = FrameFlags(rawValue: 1 << 0)

    /// Every bit this version defines; any other bit set is a protocol error.
    public static let known: FrameFlags = [.urgent]
}
