/// The encoder: writes frames into memory the caller owns, with no allocation of its own.
///
/// Three ways to use it:
/// - ``encode(_:sequence:urgent:into:)`` writes the whole frame (header, metadata, payload) into a
///   caller-provided buffer, e.g. a slot of a preallocated send-buffer pool; one `memcpy` of the payload.
/// - ``encodePrefix(_:sequence:urgent:into:)`` writes only the header and metadata; the header's length
///   still counts the payload, which the caller sends straight from where it lives with scatter-gather
///   I/O (`writev` / `sendmsg` / io_uring `SENDMSG`): zero copies.
/// - ``encode(_:sequence:urgent:appendingTo:)`` appends to a reused `[UInt8]`: no allocation once the
///   array's capacity has grown to the largest frame.
///
/// Every message is validated first (limits, counts, payload length against the metadata) and
/// errors are thrown before anything is written.
public enum FrameEncoder {
    /// Sizes of the two parts of a message's frame: header + metadata (`prefix`), and bulk `payload`.
    public static func sizes(of message: Message) throws(WireError) -> (prefix: Int, payload: Int) {
        let type = message.type
        let metadata: Int
        switch message {
        case .hello(let m): metadata = try m.metadataSize(as: type)
        case .helloAck(let m, _): metadata = Bytes32.size + (try m.metadataSize(as: type))
        case .auth, .challenge: metadata = Bytes32.size
        case .diskLayout(let m): metadata = try m.metadataSize(as: type)
        case .diskExtents(let m): metadata = try m.metadataSize(as: type)
        case .diskFetch(let m): metadata = try m.metadataSize(as: type)
        case .diskReply(_, let m): metadata = 8 + (try m.metadataSize(as: type))
        case .diskSkip(let m): metadata = try m.metadataSize(as: type)
        case .diskHeld(let m): metadata = try m.metadataSize(as: type)
        case .memoryLayout(let m): metadata = try m.metadataSize(as: type)
        case .pageBatch(let m): metadata = try m.metadataSize(as: type)
        case .pageRequest(let m): metadata = try m.metadataSize(as: type)
        case .pageReply(_, let m): metadata = 8 + (try m.metadataSize(as: type, base: 8))
        case .pageDiscard(let m): metadata = try m.metadataSize(as: type)
        case .roundEnd(let m): metadata = try m.metadataSize(as: type)
        case .switchover(let m): metadata = try m.metadataSize(as: type)
        case .vmState(let m): metadata = try m.metadataSize(as: type)
        case .complete(let m): metadata = try m.metadataSize(as: type)
        case .resumed(let m): metadata = try m.metadataSize(as: type)
        case .ack(let m): metadata = try m.metadataSize(as: type)
        case .keepalive(let m): metadata = try m.metadataSize(as: type)
        case .tunnelFrames(let m): metadata = try m.metadataSize(as: type)
        case .error(let m): metadata = try m.metadataSize(as: type)
        }
        let payload = message.payload.count
        if metadata + payload > Int(UInt32.max) {
            throw .limitExceeded(type: type, field: "payloadLength", value: metadata + payload, max: Int(UInt32.max))
        }
        return (FrameHeader.size + metadata, payload)
    }

    /// Total bytes the frame for `message` takes.
    public static func frameSize(of message: Message) throws(WireError) -> Int {
        let s = try sizes(of: message)
        return s.prefix + s.payload
    }

    /// Writes header and metadata of `message` at the start of `output` and returns the bytes written.
    /// The header's `payloadLength` includes `message.payload`, which the caller must send right after
    /// (the payload itself is not copied).
    ///
    /// - Parameters:
    ///   - sequence: the header's sequence number (0 when the frame is not sequenced).
    ///   - urgent: lane override; nil uses ``MessageType/isUrgentByDefault``.
    ///   - sealed: the frame will be sealed, so the header's length counts the tags the caller sends
    ///     with it (``SealedRecords/overhead(bodyBytes:)``).
    public static func encodePrefix(_ message: Message, sequence: UInt32 = 0, urgent: Bool? = nil, sealed: Bool = false,
                                    into output: UnsafeMutableRawBufferPointer) throws(WireError) -> Int {
        let (prefix, payload) = try sizes(of: message)
        if output.count < prefix { throw .outputTooSmall(needed: prefix, available: output.count) }
        let trailer = sealed ? SealedRecords.overhead(bodyBytes: prefix - FrameHeader.size + payload) : 0
        if prefix - FrameHeader.size + payload + trailer > Int(UInt32.max) {
            throw .limitExceeded(type: message.type, field: "payloadLength", value: prefix - FrameHeader.size + payload + trailer,
                                 max: Int(UInt32.max))
        }
        writePrefix(message, prefix: prefix, payload: payload + trailer, sequence: sequence, urgent: urgent, into: output)
        return prefix
    }

