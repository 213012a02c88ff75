// Frames and messages the Wire tests share: owned byte buffers, one-frame encode and decode, a
// sample of every message type. (SplitMix64 and the rest of the generic helpers are in FerryTestSupport.)
import Wire

/// Owned raw memory for payloads and frames, freed when the owner goes away.
final class Buffer {
    let raw: UnsafeMutableRawBufferPointer
    init(count: Int, fill: (Int) -> UInt8 = { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }) {
        raw = .allocate(byteCount: max(count, 1), alignment: 16)
        for i in 0..<count { raw[i] = fill(i) }
        view = UnsafeRawBufferPointer(rebasing: raw[0..<count])
    }
    init(_ bytes: [UInt8]) {
        raw = .allocate(byteCount: max(bytes.count, 1), alignment: 16)
        for (i, b) in bytes.enumerated() { raw[i] = b }
        view = UnsafeRawBufferPointer(rebasing: raw[0..<bytes.count])
    }
    let view: UnsafeRawBufferPointer
    var payload: Payload { Payload(view) }
    var bytes: [UInt8] { Array(view) }
    deinit { raw.deallocate() }
}

/// Encodes one frame into a fresh array.
func frameBytes(_ m: Message, sequence: UInt32 = 0, urgent: Bool? = nil) throws -> [UInt8] {
    var out: [UInt8] = []
    try FrameEncoder.encode(m, sequence: sequence, urgent: urgent, appendingTo: &out)
    return out
}

/// Decodes `bytes` as exactly one whole frame and hands the frame to `body` while the bytes are alive.
func withDecoded<R>(_ bytes: [UInt8], decoder: FrameDecoder = FrameDecoder(),
                    _ body: (DecodedFrame) throws -> R) throws -> R? {
    let owned = Buffer(bytes)
    guard let frame = try decoder.decode(owned.view) else { return nil }
    return try withExtendedLifetime(owned) { try body(frame) }
}

/// The error a decode of `bytes` throws, or nil if it decodes (or needs more bytes).
func decodeError(_ bytes: [UInt8], decoder: FrameDecoder = FrameDecoder()) -> WireError? {
    let owned = Buffer(bytes)
    do {
        _ = try decoder.decode(owned.view)
        return nil
    } catch {
        return error
    }
}

func putU16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) {
    b[at] = UInt8(v & 0xff); b[at + 1] = UInt8(v >> 8)
}
func putU32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
    for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
}
func putU64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
    for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
}

/// Payload buffers that the sample messages point at; keep this alive while using them.
final class SamplePayloads {
    let disk = Buffer(count: 3 * 4096 + 512)
    let held = Buffer(count: 2 * DiskHeld.hashSize)
    let pages = Buffer(count: 5 * 4096)
    let hugePage = Buffer(count: 2 << 20)
    let vmState = Buffer(count: 777)
    let reply = Buffer(count: 2 * 4096)
    let empty = Buffer(count: 0)
    /// Two tunnel records: a 60-byte and a 1514-byte frame, each after its u16 length.
    let tunnel = Buffer(tunnelRecords([60, 1514]))
}

/// `lengths.count` tunnel records (u16 length, little-endian, then that many bytes).
func tunnelRecords(_ lengths: [Int]) -> [UInt8] {
    var out: [UInt8] = []
    for (n, length) in lengths.enumerated() {
        out += [UInt8(length & 0xff), UInt8(length >> 8)]
        out += (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ n) }
    }
    return out
}

func sampleSession() -> SessionID { SessionID(Array(1...16).map(UInt8.init))! }
func sampleNonce(_ base: UInt8) -> Nonce { Bytes32((0..<32).map { base &+ UInt8($0) })! }

