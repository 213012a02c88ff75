import CFerryShims
import Glibc
import SystemPackage
import URing

/// Writes the destination's bulk disk data with `O_DIRECT`, several writes in flight, from a few
/// aligned staging slots registered with the kernel: the image goes to the device without filling
/// the page cache, and the applying thread moves on to the next frame while the device writes.
///
/// Why: a buffered write of a new image costs the kernel a fresh page-cache page per 4 KiB. Here
/// (a VM whose freed memory goes back to its host) 2 GiB took 3.3-5.5 s of one core in the
/// io_uring worker, more than everything else the destination does, and varied 2x from run to run;
/// `O_DIRECT` wrote the same 2 GiB with 0.4 s of CPU (docs/testing.md, "bench-seal"). QEMU's
/// mirror targets are opened with `cache=none` for the same reason.
///
/// Only writes whose offset and length are multiples of ``alignment`` go this way
/// (``write(_:at:)`` returns false for the rest, and the caller writes them through the page cache
/// after ``drain()``). Two writes to overlapping ranges are never in flight together: a later
/// round's copy of a block waits for the earlier one. Whoever reads the image through another
/// descriptor (the NBD server, a rehash) or changes it otherwise (holes, claimed post-copy
/// writes, `fdatasync`) calls ``drain()`` first; a failed write is thrown by the next call.
/// Owned by one thread; nothing is allocated per write.
final class DirectImageWriter {
    /// Offsets, lengths and buffer addresses of direct writes are multiples of this (the largest
    /// logical block size of the devices and filesystems Ferry expects).
    static let alignment = 4096
    /// Bytes per staging slot: a write larger than this is split.
    static let slotSize = 2 << 20
    /// Slots, hence writes in flight.
    static let slotCount = 8

    private let fd: Int32
    /// The image's ordinary descriptor: where a write the device refuses as misaligned (`EINVAL`) is
    /// redone, after which direct writes stop.
    private let bufferedFD: Int32
    private var ring: Ring
    private var registered = false
    private var disabled = false
    private let staging: UnsafeMutableRawBufferPointer
    /// Per slot: the image range it is writing (`count == 0`: free).
    private var ranges: [(offset: UInt64, count: Int, written: Int)]
    private var free: [Int]
    private var failure: Errno?
    /// Writes that waited for an earlier write of an overlapping range (a later round's copy of a block).
    private(set) var overlapWaits = 0

    /// Opens the image at `path` a second time with `O_DIRECT`; nil when its filesystem refuses
    /// direct I/O (then every write goes through the page cache, as before). `bufferedFD` is the
    /// image's ordinary descriptor (not owned).
    init?(path: String, bufferedFD: Int32) {
        let fd = open(path, O_WRONLY | ferry_nbd_o_direct | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        guard var ring = try? Ring(entries: UInt32(Self.slotCount * 2)) else { close(fd); return nil }
        let staging = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.slotSize * Self.slotCount, alignment: Self.alignment)
        staging.initializeMemory(as: UInt8.self, repeating: 0)
        // Registered once, so the kernel does not pin the pages on every write; optional.
        let slots = (0..<Self.slotCount).map { UnsafeMutableRawBufferPointer(rebasing: staging[($0 * Self.slotSize)..<(($0 + 1) * Self.slotSize)]) }
        self.registered = (try? ring.registerBuffers(slots)) != nil
        self.fd = fd
        self.bufferedFD = bufferedFD
        self.ring = ring
        self.staging = staging
        self.ranges = Array(repeating: (0, 0, 0), count: Self.slotCount)
        self.free = Array((0..<Self.slotCount).reversed())
    }

    deinit {
        // The kernel may still be reading the slots: wait before they go.
        while ring.inFlight > 0 {
            guard (try? ring.waitCompletion()) != nil else { break }
        }
        staging.deallocate()
        close(fd)
    }

    /// Whether `count` bytes at `offset` can be written directly.
    static func accepts(offset: UInt64, count: Int) -> Bool {
        offset % UInt64(alignment) == 0 && count % alignment == 0 && count > 0
    }

    /// Queues `bytes` for writing at `offset` (copied into a staging slot, so `bytes` may be reused
    /// at once). False, having done nothing, when the range is not aligned: the caller writes it
    /// through the page cache, after ``drain()``.
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(Errno) -> Bool {
        guard !disabled, Self.accepts(offset: offset, count: bytes.count) else { return false }
        try check()
        var done = 0
        while done < bytes.count {
            let count = min(Self.slotSize, bytes.count - done)
            let at = offset + UInt64(done)
            while overlapsInFlight(at, count) {
                overlapWaits += 1
                try reapOne()
            }
            while free.isEmpty { try reapOne() }
            let slot = free.removeLast()
            let target = staging.baseAddress! + slot * Self.slotSize
            target.copyMemory(from: bytes.baseAddress! + done, byteCount: count)
            ranges[slot] = (at, count, 0)
            do { try submit(slot: slot) } catch {
                ranges[slot] = (0, 0, 0)
                free.append(slot)
                throw error
            }
            done += count
        }
        _ = try ring.submit()
        return true
    }

    /// Waits for every queued write; throws the first that failed.
    func drain() throws(Errno) {
        while ring.inFlight > 0 { try reapOne() }
        try check()
    }

    private func check() throws(Errno) {
        if let failure {
            self.failure = nil
            throw failure
        }
    }

    private func overlapsInFlight(_ offset: UInt64, _ count: Int) -> Bool {
        for range in ranges where range.count > 0 {
            if offset < range.offset + UInt64(range.count) && range.offset < offset + UInt64(count) { return true }
        }
        return false
    }

    /// Queues (the rest of) slot `slot`'s write.
    private func submit(slot: Int) throws(Errno) {
        let range = ranges[slot]
        let from = UnsafeRawBufferPointer(start: staging.baseAddress! + slot * Self.slotSize + range.written, count: range.count - range.written)
        do {
            if registered {
                try ring.prepareWriteFixed(fd, from: from, offset: range.offset + UInt64(range.written), bufferIndex: UInt16(slot), tag: UInt64(slot))
            } else {
                try ring.prepareWrite(fd, from: from, offset: range.offset + UInt64(range.written), tag: UInt64(slot))
            }
        } catch {
            throw error.errno
        }
    }

    /// Waits for one write to finish, resubmitting a short one, and frees its slot.
    private func reapOne() throws(Errno) {
        let completion = try ring.waitCompletion()
        let slot = Int(completion.tag)
        guard slot < Self.slotCount, ranges[slot].count > 0 else { return }
        if completion.result == -EINTR || completion.result == -EAGAIN {
            try submit(slot: slot)
            return
        }
        if completion.result == -EINVAL {
            // This device wants a larger alignment: redo the write through the page cache, and stop.
            disabled = true
            let range = ranges[slot]
            var at = range.written
            while at < range.count {
                let written = pwrite(bufferedFD, staging.baseAddress! + slot * Self.slotSize + at, range.count - at, off_t(range.offset) + off_t(at))
                if written < 0 && errno == EINTR { continue }
                if written <= 0 {
                    if failure == nil { failure = written == 0 ? .noSpace : Errno(rawValue: errno) }
                    break
                }
                at += written
            }
        } else if completion.result <= 0 {
            if failure == nil { failure = completion.result == 0 ? .noSpace : Errno(rawValue: -completion.result) }
        } else {
            ranges[slot].written += Int(completion.result)
            if ranges[slot].written < ranges[slot].count {
                try submit(slot: slot)
                return
            }
        }
        ranges[slot] = (0, 0, 0)
        free.append(slot)
    }
}
