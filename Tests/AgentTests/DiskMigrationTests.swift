import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// End-to-end disk migrations between the real source-agent and dest-agent executables, with real
/// NBD clients writing to the source's disk during the migration.
final class DiskMigrationTests: XCTestCase {
    /// Everything one migration needs: a temporary directory, a key, a source image of random data
    /// (with a hole), and a relay that can slow the link down and cut it.
    private final class Setup {
        let dir = TemporaryDirectory(prefix: "ferry-disk")
        let destPort: UInt16
        let relay: E2E.Relay
        /// Bytes of random data at the start of the image (the rest is a hole).
        let dataBytes: Int
        var key: String { dir.file("key") }
        var source: String { dir.file("src.img") }
        var destination: String { dir.file("dst.img") }
        var sourceSocket: String { dir.file("src.sock") }
        var destSocket: String { dir.file("dst.sock") }

        init(imageMiB: Int, linkBytesPerSecond: Double) throws {
            destPort = try freePort()
            relay = try E2E.Relay(targetPort: destPort, bytesPerSecond: linkBytesPerSecond)
            try writeKeyFile(at: dir.file("key"))
            // Random data in the first three quarters, a hole in the last quarter.
            dataBytes = (imageMiB * 3 / 4) << 20
            try dir.sparseFile("src.img", size: UInt64(imageMiB) << 20)
            let fd = open(source, O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else { throw SupportError("open \(source) failed: errno \(errno)") }
            defer { close(fd) }
            for index in 0..<(imageMiB * 3 / 4) {
                let block = randomBytes(count: 1 << 20, seed: 0xD15C_0000 + UInt64(index))
                let written = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(index << 20)) }
                guard written == block.count else { throw SupportError("pwrite of MiB \(index) of \(source) wrote \(written): errno \(errno)") }
            }
        }

        deinit { relay.stop() }

        /// Starts dest-agent and waits until it listens.
        func startDest(extra: [String] = []) throws -> E2E.Agent {
            let dest = try E2E.Agent("dest-agent", ["--listen", "127.0.0.1:\(destPort)", "--key-file", key, "--disk", destination,
                                                    "--nbd", "unix:\(destSocket)", "--report", dir.file("dst.json"),
                                                    "--exit-after-migration", "--link-timeout", "20"] + extra,
                                     logPath: dir.file("dest.log"))
            guard dest.waitForLog("waiting for the source", timeout: 60) else { throw SupportError("dest-agent never listened: \(dest.log)") }
            return dest
        }

        /// Starts source-agent (serving the disk over NBD, migrating through the relay) and waits
        /// until it serves, so a writer can connect.
        func startSource(extra: [String] = [], key: String? = nil, through port: UInt16? = nil) throws -> E2E.Agent {
            let agent = try E2E.Agent("source-agent", ["--disk", source, "--nbd", "unix:\(sourceSocket)",
                                                       "--dest", "127.0.0.1:\(port ?? relay.port)",
                                                       "--key-file", key ?? self.key, "--block-size", "4096", "--report", dir.file("src.json"),
                                                       "--log-level", "debug"] + extra,
                                      logPath: dir.file("src.log"))
            guard agent.waitForLog("serving disk", timeout: 60) else { throw SupportError("source-agent never served the disk: \(agent.log)") }
            return agent
        }

        /// A fio random writer through the source's NBD server at `rate` (fio's notation, e.g. "5m").
        func startWriter(rate: String, seconds: Int) throws -> FioWriter {
            try FioWriter(socket: sourceSocket, rate: rate, seconds: seconds, output: dir.file("fio.json"), log: dir.file("fio.log"))
        }

        /// The agent's report `name`, waiting up to 10 s for it: an agent logs that the migration
        /// ended just before it writes the report (atomically), so a test that saw the line may be early.
        func report(_ name: String, log: @autoclosure () -> String) throws -> [String: Any] {
            _ = waitUntil(timeout: 10) { FileManager.default.fileExists(atPath: dir.file(name)) }
            return try E2E.report(dir.file(name), log: log())
        }

