import CXXHash
import Crypto
import Glibc
import Wire

/// One XXH3-64 hash per block of a disk, and the digest over them all: how both agents prove, at
/// the end, that the destination's image equals the source's at the moment of pause.
///
/// The destination updates a block's hash as it writes the block (no re-read of the image); the
/// source hashes its frozen image once. The digest is SHA-256 over the hashes in block order,
/// each as 8 little-endian bytes, so it is cheap to produce at switchover. Updates of different
/// blocks may come from different threads (each block has one slot).
///
/// The table costs memory only for the blocks written: it comes zero-filled from the kernel
/// (`calloc`, untouched pages), and a slot of 0 stands for the hash of an all-zero block. So a
/// destination told of a large disk (a hostile or a mostly empty one) holds nothing for it until
/// data arrives; zeroing a block clears its slot only if it was set. (A block whose contents hash
/// to 0 reads as a zero block on both sides alike, so the digests still agree: as unlikely as any
/// XXH3 collision.)
public struct BlockHashes: ~Copyable {
    /// Bytes per block; the last block may be shorter.
    public let blockSize: Int
    /// Size of the disk in bytes.
    public let diskSize: UInt64
    /// Number of blocks.
    public let blockCount: Int
    private let hashes: UnsafeMutableBufferPointer<UInt64>
    private let zeroBlockHash: UInt64
    /// The hash of the last block when it is all zeros (it may be short).
    private let zeroLastBlockHash: UInt64

    /// Hashes of an all-zero disk.
    public init(diskSize: UInt64, blockSize: Int) {
        self.blockSize = blockSize
        self.diskSize = diskSize
        self.blockCount = Int((diskSize + UInt64(blockSize) - 1) / UInt64(blockSize))
        guard let table = calloc(max(1, blockCount), MemoryLayout<UInt64>.stride) else {
            fatalError("cannot allocate the hashes of \(blockCount) blocks")
        }
        self.hashes = UnsafeMutableBufferPointer(start: table.assumingMemoryBound(to: UInt64.self), count: max(1, blockCount))
        self.zeroBlockHash = Self.zeroHash(length: blockSize)
        let last = blockCount == 0 ? blockSize : Self.length(ofBlock: blockCount - 1, blockSize: blockSize, diskSize: diskSize)
        self.zeroLastBlockHash = last == blockSize ? zeroBlockHash : Self.zeroHash(length: last)
    }

    deinit { free(hashes.baseAddress) }

    /// XXH3-64 of `length` zero bytes, streamed from a 64 KiB zero buffer: a 1 GiB page or a 64 MiB
    /// block costs no memory of its size (the streaming hash equals the one-shot one).
    static func zeroHash(length: Int) -> UInt64 {
        let state = XXH3_createState()
        defer { XXH3_freeState(state) }
        _ = XXH3_64bits_reset(state)
        var left = length
        zeroChunk.withUnsafeBytes { zeros in
            while left > 0 {
                let count = min(left, zeros.count)
                _ = XXH3_64bits_update(state, zeros.baseAddress, count)
                left -= count
            }
        }
        return XXH3_64bits_digest(state)
    }

    private static let zeroChunk = [UInt8](repeating: 0, count: 64 << 10)

    /// Bytes in block `index` (the last one may be short).
    public func length(ofBlock index: Int) -> Int {
        Self.length(ofBlock: index, blockSize: blockSize, diskSize: diskSize)
    }

    private static func length(ofBlock index: Int, blockSize: Int, diskSize: UInt64) -> Int {
        let start = UInt64(index) * UInt64(blockSize)
        return Int(min(UInt64(blockSize), diskSize - start))
    }

    /// The hash of block `index` when it reads as zeros.
    private func zeroHash(ofBlock index: Int) -> UInt64 { index == blockCount - 1 ? zeroLastBlockHash : zeroBlockHash }

    /// Records the contents of whole block `index`.
    public func update(block index: Int, contents: UnsafeRawBufferPointer) {
        let hash = XXH3_64bits(contents.baseAddress, contents.count)
        hashes[index] = hash == zeroHash(ofBlock: index) ? 0 : hash
    }

    /// Records that whole block `index` now reads as zeros (touching its slot only if it was set).
    public func updateZero(block index: Int) {
        if hashes[index] != 0 { hashes[index] = 0 }
    }

    /// Block `index`'s slot as stored: its hash, or 0 when it reads as zeros (or was never recorded).
    public func stored(block index: Int) -> UInt64 { hashes[index] }

    /// Sets block `index`'s slot to `value`, a slot of another table of the same geometry (a
    /// destination copying a block's hash from its base image's table).
    public func setStored(block index: Int, _ value: UInt64) {
        if hashes[index] != value { hashes[index] = value }
    }

    /// The digest over every block's hash (slots of 0 as the zero block's hash).
    public func digest() -> Wire.Digest {
        var sha = SHA256()
        let chunk = 8192
        let buffer = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: chunk)
        defer { buffer.deallocate() }
        var first = 0
        while first < blockCount {
            let count = min(chunk, blockCount - first)
            for index in 0..<count {
                let stored = hashes[first + index]
                buffer[index] = (stored == 0 ? zeroHash(ofBlock: first + index) : stored).littleEndian
            }
            sha.update(bufferPointer: UnsafeRawBufferPointer(UnsafeMutableBufferPointer(rebasing: buffer[0..<count])))
            first += count
        }
        return Wire.Digest(Array(sha.finalize()))!
    }
}
