import FerryTestSupport
import Foundation
import Wire

/// Random frames for the hostile-peer fuzzers (``HostilePeerTests``): every message type one side
/// may send (and some only the other side sends), with field values drawn from plausible ones
/// (the sizes a small migration uses) and hostile ones (0, 2^32 - 1, 2^63, 2^64 - 1, values near
/// a power of two). Every frame is valid on the wire (the encoder takes it), so it reaches the
/// agent's session logic; ``rewrite()`` then occasionally flips a byte of a frame's metadata
/// after encoding, for the decoder. Seeded: a failure reproduces from the printed seed.
struct HostileFrames {
    var random: SplitMix64
    /// Makes payloads that outlive the send.
    let payload: ([UInt8]) -> Payload

    init(seed: UInt64, payload: @escaping ([UInt8]) -> Payload) {
        random = SplitMix64(seed: seed)
        self.payload = payload
    }

    private mutating func pick<T>(_ values: [T]) -> T { values[random.below(values.count)] }
    private mutating func chance(_ percent: Int) -> Bool { random.below(100) < percent }

    /// A 64-bit value: plausible (small offsets, sizes) or hostile (near 2^32, 2^63, 2^64).
    mutating func u64() -> UInt64 {
        switch random.below(20) {
        case 0: return random.next()
        case 1: return UInt64(random.below(1 << 20))
        case let index: return Self.interesting64[index - 2]
        }
    }

    private static let interesting64: [UInt64] = [0, 1, 4095, 4096, 65535, 65536, 1 << 20, (1 << 20) - 1, 1 << 30, (1 << 30) + 1,
                                                  1 << 32, 1 << 40, 1 << 62, 1 << 63, UInt64.max - 4096, UInt64.max - 1, UInt64.max, 64 << 10]

    mutating func u32() -> UInt32 {
        random.below(9) == 0 ? UInt32(truncatingIfNeeded: random.next()) : Self.interesting32[random.below(Self.interesting32.count)]
    }

    private static let interesting32: [UInt32] = [0, 1, 512, 4096, 65536, 1 << 20, UInt32(Int32.max), UInt32.max]

    /// `value`, lowered so that `value + length` does not overflow (the wire refuses that).
    private func fitting(_ value: UInt64, _ length: UInt64) -> UInt64 { min(value, .max - length) }

    private mutating func bytes(_ count: Int) -> [UInt8] { randomBytes(count: count, seed: random.next()) }

    /// Percent of fields drawn from the hostile values; the rest are plausible for the fuzzers'
    /// rigs (disk 1 of 64 KiB in 4 KiB blocks, memory region 0 of 256 pages), so that sequences
    /// also go deep: bulk copy, round ends, switchover, VM state, digests.
    var hostility = 50

    private mutating func hostile() -> Bool { chance(hostility) }

