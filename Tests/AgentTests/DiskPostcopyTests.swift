import Foundation
import Glibc
import XCTest

/// Disk post-copy end to end: the destination serves the disk at once while the source pushes it
/// over a slow link; reads and writes of blocks that have not arrived fetch them over the urgent lane.
final class DiskPostcopyTests: XCTestCase {
    private let imageMiB = 32

    private func makeImage(_ path: String) {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        var block = [UInt8](repeating: 0, count: 1 << 20)
        for index in 0..<imageMiB {
            for i in stride(from: 0, to: block.count, by: 8) {
                block.withUnsafeMutableBytes { $0.storeBytes(of: UInt64.random(in: 0...UInt64.max), toByteOffset: i, as: UInt64.self) }
            }
            _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(index << 20)) }
        }
        close(fd)
    }

    /// A sparse image: 4 KiB data islands inside otherwise empty 64 KiB blocks, as a file system's
    /// metadata or a 4k writer leaves them.
    private func makeSparseImage(_ path: String) {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        ftruncate(fd, off_t(imageMiB << 20))
        var island = [UInt8](repeating: 0, count: 4096)
        for index in stride(from: 0, to: imageMiB << 4, by: 3) {          // every third 64 KiB block
            for i in 0..<island.count { island[i] = UInt8.random(in: 1...255) }
            let offset = index * 65536 + (index % 16) * 4096
            _ = island.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        }
        close(fd)
    }

    /// Post-copy of a sparse image with 64 KiB tracking blocks: blocks that are partly holes travel
    /// whole, every block arrives, and the images end equal.
    func testSparseImageWithPartlyHoleBlocksArrivesWhole() throws {
        try E2E.requireTool("/usr/bin/nbdsh")
        let scratch = E2E.Scratch()
        let (source, dest, relay) = try start(scratch, blockSize: 65536, sparse: true)
        defer { relay.stop() }
        let read = python("""
        import nbd
        h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
        src = open('\(scratch.file("src.img"))', 'rb')
        for offset in range(\(imageMiB << 20) - 65536 * 48, \(imageMiB << 20), 65536 * 5):
            src.seek(offset); assert h.pread(65536, offset) == src.read(65536), 'wrong data at %d' % offset
        print('sparse reads ok')
        """)
        XCTAssertTrue(read.output.contains("sparse reads ok"), read.output + dest.log)
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        XCTAssertEqual(E2E.sha256(scratch.file("src.img")), E2E.sha256(scratch.file("dst.img")))
    }

    /// Starts both agents over a 2 MB/s relay (the push of 32 MiB takes ~16 s) and waits until the
    /// destination serves.
    private func start(_ scratch: E2E.Scratch, blockSize: Int = 4096, sparse: Bool = false) throws -> (E2E.Agent, E2E.Agent, E2E.Relay) {
        if sparse { makeSparseImage(scratch.file("src.img")) } else { makeImage(scratch.file("src.img")) }
        FileManager.default.createFile(atPath: scratch.file("key"), contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let destPort = E2E.freePort()
        let relay = try E2E.Relay(targetPort: destPort, bytesPerSecond: 2e6)
        let dest = try E2E.Agent("dest-agent", ["--listen", "127.0.0.1:\(destPort)", "--key-file", scratch.file("key"),
                                                "--disk", scratch.file("dst.img"), "--nbd", "unix:\(scratch.file("dst.sock"))",
                                                "--report", scratch.file("dst.json"), "--exit-after-migration"],
                                 logPath: scratch.file("dest.log"))
        let source = try E2E.Agent("source-agent", ["--disk", scratch.file("src.img"), "--nbd", "unix:\(scratch.file("src.sock"))",
                                                    "--dest", "127.0.0.1:\(relay.port)", "--key-file", scratch.file("key"),
                                                    "--block-size", "\(blockSize)", "--disk-postcopy", "--exit-after-migration",
                                                    "--report", scratch.file("src.json")],
                                   logPath: scratch.file("src.log"))
        XCTAssertTrue(dest.waitForLog("serving the migrated disk", timeout: 20), "destination never served:\n\(dest.log)\n\(source.log)")
        return (source, dest, relay)
    }

    private func python(_ script: String) -> (status: Int32, output: String) {
        E2E.run("/usr/bin/python3", ["-c", script], timeout: 30)
    }

    /// Reads at the destination of blocks the push has not reached return the source's data, and
    /// long before the push would have brought them.
    func testReaderAtDestinationDuringPostcopyReadsTheRightData() throws {
        try E2E.requireTool("/usr/bin/nbdsh")
        let scratch = E2E.Scratch()
        let (source, dest, relay) = try start(scratch)
        defer { relay.stop() }
        let started = Date()
        let check = python("""
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
        XCTAssertEqual(check.status, 0, check.output + dest.log)
        XCTAssertTrue(check.output.contains("reads ok"), check.output)
        XCTAssertLessThan(Date().timeIntervalSince(started), 8, "reads waited for the push instead of fetching: \(check.output)")
        print("post-copy reads at the destination: \(check.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        XCTAssertEqual(E2E.sha256(scratch.file("src.img")), E2E.sha256(scratch.file("dst.img")))
        let report = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: scratch.file("dst.json"))))) as? [String: Any]
        let requests = (report?["disk"] as? [String: Any])?["postcopy_requests"] as? Int ?? 0
        XCTAssertGreaterThan(requests, 0, "no block was fetched over the urgent lane: \(report ?? [:])")
    }

    /// The link (main connection and urgent lane) is cut during post-copy: the agents reconnect,
    /// the urgent lane is reopened, reads of missing blocks are served again, and the images end equal.
    func testLinkCutDuringPostcopyIsResumedAndReadsStillWork() throws {
        try E2E.requireTool("/usr/bin/nbdsh")
        let scratch = E2E.Scratch()
        let (source, dest, relay) = try start(scratch)
        defer { relay.stop() }
        func readCheck(_ offsets: [Int]) -> (status: Int32, output: String) {
            python("""
            import nbd
            h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
            src = open('\(scratch.file("src.img"))', 'rb')
            for offset in \(offsets):
                src.seek(offset); assert h.pread(4096, offset) == src.read(4096), 'wrong data at %d' % offset
            print('reads ok')
            """)
        }
        let before = readCheck([(imageMiB - 1) << 20, (imageMiB - 3) << 20])
        XCTAssertTrue(before.output.contains("reads ok"), before.output + dest.log)
        relay.cut()
        XCTAssertTrue(source.waitForLog("link resumed", timeout: 30), "no resume after the cut:\n\(source.log)")
        let after = readCheck([(imageMiB - 2) << 20 + 8192, (imageMiB - 5) << 20 + 4096])
        XCTAssertTrue(after.output.contains("reads ok"), after.output + dest.log + source.log)
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log + "\nDEST:\n" + dest.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        XCTAssertEqual(E2E.sha256(scratch.file("src.img")), E2E.sha256(scratch.file("dst.img")))
    }

    /// A write at the destination to a block that has not arrived, then the late bulk copy of the
    /// same block: the destination's data stays.
    func testDestinationWriteWinsOverALateBulkBlock() throws {
        try E2E.requireTool("/usr/bin/nbdsh")
        let scratch = E2E.Scratch()
        let (source, dest, relay) = try start(scratch)
        defer { relay.stop() }
        let offset = (imageMiB << 20) - (1 << 20) + 8192      // near the end: the push gets there last
        let write = python("""
        import nbd
        h = nbd.NBD(); h.connect_unix('\(scratch.file("dst.sock"))')
        h.pwrite(b'D' * 4096, \(offset)); h.flush()
        assert h.pread(4096, \(offset)) == b'D' * 4096
        print('written')
        """)
        XCTAssertEqual(write.status, 0, write.output + dest.log)
        XCTAssertEqual(source.waitForExit(timeout: 90), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, dest.log)
        let fd = open(scratch.file("dst.img"), O_RDONLY)
        defer { close(fd) }
        var block = [UInt8](repeating: 0, count: 4096 * 2)
        _ = block.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
        XCTAssertEqual(Array(block[..<4096]), [UInt8](repeating: 0x44, count: 4096), "the late bulk copy overwrote the destination's write")
        // The neighbour arrived from the source, untouched by the write.
        let sourceFD = open(scratch.file("src.img"), O_RDONLY)
        defer { close(sourceFD) }
        var neighbour = [UInt8](repeating: 0, count: 4096)
        _ = neighbour.withUnsafeMutableBytes { pread(sourceFD, $0.baseAddress, $0.count, off_t(offset + 4096)) }
        XCTAssertEqual(Array(block[4096...]), neighbour)
    }
}
