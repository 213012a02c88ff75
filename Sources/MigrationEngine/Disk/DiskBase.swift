import CFerryShims
import Crypto
import Foundation
import Glibc
import Logging
import Synchronization
import SystemPackage
import Wire

/// What a destination already holds of one disk (`dest-agent --disk-base`): a shared base image,
/// or the copy a previous migration left, so that the source's bulk copy need not send the blocks
/// whose content it has (feature ``Features/heldBlocks``).
///
/// A thread reads the base once, in block order, records each block's XXH3 (what the image's
/// ``BlockHashes`` take when the block is used) and reports each block's SHA-256 to the source in
/// `diskHeld` frames as it goes, so the bulk copy starts after the first chunk, not after the
/// whole image. All-zero blocks are reported as not held: the source sends them as zero runs
/// anyway. A `held` extent is then applied by copying its blocks from the base
/// (`copy_file_range`: a reflink where the filesystem shares extents), or by nothing at all when
/// the base is the image itself (``inPlace``: the image was kept, not emptied).
///
/// The base must not change during the migration; if it does, the final digests disagree and the
/// VM does not start here.
final class DiskBase: @unchecked Sendable {
    let path: String
    /// The base is the image itself: held blocks are already in place.
    let inPlace: Bool
    private let fd: Int32
    private let layout: DiskLayout
    /// XXH3 of each base block read so far (0: a zero block, or past the base's end).
    private let hashes: BlockHashes
    /// Blocks `0 ..< reported` have been hashed (and their report sent or being sent).
    private let hashed = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let running = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    /// Blocks reported as held.
    let heldBlocks = Atomic<Int>(0)
    /// In place: one bit per block written with data or zeros in this session (the applying thread's).
    private let diverged: UnsafeMutablePointer<UInt64>

