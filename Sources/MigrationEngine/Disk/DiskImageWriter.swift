import CFerryShims
import Glibc
import SystemPackage
import URing
import Wire

/// The destination's image of a migrating disk: applies `diskExtents` (data written through
/// io_uring straight from the receive buffer, zero runs punched as holes) and keeps the per-block
/// hashes current as it goes, so the final digest costs nothing at switchover.
final class DiskImageWriter {
    let path: String
    let layout: DiskLayout
    let fd: Int32
    private var ring: Ring
    private(set) var hashes: BlockHashes
    private let scratch: UnsafeMutableRawBufferPointer
    /// Data bytes written, zero bytes punched.
    private(set) var dataBytes: UInt64 = 0
    private(set) var zeroBytes: UInt64 = 0

    /// Creates (or empties) the image at `path` and sizes it for `layout`.
    init(path: String, layout: DiskLayout) throws(Errno) {
        let ring = try Ring(entries: 8)
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw Errno(rawValue: errno) }
        if ftruncate(fd, off_t(layout.sizeBytes)) != 0 {
            let error = Errno(rawValue: errno)
            close(fd)
            throw error
        }
        self.path = path
        self.layout = layout
        self.fd = fd
        self.ring = ring
        self.hashes = BlockHashes(diskSize: layout.sizeBytes, blockSize: Int(layout.blockSize))
        self.scratch = .allocate(byteCount: Int(layout.blockSize), alignment: 4096)
    }

    deinit {
        scratch.deallocate()
        close(fd)
    }

    /// Applies one frame's extents. Throws `EINVAL` for an extent beyond the disk.
    func apply(_ message: DiskExtents) throws(Errno) {
        var payloadOffset = 0
        let payload = message.payload.bytes
        for extent in message.extents {
            let end = extent.offset + UInt64(extent.length)
            guard end <= layout.sizeBytes else { throw Errno.invalidArgument }
            switch extent.kind {
            case .data:
                let bytes = UnsafeRawBufferPointer(rebasing: payload[payloadOffset..<(payloadOffset + Int(extent.length))])
                try ring.writeFully(fd, bytes, offset: extent.offset)
                try rehash(offset: extent.offset, bytes: bytes)
                payloadOffset += Int(extent.length)
                dataBytes += UInt64(extent.length)
            case .zero:
                try punch(offset: extent.offset, length: UInt64(extent.length))
                zeroBytes += UInt64(extent.length)
            }
        }
    }

    /// Flushes the image to stable storage (`fdatasync`).
    func flush() throws(Errno) {
        do { try ring.prepareFsync(fd, dataOnly: true, tag: Ring.sequentialTag) } catch { throw error.errno }
        _ = try ring.waitCompletion().get()
    }

    /// Zeroes a range: a hole where the filesystem can punch one, written zeros elsewhere.
    private func punch(offset: UInt64, length: UInt64) throws(Errno) {
        let mode = ferry_nbd_falloc_punch_hole | ferry_nbd_falloc_keep_size
        do { try ring.prepareFallocate(fd, mode: mode, offset: offset, length: length, tag: Ring.sequentialTag) } catch { throw error.errno }
        if try ring.waitCompletion().errno != nil {
            scratch.initializeMemory(as: UInt8.self, repeating: 0)
            var done: UInt64 = 0
            while done < length {
                let count = Int(min(UInt64(scratch.count), length - done))
                try ring.writeFully(fd, UnsafeRawBufferPointer(rebasing: scratch[..<count]), offset: offset + done)
                done += UInt64(count)
            }
        }
        let blockSize = UInt64(layout.blockSize)
        var block = offset / blockSize
        while block * blockSize < offset + length {
            let blockStart = block * blockSize
            let blockEnd = blockStart + UInt64(hashes.length(ofBlock: Int(block)))
            if blockStart >= offset && blockEnd <= offset + length {
                hashes.updateZero(block: Int(block))
            } else {
                try rehashFromImage(block: Int(block))
            }
            block += 1
        }
    }

    /// Updates the hashes of the blocks `bytes` (written at `offset`) touch: whole blocks from the
    /// bytes themselves, partly covered ones by reading the block back.
    private func rehash(offset: UInt64, bytes: UnsafeRawBufferPointer) throws(Errno) {
        let blockSize = UInt64(layout.blockSize)
        var block = offset / blockSize
        let end = offset + UInt64(bytes.count)
        while block * blockSize < end {
            let blockStart = block * blockSize
            let blockLength = UInt64(hashes.length(ofBlock: Int(block)))
            if blockStart >= offset && blockStart + blockLength <= end {
                let from = Int(blockStart - offset)
                hashes.update(block: Int(block), contents: UnsafeRawBufferPointer(rebasing: bytes[from..<(from + Int(blockLength))]))
            } else {
                try rehashFromImage(block: Int(block))
            }
            block += 1
        }
    }

    private func rehashFromImage(block: Int) throws(Errno) {
        let length = hashes.length(ofBlock: block)
        let target = UnsafeMutableRawBufferPointer(rebasing: scratch[..<length])
        let got = try ring.readFully(fd, into: target, offset: UInt64(block) * UInt64(layout.blockSize))
        if got < length { UnsafeMutableRawBufferPointer(rebasing: target[got...]).initializeMemory(as: UInt8.self, repeating: 0) }
        hashes.update(block: block, contents: UnsafeRawBufferPointer(target))
    }
}

