import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// A whole "VM" migrated by the real agents: `ferry-workload` with its memory and a disk served by
/// source-agent over NBD (every other page mirrored to the disk, memory first, so memory and disk
/// can be checked to come from one instant), source-agent serving that disk and migrating disk,
/// memory and VM state in one session through an in-process relay (bandwidth cap, cuts, outages),
/// and dest-agent that starts the resumed workload on its own disk and userfaultfd.
final class WholeVMRig {
    let dir = TemporaryDirectory(prefix: "ferry-vm")
    let memoryMiB: Int
    let diskMiB: Int
    let dirtyRate: String
    let relay: E2E.Relay
    let destPort: UInt16
    var dest: ChildProcess?
    var source: ChildProcess?
    var workload: ChildProcess?
    private var fifoFD: Int32 = -1

    var key: String { dir.file("key") }
    var sourceImage: String { dir.file("src.img") }
    var destImage: String { dir.file("dst.img") }
    var sourceSocket: String { dir.file("src.sock") }
    var destSocket: String { dir.file("dst.sock") }
    var resumedOutput: String { dir.file("resumed.out") }
    var workDirectory: String { dir.file("dest-work") }

    /// The tools from the build products directory.
    static func tool(_ name: String) -> String { E2E.Agent.productsDirectory.appendingPathComponent(name).path }

    init(memoryMiB: Int = 256, diskMiB: Int = 256, dirtyRate: String = "10M", linkBytesPerSecond: Double = 50e6) throws {
        try require(root: "migrating a VM's memory (ptrace, userfaultfd of another process)")
        self.memoryMiB = memoryMiB
        self.diskMiB = diskMiB
        self.dirtyRate = dirtyRate
        _ = try writeKeyFile(at: dir.file("key"))
        try dir.sparseFile("src.img", size: UInt64(diskMiB) << 20)
        destPort = try freePort()
        relay = try E2E.Relay(targetPort: destPort, bytesPerSecond: linkBytesPerSecond)
        // The resumed workload reads its commands from this FIFO; holding it open read-write here
        // lets its shell open it without blocking.
        guard mkfifo(dir.file("commands"), 0o600) == 0 else { throw SupportError("mkfifo failed: errno \(errno)") }
        fifoFD = open(dir.file("commands"), O_RDWR | O_CLOEXEC)
    }

    deinit {
        for child in [workload, source, dest] { child?.kill(SIGKILL); _ = child?.wait(timeout: 5) }
        // FERRY_KEEP_LOGS=DIR keeps both agents' logs and reports for a look afterwards.
        if let keep = ProcessInfo.processInfo.environment["FERRY_KEEP_LOGS"] {
            let target = keep + "/" + URL(fileURLWithPath: dir.path).lastPathComponent
            try? FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
            for name in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
            where name.hasSuffix(".log") || name.hasSuffix(".json") || name.hasSuffix(".out") {
                try? FileManager.default.copyItem(atPath: dir.file(name), toPath: target + "/" + name)
            }
        }
        killResumed()
        if fifoFD >= 0 { close(fifoFD) }
        relay.stop()
    }

    /// The dest-agent command line; `extra` goes last.
    func destArguments(_ extra: [String] = []) -> [String] {
        let resume = "\(Self.tool("ferry-workload")) --resume --uffd-socket \"$FERRY_UFFD_SOCKET\" --layout \"$FERRY_LAYOUT_FILE\" "
            + "--disk-nbd \"unix:$FERRY_NBD_SOCKET\" --disk-every 2 --disk-reconnect 30 --dirty-rate \(dirtyRate) --report-interval 0.5 "
            + "< \(dir.file("commands")) > \(resumedOutput) 2>&1 &"
        return ["--listen", "127.0.0.1:\(destPort)", "--key-file", key, "--disk", destImage, "--nbd", "unix:\(destSocket)",
                "--uffd-socket", dir.file("uffd.sock"), "--on-switchover", resume, "--work-dir", workDirectory,
                "--report", dir.file("dest.json"), "--accept-timeout", "120", "--log-level", "debug"] + extra
    }

    /// Starts dest-agent (its log in dest.log, appended across restarts).
    func startDest(_ extra: [String] = [], environment: [String: String] = [:]) throws {
        var env = ProcessInfo.processInfo.environment
        for (name, value) in environment { env[name] = value }
        dest = try ChildProcess(Self.tool("dest-agent"), destArguments(extra), environment: env,
                                stdout: .discard, stderr: .file(dir.file("dest-\(Int(monotonicSeconds() * 1000)).log")))
    }

    /// Starts source-agent serving the disk and waiting for the workload's pidfile, then the workload.
    func startSourceAndWorkload(mode: String, _ extra: [String] = []) throws {
        source = try ChildProcess(Self.tool("source-agent"), [
            "--disk", sourceImage, "--nbd", "unix:\(sourceSocket)", "--vm-pidfile", dir.file("vm.pid"),
            "--dest", "127.0.0.1:\(relay.port)", "--key-file", key, "--mode", mode, "--block-size", "4096",
            "--state-cmd", "printf 'state of %s' $FERRY_PID > \"$FERRY_STATE_FILE\"",
            "--report", dir.file("source.json"), "--log-level", "debug"] + extra,
                                  stdout: .discard, stderr: .file(dir.file("source.log")))
        XCTAssertTrue(waitUntil(timeout: 30) { FileManager.default.fileExists(atPath: sourceSocket) }, "source-agent never served the disk: \(sourceLog)")
        workload = try ChildProcess(Self.tool("ferry-workload"), [
            "--memory", "\(memoryMiB)M", "--dirty-rate", dirtyRate, "--report-interval", "0.5",
            "--disk-nbd", "unix:\(sourceSocket)", "--disk-every", "2", "--pidfile", dir.file("vm.pid")],
                                    stdout: .pipe, stderr: .inherit)
        _ = try workload!.waitFor(event: "ready", timeout: 120)
    }