    /// The frames a source sends, and some of a destination's.
    mutating func sourceFrame() -> Message {
        switch random.below(17) {
        case 0, 1:
            guard hostile() else { return .diskLayout(DiskLayout(diskID: 1, sizeBytes: 64 << 10, blockSize: 4096, name: "fuzz")) }
            return .diskLayout(DiskLayout(diskID: pick([1, 1, 1, 2, 0, .max]), sizeBytes: pick([64 << 10, 1 << 20, 4097, 0, 1 << 40, 1 << 62, .max, u64()]),
                                          blockSize: pick([512, 4096, 65536, 64 << 20]), name: "fuzz"))
        case 2, 3:
            var extents: [Extent] = []
            var data = 0
            var next: UInt64 = UInt64(random.below(8)) * 4096
            for _ in 0..<(1 + random.below(4)) {
                let isData = chance(60)
                if hostile() {
                    let length = isData ? UInt32(pick([1, 512, 4096, 16384])) : max(1, u32())
                    extents.append(Extent(offset: fitting(u64(), UInt64(length)), length: length, kind: isData ? .data : .zero))
                    if isData { data += Int(length) }
                } else {
                    extents.append(Extent(offset: next, length: 4096, kind: isData ? .data : .zero))
                    next += 4096
                    if isData { data += 4096 }
                }
            }
            return .diskExtents(DiskExtents(diskID: hostile() ? pick([1, 2, 0]) : 1, round: pick([0, 0, 1, 2, .max]), extents: ExtentList(extents),
                                            payload: payload(bytes(data))))
        case 4:
            guard hostile() else {
                return .memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [
                    Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0x7f00_0000_0000, size: 1 << 20, fileOffset: 0)]))
            }
            var regions: [Wire.MemoryRegion] = []
            for index in 0..<random.below(4) {
                let size: UInt64 = pick([1 << 20, 4096, 4097, 0, 1 << 40, UInt64.max - 4095, u64()])
                regions.append(Wire.MemoryRegion(id: pick([UInt32(index), 0, .max]), guestAddress: pick([UInt64(index) << 20, 0, u64()]),
                                                 hostAddress: pick([0x7f00_0000_0000 + (UInt64(index) << 24), u64()]), size: size,
                                                 fileOffset: pick([UInt64(index) << 20, u64()])))
            }
            return .memoryLayout(GuestMemoryLayout(pageSize: pick([4096, 4096, 8192, 1 << 21, 1 << 30]), regions: regions))
        case 5, 6:
            var runs: [PageRun] = []
            var dataPages = 0
            let wild = hostile()
            for _ in 0..<(1 + random.below(3)) {
                if chance(50) {
                    let count = 1 + random.below(4)
                    runs.append(.data(UInt32(count)))
                    dataPages += count
                } else {
                    runs.append(.zero(wild ? pick([1, 255, 256, UInt32(PageRun.maxCount)]) : UInt32(1 + random.below(8))))
                }
            }
            let total = runs.reduce(UInt64(0)) { $0 + UInt64($1.count) }
            let shift: UInt8 = wild ? pick([12, 12, 13]) : 12
            let first = wild ? fitting(u64(), total) : UInt64(random.below(256 - Int(total)))
            return .pageBatch(PageBatch(regionID: wild ? pick([0, 1, 9]) : 0, pageShift: shift, firstPage: first,
                                        runs: PageRunList(runs), payload: payload(bytes(dataPages << shift))))
        case 7:
            guard hostile() else { return .pageDiscard(PageRange(regionID: 0, pageIndex: UInt64(random.below(200)), count: UInt32(1 + random.below(50)))) }
            let count = max(1, u32())
            return .pageDiscard(PageRange(regionID: pick([0, 1, 9]), pageIndex: fitting(u64(), UInt64(count)), count: count))
        case 8, 9:
            guard hostile() else {
                return .roundEnd(RoundEnd(stream: pick([.disk, .memory]), streamID: 1, round: UInt32(random.below(3)), itemsSent: 16, bytesSent: 65536,
                                          dirtyRemaining: 0))
            }
            return .roundEnd(RoundEnd(stream: pick([.disk, .disk, .memory, .control, .vmState]), streamID: pick([1, 0, 2, .max]),
                                      round: pick([0, 1, 2, .max]), itemsSent: u64(), bytesSent: u64(), dirtyRemaining: u64()))
        case 10:
            return .switchover(Switchover(finalRound: pick([1, 0, .max]), mode: pick([[], [], .memoryPostcopy, .diskPostcopy, [.memoryPostcopy, .diskPostcopy]]),
                                          diskBytesToCome: u64(), memoryPagesToCome: u64(),
                                          vmStateLength: hostile() ? pick([0, 4096, 1 << 30, (1 << 30) + 1, .max, u64()]) : pick([0, 4096])))
        case 11:
            let total = hostile() ? pick([0, 4096, 8192, 1 << 30, .max, u64()]) : 4096
            let length = Int(min(total, UInt64(pick([0, 1, 4096]))))
            let offset = hostile() ? pick([0, 4096, total - UInt64(length), u64()]) : 0
            return .vmState(VMStateChunk(totalLength: total, offset: min(offset, total - UInt64(length)), payload: payload(bytes(length))))
        case 12:
            return .complete(Wire.Completion(digests: (0..<random.below(4)).map { _ in
                StreamDigest(stream: pick([.disk, .memory, .vmState]), streamID: pick([0, 1, 2]), digest: Wire.Digest(bytes(32))!)
            }))
        case 13:
            return .ack(Ack(stream: pick([.disk, .memory, .control]), streamID: pick([0, 1, 7]), sequence: u64(), offset: u64()))
        case 14:
            return .keepalive(Keepalive(timestampNanoseconds: u64(), isEcho: chance(50)))
        default:
            return hostile() ? destinationOnlyFrame() : .keepalive(Keepalive(timestampNanoseconds: 1, isEcho: false))
        }
    }

    /// The frames a destination sends, and some of a source's.
    mutating func destinationFrame() -> Message {
        switch random.below(12) {
        case 0, 1, 2, 3:
            return .ack(Ack(stream: pick([.disk, .disk, .memory, .memory, .control, .vmState]), streamID: pick([1, 0, 1, 2, 9]),
                            sequence: pick([0, 1, 2, u64()]), offset: pick([0, 4096, 1 << 20, u64()])))
        case 4:
            return .keepalive(Keepalive(timestampNanoseconds: u64(), isEcho: chance(50)))
        case 5:
            return .resumed(VMResumed(sinceSwitchoverNanoseconds: u64()))
        case 6:
            return .complete(Wire.Completion(digests: (0..<random.below(4)).map { _ in
                StreamDigest(stream: pick([.disk, .memory]), streamID: pick([0, 1]), digest: Wire.Digest(bytes(32))!)
            }))
        case 7:
            return .error(ErrorMessage(code: pick([.protocolViolation, .storageFailure, .timeout, .busy, .digestMismatch, .vmStartFailed, .unknown(999)]),
                                       reason: "fuzz"))
        case 8, 9:
            return destinationOnlyFrame()
        default:
            return sourceFrame()
        }
    }

    /// Frames that travel only from a destination (and only on urgent lanes, for two of them).
    private mutating func destinationOnlyFrame() -> Message {
        switch random.below(5) {
        case 4:
            let count = random.below(3)
            return .diskHeld(DiskHeld(diskID: pick([1, 2]), firstBlock: fitting(u64(), UInt64(count)), count: count,
                                      hashes: payload(bytes(count * DiskHeld.hashSize))))
        case 0:
            let count = max(1, u32())
            return .pageRequest(PageRequest(requestID: u64(), regionID: pick([0, 9]), pageIndex: fitting(u64(), UInt64(count)), count: count))
        case 1:
            let length = max(1, u32())
            return .diskFetch(DiskFetch(requestID: u64(), diskID: pick([1, 2]), offset: fitting(u64(), UInt64(length)), length: length))
        case 2:
            return .resumed(VMResumed(sinceSwitchoverNanoseconds: u64()))
        default:
            let length = max(1, u32())
            return .diskSkip(DiskRange(diskID: 1, offset: fitting(u64(), UInt64(length)), length: length))
        }
    }

    /// Occasionally (one frame in eight) a rewrite that flips one byte of a frame's metadata
    /// after encoding: values the encoder would refuse, for the agent's decoder.
    mutating func rewrite() -> ((UnsafeMutableRawBufferPointer) -> Void)? {
        guard chance(12) else { return nil }
        let position = random.next(), flip = UInt8(1 + random.below(255))
        return { metadata in
            guard !metadata.isEmpty else { return }
            metadata[Int(position % UInt64(metadata.count))] ^= flip
        }
    }
}
