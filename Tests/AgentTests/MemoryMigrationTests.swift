import FerryTestSupport
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
    /// dest-agent --prestart-vm: the resumed workload is started, and hands over its memory, while
    /// the migration runs; it runs only on the go at switchover.
    func testPostcopyWithPrestartedVM() throws { try migrateWorkload(mode: "postcopy", memoryMiB: 128, prestart: true) }
    func testPrecopyWithPrestartedVM() throws { try migrateWorkload(mode: "precopy", memoryMiB: 128, prestart: true) }

    /// Starts dest-agent on a free port with `arguments` (after --listen and --key-file) and waits
    /// until it listens (its "waiting for the source" line), so a source started next is not refused.
    private func startDest(_ dir: TemporaryDirectory, _ arguments: [String]) throws -> (agent: E2E.Agent, port: UInt16) {
        let port = try freePort()
        let dest = try E2E.Agent("dest-agent", ["--listen", "127.0.0.1:\(port)", "--key-file", dir.file("key")] + arguments,
                                 logPath: dir.file("dest.log"))
        guard dest.waitForLog("waiting for the source", timeout: 60) else {
            throw SupportError("dest-agent never listened: \(dest.log)")
        }
        return (dest, port)
    }

    /// Whether the process runs (neither stopped nor gone), within a generous deadline.
    private func becomesRunnable(_ pid: pid_t) -> Bool {
        waitUntil(timeout: 10) { let state = MemE2E.state(of: pid); return state != nil && state != "T" && state != "t" }
    }

    func migrateWorkload(mode: String, memoryMiB: Int = 512, memfd: Bool = false, hashTracking: Bool = false, prestart: Bool = false) throws {
        let pages = memoryMiB * 256
        try MemE2E.requireMemoryMigration()
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        let workloadPath = E2E.tool("ferry-workload")
        try writeKeyFile(at: dir.file("key"))
        let fifo = dir.file("resumed.in")
        let resumedOut = dir.file("resumed.jsonl")
        guard mkfifo(fifo, 0o600) == 0 else { throw SupportError("mkfifo \(fifo) failed: \(errno)") }
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
        let source = try ChildProcess(workloadPath, ["--memory", "\(memoryMiB)M", "--dirty-rate", "20M", "--report-interval", "0.5"]
                                                    + (memfd ? ["--memfd"] : []))
        let region = try source.waitFor(event: "region", timeout: 60)
        let regionStart = UInt64(try region.number("start"))
        try source.waitFor(event: "ready", timeout: 60)
        let before = try source.waitFor(event: "report", timeout: 10)
        let opsBefore = try before.number("ops_per_sec")

        // A pre-started VM starts before the state exists (a real VMM reads it after the go).
        let copyState = prestart ? "" : "cp \"$FERRY_STATE_FILE\" \(dir.path)/state-at-dest; "
        let (dest, port) = try startDest(dir, [
            "--uffd-socket", dir.file("uffd.sock"),
            "--on-switchover", "\(copyState)\(workloadPath) --resume --uffd-socket \"$FERRY_UFFD_SOCKET\" --layout \"$FERRY_LAYOUT_FILE\" --dirty-rate 20M --report-interval 0.5 < \(fifo) > \(resumedOut) 2>&1 &",
            "--work-dir", dir.file("dest"), "--report", dir.file("dest.json"), "--accept-timeout", "60"] + (prestart ? ["--prestart-vm"] : []))

        let started = Date()
        var sourceArguments = ["--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", dir.file("key"), "--mode", mode,
                               "--report", dir.file("source.json")]
        if mode == "hybrid" { sourceArguments += ["--precopy-rounds", "1"] }
        if hashTracking { sourceArguments += ["--tracking", "hash"] }
        // An opaque VM-state blob made at pause travels to the destination's FERRY_STATE_FILE.
        sourceArguments += ["--state-cmd", "printf 'state of %s' $FERRY_PID > \"$FERRY_STATE_FILE\""]
        let agent = try E2E.Agent("source-agent", sourceArguments, logPath: dir.file("source.log"))
        guard let status = agent.waitForExit(timeout: 120) else {
            throw SupportError("source-agent did not finish within 120 s: \(log(agent.logPath))\nDEST:\n\(log(dest.logPath))")
        }
        let seconds = Date().timeIntervalSince(started)
        XCTAssertEqual(status, 0, "source-agent failed: \(log(agent.logPath))\n--- dest:\n\(log(dest.logPath))")
        let opsDuring = try source.drainReports()
        XCTAssertEqual(MemE2E.state(of: source.pid), "T", "after switchover the source process stays paused")
        if prestart {
            let line = dest.log.split(separator: "\n").first { $0.contains("VM pre-started") }
            XCTAssertNotNil(line, "--prestart-vm did not start the VM early: \(log(dest.logPath))")
            XCTAssertEqual(dest.log.components(separatedBy: "VM pre-started").count, 2, "one pre-started VM")
            if let line, let switchover = dest.log.range(of: "the VM runs here") {
                XCTAssertLessThan(dest.log.range(of: String(line))!.lowerBound, switchover.lowerBound, "pre-started before switchover")
            }
        } else {
            XCTAssertEqual(try? String(contentsOfFile: dir.file("state-at-dest"), encoding: .utf8), "state of \(source.pid)",
                           "the VM state reached --on-switchover")
        }

        // The resumed workload at the destination: it runs, dirties and verifies every page it touches.
        let resumed = MemLineFile(resumedOut)
        let ready = try resumed.waitFor("ready", timeout: 20)
        XCTAssertEqual(try ready.integer("pages"), pages)
        let after = try resumed.waitFor("report", timeout: 10)
        let opsAfter = try after.number("ops_per_sec")
        func command(_ text: String) { _ = (text + "\n").withCString { write(commands, $0, strlen($0)) } }
        // The VM drops three pages (MADV_DONTNEED: a UFFD_EVENT_REMOVE at the destination): they must
        // read as zero from then on, whatever the migration still delivers for them.
        command("rate 0")
        _ = try resumed.waitFor("rate", timeout: 10)
        command("drop 7 8 9")
        let dropped = try resumed.waitFor("dropped", timeout: 10)
        XCTAssertEqual(try dropped.integer("count"), 3)
        command("verify")
        let verified = try resumed.waitFor("verified", timeout: 60)
        XCTAssertEqual(try verified.integer("untouched"), 3, "dropped pages read as zero: \(verified)")
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
        XCTAssertEqual(try verified.integer("valid"), try pages - 3 - verified.integer("corrupt"),
                       "every page arrives with its pattern: \(verified)")
        // Keep running and verifying for two more of its reports (it dirties at 20 MB/s again), then quit cleanly.
        _ = try resumed.waitFor("report", timeout: 20)
        _ = try resumed.waitFor("report", timeout: 20)
        command("quit")
        let exit = try resumed.waitFor("exit", timeout: 20)
        XCTAssertLessThanOrEqual(try exit.integer("corrupt"), torn, "resumed workload: \(exit)")

        // The destination writes its final report (with the fault figures) when its VM has gone.
        if dest.waitForExit(timeout: 20) == nil { dest.signal(SIGTERM) }
        XCTAssertEqual(dest.waitForExit(timeout: 20), 0, "dest-agent: \(log(dest.logPath))")
        let sourceReport = try E2E.report(dir.file("source.json"), log: agent.log)
        let destReport = try E2E.report(dir.file("dest.json"), log: dest.log)
        XCTAssertEqual(try sourceReport.string("status"), "completed")
        XCTAssertEqual(sourceReport["digests_agree"] as? Bool, true)
        XCTAssertEqual(destReport["digests_agree"] as? Bool, true)
        let sourceMemory = try sourceReport.object("memory")
        let destMemory = try destReport.object("memory")
        XCTAssertEqual(try sourceMemory.string("digest"), try destMemory.string("digest"))
        XCTAssertEqual(try sourceMemory.string("tracking_method"),
                       mode == "postcopy" ? "none (post-copy)" : hashTracking ? "content-hash" : "uffd-wp-async+pagemap-scan")
        let missing = destMemory["fault_latency_missing"] as? [String: Any]
        let received = destMemory["fault_latency_received"] as? [String: Any]
        let requests = try sourceMemory.integer("postcopy_requests")
        let pushed = try sourceMemory.integer("pages_pushed")
        switch mode {
        case "precopy":
            // Every page is at the destination before the VM starts: nothing is requested, no fault
            // waits, and the destination installs every page into the VM at once.
            XCTAssertEqual(requests, 0)
            XCTAssertEqual(try destMemory.integer("faults_on_missing"), 0)
            let installed = try XCTUnwrap(dest.log.split(separator: "\n").first { $0.contains("every page installed in the VM") },
                                          "the destination did not install the pages into the VM: \(log(dest.logPath))")
            let count = try XCTUnwrap(installed.split(separator: " ").first { $0.hasPrefix("pages=") }.flatMap { Int($0.dropFirst(6)) },
                                      "no page count in: \(installed)")
            XCTAssertGreaterThanOrEqual(count, pages - 3, "pages installed into the resumed VM: \(installed)")
        case "postcopy":
            XCTAssertGreaterThan(pushed, 0, "post-copy pushes pages")
            XCTAssertGreaterThan(try destMemory.integer("faults_on_missing"), 0, "the resumed workload faulted on pages not yet here")
        default:
            XCTAssertGreaterThanOrEqual(try sourceMemory.integers("pages_per_round").count, 2, "hybrid ran pre-copy rounds")
        }
        print("""
            memory migration \(mode)\(memfd ? " (memfd)" : ""): \(String(format: "%.1f", seconds)) s, downtime \(sourceReport["downtime_ms"] ?? "?") ms, \
            wire \(sourceReport["wire_bytes"] ?? "?") bytes, pages per round \(sourceMemory["pages_per_round"] ?? "?"), \
            requests \(requests), pushed \(pushed), fault p50 received \(received?["p50_us"] ?? "?") us, \
            missing \(missing?["p50_us"] ?? "?") us; workload ops/s before \(opsBefore), during \(opsDuring), after \(opsAfter)
            """)
        source.kill(SIGKILL)
    }

    /// A failure before switchover (the destination dies during the bulk copy) leaves the source
    /// process running, never stopped. The destination must have received memory before it dies
    /// (its "receiving memory" line): a source refused at the door would also fail, proving nothing.
    func testDestinationDeathBeforeSwitchoverLeavesSourceRunning() throws {
        try MemE2E.requireMemoryMigration()
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        try writeKeyFile(at: dir.file("key"))
        let source = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "512M", "--dirty-rate", "20M", "--report-interval", "0.2"])
        try source.waitFor(event: "ready", timeout: 60)
        let (dest, port) = try startDest(dir, ["--accept-timeout", "60"])
        let agent = try E2E.Agent("source-agent", [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", dir.file("key"), "--max-downtime", "0.000001",
            "--max-rounds", "100000", "--link-timeout", "3", "--report", dir.file("source.json")], logPath: dir.file("source.log"))
        // Kill the destination once it receives memory, well inside the 512 MiB bulk copy.
        guard dest.waitForLog("receiving memory", timeout: 60) else {
            throw SupportError("the destination never received the migration:\nDEST:\n\(log(dest.logPath))\nSOURCE:\n\(log(agent.logPath))")
        }
        XCTAssertFalse(agent.log.contains("switching over"), "the destination must die before switchover")
        dest.signal(SIGKILL)
        XCTAssertNotNil(dest.waitForExit(timeout: 10))
        guard let status = agent.waitForExit(timeout: 60) else {
            throw SupportError("source-agent did not give up within 60 s after the destination died: \(log(agent.logPath))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(agent.logPath))")
        let report = try E2E.report(dir.file("source.json"), log: agent.log)
        XCTAssertEqual(try report.string("status"), "failed")
        XCTAssertEqual(try report.string("vm_location"), "source", "\(report)")
        // The workload runs on here: not stopped, and it still reports and verifies.
        XCTAssertTrue(becomesRunnable(source.pid), "state \(String(describing: MemE2E.state(of: source.pid)))")
        _ = try source.drainReports()
        let report2 = try source.waitFor(event: "report", timeout: 10)
        XCTAssertEqual(try report2.integer("corrupt"), 0)
        source.send("write 1 2 3")
        let written = try source.waitFor(event: "written", timeout: 10)
        XCTAssertEqual(try written.integer("count"), 3)
        source.kill(SIGKILL)
    }

    /// A pre-started VM (dest-agent --prestart-vm) when the migration fails before hand-over (the
    /// source's VM-state hook fails after the pause): it never runs. It handed over its memory and
    /// waited for a go that never came; the source tells the destination it gave up (`aborted`), so
    /// the destination kills it at once (not after its 60 s link timeout), and the source's process runs on.
    func testPrestartedVMNeverRunsWhenTheMigrationFails() throws {
        try MemE2E.requireMemoryMigration()
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        try writeKeyFile(at: dir.file("key"))
        let resumedOut = dir.file("resumed.jsonl")
        let source = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "64M", "--dirty-rate", "4M", "--report-interval", "0.2"])
        try source.waitFor(event: "ready", timeout: 60)
        let (dest, port) = try startDest(dir, [
            "--uffd-socket", dir.file("uffd.sock"), "--prestart-vm",
            "--on-switchover", "\(E2E.tool("ferry-workload")) --resume --uffd-socket \"$FERRY_UFFD_SOCKET\" --layout \"$FERRY_LAYOUT_FILE\" > \(resumedOut) 2>&1 &",
            "--work-dir", dir.file("dest"), "--report", dir.file("dest.json"), "--accept-timeout", "60"])
        let agent = try E2E.Agent("source-agent", [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", dir.file("key"),
            "--state-cmd", "exit 3", "--report", dir.file("source.json")], logPath: dir.file("source.log"))
        guard let status = agent.waitForExit(timeout: 60) else {
            throw SupportError("source-agent did not finish: \(log(agent.logPath))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(agent.logPath))")
        let line = try XCTUnwrap(dest.log.split(separator: "\n").first { $0.contains("VM pre-started") },
                                 "the VM was not pre-started: \(log(dest.logPath))")
        let pid = try XCTUnwrap(line.split(separator: " ").first { $0.hasPrefix("pid=") }.flatMap { pid_t($0.dropFirst(4)) }, "no pid in: \(line)")
        XCTAssertTrue(waitUntil(timeout: 15) { let state = MemE2E.state(of: pid); return state == nil || state == "Z" },
                      "the pre-started VM \(pid) is still alive after the failed migration: \(String(describing: MemE2E.state(of: pid)))\n\(log(dest.logPath))")
        let output = (try? String(contentsOfFile: resumedOut, encoding: .utf8)) ?? ""
        XCTAssertFalse(output.contains("\"ready\""), "the pre-started VM ran: \(output)")
        XCTAssertTrue(dest.waitForLog("the source gave up", timeout: 5), "the destination was not told: \(log(dest.logPath))")
        let report = try E2E.report(dir.file("source.json"), log: agent.log)
        XCTAssertEqual(try report.string("vm_location"), "source", "\(report)")
        XCTAssertTrue(becomesRunnable(source.pid), "the source's process must run on: \(String(describing: MemE2E.state(of: source.pid)))")
        source.send("write 5 6")
        XCTAssertEqual(try source.waitFor(event: "written", timeout: 10).integer("count"), 2)
        dest.signal(SIGTERM)
        source.kill(SIGKILL)
    }

    /// A failure after the pause but before switchover (the VM-state hook fails) resumes the
    /// paused process with SIGCONT.
    func testFailureAfterPauseResumesSource() throws {
        try MemE2E.requireMemoryMigration()
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        try writeKeyFile(at: dir.file("key"))
        let source = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "64M", "--dirty-rate", "4M", "--report-interval", "0.2"])
        try source.waitFor(event: "ready", timeout: 60)
        let (dest, port) = try startDest(dir, ["--accept-timeout", "60"])
        let agent = try E2E.Agent("source-agent", [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", dir.file("key"),
            "--state-cmd", "echo paused-at-$FERRY_PID > \(dir.path)/hook; exit 3",
            "--report", dir.file("source.json")], logPath: dir.file("source.log"))
        guard let status = agent.waitForExit(timeout: 60) else {
            throw SupportError("source-agent did not finish: \(log(agent.logPath))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(agent.logPath))")
        XCTAssertTrue(dest.log.contains("receiving memory"), "the destination never received the migration: \(log(dest.logPath))")
        XCTAssertEqual(try? String(contentsOfFile: dir.file("hook"), encoding: .utf8), "paused-at-\(source.pid)\n", "the hook ran at pause")
        let report = try E2E.report(dir.file("source.json"), log: agent.log)
        XCTAssertEqual(try report.string("status"), "failed")
        XCTAssertEqual(try report.string("vm_location"), "source", "\(report)")
        XCTAssertTrue(try report.string("reason").contains("exit status 3"), "\(report)")
        XCTAssertTrue(becomesRunnable(source.pid), "SIGCONT did not resume the paused process: state \(String(describing: MemE2E.state(of: source.pid)))")
        _ = try source.drainReports()
        source.send("write 5 6")
        let written = try source.waitFor(event: "written", timeout: 10)
        XCTAssertEqual(try written.integer("count"), 2)
        source.kill(SIGKILL)
    }

    /// The destination cannot start the VM (its --on-switchover starts nothing that hands over
    /// memory): it says so with error(vmStartFailed) before anything ran there, and the source
    /// resumes its paused process instead of leaving the VM nowhere.
    func testVMStartFailureAtDestinationResumesSource() throws {
        try MemE2E.requireMemoryMigration()
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        try writeKeyFile(at: dir.file("key"))
        let source = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "64M", "--dirty-rate", "4M", "--report-interval", "0.2"])
        try source.waitFor(event: "ready", timeout: 60)
        let (dest, port) = try startDest(dir, [
            "--uffd-socket", dir.file("uffd.sock"), "--on-switchover", "true",
            "--vm-start-timeout", "1", "--work-dir", dir.file("dest"), "--accept-timeout", "60"])
        let agent = try E2E.Agent("source-agent", [
            "--vm", "\(source.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", dir.file("key"), "--report", dir.file("source.json")],
                                  logPath: dir.file("source.log"))
        guard let status = agent.waitForExit(timeout: 60) else {
            throw SupportError("source-agent did not finish: \(log(agent.logPath))")
        }
        XCTAssertEqual(status, 1, "the migration must fail: \(log(agent.logPath))")
        let report = try E2E.report(dir.file("source.json"), log: agent.log)
        XCTAssertTrue(try report.string("reason").contains("vmStartFailed"), "\(report)")
        XCTAssertEqual(try report.string("vm_location"), "source", "\(report)")
        XCTAssertTrue(agent.log.contains("the VM keeps running at the source"), log(agent.logPath))
        XCTAssertTrue(becomesRunnable(source.pid), "the source did not resume its process: state \(String(describing: MemE2E.state(of: source.pid)))")
        _ = try source.drainReports()
        source.send("write 5 6")
        let written = try source.waitFor(event: "written", timeout: 10)
        XCTAssertEqual(try written.integer("count"), 2)
        XCTAssertEqual(dest.waitForExit(timeout: 30), 1, "dest-agent reports the failure: \(log(dest.logPath))")
        source.kill(SIGKILL)
    }

    /// KVM mode: a real KVM guest's writes to its RAM are tracked (kernel method) and migrated by
    /// pre-copy; the digests agree and the memory file holds the guest's counters, consistent
    /// (all equal but for one step) because the VM was paused.
    func testKVMGuestPrecopy() throws {
        try MemE2E.requireMemoryMigration()
        try require(device: "/dev/kvm")
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        try writeKeyFile(at: dir.file("key"))
        let guest = try ChildProcess(E2E.tool("ferry-workload"), ["--kvm", "--memory", "4M"])
        let region = try guest.waitFor(event: "region", timeout: 30)
        try guest.waitFor(event: "ready", timeout: 30)
        let start = UInt64(try region.number("start"))
        let size = UInt64(try region.number("size"))
        let memOut = dir.file("guest.mem")
        let (dest, port) = try startDest(dir, ["--mem-out", memOut, "--report", dir.file("dest.json"), "--accept-timeout", "60"])
        let agent = try E2E.Agent("source-agent", [
            "--vm", "\(guest.pid)", "--region", String(start, radix: 16) + "-" + String(start + size, radix: 16),
            "--dest", "127.0.0.1:\(port)", "--key-file", dir.file("key"), "--max-rounds", "3", "--max-downtime", "0.000001",
            "--report", dir.file("source.json")], logPath: dir.file("source.log"))
        guard let status = agent.waitForExit(timeout: 60) else {
            throw SupportError("source-agent did not finish: \(log(agent.logPath))")
        }
        XCTAssertEqual(status, 0, "source-agent: \(log(agent.logPath))\n--- dest:\n\(log(dest.logPath))")
        XCTAssertEqual(dest.waitForExit(timeout: 20), 0, "dest-agent: \(log(dest.logPath))")
        let report = try E2E.report(dir.file("source.json"), log: agent.log)
        XCTAssertEqual(report["digests_agree"] as? Bool, true)
        let memory = try report.object("memory")
        XCTAssertEqual(try memory.string("tracking_method"), "uffd-wp-async+pagemap-scan")
        let rounds = try memory.integers("pages_per_round")
        XCTAssertGreaterThanOrEqual(rounds.count, 2, "round 0, dirty rounds (if a scan found pages) and the final set: \(rounds)")
        // The guest writes pages 1...15 in a loop: the rounds after the first carry them, and only them.
        XCTAssertGreaterThanOrEqual(rounds.dropFirst().reduce(0, +), 1, "the guest's dirty pages are tracked: \(rounds)")
        XCTAssertLessThanOrEqual(try XCTUnwrap(rounds.dropFirst().max()), 64, "only the guest's pages are dirty: \(rounds)")
        let image = try Data(contentsOf: URL(fileURLWithPath: memOut))
        XCTAssertEqual(UInt64(image.count), size)
        let counters = (1...15).map { page in image.withUnsafeBytes { $0.load(fromByteOffset: page * 4096, as: UInt16.self) } }
        let low = try XCTUnwrap(counters.min()), high = try XCTUnwrap(counters.max())
        XCTAssertGreaterThan(low, 0, "the guest ran before the migration: \(counters)")
        XCTAssertLessThanOrEqual(high &- low, 1, "a consistent snapshot: \(counters)")
        guest.kill(SIGKILL)
    }

    private func log(_ path: String) -> String {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? "(no log)"
        return String(text.suffix(4000))
    }
}
