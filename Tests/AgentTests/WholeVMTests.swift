import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// One migration of a whole VM (ferry-workload: 256 MiB of memory dirtying 10 MB/s, its disk of
/// 256 MiB written at 5 MB/s through source-agent's NBD server) by the real agents: disk, memory
/// and VM state in one session, under one pause, in every mode; the resumed workload at the
/// destination verifies every page and every disk block and finds them from the same instant.
final class WholeVMTests: XCTestCase {
    /// Checks what every completed whole-VM migration must show in both reports.
    private func checkCompleted(_ rig: WholeVMRig, mode: String, file: StaticString = #filePath, line: UInt = #line) {
        // The destination writes its report after the source's goodbye, so possibly after the source exits.
        let source = rig.report("source.json"), dest = rig.waitForReport("dest.json")
        XCTAssertEqual(source["status"] as? String, "completed", "\(source)\n\(rig.logs)", file: file, line: line)
        XCTAssertEqual(source["vm_location"] as? String, "destination", file: file, line: line)
        XCTAssertEqual(source["digests_agree"] as? Bool, true, file: file, line: line)
        XCTAssertEqual(dest["digests_agree"] as? Bool, true, "\(dest)", file: file, line: line)
        let memory = source["memory"] as? [String: Any] ?? [:]
        let disk = source["disk"] as? [String: Any] ?? [:]
        XCTAssertEqual(memory["mode"] as? String, mode, file: file, line: line)
        XCTAssertEqual((memory["total"] as? NSNumber)?.intValue, rig.memoryMiB << 20, "\(memory)", file: file, line: line)
        XCTAssertEqual((disk["total"] as? NSNumber)?.intValue, rig.diskMiB << 20, "\(disk)", file: file, line: line)
        // The two sides agree on every stream's digest, and the destination's digests are its own.
        XCTAssertEqual(memory["digest"] as? String, (dest["memory"] as? [String: Any])?["digest"] as? String, file: file, line: line)
        XCTAssertEqual(disk["digest"] as? String, (dest["disk"] as? [String: Any])?["digest"] as? String, file: file, line: line)
        // ONE pause for disk and memory together.
        XCTAssertEqual(rig.sourceLog.components(separatedBy: "VM paused").count - 1, 1, "not exactly one pause:\n\(rig.sourceLog)", file: file, line: line)
        let downtime = source["downtime_ms"] as? Double ?? -1
        XCTAssertGreaterThan(downtime, 0, file: file, line: line)
        // Warnings in either log, for the record (a reconnect, a retried request).
        for line in rig.logs.split(separator: "\n") where line.contains(" warning ") || line.contains(" error ") {
            print("  log: \(line.prefix(300))")
        }
        print("whole VM (\(mode)): total \(Int(source["total_time_ms"] as? Double ?? 0)) ms, downtime \(String(format: "%.1f", downtime)) ms, wire \(source["wire_bytes"] ?? 0) B, reconnects \(source["reconnects"] ?? 0)")
    }

