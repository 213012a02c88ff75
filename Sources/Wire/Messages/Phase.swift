/// The end of one round of a stream (`roundEnd`): what was sent and what is still dirty, so the
/// receiver can acknowledge it and both sides can judge convergence.
///
/// Layout (40 bytes): `u8 stream, u8 reserved, u16 reserved, u32 streamID, u32 round, u32 reserved,
/// u64 itemsSent, u64 bytesSent, u64 dirtyRemaining`.
public struct RoundEnd: Hashable, Sendable {
    /// Disk or memory.
    public var stream: StreamKind
    /// Disk id, or region id / 0 for all memory.
    public var streamID: UInt32
    /// The round that ended (0 = bulk copy).
    public var round: UInt32
    /// Blocks (disk) or pages (memory) sent in the round, zero runs included.
    public var itemsSent: UInt64
    /// Wire bytes of the round's frames.
    public var bytesSent: UInt64
    /// Blocks or pages dirtied during the round, still to send.
    public var dirtyRemaining: UInt64

    public init(stream: StreamKind, streamID: UInt32, round: UInt32, itemsSent: UInt64,
                bytesSent: UInt64, dirtyRemaining: UInt64) {
        self.stream = stream; self.streamID = streamID; self.round = round
        self.itemsSent = itemsSent; self.bytesSent = bytesSent; self.dirtyRemaining = dirtyRemaining
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> RoundEnd {
        let kindAt = r.frameOffset
        let rawKind = try r.u8("stream")
        guard let kind = StreamKind(rawValue: rawKind) else { throw r.invalid("stream", rawKind, at: kindAt) }
        try r.reserved(3, "reserved")
        let id = try r.u32("streamID")
        let round = try r.u32("round")
        try r.reserved(4, "reserved")
        return RoundEnd(stream: kind, streamID: id, round: round, itemsSent: try r.u64("itemsSent"),
                        bytesSent: try r.u64("bytesSent"), dirtyRemaining: try r.u64("dirtyRemaining"))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int { 40 }

    func write(to w: inout ByteWriter) {
        w.u8(stream.rawValue); w.zeros(3); w.u32(streamID); w.u32(round); w.zeros(4)
        w.u64(itemsSent); w.u64(bytesSent); w.u64(dirtyRemaining)
    }
}

/// What continues after switchover.
public struct SwitchoverMode: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// The destination resumes the VM before all memory arrived and requests missing pages.
    public static let memoryPostcopy = SwitchoverMode(rawValue: 1 << 0)
    /// The destination serves the disk before all blocks arrived and fetches missing ones.
    public static let diskPostcopy = SwitchoverMode(rawValue: 1 << 1)
    /// Every bit v1 defines.
    public static let known: SwitchoverMode = [.memoryPostcopy, .diskPostcopy]
}

/// The phase marker sent when the source has paused the VM (`switchover`): what is still to come,
/// so the destination knows when it has everything.
///
/// Layout (32 bytes): `u32 finalRound, u8 mode, u8 reserved, u16 reserved, u64 diskBytesToCome,
/// u64 memoryPagesToCome, u64 vmStateLength`.
public struct Switchover: Hashable, Sendable {
    /// The round number of the final (stop-and-copy) deltas that follow.
    public var finalRound: UInt32
    /// Post-copy for memory and/or disk, or neither (pure pre-copy).
    public var mode: SwitchoverMode
    /// Disk bytes still to send (final deltas, plus everything not yet sent under disk post-copy).
    public var diskBytesToCome: UInt64
    /// Memory pages still to send (final dirty set, or everything left under post-copy).
    public var memoryPagesToCome: UInt64
    /// Total length of the VM-state blob that follows in `vmState` chunks (0 = none).
    public var vmStateLength: UInt64

    public init(finalRound: UInt32, mode: SwitchoverMode, diskBytesToCome: UInt64,
                memoryPagesToCome: UInt64, vmStateLength: UInt64) {
        self.finalRound = finalRound; self.mode = mode; self.diskBytesToCome = diskBytesToCome
        self.memoryPagesToCome = memoryPagesToCome; self.vmStateLength = vmStateLength
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> Switchover {
        let round = try r.u32("finalRound")
        let modeAt = r.frameOffset
        let rawMode = try r.u8("mode")
        let mode = SwitchoverMode(rawValue: rawMode)
        if !SwitchoverMode.known.isSuperset(of: mode) { throw r.invalid("mode", rawMode, at: modeAt) }
        try r.reserved(3, "reserved")
        return Switchover(finalRound: round, mode: mode, diskBytesToCome: try r.u64("diskBytesToCome"),
                          memoryPagesToCome: try r.u64("memoryPagesToCome"),
                          vmStateLength: try r.u64("vmStateLength"))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if !SwitchoverMode.known.isSuperset(of: mode) {
            throw .invalidValue(type: type, field: "mode", offset: FrameHeader.size + 4, value: UInt64(mode.rawValue))
        }
        return 32
    }

    func write(to w: inout ByteWriter) {
        w.u32(finalRound); w.u8(mode.rawValue); w.zeros(3)
        w.u64(diskBytesToCome); w.u64(memoryPagesToCome); w.u64(vmStateLength)
    }
}

/// One chunk of the opaque VM-state blob (`vmState`): device state from the VMM, carried as is.
///
/// Layout (16 bytes + chunk): `u64 totalLength, u64 offset, chunk bytes` with offset + chunk ≤ total.
public struct VMStateChunk: Equatable, Sendable {
    /// Length of the whole blob.
    public var totalLength: UInt64
    /// Where this chunk goes in the blob.
    public var offset: UInt64
    /// The chunk's bytes (zero-copy; see ``Payload``).
    public var payload: Payload

