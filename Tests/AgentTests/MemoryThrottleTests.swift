import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// The memory write throttle (issue 15): a CPU-bound `ferry-workload` dirtying 40 MB/s, more than the
/// 200 Mbit/s (25 MB/s) emulated WAN (scripts/wan/wan-link.sh, RTT 40 ms) carries, so pre-copy alone
/// could never converge: every round would find the set it sent dirty again. With `--memory-throttle`
/// the source slows the writers once the dirty rate passes half the link; pre-copy then converges and
/// the VM pauses within the downtime target plus one round trip. Both ways are run: `wp` (a dirty limit
/// by synchronous write-protection) and `cpu` (a cgroup CPU limit). The report must show the throttle,
/// the dirty rate it removed and the workload's slowdown, which the workload's own reports confirm.
/// Needs root (network namespaces, ptrace, userfaultfd, cgroups).
final class MemoryThrottleTests: XCTestCase {
    private var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    func testWriteProtectThrottleMakesAFortyMBPerSecondWriterConverge() throws { try throttledMigration(method: "wp", port: 7431) }
    func testCPUThrottleMakesAFortyMBPerSecondWriterConverge() throws { try throttledMigration(method: "cpu", port: 7432) }

    private func throttledMigration(method: String, port: Int) throws {
        try MemE2E.requireMemoryMigration()
        try require(tool: "/usr/sbin/ip", package: "iproute2")
        try require(tool: "/usr/sbin/tc", package: "iproute2")
        try require(root: "network namespaces and cgroups")
        let wan = repositoryRoot.appendingPathComponent("scripts/wan/wan-link.sh").path
        let name = "fth\(getpid() % 1000)\(method)"
        let relayPort = port - 1000
        let up = try E2E.run("/bin/bash", [wan, "up", name, "200", "40", "\(port)", "\(relayPort)"], timeout: 60)
        defer { _ = try? E2E.run("/bin/bash", [wan, "down", name], timeout: 60) }
        XCTAssertEqual(up.status, 0, "\(up)")
        let relay = try XCTUnwrap(up.stdout.split(separator: "\n").last.map(String.init), "wan-link.sh printed nothing: \(up)")

        let dir = TemporaryDirectory(prefix: "ferry-throttle")
        try writeKeyFile(at: dir.file("key"))
        let workloadPath = E2E.tool("ferry-workload")
        // 128 MiB, every page filled; 40 MB/s of page writes, each after 40 us of computation (about
        // 0.4 of a CPU): a VM whose dirtying follows its CPU time, with no catching up on writes it
        // could not do.
        let memoryMiB = 128
        let source = try ChildProcess(workloadPath, ["--memory", "\(memoryMiB)M", "--dirty-rate", "40M", "--work-us", "40",
                                                     "--report-interval", "0.5"])
        defer { source.kill(SIGKILL) }
        try source.waitFor(event: "ready", timeout: 60)
        var before: [Double] = []
        for _ in 0..<3 { before.append(try source.waitFor(event: "report", timeout: 10).number("ops_per_sec")) }

        let bin = E2E.Agent.productsDirectory.path
        let resumedOut = dir.file("resumed.jsonl")
        let dest = try E2E.Agent("/bin/bash", [wan, "dst", name, "\(bin)/dest-agent", "--listen", "127.0.0.1:\(port)",
                                               "--key-file", dir.file("key"), "--uffd-socket", dir.file("uffd.sock"),
                                               "--on-switchover", "\(workloadPath) --resume --uffd-socket \"$FERRY_UFFD_SOCKET\" --layout \"$FERRY_LAYOUT_FILE\" --dirty-rate 20M --seconds 3 > \(resumedOut) 2>&1 &",
                                               "--work-dir", dir.file("dest"), "--report", dir.file("dest.json")],
                                 logPath: dir.file("dest.log"), absolute: true)
        defer { dest.signal(SIGKILL) }
        XCTAssertTrue(dest.waitForLog("waiting for the source", timeout: 60), "dest-agent never listened: \(dest.log)")
        let agent = try E2E.Agent("/bin/bash", [wan, "src", name, "\(bin)/source-agent", "--vm", "\(source.pid)", "--dest", relay,
                                                "--key-file", dir.file("key"), "--memory-throttle", method,
                                                "--report", dir.file("source.json")],
                                  logPath: dir.file("source.log"), absolute: true)
        guard let status = agent.waitForExit(timeout: 180) else {
            throw SupportError("source-agent did not finish within 180 s: \(agent.log)\nDEST:\n\(dest.log)")
        }
        XCTAssertEqual(status, 0, "source-agent failed: \(agent.log)\n--- dest:\n\(dest.log)")
        let during = try source.drainReports()
        let report = try E2E.report(dir.file("source.json"), log: agent.log)
        XCTAssertEqual(try report.string("status"), "completed")
        XCTAssertEqual(report["digests_agree"] as? Bool, true, "the memory arrived as it was at the pause")

        // The throttle was engaged, and it is what let pre-copy converge: the writer dirtied faster
        // than the link before it, and less than the link after.
        let memory = try report.object("memory")
        let throttle = try XCTUnwrap(memory["throttle"] as? [String: Any], "no throttle in the report: \(memory)")
        XCTAssertEqual(try throttle.string("method"), method)
        let link = try report.number("mbps") * 1e6 / 8
        let rateBefore = try throttle.number("dirty_rate_before"), rateAfter = try throttle.number("dirty_rate_throttled")
        XCTAssertGreaterThan(rateBefore, link * 0.5, "the throttle engaged on a writer above half the link: \(throttle)")
        XCTAssertLessThan(rateAfter, link * 0.5, "throttled, the writer dirtied less than half the link: \(throttle)")
        let reason = try report.string("reason")
        XCTAssertFalse(reason.contains("limit"), "pre-copy converged, no round or time limit: \(reason)")

        // Within the downtime target (300 ms by default) plus one round trip of the link.
        let downtime = try report.number("downtime_ms")
        XCTAssertLessThan(downtime, 300 + 40 + 5, "downtime within the target and one RTT: \(report)")

        // The slowdown the report shows, and the workload's own: fewer operations per second while throttled.
        let slowdown = try throttle.number("slowdown")
        XCTAssertGreaterThan(slowdown, 0.1, "the report shows the workload slowed: \(throttle)")
        XCTAssertGreaterThan(try throttle.number("held_ms"), 0, "\(throttle)")
        let engagedMs = try throttle.number("engaged_ms")
        let throttledReports = Array(during.suffix(max(1, Int(engagedMs / 500) - 1)))
        let opsBefore = before.sorted()[1]
        let opsThrottled = throttledReports.sorted()[throttledReports.count / 2]
        XCTAssertLessThan(opsThrottled, opsBefore * 0.9, "the workload slowed while throttled: before \(before), during \(during)")

        // The destination ran the workload on and it verified its pages on exit (3 s).
        let resumed = MemLineFile(resumedOut)
        let exit = try resumed.waitFor("exit", timeout: 30)
        XCTAssertEqual(try exit.integer("corrupt"), 0, "\(exit)")
        print("""
            memory throttle \(method): downtime \(downtime) ms, rounds \(memory["pages_per_round"] ?? "?"), \
            dirty rate \(Int(rateBefore)) -> \(Int(rateAfter)) B/s (link \(Int(link))), report slowdown \(slowdown), \
            held \(throttle["held_ms"] ?? "?") ms over \(engagedMs) ms; workload ops/s before \(opsBefore), throttled \(opsThrottled) \
            (measured slowdown \(String(format: "%.2f", 1 - opsThrottled / opsBefore)))
            """)
    }
}
