import CFerryShims
import Crypto
import Glibc
import Synchronization
import Wire

/// The source's record of what the destination already holds of one disk (feature
/// ``Features/heldBlocks``): the SHA-256 its base image has for each block, as its `diskHeld`
/// frames report them, in block order. The bulk copy sends a block whose content hashes the same
/// as a `held` extent, without its bytes; a block not reported (yet), or reported as not held,
/// goes as data. Nothing depends on the report being true: the final digests compare every block.
///
/// SHA-256 and not the XXH3 of the digests: a block is left out on the strength of its hash alone,
/// so the hash must resist a guest that writes blocks crafted to collide with the base's.
///
/// The link's reader thread records frames (``record(_:)``); the session's thread reads only the
/// blocks below ``frontier``, which the reader publishes (release) after writing their hashes.
/// The table comes zero-filled from the kernel: a disk's report costs memory as it arrives.
final class HeldHashes: @unchecked Sendable {
    let diskID: UInt32
    let blockCount: Int
    private let table: UnsafeMutableRawPointer
    /// One bit per block: sent as data or zeros in this session.
    private let sent: UnsafeMutablePointer<UInt64>
    private let reported = Atomic<Int>(0)
    private let lastProgressNs = Atomic<UInt64>(ferry_monotonic_ns())
    /// Blocks reported as held so far (reader thread only).
    private(set) var heldReported = 0

    init(diskID: UInt32, blockCount: Int) {
        self.diskID = diskID
        self.blockCount = blockCount
        guard let table = calloc(max(1, blockCount), DiskHeld.hashSize) else {
            fatalError("cannot allocate the held hashes of \(blockCount) blocks")
        }
        self.table = table
        guard let sent = calloc(max(1, (blockCount + 63) / 64), 8) else { fatalError("cannot allocate the sent blocks of \(blockCount) blocks") }
        self.sent = sent.assumingMemoryBound(to: UInt64.self)
    }

    deinit {
        free(table)
        free(sent)
    }

    /// Block `index` went as data or zeros: it is never left out again.
    @inline(__always) func markSent(_ index: Int) {
        sent[index >> 6] |= 1 << UInt64(index & 63)
    }

    /// Blocks `0 ..< frontier` have been reported (held or not).
    var frontier: Int { reported.load(ordering: .acquiring) }

    /// Whether the destination has reported every block.
    var isComplete: Bool { frontier >= blockCount }

    /// Seconds since the last frame brought news (or since the report was awaited).
    var secondsSinceProgress: Double { Double(ferry_monotonic_ns() &- lastProgressNs.load(ordering: .relaxed)) / 1e9 }

    /// Records a `diskHeld` frame. Blocks between the frontier and the frame's first block were
    /// skipped (a frame lost with a dropped link): they stay not held. A frame that repeats blocks
    /// already reported (resent after a reconnect) adds only what is new. Blocks past the disk's
    /// end are a protocol violation.
    func record(_ held: DiskHeld) throws(LinkError) {
        let first = held.firstBlock
        guard first <= UInt64(blockCount), UInt64(held.count) <= UInt64(blockCount) - first else {
            throw .local(.protocolViolation, reason: "diskHeld for blocks \(first) ..< \(first &+ UInt64(held.count)) of disk \(diskID), "
                         + "which has \(blockCount) blocks")
        }
        let start = frontier
        let end = Int(first) + held.count
        guard end > start else { return }
        let from = max(start, Int(first))
        for block in from..<end {
            let hash = held.hash(block - Int(first))
            let entry = table + block * DiskHeld.hashSize
            entry.copyMemory(from: hash.baseAddress!, byteCount: DiskHeld.hashSize)
            if !Self.isZero(UnsafeRawPointer(entry)) { heldReported += 1 }
        }
        reported.store(end, ordering: .releasing)
        lastProgressNs.store(ferry_monotonic_ns(), ordering: .relaxed)
    }

    /// Whether the destination holds block `index` with exactly `contents`.
    func holds(block index: Int, contents: UnsafeRawBufferPointer) -> Bool {
        guard index < frontier, sent[index >> 6] & (1 << UInt64(index & 63)) == 0 else { return false }
        let entry = UnsafeRawPointer(table + index * DiskHeld.hashSize)
        if Self.isZero(entry) { return false }
        var sha = SHA256()
        sha.update(bufferPointer: contents)
        return sha.finalize().withUnsafeBytes { memcmp($0.baseAddress!, entry, DiskHeld.hashSize) == 0 }
    }

    private static func isZero(_ entry: UnsafeRawPointer) -> Bool {
        entry.loadUnaligned(as: UInt64.self) | entry.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
            | entry.loadUnaligned(fromByteOffset: 16, as: UInt64.self) | entry.loadUnaligned(fromByteOffset: 24, as: UInt64.self) == 0
    }
}
