import Foundation
import Glibc
import XCTest

/// End-to-end disk migrations between the real source-agent and dest-agent executables, with real
/// NBD clients writing to the source's disk during the migration.
final class DiskMigrationTests: XCTestCase {
    /// Everything one migration needs: a scratch directory, a key, a source image of random data
    /// (with a hole), and a relay that can slow the link down and cut it.
    private struct Setup {
        let scratch = E2E.Scratch()
        let destPort = E2E.freePort()
        let relay: E2E.Relay
        var key: String { scratch.file("key") }
        var source: String { scratch.file("src.img") }
        var destination: String { scratch.file("dst.img") }
        var sourceSocket: String { scratch.file("src.sock") }
        var destSocket: String { scratch.file("dst.sock") }

        init(imageMiB: Int, linkBytesPerSecond: Double) throws {
            relay = try E2E.Relay(targetPort: destPort, bytesPerSecond: linkBytesPerSecond)
            FileManager.default.createFile(atPath: scratch.file("key"), contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
            // Random data in the first three quarters, a hole in the last quarter.
            let fd = open(scratch.file("src.img"), O_RDWR | O_CREAT | O_TRUNC, 0o644)
            ftruncate(fd, off_t(imageMiB << 20))
            var block = [UInt8](repeating: 0, count: 1 << 20)
            for index in 0..<(imageMiB * 3 / 4) {
                for i in stride(from: 0, to: block.count, by: 8) { block.withUnsafeMutableBytes { $0.storeBytes(of: UInt64.random(in: 0...UInt64.max), toByteOffset: i, as: UInt64.self) } }
                _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(index << 20)) }
            }
            close(fd)
        }

        func startDest(extra: [String] = []) throws -> E2E.Agent {
            try E2E.Agent("dest-agent", ["--listen", "127.0.0.1:\(destPort)", "--key-file", key, "--disk", destination,
                                         "--nbd", "unix:\(destSocket)", "--report", scratch.file("dst.json"),
                                         "--exit-after-migration", "--link-timeout", "20"] + extra,
                          logPath: scratch.file("dest.log"))
        }

        func startSource(extra: [String] = []) throws -> E2E.Agent {
            try E2E.Agent("source-agent", ["--disk", source, "--nbd", "unix:\(sourceSocket)", "--dest", "127.0.0.1:\(relay.port)",
                                           "--key-file", key, "--block-size", "4096", "--report", scratch.file("src.json"),
                                           "--log-level", "debug"] + extra,
                          logPath: scratch.file("src.log"))
        }

        /// A fio random writer through the source's NBD server at `rate` (fio's notation, e.g. "5m").
        func startWriter(rate: String, seconds: Int) throws -> Process {
            let writer = Process()
            writer.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
            writer.arguments = ["--name=writer", "--ioengine=nbd", "--uri=nbd+unix:///?socket=\(sourceSocket)", "--rw=randwrite",
                                "--bs=4k", "--rate=\(rate)", "--time_based", "--runtime=\(seconds)", "--size=16m", "--offset=4m"]
            writer.standardOutput = FileHandle.nullDevice
            writer.standardError = FileHandle.nullDevice
            try writer.run()
            return writer
        }