/// One or more messages of every type, including empty and maximal lists.
func sampleMessages(_ p: SamplePayloads, includeMaximal: Bool = true) -> [Message] {
    var m: [Message] = []
    let hello = Hello(role: .source, features: [.disk, .memory, .postcopy, .zeroRuns, .urgentLane, .resume],
                      sessionID: sampleSession(), nonce: sampleNonce(0x40))
    m.append(.hello(hello))
    var resumed = hello
    resumed.mode = .resume
    resumed.features = Features(rawValue: 0xffff_0000_0000_01ff)  // unknown bits preserved
    resumed.resumePoints = [ResumePoint(stream: .disk, streamID: 3, sequence: 99, offset: 1 << 33),
                            ResumePoint(stream: .memory, streamID: 0, sequence: 7, offset: 4096)]
    m.append(.hello(resumed))
    var ack = hello
    ack.role = .dest
    ack.nonce = sampleNonce(0x90)
    ack.cipherSuite = CipherSuite(rawValue: 0)
    m.append(.helloAck(ack, proof: sampleNonce(0xA0)))
    m.append(.auth(proof: sampleNonce(0xC0)))
    m.append(.challenge(nonce: sampleNonce(0xD0)))

    m.append(.diskLayout(DiskLayout(diskID: 0, sizeBytes: 1 << 30, blockSize: 65536, name: "root.img")))
    m.append(.diskLayout(DiskLayout(diskID: 7, sizeBytes: 0, blockSize: 512, name: "")))
    m.append(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([
        Extent(offset: 0, length: 8192), Extent(offset: 8192, length: 1 << 20, kind: .zero),
        Extent(offset: (1 << 20) + 8192, length: 4096 + 512)]), payload: p.disk.payload)))
    m.append(.diskExtents(DiskExtents(diskID: 2, round: 5, extents: ExtentList([]), payload: p.empty.payload)))
    m.append(.diskFetch(DiskFetch(requestID: 42, diskID: 1, offset: 1 << 40, length: 65536)))
    m.append(.diskReply(requestID: 42, extents: DiskExtents(diskID: 1, round: 0, extents: ExtentList([
        Extent(offset: 1 << 40, length: 8192)]), payload: p.reply.payload)))

    m.append(.diskSkip(DiskRange(diskID: 1, offset: 1 << 30, length: 65536)))
    m.append(.diskHeld(DiskHeld(diskID: 1, firstBlock: 4096, count: 2, hashes: p.held.payload)))
    m.append(.diskHeld(DiskHeld(diskID: 2, firstBlock: 1 << 20, count: 0, hashes: p.empty.payload)))
    m.append(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([
        Extent(offset: 0, length: 65536, kind: .held), Extent(offset: 65536, length: 8192)]), payload: p.reply.payload)))
    m.append(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [
        MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0x7f00_0000_0000, size: 512 << 20, fileOffset: 0),
        MemoryRegion(id: 1, guestAddress: 1 << 32, hostAddress: 0x7f10_0000_0000, size: 1 << 30, fileOffset: 512 << 20)])))
    m.append(.memoryLayout(GuestMemoryLayout(pageSize: 2 << 20, regions: [])))
    m.append(.pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 100,
                                  runs: PageRunList([.data(2), .zero(1000), .data(3), .zero(PageRun.maxCount)]),
                                  payload: p.pages.payload)))
    m.append(.pageBatch(PageBatch(regionID: 3, pageShift: 21, firstPage: 0, runs: PageRunList([.data(1)]),
                                  payload: p.hugePage.payload)))
    m.append(.pageBatch(PageBatch(regionID: 3, pageShift: 12, firstPage: 9, runs: PageRunList([]),
                                  payload: p.empty.payload)))
    m.append(.pageRequest(PageRequest(requestID: 9, regionID: 1, pageIndex: 12345, count: 16)))
    m.append(.pageDiscard(PageRange(regionID: 1, pageIndex: 777, count: 3)))
    m.append(.pageReply(requestID: 9, batch: PageBatch(regionID: 1, pageShift: 12, firstPage: 12345,
                                                       runs: PageRunList([.data(2), .zero(14)]), payload: p.reply.payload)))

    m.append(.roundEnd(RoundEnd(stream: .disk, streamID: 1, round: 3, itemsSent: 1000, bytesSent: 65_536_000,
                                dirtyRemaining: 17)))
    m.append(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: 0, itemsSent: .max, bytesSent: .max,
                                dirtyRemaining: .max)))
    m.append(.switchover(Switchover(finalRound: 7, mode: [.memoryPostcopy, .diskPostcopy], diskBytesToCome: 1 << 20,
                                    memoryPagesToCome: 4242, vmStateLength: 777)))
    m.append(.switchover(Switchover(finalRound: 0, mode: [], diskBytesToCome: 0, memoryPagesToCome: 0, vmStateLength: 0)))
    m.append(.vmState(VMStateChunk(totalLength: 10_000, offset: 9000, payload: p.vmState.payload)))
    m.append(.vmState(VMStateChunk(totalLength: 0, offset: 0, payload: p.empty.payload)))
    m.append(.complete(Completion(digests: [StreamDigest(stream: .disk, streamID: 1, digest: sampleNonce(1)),
                                            StreamDigest(stream: .memory, streamID: 0, digest: sampleNonce(2))])))
    m.append(.complete(Completion(digests: [])))
    m.append(.resumed(VMResumed(sinceSwitchoverNanoseconds: 123_456_789)))
    m.append(.ack(Ack(stream: .disk, streamID: 1, sequence: 123_456, offset: 1 << 35)))
    m.append(.keepalive(Keepalive(timestampNanoseconds: 1_700_000_000_000_000_000, isEcho: false)))
    m.append(.keepalive(Keepalive(timestampNanoseconds: 5, isEcho: true)))
    m.append(.tunnelFrames(TunnelFrames(vmMAC: 0x5254_0012_3456, frameCount: 0, payload: Payload(p.empty.view))))
    m.append(.tunnelFrames(TunnelFrames(vmMAC: 0x5254_0012_3456, frameCount: 2, payload: Payload(p.tunnel.view))))
    m.append(.error(ErrorMessage(code: .authenticationFailed, reason: "proof mismatch for session 0102")))
    m.append(.error(ErrorMessage(code: .unknown(999), reason: "")))
    m.append(.error(ErrorMessage(code: .storageFailure, reason: "pwrite at 0x1000000+65536 failed: ENOSPC – ünïcödé ✓")))

    guard includeMaximal else { return m }
    // Maximal lists and strings.
    var big = resumed
    big.resumePoints = (0..<Hello.maxResumePoints).map {
        ResumePoint(stream: .disk, streamID: UInt32($0), sequence: UInt64($0) << 20, offset: UInt64($0) << 30)
    }
    m.append(.hello(big))
    m.append(.diskLayout(DiskLayout(diskID: .max, sizeBytes: .max, blockSize: 64 << 20,
                                    name: String(repeating: "é", count: DiskLayout.maxNameLength / 2))))
    m.append(.diskExtents(DiskExtents(diskID: 9, round: .max, extents: ExtentList((0..<DiskExtents.maxExtents).map {
        Extent(offset: UInt64($0) << 16, length: 65536, kind: .zero) }), payload: p.empty.payload)))
    m.append(.memoryLayout(GuestMemoryLayout(pageSize: 1 << 30, regions: (0..<GuestMemoryLayout.maxRegions).map {
        MemoryRegion(id: UInt32($0), guestAddress: UInt64($0) << 30, hostAddress: UInt64($0) << 31,
                     size: 1 << 30, fileOffset: UInt64($0) << 30) })))
    m.append(.pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 0,
                                  runs: PageRunList(Array(repeating: .zero(PageRun.maxCount), count: PageBatch.maxRuns)),
                                  payload: p.empty.payload)))
    m.append(.complete(Completion(digests: (0..<Completion.maxDigests).map {
        StreamDigest(stream: .memory, streamID: UInt32($0), digest: sampleNonce(UInt8(truncatingIfNeeded: $0))) })))
    m.append(.error(ErrorMessage(code: .internalError, reason: String(repeating: "x", count: ErrorMessage.maxReasonLength))))
    return m
}