    public init(totalLength: UInt64, offset: UInt64, payload: Payload) {
        self.totalLength = totalLength; self.offset = offset; self.payload = payload
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> VMStateChunk {
        let total = try r.u64("totalLength")
        let offAt = r.frameOffset
        let off = try r.u64("offset")
        let chunk = r.rest()
        let (end, overflow) = off.addingReportingOverflow(UInt64(chunk.count))
        if overflow || end > total { throw r.invalid("offset", off, at: offAt) }
        return VMStateChunk(totalLength: total, offset: off, payload: Payload(chunk))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(payload.count))
        if overflow || end > totalLength {
            throw .invalidValue(type: type, field: "offset", offset: FrameHeader.size + 8, value: offset)
        }
        return 16
    }

    func write(to w: inout ByteWriter) { w.u64(totalLength); w.u64(offset) }
}

/// The SHA-256 digest of one stream's final contents.
public struct StreamDigest: Hashable, Sendable {
    /// Disk, memory or VM state.
    public var stream: StreamKind
    /// Disk id, or region id / 0 for all memory.
    public var streamID: UInt32
    /// SHA-256 of the stream's bytes (a disk image; memory regions in layout order).
    public var digest: Digest

    public init(stream: StreamKind, streamID: UInt32, digest: Digest) {
        self.stream = stream; self.streamID = streamID; self.digest = digest
    }

    static let size = 40
}

/// The end of a migration (`complete`): each side's digests of what it holds at pause, to be compared.
///
/// Layout (8 bytes + 40 per digest): `u16 digestCount, u16 reserved, u32 reserved,
/// digestCount × (u8 stream, u8 reserved, u16 reserved, u32 streamID, 32 digest)`.
public struct Completion: Hashable, Sendable {
    /// Most digests in one frame.
    public static let maxDigests = 4096

    /// One digest per disk and per memory stream.
    public var digests: [StreamDigest]

    public init(digests: [StreamDigest]) { self.digests = digests }

    static func decode(from r: inout ByteReader) throws(WireError) -> Completion {
        let rawCount = try r.u16("digestCount")
        try r.reserved(6, "reserved")
        let count = try r.count(rawCount, elementSize: StreamDigest.size, max: maxDigests, "digestCount")
        var digests: [StreamDigest] = []
        digests.reserveCapacity(count)
        for _ in 0..<count {
            let kindAt = r.frameOffset
            let rawKind = try r.u8("digest.stream")
            guard let kind = StreamKind(rawValue: rawKind) else { throw r.invalid("digest.stream", rawKind, at: kindAt) }
            try r.reserved(3, "digest.reserved")
            let id = try r.u32("digest.streamID")
            digests.append(StreamDigest(stream: kind, streamID: id, digest: try r.bytes32("digest")))
        }
        return Completion(digests: digests)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if digests.count > Completion.maxDigests {
            throw .limitExceeded(type: type, field: "digestCount", value: digests.count, max: Completion.maxDigests)
        }
        return 8 + StreamDigest.size * digests.count
    }

    func write(to w: inout ByteWriter) {
        w.u16(UInt16(digests.count)); w.zeros(6)
        for d in digests { w.u8(d.stream.rawValue); w.zeros(3); w.u32(d.streamID); w.bytes32(d.digest) }
    }
}

/// The destination has resumed the VM (`resumed`): from this frame on the VM runs at the destination
/// and the source must never resume its own copy. Also the destination's half of the downtime figure.
///
/// Layout (16 bytes): `u64 sinceSwitchoverNanoseconds, u64 reserved`.
public struct VMResumed: Hashable, Sendable {
    /// Time on the destination's monotonic clock from receiving `switchover` to the VM running again.
    /// The source's downtime estimate is (receipt of this frame − pause) − RTT / 2.
    public var sinceSwitchoverNanoseconds: UInt64

    public init(sinceSwitchoverNanoseconds: UInt64) { self.sinceSwitchoverNanoseconds = sinceSwitchoverNanoseconds }

    static func decode(from r: inout ByteReader) throws(WireError) -> VMResumed {
        let ns = try r.u64("sinceSwitchoverNanoseconds")
        try r.reserved(8, "reserved")
        return VMResumed(sinceSwitchoverNanoseconds: ns)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int { 16 }

    func write(to w: inout ByteWriter) { w.u64(sinceSwitchoverNanoseconds); w.zeros(8) }
}
