import CFerryShims

/// One bit per block of the disk, set when a write, trim or zero that touches the block completes.
///
/// The migration engine reads and clears it once per pre-copy round with ``snapshotAndClear(into:)``:
/// each 64-bit word is swapped with zero atomically, so a write racing the snapshot lands either in
/// this round or in the next, never in neither. Marking is an atomic OR into the words (no lock):
/// many connections mark concurrently. Block size is a power of two (default 64 KiB).
public final class DirtyBitmap: @unchecked Sendable {
    /// Bytes per bit.
    public let blockSize: UInt64
    /// Blocks covered (the last one may be partial).
    public let blockCount: Int
    /// 64-bit words holding the bits.
    public let wordCount: Int
    private let shift: UInt64
    private let words: UnsafeMutablePointer<UInt64>

    /// A clean bitmap for a disk of `diskSize` bytes in blocks of `blockSize` (a power of two).
    public init(diskSize: UInt64, blockSize: UInt64 = 64 * 1024) {
        precondition(blockSize > 0 && blockSize & (blockSize - 1) == 0, "block size \(blockSize) is not a power of two")
        self.blockSize = blockSize
        self.shift = UInt64(blockSize.trailingZeroBitCount)
        self.blockCount = Int((diskSize + blockSize - 1) >> UInt64(blockSize.trailingZeroBitCount))
        self.wordCount = max(1, (blockCount + 63) / 64)
        self.words = .allocate(capacity: wordCount)
        self.words.initialize(repeating: 0, count: wordCount)
    }

    deinit { words.deallocate() }

    /// Marks every block that `[offset, offset+length)` touches. No allocation, no lock.
    @inline(__always)
    public func markDirty(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        var first = Int(offset >> shift)
        let last = min(Int((offset + length - 1) >> shift), blockCount - 1)
        guard first <= last else { return }
        while first <= last {
            let word = first >> 6
            let lowBit = first & 63
            let highBit = min(63, lowBit + (last - first))
            let width = highBit - lowBit + 1
            let mask: UInt64 = width == 64 ? ~0 : ((1 << UInt64(width)) - 1) << UInt64(lowBit)
            _ = ferry_nbd_atomic_or_u64(words + word, mask)
            first += width
        }
    }

    /// Whether block `index` is dirty now.
    public func isDirty(block index: Int) -> Bool {
        precondition(index >= 0 && index < blockCount, "block \(index) outside 0..<\(blockCount)")
        return ferry_nbd_atomic_load_u64(words + (index >> 6)) & (1 << UInt64(index & 63)) != 0
    }

    /// Dirty blocks now (a racy count: writes may be marking concurrently).
    public var dirtyCount: Int {
        var total = 0
        for i in 0..<wordCount { total += ferry_nbd_atomic_load_u64(words + i).nonzeroBitCount }
        return total
    }

    /// Copies the bitmap into `destination` (at least ``wordCount`` words, bit i of word w is block
    /// w*64+i) and clears it, word by word atomically. Returns the number of dirty blocks taken.
    @discardableResult
    public func snapshotAndClear(into destination: UnsafeMutableBufferPointer<UInt64>) -> Int {
        precondition(destination.count >= wordCount, "snapshot buffer of \(destination.count) words, need \(wordCount)")
        var total = 0
        for i in 0..<wordCount {
            let bits = ferry_nbd_atomic_exchange_u64(words + i, 0)
            destination[i] = bits
            total += bits.nonzeroBitCount
        }
        return total
    }

    /// Takes and clears the dirty blocks, returned as runs of consecutive blocks (block indexes).
    /// Allocates the result: meant for once per round, not per write.
    public func snapshotAndClearRuns() -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var runStart = -1
        for i in 0..<wordCount {
            var bits = ferry_nbd_atomic_exchange_u64(words + i, 0)
            var bit = 0
            if bits == 0 {
                if runStart >= 0 { runs.append(runStart..<(i * 64)); runStart = -1 }
                continue
            }
            if bits == ~0 {
                if runStart < 0 { runStart = i * 64 }
                continue
            }
            while bit < 64 {
                let set = bits & 1 != 0
                let block = i * 64 + bit
                if set && runStart < 0 { runStart = block }
                if !set && runStart >= 0 { runs.append(runStart..<block); runStart = -1 }
                bits >>= 1
                bit += 1
            }
        }
        if runStart >= 0 { runs.append(runStart..<min(wordCount * 64, blockCount)) }
        return runs
    }

    /// Marks every block dirty (the first pre-copy round sends everything).
    public func markAll() {
        markDirty(offset: 0, length: UInt64(blockCount) << shift)
    }

    /// The byte range of block `index`, clipped to the disk only by the caller (the last block may be partial).
    public func byteRange(ofBlock index: Int) -> Range<UInt64> {
        UInt64(index) << shift ..< (UInt64(index) + 1) << shift
    }
}
