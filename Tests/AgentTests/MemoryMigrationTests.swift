import Foundation
import Glibc
import XCTest

/// End-to-end memory migrations between the real source-agent and dest-agent executables on
/// loopback: a 512 MiB `ferry-workload` dirtying 20 MB/s moves by pre-copy, post-copy and hybrid;
/// the dest-agent resumes it with `ferry-workload --resume` (started by --on-switchover), which
/// touches and verifies every page; both agents' digests must agree.
final class MemoryMigrationTests: XCTestCase {
    func testPrecopyMigratesRunningWorkload() throws { try migrateWorkload(mode: "precopy") }
    func testPostcopyMigratesRunningWorkload() throws { try migrateWorkload(mode: "postcopy") }
    func testHybridMigratesRunningWorkload() throws { try migrateWorkload(mode: "hybrid") }
    /// Guest memory in a memfd (shmem, MAP_SHARED), as VMMs that share guest RAM keep it.
    func testPrecopyMigratesMemfdWorkload() throws { try migrateWorkload(mode: "precopy", memoryMiB: 128, memfd: true) }

    /// The content-hash fallback tracker, forced (it is what runs where the kernel method is unavailable).
    func testPrecopyWithContentHashTracking() throws { try migrateWorkload(mode: "precopy", memoryMiB: 128, hashTracking: true) }

