import CFerryShims
import Glibc
import Synchronization
import SystemPackage
import URing
import Wire

/// The destination's image of a migrating disk, shared by the threads that apply data to it: the
/// file, the per-block hashes (kept current as blocks are written, so the final digest costs
/// nothing at switchover) and which blocks have arrived. Each applying thread uses its own
/// ``DiskApplier``.
final class DiskImage: @unchecked Sendable {
    let path: String
    let layout: DiskLayout
    let fd: Int32
    let hashes: BlockHashes
    /// Blocks that have arrived (and, in post-copy, who may write them).
    let presence: BlockPresence
    /// In post-copy each block is written once, by the applier that claims it first.
    let claimsEnabled = Atomic<Bool>(false)
    let dataBytes = Atomic<UInt64>(0)
    let zeroBytes = Atomic<UInt64>(0)
    let heldBytes = Atomic<UInt64>(0)
    /// What this destination already holds of the disk, if anything (`held` extents come from it).
    private(set) var base: DiskBase?

    /// Creates (or empties, unless `keep`: it is its own base) the image at `path` and sizes it for `layout`.
    init(path: String, layout: DiskLayout, keep: Bool = false) throws(Errno) {
        let fd = open(path, O_RDWR | O_CREAT | (keep ? 0 : O_TRUNC) | O_CLOEXEC, 0o644)
        if fd < 0 { throw Errno(rawValue: errno) }
        if ftruncate(fd, off_t(layout.sizeBytes)) != 0 {
            let error = Errno(rawValue: errno)
            close(fd)
            throw error
        }
        self.path = path
        self.layout = layout
        self.fd = fd
        self.hashes = BlockHashes(diskSize: layout.sizeBytes, blockSize: Int(layout.blockSize))
        self.presence = BlockPresence(blockCount: hashes.blockCount)
    }

    deinit { close(fd) }

    var blockSize: UInt64 { UInt64(layout.blockSize) }

    /// Sets the base image, before any extent is applied.
    func use(base: DiskBase) { self.base = base }
}

/// One thread's means of applying `diskExtents` to a ``DiskImage``: its own io_uring ring and
/// scratch block. The stream's own applier writes aligned data with `O_DIRECT`, several writes in
/// flight (``DirectImageWriter``); the rest is written straight from the receive buffer through the
/// page cache, and zero runs are punched as holes. Before anything else touches the image (a
/// hole, a claimed post-copy write, a read-back, serving it, `fdatasync`), the direct writes in
/// flight are drained (``drain()``).
struct DiskApplier: ~Copyable {
    let image: DiskImage
    private var ring: Ring
    private let scratch: UnsafeMutableRawBufferPointer
    private var direct: DirectImageWriter?

    /// An applier for `image`; with `directWrites`, pre-copy data goes through `O_DIRECT` where the
    /// filesystem allows it.
    init(image: DiskImage, directWrites: Bool = false) throws(Errno) {
        self.ring = try Ring(entries: 8)
        self.image = image
        self.scratch = .allocate(byteCount: Int(image.layout.blockSize), alignment: 4096)
        self.direct = directWrites ? DirectImageWriter(path: image.path, bufferedFD: image.fd) : nil
    }

    /// Whether data goes through `O_DIRECT` (the filesystem allowed it).
    var writesDirectly: Bool { direct != nil }
    /// Direct writes that waited for an earlier one of an overlapping range.
    var overlapWaits: Int { direct?.overlapWaits ?? 0 }

    /// Waits for the direct writes in flight; throws the first that failed.
    mutating func drain() throws(Errno) {
        try direct?.drain()
    }

    deinit { scratch.deallocate() }

    /// Applies one frame's extents. Throws `EINVAL` for an extent beyond the disk.
    mutating func apply(_ message: DiskExtents) throws(Errno) {
        var payloadOffset = 0
        let payload = message.payload.bytes
        let claims = image.claimsEnabled.load(ordering: .acquiring)
        for extent in message.extents {
            let end = extent.offset + UInt64(extent.length)
            guard end <= image.layout.sizeBytes else { throw Errno.invalidArgument }
            let bytes: UnsafeRawBufferPointer? = extent.kind == .data
                ? UnsafeRawBufferPointer(rebasing: payload[payloadOffset..<(payloadOffset + Int(extent.length))]) : nil
            if extent.kind == .held {
                // Checked by the stream (whole blocks, each reported held); never in post-copy.
                guard !claims, let base = image.base else { throw Errno.invalidArgument }
                try drain()
                try base.take(offset: extent.offset, length: UInt64(extent.length), into: image)
                image.heldBytes.add(UInt64(extent.length), ordering: .relaxed)
                continue
            } else if claims {
                try drain()
                try applyClaimed(offset: extent.offset, length: UInt64(extent.length), bytes: bytes)
            } else if let bytes {
                if try direct?.write(bytes, at: extent.offset) != true {
                    try drain()
                    try ring.writeFully(image.fd, bytes, offset: extent.offset)
                }
                try rehash(offset: extent.offset, bytes: bytes)
            } else {
                try drain()
                try zero(offset: extent.offset, length: UInt64(extent.length))
            }
            if extent.kind == .data {
                payloadOffset += Int(extent.length)
                image.dataBytes.add(UInt64(extent.length), ordering: .relaxed)
            } else {
                image.zeroBytes.add(UInt64(extent.length), ordering: .relaxed)
            }
        }
    }