    var sourceLog: String { (try? String(contentsOfFile: dir.file("source.log"), encoding: .utf8)) ?? "" }
    var destLog: String {
        let logs = ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasPrefix("dest-") && $0.hasSuffix(".log") }.sorted()
        return logs.map { (try? String(contentsOfFile: dir.file($0), encoding: .utf8)) ?? "" }.joined(separator: "\n--- restarted ---\n")
    }
    var logs: String { "SOURCE:\n\(sourceLog)\nDEST:\n\(destLog)" }

    /// Waits until the source's log has `text`.
    func waitForSourceLog(_ text: String, timeout: Double) -> Bool {
        waitUntil(timeout: timeout, interval: 0.02) { sourceLog.contains(text) }
    }

    /// The source's exit status (nil: still running after `timeout`).
    func waitForSource(timeout: Double) -> Int32? { source?.wait(timeout: timeout) }

    /// The report `name` once written (the agent logs its end a moment before it writes it).
    func waitForReport(_ name: String, timeout: Double = 30) -> [String: Any] {
        var found: [String: Any] = [:]
        _ = waitUntil(timeout: timeout, interval: 0.02) {
            found = report(name)
            return found["status"] != nil
        }
        return found
    }

    func report(_ name: String) -> [String: Any] {
        guard let data = FileManager.default.contents(atPath: dir.file(name)),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return [:] }
        return object
    }

    /// A command to the resumed workload at the destination.
    func sendToResumed(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fifoFD, $0.baseAddress, $0.count) }
    }

    /// The resumed workload's JSON lines so far.
    func resumedEvents() -> [[String: Any]] {
        let text = (try? String(contentsOfFile: resumedOutput, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
        }
    }

    /// Waits for the resumed workload's `event` line after `count` earlier ones.
    func waitForResumed(_ event: String, after count: Int = 0, timeout: Double) -> [String: Any]? {
        var found: [String: Any]? = nil
        _ = waitUntil(timeout: timeout, interval: 0.05) {
            let matching = resumedEvents().filter { $0["event"] as? String == event }
            if matching.count > count { found = matching[count] }
            return found != nil
        }
        return found
    }

    /// Has the resumed workload stop dirtying, verify memory and disk, and quit; returns the
    /// `verified` line. Fails the test when memory or disk is wrong or torn.
    @discardableResult
    func verifyResumed(file: StaticString = #filePath, line: UInt = #line) -> [String: Any] {
        guard waitForResumed("ready", timeout: 60) != nil else {
            XCTFail("the resumed workload never became ready: \((try? String(contentsOfFile: resumedOutput, encoding: .utf8)) ?? "")\n\(logs)", file: file, line: line)
            return [:]
        }
        // It ran on at the destination: its own reports, with writes and no corruption.
        XCTAssertNotNil(waitForResumed("report", after: 1, timeout: 30), "the resumed workload did not run on", file: file, line: line)
        sendToResumed("rate 0")
        _ = waitForResumed("rate", timeout: 30)
        sendToResumed("verify")
        guard let verified = waitForResumed("verified", timeout: 180) else {
            XCTFail("no verify result: \((try? String(contentsOfFile: resumedOutput, encoding: .utf8)) ?? "")", file: file, line: line)
            return [:]
        }
        func int(_ key: String) -> Int { (verified[key] as? NSNumber)?.intValue ?? -1 }
        XCTAssertEqual(int("corrupt"), 0, "memory pages lost or stale at the destination: \(verified)", file: file, line: line)
        // The one write the pause may have cut, finished by the resumed workload (the agents' digests agree, so the
        // source's paused memory held that page exactly so).
        XCTAssertTrue((0...1).contains(int("interrupted_writes")), "\(verified)", file: file, line: line)
        XCTAssertEqual(int("valid") + int("untouched"), memoryMiB * 256, "\(verified)", file: file, line: line)
        XCTAssertEqual(int("disk_torn"), 0, "memory and disk come from different instants: \(verified)", file: file, line: line)
        XCTAssertTrue((0...1).contains(int("disk_lagging")), "\(verified)", file: file, line: line)
        XCTAssertEqual(int("disk_blocks"), memoryMiB * 128, "\(verified)", file: file, line: line)
        XCTAssertEqual(int("disk_equal") + int("disk_lagging"), int("disk_blocks"), "\(verified)", file: file, line: line)
        sendToResumed("quit")
        XCTAssertNotNil(waitForResumed("exit", timeout: 30), "the resumed workload did not quit", file: file, line: line)
        return verified
    }

    /// Kills any resumed workload left (the dest-agent's child's child).
    func killResumed() {
        _ = try? runTool("/usr/bin/pkill", ["-KILL", "-f", "ferry-workload --resume --uffd-socket \(dir.file("uffd.sock"))"], timeout: 10)
    }
}
