import CXXHash
import Crypto
import Wire

/// One XXH3-64 hash per block of a disk, and the digest over them all: how both agents prove, at
/// the end, that the destination's image equals the source's at the moment of pause.
///
/// The destination updates a block's hash as it writes the block (no re-read of the image); the
/// source hashes its frozen image once. The digest is SHA-256 over the hashes in block order,
/// each as 8 little-endian bytes, so it is cheap to produce at switchover. Updates of different
/// blocks may come from different threads (each block has one slot).
public struct BlockHashes: ~Copyable {
    /// Bytes per block; the last block may be shorter.
    public let blockSize: Int
    /// Size of the disk in bytes.
    public let diskSize: UInt64
    /// Number of blocks.
    public let blockCount: Int
    private let hashes: UnsafeMutableBufferPointer<UInt64>
    private let zeroBlockHash: UInt64

    /// Hashes of an all-zero disk.
    public init(diskSize: UInt64, blockSize: Int) {
        self.blockSize = blockSize
        self.diskSize = diskSize
        self.blockCount = Int((diskSize + UInt64(blockSize) - 1) / UInt64(blockSize))
        self.hashes = .allocate(capacity: max(1, blockCount))
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 64)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        self.zeroBlockHash = XXH3_64bits(zeros.baseAddress, blockSize)
        for index in 0..<blockCount {
            let length = Self.length(ofBlock: index, blockSize: blockSize, diskSize: diskSize)
            hashes[index] = length == blockSize ? zeroBlockHash : XXH3_64bits(zeros.baseAddress, length)
        }
        zeros.deallocate()
    }

    deinit { hashes.deallocate() }

    /// Bytes in block `index` (the last one may be short).
    public func length(ofBlock index: Int) -> Int {
        Self.length(ofBlock: index, blockSize: blockSize, diskSize: diskSize)
    }

    private static func length(ofBlock index: Int, blockSize: Int, diskSize: UInt64) -> Int {
        let start = UInt64(index) * UInt64(blockSize)
        return Int(min(UInt64(blockSize), diskSize - start))
    }

    /// Records the contents of whole block `index`.
    public func update(block index: Int, contents: UnsafeRawBufferPointer) {
        hashes[index] = XXH3_64bits(contents.baseAddress, contents.count)
    }

    /// Records that whole block `index` now reads as zeros.
    public func updateZero(block index: Int) {
        let length = length(ofBlock: index)
        if length == blockSize {
            hashes[index] = zeroBlockHash
        } else {
            let zeros = [UInt8](repeating: 0, count: length)
            hashes[index] = zeros.withUnsafeBytes { XXH3_64bits($0.baseAddress, length) }
        }
    }

    /// The digest over every block's hash.
    public func digest() -> Wire.Digest {
        var sha = SHA256()
        sha.update(bufferPointer: UnsafeRawBufferPointer(hashes))
        return Wire.Digest(Array(sha.finalize()))!
    }
}
