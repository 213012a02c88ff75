import SystemPackage
import URing
import Wire

extension BlockHashes {
    /// Hashes every block of the image open at `fd` (read through io_uring, 4 MiB at a time).
    public static func hashing(fd: Int32, diskSize: UInt64, blockSize: Int) throws(Errno) -> BlockHashes {
        let hashes = BlockHashes(diskSize: diskSize, blockSize: blockSize)
        var ring = try Ring(entries: 4)
        let chunkBlocks = max(1, (4 << 20) / blockSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBlocks * blockSize, alignment: 4096)
        defer { buffer.deallocate() }
        var block = 0
        while block < hashes.blockCount {
            let count = min(chunkBlocks, hashes.blockCount - block)
            let offset = UInt64(block) * UInt64(blockSize)
            let length = Int(min(UInt64(count * blockSize), diskSize - offset))
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[..<length])
            let got = try ring.readFully(fd, into: target, offset: offset)
            if got < length { UnsafeMutableRawBufferPointer(rebasing: target[got...]).initializeMemory(as: UInt8.self, repeating: 0) }
            for index in 0..<count {
                let start = index * blockSize
                let blockLength = hashes.length(ofBlock: block + index)
                hashes.update(block: block + index, contents: UnsafeRawBufferPointer(rebasing: buffer[start..<(start + blockLength)]))
            }
            block += count
        }
        return hashes
    }
}
