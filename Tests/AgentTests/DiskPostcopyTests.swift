import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// Disk post-copy end to end: the destination serves the disk at once while the source pushes it
/// over a slow link; reads and writes of blocks that have not arrived fetch them over the urgent lane.
final class DiskPostcopyTests: XCTestCase {
    private let imageMiB = 32

    private func makeImage(_ path: String) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SupportError("open \(path) failed: errno \(errno)") }
        defer { close(fd) }
        for index in 0..<imageMiB {
            let block = randomBytes(count: 1 << 20, seed: 0x9057_0000 + UInt64(index))
            let written = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(index << 20)) }
            guard written == block.count else { throw SupportError("pwrite of MiB \(index) of \(path) wrote \(written): errno \(errno)") }
        }
    }

    /// A sparse image: 4 KiB data islands inside otherwise empty 64 KiB blocks, as a file system's
    /// metadata or a 4k writer leaves them.
    private func makeSparseImage(_ path: String) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SupportError("open \(path) failed: errno \(errno)") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(imageMiB << 20)) == 0 else { throw SupportError("ftruncate \(path) failed: errno \(errno)") }
        var generator = SplitMix64(seed: 0x5BA5_5E00)
        var island = [UInt8](repeating: 0, count: 4096)
        for index in stride(from: 0, to: imageMiB << 4, by: 3) {          // every third 64 KiB block
            for i in 0..<island.count { island[i] = UInt8(1 + generator.below(255)) }
            let offset = index * 65536 + (index % 16) * 4096
            let written = island.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
            guard written == island.count else { throw SupportError("pwrite at \(offset) of \(path) wrote \(written): errno \(errno)") }
        }
    }

    /// Post-copy of a sparse image with 64 KiB tracking blocks: blocks that are partly holes travel
    /// whole, every block arrives, and the images end equal.
    func testSparseImageWithPartlyHoleBlocksArrivesWhole() throws {
        try require(tool: "nbdsh")
        let scratch = TemporaryDirectory(prefix: "ferry-postcopy")
        let (source, dest, relay) = try start(scratch, blockSize: 65536, sparse: true)
        defer { relay.stop() }
        let read = try python("""
        import nbd
        h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
        src = open('\(scratch.file("src.img"))', 'rb')
        for offset in range(\(imageMiB << 20) - 65536 * 48, \(imageMiB << 20), 65536 * 5):
            src.seek(offset); assert h.pread(65536, offset) == src.read(65536), 'wrong data at %d' % offset
        print('sparse reads ok')
        """)
        XCTAssertEqual(read.status, 0, "\(read)\n\(dest.log)")
        XCTAssertTrue(read.stdout.contains("sparse reads ok"), "\(read)\n\(dest.log)")
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        XCTAssertEqual(try SHA256Hex.of(file: scratch.file("src.img")), try SHA256Hex.of(file: scratch.file("dst.img")), "the images differ")
    }

    /// Starts both agents over a 2 MB/s relay (the push of 32 MiB takes ~16 s) and waits until the
    /// destination serves.
    private func start(_ scratch: TemporaryDirectory, blockSize: Int = 4096, sparse: Bool = false) throws -> (E2E.Agent, E2E.Agent, E2E.Relay) {
        if sparse { try makeSparseImage(scratch.file("src.img")) } else { try makeImage(scratch.file("src.img")) }
        try writeKeyFile(at: scratch.file("key"))
        let destPort = try freePort()
        let relay = try E2E.Relay(targetPort: destPort, bytesPerSecond: 2e6)
        let dest = try E2E.Agent("dest-agent", ["--listen", "127.0.0.1:\(destPort)", "--key-file", scratch.file("key"),
                                                "--disk", scratch.file("dst.img"), "--nbd", "unix:\(scratch.file("dst.sock"))",
                                                "--report", scratch.file("dst.json"), "--exit-after-migration"],
                                 logPath: scratch.file("dest.log"))
        guard dest.waitForLog("waiting for the source", timeout: 60) else { throw SupportError("dest-agent never listened: \(dest.log)") }
        let source = try E2E.Agent("source-agent", ["--disk", scratch.file("src.img"), "--nbd", "unix:\(scratch.file("src.sock"))",
                                                    "--dest", "127.0.0.1:\(relay.port)", "--key-file", scratch.file("key"),
                                                    "--block-size", "\(blockSize)", "--disk-postcopy", "--exit-after-migration",
                                                    "--report", scratch.file("src.json")],
                                   logPath: scratch.file("src.log"))
        guard dest.waitForLog("serving the migrated disk", timeout: 60) else {
            throw SupportError("destination never served:\n\(dest.log)\n\(source.log)")
        }
        return (source, dest, relay)
    }

    /// Runs a Python script (with Debian's nbd module) to completion: its status, output, and whether it timed out.
    private func python(_ script: String) throws -> ToolResult {
        try E2E.run("/usr/bin/python3", ["-c", script], timeout: 60)
    }

    /// Reads at the destination of blocks the push has not reached return the source's data, and
    /// long before the push would have brought them.
    func testReaderAtDestinationDuringPostcopyReadsTheRightData() throws {
        try require(tool: "nbdsh")
        let scratch = TemporaryDirectory(prefix: "ferry-postcopy")
        let (source, dest, relay) = try start(scratch)
        defer { relay.stop() }
        let started = Date()
        let check = try python("""
        import nbd, random, time
        h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
        src = open('\(scratch.file("src.img"))', 'rb')
        random.seed(7)
        worst = 0.0
        for offset in sorted(random.sample(range(\(imageMiB / 2 << 20) // 4096, \(imageMiB << 20) // 4096), 24), reverse=True):
            offset *= 4096
            t = time.monotonic(); data = h.pread(8192 if offset + 8192 <= \(imageMiB << 20) else 4096, offset); worst = max(worst, time.monotonic() - t)
            src.seek(offset); assert data == src.read(len(data)), 'wrong data at %d' % offset
        print('reads ok, slowest %.3f s' % worst)
        """)
        XCTAssertEqual(check.status, 0, "\(check)\n\(dest.log)")
        XCTAssertTrue(check.stdout.contains("reads ok"), "\(check)")
        XCTAssertLessThan(Date().timeIntervalSince(started), 8, "reads waited for the push instead of fetching: \(check)")
        print("post-copy reads at the destination: \(check.stdout.trimmingCharacters(in: .whitespacesAndNewlines))")
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        XCTAssertEqual(try SHA256Hex.of(file: scratch.file("src.img")), try SHA256Hex.of(file: scratch.file("dst.img")), "the images differ")
        let report = try E2E.report(scratch.file("dst.json"), log: dest.log)
        let requests = try report.object("disk").integer("postcopy_requests")
        XCTAssertGreaterThan(requests, 0, "no block was fetched over the urgent lane: \(report)")
    }

    /// The link (main connection and urgent lane) is cut during post-copy: the agents reconnect,
    /// the urgent lane is reopened, reads of missing blocks are served again, and the images end equal.
    func testLinkCutDuringPostcopyIsResumedAndReadsStillWork() throws {
        try require(tool: "nbdsh")
        let scratch = TemporaryDirectory(prefix: "ferry-postcopy")
        let (source, dest, relay) = try start(scratch)
        defer { relay.stop() }
        func readCheck(_ offsets: [Int]) throws -> ToolResult {
            try python("""
            import nbd
            h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
            src = open('\(scratch.file("src.img"))', 'rb')
            for offset in \(offsets):
                src.seek(offset); assert h.pread(4096, offset) == src.read(4096), 'wrong data at %d' % offset
            print('reads ok')
            """)
        }
        let before = try readCheck([(imageMiB - 1) << 20, (imageMiB - 3) << 20])
        XCTAssertEqual(before.status, 0, "\(before)\n\(dest.log)")
        XCTAssertTrue(before.stdout.contains("reads ok"), "\(before)\n\(dest.log)")
        relay.cut()
        XCTAssertTrue(source.waitForLog("link resumed", timeout: 30), "no resume after the cut:\n\(source.log)")
        let after = try readCheck([(imageMiB - 2) << 20 + 8192, (imageMiB - 5) << 20 + 4096])
        XCTAssertEqual(after.status, 0, "\(after)\n\(dest.log)\n\(source.log)")
        XCTAssertTrue(after.stdout.contains("reads ok"), "\(after)\n\(dest.log)\n\(source.log)")
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log + "\nDEST:\n" + dest.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        XCTAssertEqual(try SHA256Hex.of(file: scratch.file("src.img")), try SHA256Hex.of(file: scratch.file("dst.img")), "the images differ")
    }

    /// A write at the destination to a block that has not arrived, then the late bulk copy of the
    /// same block: the destination's data stays.
    func testDestinationWriteWinsOverALateBulkBlock() throws {
        try require(tool: "nbdsh")
        let scratch = TemporaryDirectory(prefix: "ferry-postcopy")
        let (source, dest, relay) = try start(scratch)
        defer { relay.stop() }
        let offset = (imageMiB << 20) - (1 << 20) + 8192      // near the end: the push gets there last
        let write = try python("""
        import nbd
        h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
        h.pwrite(b'D' * 4096, \(offset)); h.flush()
        assert h.pread(4096, \(offset)) == b'D' * 4096
        print('written')
        """)
        XCTAssertEqual(write.status, 0, "\(write)\n\(dest.log)")
        XCTAssertTrue(write.stdout.contains("written"), "\(write)")
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        let fd = open(scratch.file("dst.img"), O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0, "open dst.img: errno \(errno)")
        defer { close(fd) }
        var block = [UInt8](repeating: 0, count: 4096 * 2)
        XCTAssertEqual(block.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }, block.count)
        XCTAssertEqual(Array(block[..<4096]), [UInt8](repeating: 0x44, count: 4096), "the late bulk copy overwrote the destination's write")
        // The neighbour arrived from the source, untouched by the write.
        let sourceFD = open(scratch.file("src.img"), O_RDONLY)
        XCTAssertGreaterThanOrEqual(sourceFD, 0, "open src.img: errno \(errno)")
        defer { close(sourceFD) }
        var neighbour = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(neighbour.withUnsafeMutableBytes { pread(sourceFD, $0.baseAddress, $0.count, off_t(offset + 4096)) }, neighbour.count)
        XCTAssertEqual(Array(block[4096...]), neighbour)
    }
}
