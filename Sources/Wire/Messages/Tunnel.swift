/// Ethernet frames of the VM carried over the tunnel lane (`tunnelFrames`, docs/network.md): from
/// switchover on, the source forwards what reaches its host for the VM and the destination sends
/// the VM's frames back for the old host's segment, so the VM's connections survive the move.
///
/// Layout: metadata (16 bytes) `u64 vmMAC (the VM's MAC in the low 48 bits, most significant byte
/// first as on the wire; the top 16 bits zero), u16 frameCount, u16 reserved, u32 reserved`;
/// payload: `frameCount` records of `u16 length` (little-endian, like every field) then `length` bytes of one Ethernet frame (from the
/// destination MAC on, no preamble or checksum), filling the payload exactly. A batch with no frame
/// announces the VM's MAC when a lane opens.
public struct TunnelFrames: Equatable, Sendable {
    /// Most frames in one batch.
    public static let maxFrames = 1024
    /// Shortest frame: an Ethernet header.
    public static let minFrameLength = 14
    /// Longest frame: a 9000-byte jumbo frame with its header and a VLAN tag, with room to spare.
    public static let maxFrameLength = 9216

    /// The VM's MAC address in the low 48 bits.
    public var vmMAC: UInt64
    /// Frames in ``payload``.
    public var frameCount: Int
    /// The frame records (zero-copy; see ``Payload``).
    public var payload: Payload

    /// A batch of `frameCount` records already laid out in `payload` (see ``TunnelFrameBatch``).
    public init(vmMAC: UInt64, frameCount: Int, payload: Payload) {
        self.vmMAC = vmMAC; self.frameCount = frameCount; self.payload = payload
    }

    /// Calls `body` with each frame of the batch in order. The records were checked when the batch
    /// was decoded or encoded.
    public func forEachFrame<E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> Void) throws(E) {
        let bytes = payload.bytes
        var at = 0
        for _ in 0..<frameCount {
            let length = Int(bytes[at]) | Int(bytes[at + 1]) << 8
            try body(UnsafeRawBufferPointer(rebasing: bytes[(at + 2)..<(at + 2 + length)]))
            at += 2 + length
        }
    }

    /// Checks that `records` (at frame offset `base`) holds exactly `count` well-formed records:
    /// the error for the first that is not, or nil.
    static func check(_ records: UnsafeRawBufferPointer, count: Int, base: Int) -> WireError? {
        var at = 0
        for _ in 0..<count {
            let left = records.count - at
            guard left >= 2 else { return .truncated(type: .tunnelFrames, field: "frame length", offset: base + at, needed: 2, available: left) }
            let length = Int(records[at]) | Int(records[at + 1]) << 8
            guard length >= minFrameLength, length <= maxFrameLength else {
                return .invalidValue(type: .tunnelFrames, field: "frame length", offset: base + at, value: UInt64(length))
            }
            guard left - 2 >= length else { return .truncated(type: .tunnelFrames, field: "frame", offset: base + at + 2, needed: length, available: left - 2) }
            at += 2 + length
        }
        return at == records.count ? nil : .trailingBytes(type: .tunnelFrames, offset: base + at, count: records.count - at)
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> TunnelFrames {
        let macAt = r.frameOffset
        let mac = try r.u64("vmMAC")
        if mac >> 48 != 0 { throw r.invalid("vmMAC", mac, at: macAt) }
        let countAt = r.frameOffset
        let count = try r.u16("frameCount")
        if Int(count) > maxFrames { throw r.invalid("frameCount", count, at: countAt) }
        try r.reserved(6, "reserved")
        let recordsAt = r.frameOffset
        let records = r.rest()
        if let error = check(records, count: Int(count), base: recordsAt) { throw error }
        return TunnelFrames(vmMAC: mac, frameCount: Int(count), payload: Payload(records))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if vmMAC >> 48 != 0 { throw .invalidValue(type: type, field: "vmMAC", offset: FrameHeader.size, value: vmMAC) }
        if frameCount < 0 || frameCount > Self.maxFrames {
            throw .limitExceeded(type: type, field: "frameCount", value: frameCount, max: Self.maxFrames)
        }
        if let error = Self.check(payload.bytes, count: frameCount, base: FrameHeader.size + 16) { throw error }
        return 16
    }

    func write(to w: inout ByteWriter) { w.u64(vmMAC); w.u16(UInt16(frameCount)); w.zeros(6) }
}

/// Builds ``TunnelFrames`` batches in one reused buffer: frames are appended as records until the
/// batch is full, sent, and the buffer is reused. Allocates only when made. Owned by one thread.
public struct TunnelFrameBatch: ~Copyable {
    private let buffer: UnsafeMutableRawBufferPointer
    /// Bytes of records so far.
    public private(set) var byteCount = 0
    /// Frames so far.
    public private(set) var frameCount = 0

    /// A batch of at most `capacity` bytes of records (at least one largest frame).
    public init(capacity: Int = 64 << 10) {
        buffer = .allocate(byteCount: max(capacity, TunnelFrames.maxFrameLength + 2), alignment: 16)
    }

    deinit { buffer.deallocate() }

    /// Whether `length` more bytes of frame fit (and the frame count allows one more).
    public func hasRoom(for length: Int) -> Bool {
        frameCount < TunnelFrames.maxFrames && buffer.count - byteCount >= length + 2
    }

    /// Appends one frame; false (nothing appended) when it does not fit or is not a valid frame length.
    public mutating func append(_ frame: UnsafeRawBufferPointer) -> Bool {
        guard frame.count >= TunnelFrames.minFrameLength, frame.count <= TunnelFrames.maxFrameLength, hasRoom(for: frame.count) else { return false }
        buffer[byteCount] = UInt8(frame.count & 0xff)
        buffer[byteCount + 1] = UInt8(frame.count >> 8)
        (buffer.baseAddress! + byteCount + 2).copyMemory(from: frame.baseAddress!, byteCount: frame.count)
        byteCount += 2 + frame.count
        frameCount += 1
        return true
    }

    /// The batch as a message for the VM with MAC `vmMAC`, valid until the next change to the batch.
    public func message(vmMAC: UInt64) -> Message {
        .tunnelFrames(TunnelFrames(vmMAC: vmMAC, frameCount: frameCount,
                                   payload: Payload(UnsafeRawBufferPointer(rebasing: buffer[..<byteCount]))))
    }

    /// Empties the batch.
    public mutating func reset() { byteCount = 0; frameCount = 0 }
}