    func migrateWorkload(mode: String, memoryMiB: Int = 512, memfd: Bool = false, hashTracking: Bool = false) throws {
        let pages = memoryMiB * 256
        try MemE2E.requireMemoryMigration()
        let dir = try MemE2E.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let workloadPath = try MemE2E.tool("ferry-workload")
        let key = dir + "/key"
        FileManager.default.createFile(atPath: key, contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let fifo = dir + "/resumed.in"
        let resumedOut = dir + "/resumed.jsonl"
        guard mkfifo(fifo, 0o600) == 0 else { throw MemTestError("mkfifo \(fifo) failed: \(errno)") }
        // Opened read-write so neither side blocks on open; the resumed workload reads commands from it.
        let commands = open(fifo, O_RDWR)
        defer { close(commands) }
        // Whatever happens, the workload the dest-agent resumed must not outlive the test (a resumed
        // workload whose fault handler died waits for ever on its next missing page).
        defer {
            let text = (try? String(contentsOfFile: resumedOut, encoding: .utf8)) ?? ""
            for line in text.split(separator: "\n") {
                if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                   let pid = (object["pid"] as? NSNumber)?.int32Value, pid > 0 { kill(pid, SIGKILL) }
            }
        }

        // The source workload: 512 MiB, every page filled, 20 MB/s of verified rewrites.
        let source = try MemChild(workloadPath, ["--memory", "\(memoryMiB)M", "--dirty-rate", "20M", "--report-interval", "0.5"]
                                                + (memfd ? ["--memfd"] : []))
        let region = try source.waitFor("region", timeout: 60)
        let regionStart = (region["start"] as? NSNumber)?.uint64Value ?? 0
        _ = try source.waitFor("ready", timeout: 60)
        let before = try source.waitFor("report", timeout: 10)
        let opsBefore = (before["ops_per_sec"] as? NSNumber)?.doubleValue ?? 0

        let port = MemE2E.freePort()
        let dest = try MemChild(try MemE2E.tool("dest-agent"), [
            "--listen", "127.0.0.1:\(port)", "--key-file", key, "--uffd-socket", dir + "/uffd.sock",
            "--on-switchover", "cp \"$FERRY_STATE_FILE\" \(dir)/state-at-dest; \(workloadPath) --resume --uffd-socket \"$FERRY_UFFD_SOCKET\" --layout \"$FERRY_LAYOUT_FILE\" --dirty-rate 20M --report-interval 0.5 < \(fifo) > \(resumedOut) 2>&1 &",
            "--work-dir", dir + "/dest", "--report", dir + "/dest.json", "--accept-timeout", "60"], logPath: dir + "/dest.log")
        defer { kill(dest.pid, SIGKILL) }
        usleep(300_000)

        let started = Date()
        var sourceArguments = ["--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", key, "--mode", mode,
                               "--report", dir + "/source.json"]
        if mode == "hybrid" { sourceArguments += ["--precopy-rounds", "1"] }
        if hashTracking { sourceArguments += ["--tracking", "hash"] }
        // An opaque VM-state blob made at pause travels to the destination's FERRY_STATE_FILE.
        sourceArguments += ["--state-cmd", "printf 'state of %s' $FERRY_PID > \"$FERRY_STATE_FILE\""]
        let agent = try MemChild(try MemE2E.tool("source-agent"), sourceArguments, logPath: dir + "/source.log")
        guard let status = agent.wait(timeout: 120) else {
            kill(agent.pid, SIGKILL)
            throw MemTestError("source-agent did not finish within 120 s: \(log(dir + "/source.log"))\nDEST:\n\(log(dir + "/dest.log"))")
        }
        let seconds = Date().timeIntervalSince(started)
        XCTAssertEqual(status, 0, "source-agent failed: \(log(dir + "/source.log"))\n--- dest:\n\(log(dir + "/dest.log"))")
        let opsDuring = source.drainOps()
        XCTAssertEqual(MemE2E.state(of: source.pid), "T", "after switchover the source process stays paused")
        XCTAssertEqual(try? String(contentsOfFile: dir + "/state-at-dest", encoding: .utf8), "state of \(source.pid)",
                       "the VM state reached --on-switchover")

        // The resumed workload at the destination: it runs, dirties and verifies every page it touches.
        let resumed = MemLineFile(resumedOut)
        let ready = try resumed.waitFor("ready", timeout: 20)
        XCTAssertEqual((ready["pages"] as? NSNumber)?.intValue, pages)
        let after = try resumed.waitFor("report", timeout: 10)
        let opsAfter = (after["ops_per_sec"] as? NSNumber)?.doubleValue ?? 0
        func command(_ text: String) { _ = (text + "\n").withCString { write(commands, $0, strlen($0)) } }
        // The VM drops three pages (MADV_DONTNEED: a UFFD_EVENT_REMOVE at the destination): they must
        // read as zero from then on, whatever the migration still delivers for them.
        command("rate 0")
        _ = try resumed.waitFor("rate", timeout: 10)
        command("drop 7 8 9")
        let dropped = try resumed.waitFor("dropped", timeout: 10)
        XCTAssertEqual((dropped["count"] as? NSNumber)?.intValue, 3)
        command("verify")
        let verified = try resumed.waitFor("verified", timeout: 60)
        XCTAssertEqual((verified["untouched"] as? NSNumber)?.intValue, 3, "dropped pages read as zero: \(verified)")
        command("rate 20M")
        // SIGSTOP may catch the source workload halfway through rewriting one page (its CPU state
        // does not travel to the resumed workload, which cannot finish that write): such a page
        // is torn at the source itself, and migrating it faithfully is right. Any other corrupt
        // page is a migration bug.
        for page in resumed.corruptPages {
            XCTAssertFalse(try MemPattern.isIntact(pid: source.pid, address: regionStart + UInt64(page) * 4096, index: UInt64(page)),
                           "page \(page) is intact at the paused source but corrupt at the destination")
        }
        XCTAssertLessThanOrEqual(resumed.corruptPages.count, 1, "at most the one page SIGSTOP interrupted: \(resumed.corruptPages)")
        let torn = resumed.corruptPages.count
        XCTAssertEqual((verified["valid"] as? NSNumber)?.intValue, pages - 3 - (verified["corrupt"] as? NSNumber)!.intValue,
                       "every page arrives with its pattern: \(verified)")
        // Keep running and verifying a little longer, then quit cleanly.
        usleep(2_000_000)
        command("quit")
        let exit = try resumed.waitFor("exit", timeout: 20)
        XCTAssertLessThanOrEqual((exit["corrupt"] as? NSNumber)?.intValue ?? 99, torn, "resumed workload: \(exit)")

        // The destination writes its final report (with the fault figures) when its VM has gone.
        let destStatus = dest.wait(timeout: 20)
        if destStatus == nil { kill(dest.pid, SIGTERM); _ = dest.wait(timeout: 10) }
        XCTAssertEqual(dest.exitStatus, 0, "dest-agent: \(log(dir + "/dest.log"))")
        let sourceReport = try MemE2E.readJSON(dir + "/source.json")
        let destReport = try MemE2E.readJSON(dir + "/dest.json")
        XCTAssertEqual(sourceReport["status"] as? String, "completed")
        XCTAssertEqual(sourceReport["digests_agree"] as? Bool, true)
        XCTAssertEqual(destReport["digests_agree"] as? Bool, true)
        let sourceMemory = try XCTUnwrap(sourceReport["memory"] as? [String: Any])
        let destMemory = try XCTUnwrap(destReport["memory"] as? [String: Any])
        XCTAssertEqual(sourceMemory["digest"] as? String, destMemory["digest"] as? String)
        XCTAssertEqual(sourceMemory["tracking_method"] as? String,
                       mode == "postcopy" ? "none (post-copy)" : hashTracking ? "content-hash" : "uffd-wp-async+pagemap-scan")
        let missing = destMemory["fault_latency_missing"] as? [String: Any]
        let received = destMemory["fault_latency_received"] as? [String: Any]
        let requests = (sourceMemory["postcopy_requests"] as? NSNumber)?.intValue ?? 0
        let pushed = (sourceMemory["pages_pushed"] as? NSNumber)?.intValue ?? 0
        switch mode {
        case "precopy":
            XCTAssertEqual(requests, 0)
            XCTAssertGreaterThan((destMemory["faults_on_received"] as? NSNumber)?.intValue ?? 0, pages * 3 / 4, "the resumed workload faulted its pages in")
        case "postcopy":
            XCTAssertGreaterThan(pushed, 0, "post-copy pushes pages")
            XCTAssertGreaterThan((destMemory["faults_on_missing"] as? NSNumber)?.intValue ?? 0, 0, "the resumed workload faulted on pages not yet here")
        default:
            XCTAssertGreaterThanOrEqual((sourceMemory["pages_per_round"] as? [Any])?.count ?? 0, 2, "hybrid ran pre-copy rounds")
        }
        print("""
            memory migration \(mode)\(memfd ? " (memfd)" : ""): \(String(format: "%.1f", seconds)) s, downtime \(sourceReport["downtime_ms"] ?? "?") ms, \
            wire \(sourceReport["wire_bytes"] ?? "?") bytes, pages per round \(sourceMemory["pages_per_round"] ?? "?"), \
            requests \(requests), pushed \(pushed), fault p50 received \(received?["p50_us"] ?? "?") us, \
            missing \(missing?["p50_us"] ?? "?") us; workload ops/s before \(opsBefore), during \(opsDuring), after \(opsAfter)
            """)
        kill(source.pid, SIGKILL)
    }

    /// A failure before switchover (the destination dies during the bulk copy) leaves the source
    /// process running, never stopped.
    func testDestinationDeathBeforeSwitchoverLeavesSourceRunning() throws {
        try MemE2E.requireMemoryMigration()
        let dir = try MemE2E.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = dir + "/key"
        FileManager.default.createFile(atPath: key, contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let source = try MemChild(try MemE2E.tool("ferry-workload"), ["--memory", "512M", "--dirty-rate", "20M", "--report-interval", "0.2"])
        _ = try source.waitFor("ready", timeout: 60)
        let port = MemE2E.freePort()
        let dest = try MemChild(try MemE2E.tool("dest-agent"), ["--listen", "127.0.0.1:\(port)", "--key-file", key,
                                                              "--accept-timeout", "60"], logPath: dir + "/dest.log")
        usleep(300_000)
        let agent = try MemChild(try MemE2E.tool("source-agent"), [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", key, "--max-downtime", "0.000001",
            "--max-rounds", "100000", "--link-timeout", "3", "--report", dir + "/source.json"], logPath: dir + "/source.log")
        // Kill the destination once the source is connected, well inside the 512 MiB bulk copy.
        let deadline = Date().addingTimeInterval(30)
        while !log(dir + "/dest.log").contains("receiving memory") && Date() < deadline { usleep(10_000) }
        usleep(100_000)
        XCTAssertFalse(log(dir + "/source.log").contains("switching over"), "the destination must die before switchover")
        kill(dest.pid, SIGKILL)
        _ = dest.wait(timeout: 10)
        guard let status = agent.wait(timeout: 60) else {
            kill(agent.pid, SIGKILL)
            throw MemTestError("source-agent did not give up within 60 s after the destination died: \(log(dir + "/source.log"))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(dir + "/source.log"))")
        let report = try MemE2E.readJSON(dir + "/source.json")
        XCTAssertEqual(report["status"] as? String, "failed")
        // The workload runs on here: not stopped, and it still reports and verifies.
        XCTAssertNotEqual(MemE2E.state(of: source.pid), "T")
        _ = source.drainOps()
        let report2 = try source.waitFor("report", timeout: 5)
        XCTAssertEqual((report2["corrupt"] as? NSNumber)?.intValue, 0)
        source.send("write 1 2 3")
        let written = try source.waitFor("written", timeout: 10)
        XCTAssertEqual((written["count"] as? NSNumber)?.intValue, 3)
        kill(source.pid, SIGKILL)
    }

    /// A failure after the pause but before switchover (the VM-state hook fails) resumes the
    /// paused process with SIGCONT.
    func testFailureAfterPauseResumesSource() throws {
        try MemE2E.requireMemoryMigration()
        let dir = try MemE2E.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = dir + "/key"
        FileManager.default.createFile(atPath: key, contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let source = try MemChild(try MemE2E.tool("ferry-workload"), ["--memory", "64M", "--dirty-rate", "4M", "--report-interval", "0.2"])
        _ = try source.waitFor("ready", timeout: 60)
        let port = MemE2E.freePort()
        let dest = try MemChild(try MemE2E.tool("dest-agent"), ["--listen", "127.0.0.1:\(port)", "--key-file", key,
                                                              "--accept-timeout", "60"], logPath: dir + "/dest.log")
        defer { kill(dest.pid, SIGKILL) }
        usleep(300_000)
        let agent = try MemChild(try MemE2E.tool("source-agent"), [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", key, "--state-cmd", "echo paused-at-$FERRY_PID > \(dir)/hook; exit 3",
            "--report", dir + "/source.json"], logPath: dir + "/source.log")
        guard let status = agent.wait(timeout: 60) else {
            kill(agent.pid, SIGKILL)
            throw MemTestError("source-agent did not finish: \(log(dir + "/source.log"))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(dir + "/source.log"))")
        XCTAssertEqual(try? String(contentsOfFile: dir + "/hook", encoding: .utf8), "paused-at-\(source.pid)\n", "the hook ran at pause")
        let report = try MemE2E.readJSON(dir + "/source.json")
        XCTAssertEqual(report["status"] as? String, "failed")
        XCTAssertTrue((report["reason"] as? String ?? "").contains("exit status 3"), "\(report["reason"] ?? "")")
        usleep(100_000)
        XCTAssertNotEqual(MemE2E.state(of: source.pid), "T", "SIGCONT resumed the paused process")
        _ = source.drainOps()
        source.send("write 5 6")
        let written = try source.waitFor("written", timeout: 10)
        XCTAssertEqual((written["count"] as? NSNumber)?.intValue, 2)
        kill(source.pid, SIGKILL)
    }

    /// The destination cannot start the VM (its --on-switchover starts nothing that hands over
    /// memory): it says so with error(vmStartFailed) before anything ran there, and the source
    /// resumes its paused process instead of leaving the VM nowhere.
    func testVMStartFailureAtDestinationResumesSource() throws {
        try MemE2E.requireMemoryMigration()
        let dir = try MemE2E.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = dir + "/key"
        FileManager.default.createFile(atPath: key, contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let source = try MemChild(try MemE2E.tool("ferry-workload"), ["--memory", "64M", "--dirty-rate", "4M", "--report-interval", "0.2"])
        _ = try source.waitFor("ready", timeout: 60)
        let port = MemE2E.freePort()
        let dest = try MemChild(try MemE2E.tool("dest-agent"), [
            "--listen", "127.0.0.1:\(port)", "--key-file", key, "--uffd-socket", dir + "/uffd.sock", "--on-switchover", "true",
            "--vm-start-timeout", "1", "--work-dir", dir + "/dest", "--accept-timeout", "60"], logPath: dir + "/dest.log")
        defer { kill(dest.pid, SIGKILL) }
        usleep(300_000)
        let agent = try MemChild(try MemE2E.tool("source-agent"), [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", key, "--report", dir + "/source.json"],
                                 logPath: dir + "/source.log")
        guard let status = agent.wait(timeout: 60) else {
            kill(agent.pid, SIGKILL)
            throw MemTestError("source-agent did not finish: \(log(dir + "/source.log"))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(dir + "/source.log"))")
        let report = try MemE2E.readJSON(dir + "/source.json")
        XCTAssertTrue((report["reason"] as? String ?? "").contains("vmStartFailed"), "\(report["reason"] ?? "")")
        XCTAssertEqual(report["vm_location"] as? String, "source", "\(report)")
        XCTAssertTrue(log(dir + "/source.log").contains("the VM keeps running at the source"), log(dir + "/source.log"))
        usleep(100_000)
        XCTAssertNotEqual(MemE2E.state(of: source.pid), "T", "the source resumed its process")
        _ = source.drainOps()
        source.send("write 5 6")
        let written = try source.waitFor("written", timeout: 10)
        XCTAssertEqual((written["count"] as? NSNumber)?.intValue, 2)
        XCTAssertEqual(dest.wait(timeout: 10), 1, "dest-agent reports the failure: \(log(dir + "/dest.log"))")
        kill(source.pid, SIGKILL)
    }

    /// KVM mode: a real KVM guest's writes to its RAM are tracked (kernel method) and migrated by
    /// pre-copy; the digests agree and the memory file holds the guest's counters, consistent
    /// (all equal but for one step) because the VM was paused.
    func testKVMGuestPrecopy() throws {
        try MemE2E.requireMemoryMigration()
        try MemE2E.require(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm is not available")
        let dir = try MemE2E.scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = dir + "/key"
        FileManager.default.createFile(atPath: key, contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let guest = try MemChild(try MemE2E.tool("ferry-workload"), ["--kvm", "--memory", "4M"])
        let region = try guest.waitFor("region", timeout: 30)
        _ = try guest.waitFor("ready", timeout: 30)
        let start = (region["start"] as? NSNumber)?.uint64Value ?? 0
        let size = (region["size"] as? NSNumber)?.uint64Value ?? 0
        let port = MemE2E.freePort()
        let memOut = dir + "/guest.mem"
        let dest = try MemChild(try MemE2E.tool("dest-agent"), ["--listen", "127.0.0.1:\(port)", "--key-file", key, "--mem-out", memOut,
                                                              "--report", dir + "/dest.json", "--accept-timeout", "60"],
                                logPath: dir + "/dest.log")
        defer { kill(dest.pid, SIGKILL) }
        usleep(300_000)
        let agent = try MemChild(try MemE2E.tool("source-agent"), [
            "--vm", "\(guest.pid)", "--region", String(start, radix: 16) + "-" + String(start + size, radix: 16),
            "--dest", "127.0.0.1:\(port)", "--key-file", key, "--max-rounds", "3", "--max-downtime", "0.000001",
            "--report", dir + "/source.json"], logPath: dir + "/source.log")
        guard let status = agent.wait(timeout: 60) else {
            kill(agent.pid, SIGKILL)
            throw MemTestError("source-agent did not finish: \(log(dir + "/source.log"))")
        }
        XCTAssertEqual(status, 0, "source-agent: \(log(dir + "/source.log"))\n--- dest:\n\(log(dir + "/dest.log"))")
        XCTAssertEqual(dest.wait(timeout: 20), 0, "dest-agent: \(log(dir + "/dest.log"))")
        let report = try MemE2E.readJSON(dir + "/source.json")
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        let memory = try XCTUnwrap(report["memory"] as? [String: Any])
        XCTAssertEqual(memory["tracking_method"] as? String, "uffd-wp-async+pagemap-scan")
        let rounds = (memory["pages_per_round"] as? [NSNumber])?.map(\.intValue) ?? []
        XCTAssertGreaterThanOrEqual(rounds.count, 2, "round 0, dirty rounds (if a scan found pages) and the final set: \(rounds)")
        // The guest writes pages 1...15 in a loop: the rounds after the first carry them, and only them.
        XCTAssertGreaterThanOrEqual(rounds.dropFirst().reduce(0, +), 1, "the guest's dirty pages are tracked: \(rounds)")
        XCTAssertLessThanOrEqual(rounds.dropFirst().max() ?? 0, 64, "only the guest's pages are dirty: \(rounds)")
        let image = try Data(contentsOf: URL(fileURLWithPath: memOut))
        XCTAssertEqual(UInt64(image.count), size)
        let counters = (1...15).map { page in image.withUnsafeBytes { $0.load(fromByteOffset: page * 4096, as: UInt16.self) } }
        XCTAssertGreaterThan(counters.min() ?? 0, 0, "the guest ran before the migration: \(counters)")
        XCTAssertLessThanOrEqual((counters.max() ?? 0) &- (counters.min() ?? 0), 1, "a consistent snapshot: \(counters)")
        kill(guest.pid, SIGKILL)
    }

    private func log(_ path: String) -> String {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? "(no log)"
        return String(text.suffix(4000))
    }
}
