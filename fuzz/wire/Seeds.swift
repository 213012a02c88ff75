// Seed corpus for the libFuzzer harness: one valid frame of every message type, written when
// FERRY_WIRE_SEEDS_DIR is set at start-up (build.sh does this before fuzzing).
#if canImport(Glibc)
import Glibc
#endif

@_cdecl("LLVMFuzzerInitialize")
public func fuzzWireInitialize(_ argc: UnsafeMutablePointer<CInt>?,
                               _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    guard let dir = getenv("FERRY_WIRE_SEEDS_DIR") else { return 0 }
    let path = String(cString: dir)
    let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: 3 * 4096, alignment: 16)
    defer { pages.deallocate() }
    for i in 0..<pages.count { pages[i] = UInt8(truncatingIfNeeded: i &* 7) }
    let p = UnsafeRawBufferPointer(pages)
    let zero = Bytes32.zero
    let hello = Hello(role: .source, mode: .resume, features: [.disk, .memory, .resume], sessionID: .zero, nonce: zero,
                      resumePoints: [ResumePoint(stream: .disk, streamID: 1, sequence: 2, offset: 3)])
    let messages: [Message] = [
        .hello(hello), .helloAck(hello, proof: zero), .auth(proof: zero), .challenge(nonce: zero),
        .diskLayout(DiskLayout(diskID: 1, sizeBytes: 1 << 30, blockSize: 65536, name: "disk")),
        .diskExtents(DiskExtents(diskID: 1, round: 2, extents: ExtentList([Extent(offset: 0, length: 4096),
                                                                            Extent(offset: 4096, length: 8192, kind: .zero)]),
                                 payload: Payload(UnsafeRawBufferPointer(rebasing: p[0..<4096])))),
        .diskFetch(DiskFetch(requestID: 1, diskID: 1, offset: 0, length: 4096)),
        .diskReply(requestID: 1, extents: DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 16)]),
                                                      payload: Payload(UnsafeRawBufferPointer(rebasing: p[0..<16])))),
        .diskSkip(DiskRange(diskID: 1, offset: 8192, length: 4096)),
        .memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [MemoryRegion(id: 0, guestAddress: 0, hostAddress: 1 << 40,
                                                                               size: 1 << 20, fileOffset: 0)])),
        .pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 5, runs: PageRunList([.data(2), .zero(9), .data(1)]),
                             payload: Payload(p))),
        .pageRequest(PageRequest(requestID: 2, regionID: 0, pageIndex: 7, count: 4)),
        .pageReply(requestID: 2, batch: PageBatch(regionID: 0, pageShift: 12, firstPage: 7, runs: PageRunList([.data(1), .zero(3)]),
                                                  payload: Payload(UnsafeRawBufferPointer(rebasing: p[0..<4096])))),
        .roundEnd(RoundEnd(stream: .memory, streamID: 0, round: 1, itemsSent: 2, bytesSent: 3, dirtyRemaining: 4)),
        .switchover(Switchover(finalRound: 3, mode: [.memoryPostcopy], diskBytesToCome: 1, memoryPagesToCome: 2, vmStateLength: 16)),
        .vmState(VMStateChunk(totalLength: 32, offset: 16, payload: Payload(UnsafeRawBufferPointer(rebasing: p[0..<16])))),
        .complete(Completion(digests: [StreamDigest(stream: .disk, streamID: 1, digest: zero)])),
        .resumed(VMResumed(sinceSwitchoverNanoseconds: 1_000_000)),
        .ack(Ack(stream: .disk, streamID: 1, sequence: 9, offset: 4096)),
        .keepalive(Keepalive(timestampNanoseconds: 12345, isEcho: true)),
        .error(ErrorMessage(code: .storageFailure, reason: "pwrite failed")),
    ]
    for (i, m) in messages.enumerated() {
        var bytes: [UInt8] = []
        try! FrameEncoder.encode(m, sequence: UInt32(i), appendingTo: &bytes)
        guard let f = fopen("\(path)/seed-\(i)-\(m.type)", "wb") else { continue }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
    }
    return 0
}
