/// The pure, stateless decoder: bytes in, one frame (header + ``Message``) or a precise
/// ``WireError`` out. No I/O, no hidden buffering.
///
/// Usage: keep received bytes in a buffer; call ``decode(_:)`` on the unread part. `nil` means
/// more bytes are needed; otherwise drop ``DecodedFrame/consumed`` bytes after using the message.
/// A header declaring a frame larger than ``maxFrameSize`` is refused as soon as its 12 bytes are
/// present, before the body is awaited. Every count and length is checked against the bytes the
/// frame really holds before it is used, with overflow-checked arithmetic; the decoder never reads
/// outside the buffer, never loops more than the frame's size allows, and allocates only for small
/// metadata (names, region and digest lists) whose bytes are known to be present.
public struct FrameDecoder: Sendable {
    /// Default largest frame, header included: 16 MiB of payload plus 64 KiB for metadata.
    public static let defaultMaxFrameSize = 16 << 20 + 64 << 10

    /// Largest frame accepted, header included.
    public let maxFrameSize: Int

    /// A decoder refusing frames (header included) larger than `maxFrameSize`, clamped to
    /// `FrameHeader.size ... FrameHeader.size + UInt32.max`.
    public init(maxFrameSize: Int = FrameDecoder.defaultMaxFrameSize) {
        self.maxFrameSize = min(max(maxFrameSize, FrameHeader.size), FrameHeader.size + Int(UInt32.max))
    }

    /// Parses and checks a header from the start of `buffer`: version, size limit, type and flags.
    /// Returns nil when fewer than 12 bytes are present.
    public func decodeHeader(_ buffer: UnsafeRawBufferPointer) throws(WireError) -> FrameHeader? {
        guard buffer.count >= FrameHeader.size else { return nil }
        let length = UInt32(littleEndian: buffer.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        let version = buffer.load(fromByteOffset: 4, as: UInt8.self)
        let rawType = buffer.load(fromByteOffset: 5, as: UInt8.self)
        let flags = UInt16(littleEndian: buffer.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        let sequence = UInt32(littleEndian: buffer.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        if version != FrameHeader.currentVersion { throw .unsupportedVersion(version) }
        let total = FrameHeader.size + Int(length)
        if total > maxFrameSize { throw .frameTooLarge(length: total, max: maxFrameSize) }
        guard let type = MessageType(rawValue: rawType) else { throw .unknownMessageType(rawType) }
        if flags & ~FrameFlags.known.rawValue != 0 { throw .reservedFlags(flags) }
        return FrameHeader(payloadLength: length, type: type, flags: FrameFlags(rawValue: flags),
                           sequence: sequence, version: version)
    }

    /// Decodes one frame from the start of `buffer`. Returns nil when the buffer holds less than a
    /// whole frame (after checking the header, once 12 bytes are there). Payload views in the result
    /// point into `buffer`.
    public func decode(_ buffer: UnsafeRawBufferPointer) throws(WireError) -> DecodedFrame? {
        guard let header = try decodeHeader(buffer) else { return nil }
        guard buffer.count >= header.frameSize else { return nil }
        let body = UnsafeRawBufferPointer(rebasing: buffer[FrameHeader.size..<header.frameSize])
        let message = try decodeBody(body, type: header.type)
        return DecodedFrame(header: header, message: message)
    }

    /// Decodes a message body (the `payloadLength` bytes after a header) of the given type.
    /// The body must be exactly one message: trailing bytes are an error.
    public func decodeBody(_ body: UnsafeRawBufferPointer, type: MessageType) throws(WireError) -> Message {
        var r = ByteReader(body: body, type: type)
        let message: Message
        switch type {
        case .hello:
            message = .hello(try Hello.decode(from: &r))
        case .helloAck:
            let proof = try r.bytes32("proof")
            message = .helloAck(try Hello.decode(from: &r), proof: proof)
        case .auth:
            message = .auth(proof: try r.bytes32("proof"))
        case .challenge:
            message = .challenge(nonce: try r.bytes32("nonce"))
        case .diskLayout:
            message = .diskLayout(try DiskLayout.decode(from: &r))
        case .diskExtents:
            message = .diskExtents(try DiskExtents.decode(from: &r))
        case .diskFetch:
            message = .diskFetch(try DiskFetch.decode(from: &r))
        case .diskReply:
            let request = try r.u64("requestID")
            message = .diskReply(requestID: request, extents: try DiskExtents.decode(from: &r))
        case .diskSkip:
            message = .diskSkip(try DiskRange.decode(from: &r))
        case .diskHeld:
            message = .diskHeld(try DiskHeld.decode(from: &r))
        case .memoryLayout:
            message = .memoryLayout(try GuestMemoryLayout.decode(from: &r))
        case .pageBatch:
            message = .pageBatch(try PageBatch.decode(from: &r))
        case .pageRequest:
            message = .pageRequest(try PageRequest.decode(from: &r))
        case .pageReply:
            let request = try r.u64("requestID")
            message = .pageReply(requestID: request, batch: try PageBatch.decode(from: &r))
        case .pageDiscard:
            message = .pageDiscard(try PageRange.decode(from: &r))
        case .roundEnd:
            message = .roundEnd(try RoundEnd.decode(from: &r))
        case .switchover:
            message = .switchover(try Switchover.decode(from: &r))
        case .vmState:
            message = .vmState(try VMStateChunk.decode(from: &r))
        case .complete:
            message = .complete(try Completion.decode(from: &r))
        case .resumed:
            message = .resumed(try VMResumed.decode(from: &r))
        case .ack:
            message = .ack(try Ack.decode(from: &r))
        case .keepalive:
            message = .keepalive(try Keepalive.decode(from: &r))
        case .tunnelFrames:
            message = .tunnelFrames(try TunnelFrames.decode(from: &r))
        case .error:
            message = .error(try ErrorMessage.decode(from: &r))
        }
        try r.end()
        return message
    }
}

/// One decoded frame: its header and message. The message's payload views point into the buffer
/// given to ``FrameDecoder/decode(_:)``.
public struct DecodedFrame: Equatable, Sendable {
    /// The checked header (lane flags and sequence number included).
    public var header: FrameHeader
    /// The message.
    public var message: Message
    /// Bytes of the input this frame occupied: drop them before decoding the next frame.
    public var consumed: Int { header.frameSize }

    /// A frame from its parts (a receiver that opens sealed frames decodes header and body apart).
    public init(header: FrameHeader, message: Message) {
        self.header = header
        self.message = message
    }
}