    /// Flushes the image to stable storage (`fdatasync`).
    mutating func flush() throws(Errno) {
        try drain()
        do { try ring.prepareFsync(image.fd, dataOnly: true, tag: Ring.sequentialTag) } catch { throw error.errno }
        _ = try ring.waitCompletion().get()
    }

    /// Post-copy: writes only the whole blocks this applier wins the claim of, runs of them at a
    /// time, and marks them present after the write.
    private mutating func applyClaimed(offset: UInt64, length: UInt64, bytes: UnsafeRawBufferPointer?) throws(Errno) {
        let blockSize = image.blockSize
        var block = Int(offset / blockSize)
        let end = offset + length
        var runStart = -1
        func flushRun(upTo stop: Int, applier: inout DiskApplier) throws(Errno) {
            guard runStart >= 0 else { return }
            let from = UInt64(runStart) * blockSize
            let to = min(UInt64(stop) * blockSize, end)
            if let bytes {
                let slice = UnsafeRawBufferPointer(rebasing: bytes[Int(from - offset)..<Int(to - offset)])
                try applier.ring.writeFully(applier.image.fd, slice, offset: from)
                try applier.rehash(offset: from, bytes: slice)
            } else {
                try applier.zero(offset: from, length: to - from)
            }
            for claimed in runStart..<stop { applier.image.presence.markPresent(claimed) }
            runStart = -1
        }
        while UInt64(block) * blockSize < end {
            let blockStart = UInt64(block) * blockSize
            let whole = blockStart >= offset && blockStart + UInt64(image.hashes.length(ofBlock: block)) <= end
            if whole && image.presence.tryClaim(block) {
                if runStart < 0 { runStart = block }
            } else {
                try flushRun(upTo: block, applier: &self)
            }
            block += 1
        }
        try flushRun(upTo: block, applier: &self)
    }

    /// Zeroes a range: a hole where the filesystem can punch one, written zeros elsewhere.
    private mutating func zero(offset: UInt64, length: UInt64) throws(Errno) {
        let mode = ferry_nbd_falloc_punch_hole | ferry_nbd_falloc_keep_size
        do { try ring.prepareFallocate(image.fd, mode: mode, offset: offset, length: length, tag: Ring.sequentialTag) } catch { throw error.errno }
        if try ring.waitCompletion().errno != nil {
            scratch.initializeMemory(as: UInt8.self, repeating: 0)
            var done: UInt64 = 0
            while done < length {
                let count = Int(min(UInt64(scratch.count), length - done))
                try ring.writeFully(image.fd, UnsafeRawBufferPointer(rebasing: scratch[..<count]), offset: offset + done)
                done += UInt64(count)
            }
        }
        let blockSize = image.blockSize
        var block = offset / blockSize
        while block * blockSize < offset + length {
            let blockStart = block * blockSize
            let blockEnd = blockStart + UInt64(image.hashes.length(ofBlock: Int(block)))
            if blockStart >= offset && blockEnd <= offset + length {
                image.hashes.updateZero(block: Int(block))
                image.presence.markPresent(Int(block))
            } else {
                try rehashFromImage(block: Int(block))
            }
            block += 1
        }
    }

    /// Updates the hashes of the blocks `bytes` (written at `offset`) touch: whole blocks from the
    /// bytes themselves, partly covered ones by reading the block back.
    private mutating func rehash(offset: UInt64, bytes: UnsafeRawBufferPointer) throws(Errno) {
        let blockSize = image.blockSize
        var block = offset / blockSize
        let end = offset + UInt64(bytes.count)
        while block * blockSize < end {
            let blockStart = block * blockSize
            let blockLength = UInt64(image.hashes.length(ofBlock: Int(block)))
            if blockStart >= offset && blockStart + blockLength <= end {
                let from = Int(blockStart - offset)
                image.hashes.update(block: Int(block), contents: UnsafeRawBufferPointer(rebasing: bytes[from..<(from + Int(blockLength))]))
                image.presence.markPresent(Int(block))
            } else {
                try rehashFromImage(block: Int(block))
            }
            block += 1
        }
    }

    private mutating func rehashFromImage(block: Int) throws(Errno) {
        try drain()
        let length = image.hashes.length(ofBlock: block)
        let target = UnsafeMutableRawBufferPointer(rebasing: scratch[..<length])
        let got = try ring.readFully(image.fd, into: target, offset: UInt64(block) * image.blockSize)
        if got < length { UnsafeMutableRawBufferPointer(rebasing: target[got...]).initializeMemory(as: UInt8.self, repeating: 0) }
        image.hashes.update(block: block, contents: UnsafeRawBufferPointer(target))
    }
}