    private func migrate(mode: String, extra: [String] = []) throws {
        let rig = try WholeVMRig()
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: mode, extra)
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        checkCompleted(rig, mode: mode)
        // Every round's dirty rate is the VM's (10 MB/s of memory, half of it mirrored to disk), not the
        // first round's dirty set over the few milliseconds since the bulk copy ended (hundreds of MB/s, once).
        let rates = rig.sourceLog.split(separator: "\n").filter { $0.contains("round done") }.compactMap { line in
            line.split(separator: " ").first { $0.hasPrefix("dirty_rate=") }.flatMap { Double($0.dropFirst("dirty_rate=".count)) }
        }
        XCTAssertTrue(rates.allSatisfy { $0 < 60e6 }, "dirty rates measured per round: \(rates)")
        // The link's rate is what crossed it (the relay passes 50 MB/s), not what the send buffer took.
        XCTAssertLessThanOrEqual((rig.report("source.json")["mbps"] as? NSNumber)?.doubleValue ?? .infinity, 50e6 * 8 / 1e6 * 1.05)
        rig.verifyResumed()
    }

    func testPrecopyMovesDiskMemoryAndStateUnderOnePause() throws {
        try migrate(mode: "precopy")
    }

    func testPostcopyMovesDiskMemoryAndStateUnderOnePause() throws {
        try migrate(mode: "postcopy")
    }

    func testHybridMovesDiskMemoryAndStateUnderOnePause() throws {
        try migrate(mode: "hybrid", extra: ["--precopy-rounds", "2"])
    }

    func testDiskPostcopyWithMemoryPrecopy() throws {
        let rig = try WholeVMRig()
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: "precopy", ["--disk-postcopy"])
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        checkCompleted(rig, mode: "precopy")
        let disk = rig.report("source.json")["disk"] as? [String: Any] ?? [:]
        XCTAssertGreaterThan((disk["postcopy_bytes"] as? NSNumber)?.intValue ?? 0, 0, "the disk was not pushed after hand-over: \(disk)")
        XCTAssertEqual((disk["bulk_bytes"] as? NSNumber)?.intValue, 0, "disk post-copy sends nothing before the pause: \(disk)")
        rig.verifyResumed()
    }

    /// Nothing before the pause: memory and disk both post-copy, the VM resumes at once.
    func testMemoryAndDiskBothPostcopy() throws {
        try migrate(mode: "postcopy", extra: ["--disk-postcopy"])
        // (checkCompleted and the resumed verify ran inside migrate)
    }

    /// Hybrid memory with a post-copy disk.
    func testHybridMemoryWithDiskPostcopy() throws {
        try migrate(mode: "hybrid", extra: ["--precopy-rounds", "1", "--disk-postcopy"])
    }

    /// A 5 s outage in the bulk copy, then another in the dirty rounds: the migration completes
    /// without starting over, and everything verifies.
    func testOutagesInBulkAndRoundsAreResumed() throws {
        let rig = try WholeVMRig(linkBytesPerSecond: 40e6)
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: "precopy", ["--max-downtime", "0.001", "--max-rounds", "10", "--link-timeout", "30"])
        XCTAssertTrue(rig.waitForSourceLog("bulk copy started", timeout: 60), rig.logs)
        usleep(1_500_000)
        XCTAssertFalse(rig.sourceLog.contains("round done"), "the bulk copy ended before the cut")
        rig.relay.outage(seconds: 5)
        XCTAssertTrue(rig.waitForSourceLog("link resumed", timeout: 30), "no resume after the bulk outage:\n\(rig.logs)")
        XCTAssertTrue(rig.waitForSourceLog("round done", timeout: 120), rig.logs)
        XCTAssertFalse(rig.sourceLog.contains("VM paused"), "switched over before the second cut")
        rig.relay.outage(seconds: 5)
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        checkCompleted(rig, mode: "precopy")
        let report = rig.report("source.json")
        XCTAssertGreaterThanOrEqual((report["reconnects"] as? NSNumber)?.intValue ?? 0, 2, "\(report)")
        // Resumed, not restarted: the bulk data sent is about one copy of what the VM holds, not two.
        let memory = report["memory"] as? [String: Any] ?? [:], disk = report["disk"] as? [String: Any] ?? [:]
        let bulk = ((disk["bulk_bytes"] as? NSNumber)?.intValue ?? 0) + ((memory["bulk_bytes"] as? NSNumber)?.intValue ?? 0)
        let held = (rig.memoryMiB << 20) + (rig.memoryMiB << 19)
        XCTAssertLessThan(bulk, held + held / 2, "the bulk copy started over: \(bulk) bytes for \(held): \(report)")
        XCTAssertGreaterThanOrEqual(bulk, held, "less than the VM's data went in the bulk copy: \(report)")
        rig.verifyResumed()
    }

    /// A 5 s outage while memory is pulled and pushed in post-copy: the agents reconnect, the
    /// urgent lane is reopened, and the VM at the destination verifies.
    func testOutageDuringMemoryPostcopyIsResumed() throws {
        let rig = try WholeVMRig(linkBytesPerSecond: 12e6)
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: "postcopy", ["--link-timeout", "30"])
        XCTAssertTrue(rig.waitForSourceLog("the VM runs at the destination", timeout: 120), rig.logs)
        usleep(1_000_000)
        XCTAssertFalse(rig.sourceLog.contains("memory push done"), "the push ended before the cut")
        rig.relay.outage(seconds: 5)
        XCTAssertTrue(rig.waitForSourceLog("link resumed", timeout: 30), "no resume after the post-copy outage:\n\(rig.logs)")
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        checkCompleted(rig, mode: "postcopy")
        rig.verifyResumed()
    }

    /// kill -9 of dest-agent before switchover: the VM runs on at the source, its disk served.
    func testDestKilledBeforeSwitchoverLeavesTheVMRunningAtTheSource() throws {
        let rig = try WholeVMRig(linkBytesPerSecond: 20e6)
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: "precopy", ["--link-timeout", "3"])
        XCTAssertTrue(rig.waitForSourceLog("bulk copy started", timeout: 60), rig.logs)
        usleep(500_000)
        rig.dest?.kill(SIGKILL)
        XCTAssertTrue(rig.waitForSourceLog("migration failed", timeout: 60), rig.logs)
        let report = rig.waitForReport("source.json")
        XCTAssertEqual(report["vm_location"] as? String, "source", "\(report)")
        XCTAssertTrue(rig.source?.isRunning ?? false, "source-agent must serve on: \(rig.sourceLog)")
        // The VM was never paused and still writes memory and disk through the source's server.
        let workload = try XCTUnwrap(rig.workload)
        _ = try workload.waitFor(event: "report", timeout: 10)
        let before = try workload.waitFor(event: "report", timeout: 10)
        let after = try workload.waitFor(event: "report", timeout: 10)
        XCTAssertGreaterThan((after["disk_writes"] as? NSNumber)?.intValue ?? 0, (before["disk_writes"] as? NSNumber)?.intValue ?? 0,
                             "the VM's disk writes stopped at the source")
        workload.send("rate 0")
        workload.send("verify")
        let verified = try workload.waitFor(event: "verified", timeout: 120)
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0, "\(verified)")
        XCTAssertEqual((verified["disk_torn"] as? NSNumber)?.intValue, 0, "\(verified)")
    }

    /// kill -9 of dest-agent right after hand-over, then a restart: it recovers from its journal,
    /// the VM runs on at the destination (its disk served again), and the source never resumes.
    func testDestRestartedAfterHandOverRecoversFromItsJournal() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64)
        try rig.startDest(environment: ["FERRY_TEST_STALL_AFTER_HANDOVER_MS": "8000"])
        try rig.startSourceAndWorkload(mode: "precopy", ["--link-timeout", "5"])
        XCTAssertTrue(waitUntil(timeout: 120) { rig.destLog.contains("every page installed in the VM") && rig.destLog.contains("test hook: stalling") }, rig.logs)
        XCTAssertTrue(FileManager.default.fileExists(atPath: rig.workDirectory + "/handover.json"), "no journal before hand-over")
        rig.dest?.kill(SIGKILL)
        _ = rig.dest?.wait(timeout: 10)
        usleep(1_000_000)
        try rig.startDest()
        XCTAssertEqual(rig.waitForSource(timeout: 120), 0, rig.logs)
        let report = rig.report("source.json")
        XCTAssertEqual(report["status"] as? String, "completed", "\(report)\n\(rig.logs)")
        XCTAssertEqual(report["vm_location"] as? String, "destination")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        XCTAssertTrue(rig.destLog.contains("restarted after hand-over"), rig.destLog)
        // The paused copy at the source was never resumed.
        XCTAssertEqual(MemE2E.state(of: rig.workload!.pid), "T", "the source resumed its stale copy")
        rig.verifyResumed()
    }

    /// kill -9 of dest-agent in memory post-copy while pages are still pushed, then a restart: it
    /// takes the VM's userfaultfd back (pidfd_getfd), wakes the faults it had read, pulls again what
    /// it lost, and the VM at the destination verifies; the source never resumes its copy.
    func testDestRestartedDuringMemoryPostcopyTakesTheVMBack() throws {
        let rig = try WholeVMRig(memoryMiB: 128, diskMiB: 128, linkBytesPerSecond: 8e6)
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: "postcopy", ["--link-timeout", "5"])
        XCTAssertTrue(rig.waitForSourceLog("the VM runs at the destination", timeout: 180), rig.logs)
        usleep(1_500_000)
        XCTAssertFalse(rig.sourceLog.contains("memory push done"), "the push ended before the kill")
        rig.dest?.kill(SIGKILL)
        _ = rig.dest?.wait(timeout: 10)
        usleep(1_000_000)
        try rig.startDest()
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        let report = rig.waitForReport("source.json")
        XCTAssertEqual(report["status"] as? String, "completed", "\(report)\n\(rig.logs)")
        XCTAssertEqual(report["vm_location"] as? String, "destination")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        XCTAssertTrue(rig.destLog.contains("took the VM's userfaultfd back"), rig.destLog)
        XCTAssertTrue(rig.sourceLog.contains("pushing every page again"), rig.sourceLog)
        XCTAssertEqual(MemE2E.state(of: rig.workload!.pid), "T", "the source resumed its stale copy")
        rig.verifyResumed()
    }

    /// Stray connections to the destination's port, silent or sending garbage, before and during a
    /// migration, change nothing.
    func testStrayConnectionsChangeNothing() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64)
        try rig.startDest()
        var strays: [Int32] = []
        defer { for fd in strays { close(fd) } }
        func stray(garbage: Bool) {
            guard let fd = connectToLoopback(port: rig.destPort) else { return XCTFail("connect to dest-agent: errno \(errno)") }
            if garbage { _ = "GET / HTTP/1.0\r\n\r\n".withCString { send(fd, $0, 18, 0) } }
            strays.append(fd)
        }
        XCTAssertTrue(waitUntil(timeout: 30) { rig.destLog.contains("waiting for the source") }, rig.destLog)
        for i in 0..<4 { stray(garbage: i % 2 == 0) }
        try rig.startSourceAndWorkload(mode: "precopy")
        XCTAssertTrue(rig.waitForSourceLog("bulk copy started", timeout: 60), rig.logs)
        for i in 0..<4 { stray(garbage: i % 2 == 1) }
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        checkCompleted(rig, mode: "precopy")
        XCTAssertTrue(rig.destLog.contains("refused a connection"), "the strays were not even seen:\n\(rig.destLog)")
        rig.verifyResumed()
    }

    /// The VM-start command fails at the destination: seen at once (not after --vm-start-timeout),
    /// the source resumes its VM within a second and serves its disk on.
    func testVMStartFailureIsSeenAtOnceAndTheSourceResumes() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64)
        let args = rig.destArguments(["--vm-start-timeout", "60"])
        var replaced = args
        if let index = replaced.firstIndex(of: "--on-switchover") { replaced[index + 1] = "echo cannot start >&2; exit 3" }
        rig.dest = try ChildProcess(WholeVMRig.tool("dest-agent"), replaced, stdout: .discard, stderr: .file(rig.dir.file("dest-0.log")))
        try rig.startSourceAndWorkload(mode: "precopy")
        XCTAssertTrue(rig.waitForSourceLog("migration failed", timeout: 120), rig.logs)
        let report = rig.waitForReport("source.json")
        XCTAssertEqual(report["vm_location"] as? String, "source", "\(report)")
        XCTAssertTrue((report["reason"] as? String ?? "").contains("vmStartFailed"), "\(report)")
        XCTAssertTrue((report["reason"] as? String ?? "").contains("exit status 3"), "\(report)")
        XCTAssertLessThan(report["total_time_ms"] as? Double ?? 1e9, 50_000, "the failure waited for the 60 s VM-start timeout")
        // The VM runs again here: not stopped, and its disk writes go on through the source's server.
        XCTAssertTrue(waitUntil(timeout: 5) { MemE2E.state(of: rig.workload!.pid) != "T" }, "the source did not resume its VM")
        let workload = try XCTUnwrap(rig.workload)
        let before = try workload.waitFor(event: "report", timeout: 10)
        let after = try workload.waitFor(event: "report", timeout: 10)
        XCTAssertGreaterThan((after["disk_writes"] as? NSNumber)?.intValue ?? 0, (before["disk_writes"] as? NSNumber)?.intValue ?? 0)
    }
}
