import CFerryShims
import Glibc

/// Which blocks of a disk being received by post-copy have arrived, which an applier has claimed,
/// and which have been asked for — three lock-free bitmaps shared by the NBD connections, the bulk
/// applier and the urgent-lane applier.
///
/// The rule that makes "a write at the destination wins over a later copy" race-free: a block is
/// written from the network only by the one applier that wins its claim, and marked present only
/// after that write; the NBD server lets the VM read or write a block only once it is present.
/// Any later copy of the block loses the claim and is dropped.
public final class BlockPresence: @unchecked Sendable {
    /// Blocks on the disk.
    public let blockCount: Int
    private let wordCount: Int
    private let present: UnsafeMutablePointer<UInt64>
    private let claimed: UnsafeMutablePointer<UInt64>
    private let requested: UnsafeMutablePointer<UInt64>

    /// The bitmaps come zero-filled from the kernel (`calloc`): a large disk costs memory only for
    /// the words its blocks touch.
    public init(blockCount: Int) {
        self.blockCount = blockCount
        let words = (blockCount + 63) / 64
        wordCount = words
        func bitmap() -> UnsafeMutablePointer<UInt64> {
            guard let bits = calloc(max(1, words), MemoryLayout<UInt64>.stride) else { fatalError("cannot allocate a bitmap of \(blockCount) blocks") }
            return bits.assumingMemoryBound(to: UInt64.self)
        }
        present = bitmap()
        claimed = bitmap()
        requested = bitmap()
    }

    deinit {
        free(present)
        free(claimed)
        free(requested)
    }

    /// Claims `block` for writing from the network; false when another applier already has it.
    public func tryClaim(_ block: Int) -> Bool {
        let bit = UInt64(1) << UInt64(block & 63)
        return ferry_nbd_atomic_or_u64(claimed + (block >> 6), bit) & bit == 0
    }

    /// Marks `block` as holding its data (after the claimed write completed).
    public func markPresent(_ block: Int) {
        _ = ferry_nbd_atomic_or_u64(present + (block >> 6), UInt64(1) << UInt64(block & 63))
    }

    /// Whether `block` holds its data.
    public func isPresent(_ block: Int) -> Bool {
        ferry_nbd_atomic_load_u64(present + (block >> 6)) & (UInt64(1) << UInt64(block & 63)) != 0
    }

    /// Whether every block of `blocks` holds its data.
    public func arePresent(_ blocks: Range<Int>) -> Bool {
        var block = blocks.lowerBound
        while block < blocks.upperBound {
            let word = ferry_nbd_atomic_load_u64(present + (block >> 6))
            if block & 63 == 0 && blocks.upperBound - block >= 64 {
                if word != .max { return false }
                block += 64
                continue
            }
            if word & (UInt64(1) << UInt64(block & 63)) == 0 { return false }
            block += 1
        }
        return true
    }

    /// Marks `block` as asked for; false when it already was (or is present).
    public func tryRequest(_ block: Int) -> Bool {
        if isPresent(block) { return false }
        let bit = UInt64(1) << UInt64(block & 63)
        return ferry_nbd_atomic_or_u64(requested + (block >> 6), bit) & bit == 0
    }

    /// Forgets which blocks were asked for (their answers were lost with a link): blocks still
    /// missing will be asked for again by the next read that needs them.
    public func forgetRequests() {
        for word in 0..<wordCount { _ = ferry_nbd_atomic_exchange_u64(requested + word, 0) }
    }

    /// Blocks present, counted.
    public var presentCount: Int {
        (0..<wordCount).reduce(0) { $0 + ferry_nbd_atomic_load_u64(present + $1).nonzeroBitCount }
    }
}