        func report(_ name: String) -> [String: Any] {
            guard let data = FileManager.default.contents(atPath: scratch.file(name)),
                  let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return [:] }
            return object
        }

        func waitForSocket(_ path: String) {
            for _ in 0..<200 where !FileManager.default.fileExists(atPath: path) { usleep(25_000) }
        }
    }

    /// A writer keeps writing through the source's NBD server during the migration; after
    /// switchover the destination's image equals the source's at the moment of pause.
    func testMigrationUnderAWriterEndsWithEqualImages() throws {
        try E2E.requireTool("/usr/bin/fio")
        let setup = try Setup(imageMiB: 48, linkBytesPerSecond: 24e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--exit-after-migration"])
        setup.waitForSocket(setup.sourceSocket)
        let writer = try setup.startWriter(rate: "2m", seconds: 60)
        defer { if writer.isRunning { writer.terminate() } }
        XCTAssertEqual(source.waitForExit(timeout: 120), 0, "source-agent failed:\n\(source.log)")
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
        writer.terminate()

        let report = setup.report("src.json")
        XCTAssertEqual(report["status"] as? String, "completed", "\(report)")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        let disk = report["disk"] as? [String: Any] ?? [:]
        let rounds = disk["blocks_per_round"] as? [Int] ?? []
        XCTAssertGreaterThanOrEqual(rounds.count, 2, "expected the bulk copy and at least the final round: \(disk)")
        XCTAssertGreaterThan(rounds.dropFirst().reduce(0, +), 0, "the writer's blocks were never sent again: \(disk)")
        XCTAssertEqual(E2E.sha256(setup.source), E2E.sha256(setup.destination), "images differ after switchover")
        XCTAssertLessThan(report["downtime_ms"] as? Double ?? 1e9, 2000)
        print("disk migration under a writer: \(report["total_time_ms"] ?? 0) ms total, \(report["downtime_ms"] ?? 0) ms downtime, rounds \(rounds)")
    }

    /// A writer that dirties faster than the link drains: the source throttles it (Bradford et al.
    /// 2007), the migration still ends, and the images are equal.
    func testWriterFasterThanTheLinkIsThrottledAndTheMigrationEnds() throws {
        try E2E.requireTool("/usr/bin/fio")
        let setup = try Setup(imageMiB: 24, linkBytesPerSecond: 4e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--exit-after-migration", "--max-rounds", "8", "--throttle-delay-ms", "5"])
        setup.waitForSocket(setup.sourceSocket)
        let writer = try setup.startWriter(rate: "8m", seconds: 120)
        defer { if writer.isRunning { writer.terminate() } }
        XCTAssertEqual(source.waitForExit(timeout: 150), 0, "source-agent failed:\n\(source.log)")
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
        writer.terminate()
        let report = setup.report("src.json")
        let disk = report["disk"] as? [String: Any] ?? [:]
        XCTAssertEqual(report["status"] as? String, "completed", "\(report)")
        XCTAssertTrue(source.log.contains("write throttle on"), "the throttle never engaged:\n\(source.log)")
        XCTAssertGreaterThan(disk["throttled_writes"] as? Int ?? 0, 0, "\(disk)")
        XCTAssertGreaterThan(disk["throttle_seconds"] as? Double ?? 0, 0, "\(disk)")
        XCTAssertEqual(E2E.sha256(setup.source), E2E.sha256(setup.destination), "images differ after switchover")
        print("throttled migration: \(disk["throttled_writes"] ?? 0) writes delayed over \(disk["throttle_seconds"] ?? 0) s, rounds \(disk["blocks_per_round"] ?? [])")
    }

    /// The link is cut once during the bulk copy and once during the dirty rounds; both agents
    /// reconnect, resume from the last acknowledged point and still end with equal images.
    func testLinkCutMidBulkAndMidDeltaResumesAndEndsEqual() throws {
        try E2E.requireTool("/usr/bin/fio")
        let setup = try Setup(imageMiB: 48, linkBytesPerSecond: 16e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--exit-after-migration", "--max-downtime", "0.05", "--link-timeout", "20"])
        setup.waitForSocket(setup.sourceSocket)
        let writer = try setup.startWriter(rate: "3m", seconds: 60)
        defer { if writer.isRunning { writer.terminate() } }

        XCTAssertTrue(source.waitForLog("bulk copy started", timeout: 20), source.log)
        usleep(800_000)
        setup.relay.cut()                                           // mid-bulk
        XCTAssertTrue(source.waitForLog("link resumed", timeout: 20), "no resume after the first cut:\n\(source.log)")
        XCTAssertTrue(source.waitForLog("round done", timeout: 60), "never reached a dirty round:\n\(source.log)")
        setup.relay.cut()                                           // mid-delta
        XCTAssertEqual(source.waitForExit(timeout: 120), 0, "source-agent failed:\n\(source.log)")
        XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
        writer.terminate()

        let report = setup.report("src.json")
        XCTAssertEqual(report["status"] as? String, "completed", "\(report)")
        XCTAssertGreaterThanOrEqual(report["reconnects"] as? Int ?? 0, 2, "\(report)")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        XCTAssertEqual(E2E.sha256(setup.source), E2E.sha256(setup.destination), "images differ after a resumed migration")
        let bulk = (report["disk"] as? [String: Any])?["bulk_bytes"] as? Int ?? 0
        XCTAssertLessThan(bulk, 48 << 20, "the bulk copy started over instead of resuming: \(bulk) bytes")
    }

    /// kill -9 of dest-agent before switchover: the source gives the migration up after its link
    /// timeout, says why, and keeps serving the VM's disk (reads and writes still work).
    func testDestKilledBeforeSwitchoverLeavesTheSourceServing() throws {
        try E2E.requireTool("/usr/bin/nbdsh")
        let setup = try Setup(imageMiB: 48, linkBytesPerSecond: 4e6)
        let dest = try setup.startDest()
        let source = try setup.startSource(extra: ["--link-timeout", "2"])
        XCTAssertTrue(source.waitForLog("bulk copy started", timeout: 20), source.log)
        usleep(500_000)
        dest.signal(SIGKILL)
        setup.relay.cut()
        XCTAssertTrue(source.waitForLog("migration failed", timeout: 30), "no failure reported:\n\(source.log)")
        XCTAssertTrue(source.log.contains("the VM keeps running at the source"), source.log)
        XCTAssertTrue(source.process.isRunning, "source-agent exited instead of serving on")

        let probe = E2E.run("/usr/bin/nbdsh", ["-u", "nbd+unix:///?socket=\(setup.sourceSocket)", "-c",
                                               "h.pwrite(b'ferry' * 819 + b'x', 4096); assert h.pread(4096, 4096)[:5] == b'ferry'; print('served', h.get_size())"])
        XCTAssertEqual(probe.status, 0, probe.output)
        XCTAssertTrue(probe.output.contains("served \(48 << 20)"), probe.output)
        source.signal(SIGTERM)
        XCTAssertEqual(source.waitForExit(timeout: 20), 0, source.log)
    }

    /// A source holding another key is refused at the handshake; nothing is written at the
    /// destination and the source keeps serving.
    func testWrongKeyIsRefused() throws {
        let setup = try Setup(imageMiB: 4, linkBytesPerSecond: 0)
        let dest = try setup.startDest()
        let otherKey = setup.scratch.file("other.key")
        FileManager.default.createFile(atPath: otherKey, contents: Data(repeating: 7, count: 32))
        let source = try E2E.Agent("source-agent", ["--disk", setup.source, "--nbd", "unix:\(setup.sourceSocket)",
                                                    "--dest", "127.0.0.1:\(setup.destPort)", "--key-file", otherKey,
                                                    "--exit-after-migration", "--link-timeout", "1"],
                                   logPath: setup.scratch.file("src.log"))
        XCTAssertEqual(source.waitForExit(timeout: 30), 1, source.log)
        XCTAssertTrue(source.log.contains("authentication failed"), source.log)
        XCTAssertFalse(FileManager.default.fileExists(atPath: setup.destination), "the destination wrote an image for an impostor")
        XCTAssertTrue(dest.process.isRunning)
        dest.signal(SIGTERM)
    }
}