    /// Opens `path` (read-only) as the base of the image at `imagePath`, of `layout`.
    init(path: String, imagePath: String, layout: DiskLayout) throws(LinkError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw .local(.storageFailure, reason: "cannot open the base image \(path) of disk \(layout.diskID): \(String(cString: strerror(errno)))")
        }
        var base = stat(), image = stat()
        _ = fstat(fd, &base)
        self.inPlace = stat(imagePath, &image) == 0 && image.st_dev == base.st_dev && image.st_ino == base.st_ino
        self.path = path
        self.fd = fd
        self.layout = layout
        self.hashes = BlockHashes(diskSize: layout.sizeBytes, blockSize: Int(layout.blockSize))
        guard let diverged = calloc(max(1, (hashes.blockCount + 63) / 64), 8) else { fatalError("cannot allocate a bitmap of \(hashes.blockCount) blocks") }
        self.diverged = diverged.assumingMemoryBound(to: UInt64.self)
    }

    deinit {
        stop()
        close(fd)
        free(diverged)
    }

    /// In place: the blocks `length` bytes at `offset` touch are about to be written with data or
    /// zeros, so they no longer hold what was reported.
    func diverge(offset: UInt64, length: UInt64) {
        guard inPlace, length > 0 else { return }
        let blockSize = UInt64(layout.blockSize)
        for block in Int(offset / blockSize) ... Int((offset + length - 1) / blockSize) {
            diverged[block >> 6] |= 1 << UInt64(block & 63)
        }
    }

    /// Whether `path` names the same file as `imagePath` (so the image must be kept, not emptied).
    static func isSameFile(_ path: String, as imagePath: String) -> Bool {
        var a = stat(), b = stat()
        return stat(path, &a) == 0 && stat(imagePath, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino
    }

    /// Starts the thread that hashes the base and sends its report through `send` (which sends
    /// on the session's current main link, and throws when there is none or it failed: the frame
    /// is then tried again on the next link, every 50 ms, until ``stop()``).
    func startReporting(logger: Logger, send: @escaping @Sendable (Message) throws(LinkError) -> Void) {
        running.store(true, ordering: .relaxed)
        let thread = Thread { [self] in
            defer { finished.signal() }
            report(logger: logger, send: send)
        }
        thread.name = "ferry-disk-base"
        thread.start()
    }

    /// Stops the reporting thread (waiting up to 2 s for it).
    func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing), running.load(ordering: .relaxed) else { return }
        _ = finished.wait(timeout: .now() + 2)
    }

    private func report(logger: Logger, send: @Sendable (Message) throws(LinkError) -> Void) {
        let blockSize = Int(layout.blockSize)
        let blocksPerFrame = max(1, min(DiskHeld.maxBlocks, (4 << 20) / blockSize))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blocksPerFrame * blockSize, alignment: 4096)
        let frameHashes = UnsafeMutableRawBufferPointer.allocate(byteCount: blocksPerFrame * DiskHeld.hashSize, alignment: 16)
        defer { buffer.deallocate(); frameHashes.deallocate() }
        let started = ContinuousClock.now
        var first = 0
        var failure: String?
        while first < hashes.blockCount && !stopping.load(ordering: .relaxed) {
            let count = min(blocksPerFrame, hashes.blockCount - first)
            let offset = UInt64(first) * UInt64(blockSize)
            let length = Int(min(UInt64(count * blockSize), layout.sizeBytes - offset))
            var got = 0
            while got < length {
                let n = pread(fd, buffer.baseAddress! + got, length - got, off_t(offset) + off_t(got))
                if n < 0 && errno == EINTR { continue }
                if n < 0 { failure = "reading \(path) at \(offset + UInt64(got)): \(String(cString: strerror(errno)))" }
                if n <= 0 { break }
                got += n
            }
            if failure != nil { break }
            // Past the base's end: not held (the zero check below would call it a zero block, which
            // the source sends as a zero run anyway).
            if got < length { UnsafeMutableRawBufferPointer(rebasing: buffer[got..<length]).initializeMemory(as: UInt8.self, repeating: 0) }
            var held = 0
            for index in 0..<count {
                let block = first + index
                let start = index * blockSize
                let contents = UnsafeRawBufferPointer(rebasing: buffer[start..<(start + hashes.length(ofBlock: block))])
                let entry = UnsafeMutableRawBufferPointer(rebasing: frameHashes[(index * DiskHeld.hashSize)..<((index + 1) * DiskHeld.hashSize)])
                if Self.isZero(contents) {
                    entry.initializeMemory(as: UInt8.self, repeating: 0)
                    continue
                }
                hashes.update(block: block, contents: contents)
                var sha = SHA256()
                sha.update(bufferPointer: contents)
                sha.finalize().withUnsafeBytes { entry.copyMemory(from: $0) }
                held += 1
            }
            heldBlocks.add(held, ordering: .relaxed)
            hashed.store(first + count, ordering: .releasing)   // before the source can name these blocks
            let frame = DiskHeld(diskID: layout.diskID, firstBlock: UInt64(first), count: count,
                                 hashes: Payload(UnsafeRawBufferPointer(rebasing: frameHashes[..<(count * DiskHeld.hashSize)])))
            guard deliver(.diskHeld(frame), send: send) else { return }
            first += count
        }
        if let failure {
            // What was not reported is not held: the source sends it as data.
            logger.warning("reading the base image failed; the rest of the disk comes as data", metadata: ["disk": "\(layout.diskID)", "error": "\(failure)"])
        }
        guard !stopping.load(ordering: .relaxed) else { return }
        _ = deliver(.diskHeld(DiskHeld(diskID: layout.diskID, firstBlock: UInt64(hashes.blockCount), count: 0, hashes: .empty)), send: send)
        let elapsed = ContinuousClock.now - started
        logger.info("base image reported", metadata: ["disk": "\(layout.diskID)", "base": "\(path)", "in_place": "\(inPlace)",
                                                      "held_blocks": "\(heldBlocks.load(ordering: .relaxed))", "blocks": "\(hashes.blockCount)",
                                                      "seconds": "\(Double(elapsed.components.attoseconds) / 1e18 + Double(elapsed.components.seconds))"])
    }

    /// Sends `message`, again on the next link while sending fails; false once stopped.
    private func deliver(_ message: Message, send: @Sendable (Message) throws(LinkError) -> Void) -> Bool {
        while !stopping.load(ordering: .relaxed) {
            do throws(LinkError) {
                try send(message)
                return true
            } catch {
                usleep(50_000)
            }
        }
        return false
    }

    private static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return true }
        return base.load(as: UInt8.self) == 0 && memcmp(base, base + 1, bytes.count - 1) == 0
    }

    /// Why a `held` extent of `length` bytes at `offset` cannot be taken from this base, or nil:
    /// it must cover whole blocks, each reported as held and, in place, not written with data or
    /// zeros in this session (it no longer holds what was reported; a source never sends that).
    func refusal(offset: UInt64, length: UInt64) -> String? {
        let blockSize = UInt64(layout.blockSize)
        guard offset % blockSize == 0, (offset + length) % blockSize == 0 || offset + length == layout.sizeBytes else {
            return "a held extent at \(offset)+\(length) that is not whole \(blockSize)-byte blocks"
        }
        let reported = hashed.load(ordering: .acquiring)
        for block in Int(offset / blockSize) ..< Int((offset + length + blockSize - 1) / blockSize) {
            guard block < reported, hashes.stored(block: block) != 0 else {
                return "a held extent names block \(block), which this destination did not report as held"
            }
            guard !inPlace || diverged[block >> 6] & (1 << UInt64(block & 63)) == 0 else {
                return "a held extent names block \(block), which this session already wrote with other data"
            }
        }
        return nil
    }

    /// Takes the blocks of a checked held extent into `image`: copies them from the base (unless
    /// in place) and records their hashes.
    func take(offset: UInt64, length: UInt64, into image: DiskImage) throws(Errno) {
        if !inPlace {
            var at = offset
            var left = Int(length)
            while left > 0 {
                let n = ferry_copy_file_range(fd, Int64(at), image.fd, Int64(at), Int64(left))
                if n == -Int64(EINTR) { continue }
                if n == -Int64(EXDEV) || n == -Int64(EINVAL) || n == -Int64(ENOSYS) || n == -Int64(EOPNOTSUPP) {
                    try copyByHand(from: at, count: left, into: image)
                    break
                }
                if n < 0 { throw Errno(rawValue: Int32(-n)) }
                if n == 0 { break }   // the base ended: the rest reads as zeros, as the image does where nothing was written
                at += UInt64(n)
                left -= Int(n)
            }
        }
        let blockSize = UInt64(layout.blockSize)
        for block in Int(offset / blockSize) ..< Int((offset + length + blockSize - 1) / blockSize) {
            image.hashes.setStored(block: block, hashes.stored(block: block))
            image.presence.markPresent(block)
        }
    }

    private func copyByHand(from offset: UInt64, count: Int, into image: DiskImage) throws(Errno) {
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { chunk.deallocate() }
        var done = 0
        while done < count {
            let n = pread(fd, chunk.baseAddress!, min(chunk.count, count - done), off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw Errno(rawValue: errno) }
            if n == 0 { break }
            var written = 0
            while written < n {
                let w = pwrite(image.fd, chunk.baseAddress! + written, n - written, off_t(offset) + off_t(done + written))
                if w < 0 && errno == EINTR { continue }
                if w <= 0 { throw w == 0 ? .noSpace : Errno(rawValue: errno) }
                written += w
            }
            done += n
        }
    }
}