        func imagesEqual(file: StaticString = #filePath, line: UInt = #line) throws {
            XCTAssertEqual(try SHA256Hex.of(file: source), try SHA256Hex.of(file: destination), "the images differ", file: file, line: line)
        }
    }

    /// fio writing 4 KiB blocks at random through the source's NBD server (the VM's writes), its
    /// results in JSON. ``finish(file:line:)`` checks how it ended.
    final class FioWriter {
        let child: ChildProcess
        let output: String
        let logPath: String

        init(socket: String, rate: String, seconds: Int, output: String, log: String) throws {
            let fio = try require(tool: "fio")
            self.output = output
            logPath = log
            child = try ChildProcess(fio, ["--name=writer", "--ioengine=nbd", "--uri=nbd+unix:///?socket=\(socket)", "--rw=randwrite",
                                           "--bs=4k", "--rate=\(rate)", "--time_based", "--runtime=\(seconds)", "--size=16m", "--offset=4m",
                                           "--output-format=json", "--output=\(output)"],
                                     environment: E2E.toolEnvironment, stdout: .file(log), stderr: .file(log))
        }

        /// Once the source-agent has exited: waits for fio to end and checks that it wrote, and that
        /// it ended either at its own runtime (status 0, no error) or because the source stopped
        /// serving after the VM moved (status 1, error: the connection went away, or ESHUTDOWN for a
        /// write held at the pause). Any other error (EIO: the source failed a write during the
        /// migration) or no write at all fails the test. Returns the bytes written.
        @discardableResult
        func finish(file: StaticString = #filePath, line: UInt = #line) throws -> Int {
            let status = try XCTUnwrap(child.wait(timeout: 60), "fio did not end within 60 s of the source's exit", file: file, line: line)
            let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
            // fio may print a line ("fio: terminating on signal ...") ahead of the JSON.
            let json = text.firstIndex(of: "{").map { String(text[$0...]) } ?? ""
            let parsed = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
            let object = try XCTUnwrap(parsed, "fio (status \(status)) wrote no JSON results: \(text.prefix(2000))\n\(log.suffix(2000))",
                                       file: file, line: line)
            let jobs = try XCTUnwrap(object["jobs"] as? [[String: Any]], "\(object)", file: file, line: line)
            let job = try XCTUnwrap(jobs.first, "fio reported no job", file: file, line: line)
            let error = UInt32(truncatingIfNeeded: try job.integer("error", file: file, line: line))
            let written = try job.object("write", file: file, line: line).integer("io_bytes", file: file, line: line)
            XCTAssertGreaterThan(written, 64 << 10, "fio wrote (almost) nothing through the source's NBD server: \(log.suffix(2000))",
                                 file: file, line: line)
            // -1: libnbd's connection is dead (the source closed it after hand-over); ENOTCONN,
            // ECONNRESET, EPIPE: the same seen by a send; ESHUTDOWN: a write held at the pause and
            // refused when the source stopped serving.
            let endOfServing: Set<UInt32> = [UInt32.max, UInt32(ESHUTDOWN), UInt32(ENOTCONN), UInt32(ECONNRESET), UInt32(EPIPE)]
            if status == 0 {
                XCTAssertEqual(error, 0, "fio exited 0 with error \(error): \(log.suffix(2000))", file: file, line: line)
            } else {
                XCTAssertEqual(status, 1, "fio ended with status \(status): \(log.suffix(2000))", file: file, line: line)
                XCTAssertTrue(endOfServing.contains(error),
                              "fio failed with error \(error) (\(String(cString: strerror(Int32(truncatingIfNeeded: error))))), "
                              + "not because the source stopped serving after hand-over: \(log.suffix(2000))", file: file, line: line)
            }
            return written
        }
    }

    /// A writer keeps writing through the source's NBD server during the migration; after
    /// switchover the destination's image equals the source's at the moment of pause.
    func testMigrationUnderAWriterEndsWithEqualImages() throws {
        try require(tool: "fio")
        let setup = try Setup(imageMiB: 48, linkBytesPerSecond: 24e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--exit-after-migration"])
        let writer = try setup.startWriter(rate: "2m", seconds: 60)
        XCTAssertEqual(source.waitForExit(timeout: 120), 0, "source-agent failed:\n\(source.log)")
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
        try writer.finish()

        let report = try setup.report("src.json", log: source.log)
        XCTAssertEqual(try report.string("status"), "completed", "\(report)")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        let disk = try report.object("disk")
        let rounds = try disk.integers("blocks_per_round")
        XCTAssertGreaterThanOrEqual(rounds.count, 2, "expected the bulk copy and at least the final round: \(disk)")
        XCTAssertGreaterThan(rounds.dropFirst().reduce(0, +), 0, "the writer's blocks were never sent again: \(disk)")
        try setup.imagesEqual()
        let downtime = try report.number("downtime_ms")
        XCTAssertGreaterThan(downtime, 0)
        XCTAssertLessThan(downtime, 2000)
        print("disk migration under a writer: \(report["total_time_ms"] ?? 0) ms total, \(downtime) ms downtime, rounds \(rounds)")
    }

    /// A writer that dirties faster than the link drains: the source throttles it (Bradford et al.
    /// 2007), the migration still ends, and the images are equal.
    func testWriterFasterThanTheLinkIsThrottledAndTheMigrationEnds() throws {
        try require(tool: "fio")
        let setup = try Setup(imageMiB: 24, linkBytesPerSecond: 4e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--exit-after-migration", "--max-rounds", "8", "--throttle-delay-ms", "5"])
        let writer = try setup.startWriter(rate: "8m", seconds: 120)
        XCTAssertEqual(source.waitForExit(timeout: 150), 0, "source-agent failed:\n\(source.log)")
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
        try writer.finish()
        let report = try setup.report("src.json", log: source.log)
        let disk = try report.object("disk")
        XCTAssertEqual(try report.string("status"), "completed", "\(report)")
        XCTAssertTrue(source.log.contains("write throttle on"), "the throttle never engaged:\n\(source.log)")
        XCTAssertGreaterThan(try disk.integer("throttled_writes"), 0, "\(disk)")
        XCTAssertGreaterThan(try disk.number("throttle_seconds"), 0, "\(disk)")
        try setup.imagesEqual()
        print("throttled migration: \(disk["throttled_writes"] ?? 0) writes delayed over \(disk["throttle_seconds"] ?? 0) s, rounds \(disk["blocks_per_round"] ?? [])")
    }

    /// The link is cut once during the bulk copy and once during the dirty rounds; both agents
    /// reconnect, resume from the last acknowledged point and still end with equal images. The
    /// first cut comes once 24 MiB (of 36) have reached the destination, so a bulk copy that started
    /// over would send at least those 24 MiB again; resuming sends again only what was in flight or
    /// not yet acknowledged (at most the sockets' buffers and half a second of the 16 MB/s link).
    func testLinkCutMidBulkAndMidDeltaResumesAndEndsEqual() throws {
        try require(tool: "fio")
        let setup = try Setup(imageMiB: 48, linkBytesPerSecond: 16e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--exit-after-migration", "--max-downtime", "0.05", "--link-timeout", "20"])
        let writer = try setup.startWriter(rate: "3m", seconds: 60)

        XCTAssertTrue(source.waitForLog("bulk copy started", timeout: 60), source.log)
        XCTAssertTrue(waitUntil(timeout: 60) { setup.relay.bytesToTarget >= 24 << 20 }, "24 MiB never reached the destination")
        let deliveredAtCut = setup.relay.bytesToTarget
        let bulkDoneBeforeCut = source.log.contains("disk bulk copy sent")
        setup.relay.cut()                                           // mid-bulk
        XCTAssertFalse(bulkDoneBeforeCut, "the bulk copy ended before the first cut (the cut must fall inside it):\n\(source.log)")
        XCTAssertTrue(source.waitForLog("link resumed", timeout: 60), "no resume after the first cut:\n\(source.log)")
        XCTAssertTrue(source.waitForLog("round done", timeout: 60), "never reached a dirty round:\n\(source.log)")
        setup.relay.cut()                                           // mid-delta
        XCTAssertEqual(source.waitForExit(timeout: 120), 0, "source-agent failed:\n\(source.log)")
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
        try writer.finish()

        let report = try setup.report("src.json", log: source.log)
        XCTAssertEqual(try report.string("status"), "completed", "\(report)")
        XCTAssertGreaterThanOrEqual(try report.integer("reconnects"), 2, "\(report)")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        try setup.imagesEqual()
        let bulk = try report.object("disk").integer("bulk_bytes")
        XCTAssertGreaterThanOrEqual(bulk, setup.dataBytes, "the bulk copy sent less than the image's data")
        XCTAssertLessThan(bulk, setup.dataBytes + Int(deliveredAtCut),
                          "the bulk copy started over instead of resuming: \(bulk) bytes for \(setup.dataBytes) of data, \(deliveredAtCut) delivered at the cut")
    }

    /// kill -9 of dest-agent during the bulk copy (it has received part of the disk): the source
    /// gives the migration up after its link timeout, says why, and keeps serving the VM's disk
    /// (reads and writes still work).
    func testDestKilledBeforeSwitchoverLeavesTheSourceServing() throws {
        let nbdsh = try require(tool: "nbdsh")
        let setup = try Setup(imageMiB: 48, linkBytesPerSecond: 4e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--link-timeout", "2"])
        XCTAssertTrue(source.waitForLog("bulk copy started", timeout: 60), source.log)
        XCTAssertTrue(dest.waitForLog("receiving disk", timeout: 60), "the destination never received the migration:\n\(dest.log)")
        XCTAssertTrue(waitUntil(timeout: 60) { setup.relay.bytesToTarget >= 1 << 20 }, "no data reached the destination")
        XCTAssertFalse(source.log.contains("switching over"), "the destination must die before switchover:\n\(source.log)")
        dest.signal(SIGKILL)
        XCTAssertNotNil(dest.waitForExit(timeout: 10))
        setup.relay.cut()
        XCTAssertTrue(source.waitForLog("migration failed", timeout: 60), "no failure reported:\n\(source.log)")
        XCTAssertTrue(source.log.contains("the VM keeps running at the source"), source.log)
        XCTAssertTrue(source.isRunning, "source-agent exited instead of serving on")
        let report = try setup.report("src.json", log: source.log)
        XCTAssertEqual(try report.string("vm_location"), "source", "\(report)")

        let probe = try E2E.run(nbdsh, ["-u", "nbd+unix:///?socket=\(setup.sourceSocket)", "-c",
                                        "h.pwrite(b'ferry' * 819 + b'x', 4096); assert h.pread(4096, 4096)[:5] == b'ferry'; print('served', h.get_size())"])
        XCTAssertEqual(probe.status, 0, "\(probe)")
        XCTAssertTrue(probe.stdout.contains("served \(48 << 20)"), "\(probe)")
        source.signal(SIGTERM)
        XCTAssertEqual(source.waitForExit(timeout: 20), 0, source.log)
    }

    /// A source holding another key is refused at the handshake (the destination logs the refusal);
    /// nothing is written at the destination and the source keeps serving.
    func testWrongKeyIsRefused() throws {
        let setup = try Setup(imageMiB: 4, linkBytesPerSecond: 0)
        let dest = try setup.startDest()
        let otherKey = setup.dir.file("other.key")
        try writeKeyFile(at: otherKey, seed: 7)
        let source = try setup.startSource(extra: ["--exit-after-migration", "--link-timeout", "1"], key: otherKey, through: setup.destPort)
        XCTAssertEqual(source.waitForExit(timeout: 60), 1, source.log)
        XCTAssertTrue(source.log.contains("authentication failed"), source.log)
        XCTAssertTrue(dest.waitForLog("refused a connection", timeout: 30), "the destination did not refuse the impostor:\n\(dest.log)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: setup.destination), "the destination wrote an image for an impostor")
        XCTAssertTrue(dest.isRunning)
        dest.signal(SIGTERM)
    }
}