    /// Writes the whole frame for `message` (header, metadata, payload) at the start of `output` and
    /// returns the bytes written.
    public static func encode(_ message: Message, sequence: UInt32 = 0, urgent: Bool? = nil,
                              into output: UnsafeMutableRawBufferPointer) throws(WireError) -> Int {
        let (prefix, payload) = try sizes(of: message)
        if output.count < prefix + payload {
            throw .outputTooSmall(needed: prefix + payload, available: output.count)
        }
        writePrefix(message, prefix: prefix, payload: payload, sequence: sequence, urgent: urgent, into: output)
        if payload > 0 {
            (output.baseAddress! + prefix).copyMemory(from: message.payload.bytes.baseAddress!, byteCount: payload)
        }
        return prefix + payload
    }

    /// Appends the whole frame for `message` to `output`. Reuse one array (clear it with
    /// `removeAll(keepingCapacity: true)`) so that no frame allocates once it has grown.
    public static func encode(_ message: Message, sequence: UInt32 = 0, urgent: Bool? = nil,
                              appendingTo output: inout [UInt8]) throws(WireError) {
        let (prefix, payload) = try sizes(of: message)
        let start = output.count
        output.append(contentsOf: repeatElement(0, count: prefix + payload))
        output.withUnsafeMutableBytes { raw in
            let out = UnsafeMutableRawBufferPointer(rebasing: raw[start...])
            writePrefix(message, prefix: prefix, payload: payload, sequence: sequence, urgent: urgent, into: out)
            if payload > 0 {
                (out.baseAddress! + prefix).copyMemory(from: message.payload.bytes.baseAddress!, byteCount: payload)
            }
        }
    }

    /// Writes an already validated message's header and metadata; `output` has room for `prefix`.
    private static func writePrefix(_ message: Message, prefix: Int, payload: Int, sequence: UInt32,
                                    urgent: Bool?, into output: UnsafeMutableRawBufferPointer) {
        let type = message.type
        let flags: FrameFlags = (urgent ?? type.isUrgentByDefault) ? .urgent : []
        FrameHeader(payloadLength: UInt32(prefix - FrameHeader.size + payload), type: type, flags: flags,
                    sequence: sequence).store(to: output.baseAddress!)
        var w = ByteWriter(output, offset: FrameHeader.size)
        switch message {
        case .hello(let m): m.write(to: &w)
        case .helloAck(let m, let proof): w.bytes32(proof); m.write(to: &w)
        case .auth(let proof): w.bytes32(proof)
        case .challenge(let nonce): w.bytes32(nonce)
        case .diskLayout(let m): m.write(to: &w)
        case .diskExtents(let m): m.write(to: &w)
        case .diskFetch(let m): m.write(to: &w)
        case .diskReply(let request, let m): w.u64(request); m.write(to: &w)
        case .diskSkip(let m): m.write(to: &w)
        case .diskHeld(let m): m.write(to: &w)
        case .memoryLayout(let m): m.write(to: &w)
        case .pageBatch(let m): m.write(to: &w)
        case .pageRequest(let m): m.write(to: &w)
        case .pageReply(let request, let m): w.u64(request); m.write(to: &w)
        case .pageDiscard(let m): m.write(to: &w)
        case .roundEnd(let m): m.write(to: &w)
        case .switchover(let m): m.write(to: &w)
        case .vmState(let m): m.write(to: &w)
        case .complete(let m): m.write(to: &w)
        case .resumed(let m): m.write(to: &w)
        case .ack(let m): m.write(to: &w)
        case .keepalive(let m): m.write(to: &w)
        case .tunnelFrames(let m): m.write(to: &w)
        case .error(let m): m.write(to: &w)
        }
        assert(w.offset == prefix, "metadata of \(type) wrote \(w.offset) bytes, sized \(prefix)")
    }
}
