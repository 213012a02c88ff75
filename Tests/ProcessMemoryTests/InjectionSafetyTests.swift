import FerryTestSupport
import Foundation
import Glibc
import ProcessMemory
import XCTest

/// A `ferry-workload --injection-target MODE` child (InjectionTarget.swift): a main thread that sleeps, reads a pipe
/// or spins and checks every result, optional spinning threads, a recognizable signal mask, SIGUSR1 counted.
final class InjectionTargetProcess {
    let child: ChildProcess
    var pid: pid_t { child.pid }

    init(_ mode: String, threads: Int = 0, seccomp: Bool = false) throws {
        var args = ["--injection-target", mode, "--target-threads", String(threads)]
        if seccomp { args.append("--seccomp-deny-userfaultfd") }
        child = try ChildProcess(WorkloadProcess.binary, args, stdout: .pipe, stderr: .inherit)
        try child.waitFor(event: "ready", timeout: 30)
    }

    deinit { _ = child.stop(quitCommand: "quit", grace: 5) }

    struct Status {
        var loops: Int, anomalies: Int, lastAnomaly: Int, usr1: Int, workers: [Int]
    }

    func status() throws -> Status {
        child.send("status")
        let s = try child.waitFor(event: "status", timeout: 10)
        func int(_ key: String) -> Int { (s[key] as? NSNumber)?.intValue ?? -1 }
        return Status(loops: int("loops"), anomalies: int("anomalies"), lastAnomaly: int("last_anomaly"), usr1: int("usr1"),
                      workers: (s["workers"] as? [NSNumber] ?? []).map(\.intValue))
    }

    /// Waits until the main thread has done `more` more rounds (and every worker counted on); returns the status.
    @discardableResult
    func waitForProgress(after before: Status, more: Int = 2, timeout: Double = 5,
                         file: StaticString = #filePath, line: UInt = #line) throws -> Status {
        var now = before
        let moved = try waitUntil(timeout: timeout, interval: 0.01) {
            now = try status()
            return now.loops >= before.loops + more
                && zip(now.workers, before.workers).allSatisfy { $0 > $1 }
        }
        XCTAssertTrue(moved, "the target stopped making progress: before \(before), now \(now)", file: file, line: line)
        return now
    }

    var procStatus: ProcessStatus { get throws { try ProcessStatus(pid: pid) } }
}

/// The ptrace injection cannot hurt the target: a seccomp'd target is refused, a target blocked in a system call,
/// a multi-threaded one, a spinning one and a stopped one come out as they went in, and an injector killed with
/// SIGKILL at random moments leaves the target alive, progressing, with its signal mask. docs/ptrace-injection.md.
final class InjectionSafetyTests: XCTestCase {
    /// glibc's SIGUSR2 (12) and SIGRTMIN + 3 (37), what the target blocks: bits n - 1.
    static let targetMask: UInt64 = 1 << 11 | 1 << 36

    override func setUp() async throws {
        try require(root: "ptrace of another process")
    }

    /// Injects `close(-1)` `times` times and checks it returned -EBADF; returns the routes taken.
    @discardableResult
    func injectClose(_ pid: Int32, times: Int = 1) throws -> [RemoteSyscallSession.Route] {
        var session = try RemoteSyscallSession(pid: pid)
        var routes: [RemoteSyscallSession.Route] = []
        for _ in 0..<times {
            let r = try session.call(SyscallNumber.close, UInt64.max)
            XCTAssertEqual(r, -Int64(EBADF), "close(-1) in the target")
            if let route = session.lastRoute { routes.append(route) }
        }
        try session.finish()
        return routes
    }

    func waitUntilUntraced(_ pid: Int32) throws -> Bool {
        try waitUntil(timeout: 5) { try ProcessStatus(pid: pid).tracerPID == 0 }
    }

    // MARK: - /proc/PID/status

    func testStatusDecidesTheRefusals() throws {
        let text = """
        Name:\tqemu-system-x86
        State:\tS (sleeping)
        Tgid:\t4242
        TracerPid:\t0
        Threads:\t7
        SigPnd:\t0000000000000000
        ShdPnd:\t0000000000000200
        SigBlk:\t0000000010000800
        SigIgn:\t0000000000001000
        SigCgt:\t0000000180004a03
        NoNewPrivs:\t1
        Seccomp:\t2
        Seccomp_filters:\t3
        Speculation_Store_Bypass:\tthread vulnerable
        """
        var status = try XCTUnwrap(ProcessStatus(parsing: text))
        XCTAssertEqual(status.state, "S")
        XCTAssertEqual(status.threads, 7)
        XCTAssertEqual(status.blocked, 0x1000_0800)
        XCTAssertEqual(status.injectionRefusal(), .seccompFilter(filters: 3))
        status.seccompMode = 1
        XCTAssertEqual(status.injectionRefusal(), .seccompStrict)
        status.seccompMode = 0
        XCTAssertNil(status.injectionRefusal())
        status.tracerPID = 99
        XCTAssertEqual(status.injectionRefusal(), .traced(by: 99))
        XCTAssertNil(status.injectionRefusal(tracedByUs: true))
        status.state = "Z"
        XCTAssertEqual(status.injectionRefusal(tracedByUs: true), .zombie)
        XCTAssertEqual(status.pendingCaught, 0x200, "SIGUSR1 (bit 9): pending for the process, caught, not blocked")
        XCTAssertNil(ProcessStatus(parsing: "Name:\tx\nState:\tR (running)\n"), "no Seccomp: line")
    }

    // MARK: - Refused targets

    func testSeccompFilteredTargetIsRefusedUntouched() throws {
        let target = try InjectionTargetProcess("sleep", seccomp: true)
        let before = try target.procStatus
        XCTAssertEqual(before.seccompMode, 2)
        var caught: ProcessMemoryError?
        do {
            let uffd = try Userfaultfd.inject(into: target.pid)
            _ = uffd
        } catch {
            caught = error
        }
        let error = try XCTUnwrap(caught, "a target whose seccomp filter kills it at userfaultfd was not refused")
        XCTAssertEqual(error.refusal, .seccompFilter(filters: before.seccompFilters))
        XCTAssertNil(error.errno)
        for part in ["Seccomp: 2", "userfaultfd", "-sandbox off"] {
            XCTAssertTrue(error.message.contains(part), "'\(part)' missing from: \(error.message)")
        }
        print("InjectionSafety: refused: \(error)")
        // Never touched: no tracer came, it runs on, and the source falls back to content hashing.
        XCTAssertEqual(try target.procStatus.tracerPID, 0)
        try target.waitForProgress(after: try target.status())
        var reason: ProcessMemoryError?
        let regions = try ProcessRegions(pid: target.pid).all.filter { $0.writable && $0.kind == .anonymous }.prefix(1)
        let tracker = try AnyDirtyPageTracker.attach(pid: target.pid, regions: Array(regions), fallbackReason: &reason)
        XCTAssertEqual(tracker.method, "content-hash")
        XCTAssertEqual(reason?.refusal, .seccompFilter(filters: before.seccompFilters))
        try tracker.detach()
        XCTAssertEqual(try target.status().anomalies, 0)
    }

    func testStoppedTargetWithACaughtSignalPendingIsRefusedAndStaysStopped() throws {
        let target = try InjectionTargetProcess("sleep")
        kill(target.pid, SIGSTOP)
        XCTAssertTrue(try waitUntil(timeout: 5) { try target.procStatus.state == "T" })
        kill(target.pid, SIGUSR1)   // caught: pending while stopped
        XCTAssertTrue(try waitUntil(timeout: 5) { try target.procStatus.pendingCaught != 0 })
        var caught: ProcessMemoryError?
        do { try injectClose(target.pid) } catch { caught = error as? ProcessMemoryError }
        XCTAssertEqual(caught?.refusal, .stoppedWithSignalsPending(1 << 9), "\(String(describing: caught))")
        XCTAssertTrue(try waitUntilUntraced(target.pid))
        usleep(50_000)
        XCTAssertEqual(try target.procStatus.state, "T", "the refusal resumed a stopped process")
        kill(target.pid, SIGCONT)
        let after = try target.waitForProgress(after: try target.status())
        XCTAssertEqual(after.usr1, 1, "the pending SIGUSR1 was delivered once, after SIGCONT")
        XCTAssertEqual(after.anomalies, 0, "last anomaly \(after.lastAnomaly)")
    }

    // MARK: - Targets that come out as they went in

    /// The main thread is in clock_nanosleep: PTRACE_INTERRUPT leaves it to restart (restart_syscall), each call
    /// borrows that restart, which then runs again: every sleep still lasts 20 ms and returns 0.
    func testTargetBlockedInNanosleepSleepsOnUndisturbed() throws {
        let target = try InjectionTargetProcess("sleep", threads: 1)
        let before = try target.status()
        let routes = try (0..<5).flatMap { _ in try injectClose(target.pid, times: 2) }
        print("InjectionSafety: nanosleep target, routes \(Set(routes.map { "\($0)" }))")
        for route in routes {
            guard case .borrowed(let number) = route else { XCTFail("pointed, not borrowed: \(route)"); continue }
            XCTAssertTrue([219, 230, 35].contains(number), "borrowed syscall \(number): restart_syscall or the sleep itself")
        }
        XCTAssertTrue(try waitUntilUntraced(target.pid))
        let after = try target.waitForProgress(after: before, more: 5)
        XCTAssertEqual(after.anomalies, 0, "a sleep was cut short or failed: last anomaly \(after.lastAnomaly)")
        XCTAssertEqual(try target.procStatus.blocked, Self.targetMask)
    }

    /// The main thread is in read(2) on an empty pipe: after the injections it still gets every byte, in order,
    /// and never EINTR.
    func testTargetBlockedInReadGetsItsData() throws {
        let target = try InjectionTargetProcess("read")
        usleep(20_000)   // into the read
        let routes = try injectClose(target.pid, times: 3)
        XCTAssertEqual(routes, [.borrowed(0), .borrowed(0), .borrowed(0)], "each call borrows the restarted read")
        for i in 1...3 {
            target.child.send("feed")
            try target.child.waitFor(event: "fed", timeout: 10)
            XCTAssertTrue(try waitUntil(timeout: 5) { try target.status().loops == i }, "byte \(i) not read")
            try injectClose(target.pid)
        }
        let after = try target.status()
        XCTAssertEqual(after.loops, 3)
        XCTAssertEqual(after.anomalies, 0, "read saw EINTR or a wrong byte: last anomaly \(after.lastAnomaly)")
        XCTAssertEqual(try target.procStatus.blocked, Self.targetMask)
    }

    /// Only the main thread is seized; three others spin on meanwhile and nothing in the target's memory is
    /// written, so no thread can run into a patch.
    func testMultiThreadedTargetRunsOn() throws {
        let target = try InjectionTargetProcess("sleep", threads: 3)
        XCTAssertEqual(try target.procStatus.threads, 5, "main, helper and three spinning threads")
        let before = try target.status()
        let maps = try String(contentsOfFile: "/proc/\(target.pid)/maps", encoding: .utf8)
        for _ in 0..<10 {
            let uffd = try Userfaultfd.inject(into: target.pid)
            _ = uffd
        }
        XCTAssertEqual(try String(contentsOfFile: "/proc/\(target.pid)/maps", encoding: .utf8), maps, "no mapping added or changed")
        let after = try target.waitForProgress(after: before, more: 3)
        XCTAssertEqual(after.anomalies, 0, "last anomaly \(after.lastAnomaly)")
        XCTAssertEqual(try target.procStatus.threads, 5)
        XCTAssertEqual(try target.procStatus.blocked, Self.targetMask)
        XCTAssertEqual(try openUserfaultfds(target.pid), 0, "the target's copies were closed")
    }

    /// A main thread that never makes a system call: after `ownSyscallWait` it is pointed at the [vdso]'s
    /// `syscall` instruction; its running sum (kept in registers) stays right.
    func testSpinningTargetIsPointedAtTheVDSO() throws {
        let target = try InjectionTargetProcess("spin", threads: 1)
        let before = try target.status()
        let routes = try injectClose(target.pid, times: 2)
        let vdso = try XCTUnwrap(try ProcessRegions(pid: target.pid).all.first { $0.path == "[vdso]" })
        XCTAssertEqual(routes.count, 2)
        for route in routes {
            guard case .pointed(let address) = route else { XCTFail("borrowed a call of a thread that makes none: \(route)"); continue }
            XCTAssertTrue(vdso.range.contains(address), "0x\(String(address, radix: 16)) not in the [vdso] \(vdso.range)")
        }
        let after = try target.waitForProgress(after: before, more: 3)
        XCTAssertEqual(after.anomalies, 0, "the running sum went wrong: registers were not restored")
        XCTAssertEqual(try target.procStatus.blocked, Self.targetMask)
    }

    /// A process stopped by SIGSTOP (state T): the injection works and leaves it stopped; SIGCONT then resumes it
    /// as if nothing happened. Both a thread stopped inside nanosleep (borrowed route: the restart) and one stopped
    /// in its own code (pointed route: its code must not run).
    func testStoppedTargetStaysStopped() throws {
        for mode in ["sleep", "spin"] {
            let target = try InjectionTargetProcess(mode)
            let before = try target.status()
            kill(target.pid, SIGSTOP)
            XCTAssertTrue(try waitUntil(timeout: 5) { try target.procStatus.state == "T" })
            let ran = try mainThreadRunTime(target.pid)
            let routes = try injectClose(target.pid, times: 2)
            print("InjectionSafety: stopped \(mode) target, routes \(routes)")
            if mode == "spin" {
                XCTAssertTrue(routes.allSatisfy { if case .pointed = $0 { true } else { false } }, "\(routes)")
            }
            XCTAssertTrue(try waitUntilUntraced(target.pid))
            usleep(100_000)
            XCTAssertEqual(try target.procStatus.state, "T", "\(mode): the injection resumed a stopped process")
            // Its main thread ran only for the calls (microseconds), never its own code for long.
            let extra = try mainThreadRunTime(target.pid) - ran
            XCTAssertLessThan(extra, 0.005, "\(mode): the main thread ran \(extra) s while stopped")
            kill(target.pid, SIGCONT)
            let after = try target.waitForProgress(after: before)
            XCTAssertEqual(after.anomalies, 0, "\(mode): last anomaly \(after.lastAnomaly)")
            XCTAssertEqual(try target.procStatus.blocked, Self.targetMask)
        }
    }

    /// Seconds the main thread of `pid` has spent on a CPU (/proc/PID/task/PID/schedstat, nanoseconds).
    func mainThreadRunTime(_ pid: Int32) throws -> Double {
        let text = try String(contentsOfFile: "/proc/\(pid)/task/\(pid)/schedstat", encoding: .utf8)
        return Double(text.split(separator: " ").first.flatMap { UInt64($0) } ?? 0) / 1e9
    }

    /// A signal that arrives while the target is held is delivered once, in its own context, not lost and not
    /// doubled, and the call still completes.
    func testSignalArrivingDuringTheInjectionIsDeliveredOnce() throws {
        let target = try InjectionTargetProcess("sleep")
        let before = try target.status()
        var session = try RemoteSyscallSession(pid: target.pid)
        kill(target.pid, SIGUSR1)
        XCTAssertEqual(try session.call(SyscallNumber.close, UInt64.max), -Int64(EBADF))
        XCTAssertEqual(try session.call(SyscallNumber.close, UInt64.max), -Int64(EBADF))
        try session.finish()
        let after = try target.waitForProgress(after: before)
        XCTAssertEqual(after.usr1, 1)
        XCTAssertEqual(after.anomalies, 0, "last anomaly \(after.lastAnomaly)")
        XCTAssertEqual(try target.procStatus.blocked, Self.targetMask)
    }

    // MARK: - The injector killed at random moments

    /// `ferry-workload --inject-into PID` (Injector.swift) is killed with SIGKILL at moments spread over the
    /// injection's duration. After each kill the target must be alive, untraced, progressing, with its signal
    /// mask; the only damage allowed is the documented one (docs/ptrace-injection.md): a kill inside the one
    /// system call borrowed makes that call (here the sleep) return our call's result (anomaly 3 or 6). Those are
    /// counted and printed beside the window measured, not failed.
    func testInjectorKilledAtRandomMomentsLeavesTheTargetWhole() throws {
        let target = try InjectionTargetProcess("sleep", threads: 1)
        let median = try injectorRunTime(target.pid)
        // One injection, warm (7 in one process), and the window itself, measured from here the same way (two
        // calls per injection, as Userfaultfd.inject).
        let calibration = try ChildProcess(WorkloadProcess.binary, ["--inject-into", String(target.pid), "--inject-times", "7"])
        try calibration.waitFor(event: "ready", timeout: 30)
        calibration.send("go")
        let timing = try calibration.waitFor(event: "injected", timeout: 30)
        XCTAssertEqual(calibration.wait(timeout: 10), 0)
        let micros = (timing["us"] as? [NSNumber] ?? []).map(\.doubleValue).sorted()
        var windows: [Double] = []
        for _ in 0..<10 {
            var session = try RemoteSyscallSession(pid: target.pid)
            for _ in 0..<2 {
                _ = try session.call(SyscallNumber.close, UInt64.max)
                if let w = session.lastWindow { windows.append(Double(w.components.attoseconds) / 1e12 + Double(w.components.seconds) * 1e6) }
            }
            try session.finish()
        }
        windows.sort()
        print("InjectionSafety: go to result in a fresh injector, median \(Int(median)) us; one injection, warm, "
              + "\(micros.map { Int($0) }) us; the window (registers not the target's) per call: median "
              + "\(Int(windows[windows.count / 2])) us, max \(Int(windows.last ?? 0)) us")

        let iterations = 40
        var rng = SplitMix64(seed: 0x5EED_C0DE)
        var completed = 0, killed = 0, windowHits = 0
        var last = try target.status()
        let mask = try target.procStatus.blocked
        XCTAssertEqual(mask, Self.targetMask)
        for i in 0..<iterations {
            // Kill points spread over 0 ... 1.1 x the time from "go" to the result.
            let delay = (Double(i) + Double(rng.below(1000)) / 1000) / Double(iterations) * 1.1 * median / 1e6
            let (code, finished) = try killInjector(into: target.pid, after: delay)
            if finished { completed += 1 } else { killed += 1 }
            XCTAssertTrue(code == 0 || code == 128 + SIGKILL, "iteration \(i): injector ended with \(String(describing: code))")

            XCTAssertTrue(target.child.isRunning, "iteration \(i) (kill after \(Int(delay * 1e6)) us): the target died")
            guard target.child.isRunning else { break }
            XCTAssertTrue(try waitUntilUntraced(target.pid), "iteration \(i): still traced")
            let status = try target.procStatus
            XCTAssertNotEqual(status.state, "T", "iteration \(i): left stopped")
            XCTAssertEqual(status.blocked, mask, "iteration \(i): signal mask changed")
            let now = try target.waitForProgress(after: last, more: 1)
            if now.anomalies > last.anomalies {
                XCTAssertTrue([3, 6].contains(now.lastAnomaly),
                              "iteration \(i) (kill after \(Int(delay * 1e6)) us): damage other than the borrowed call's result: \(now.lastAnomaly)")
                windowHits += now.anomalies - last.anomalies
            }
            last = now
        }
        let leaked = try openUserfaultfds(target.pid)
        print("InjectionSafety: \(iterations) kills over 0-\(Int(1.1 * median)) us: \(killed) before the injection ended, \(completed) after; "
              + "target alive, untraced, mask intact, progressing after every one; \(windowHits) landed inside a borrowed "
              + "call (that sleep returned our result); \(leaked) userfaultfd copies left open in the target")
        XCTAssertLessThan(windowHits, max(3, killed / 2), "far more kills inside the window than its length explains")
    }

    /// The real memory workload (its main thread in poll(2), dirtying 4 MB/s in a verifiable pattern) under the same
    /// kills: it stays alive, untraced, with its mask, keeps writing, and every page verifies.
    func testInjectorKilledAtRandomMomentsLeavesTheMemoryWorkloadWhole() throws {
        let w = try WorkloadProcess(["--memory", "16M", "--dirty-rate", "4M", "--report-interval", "0.05"])
        defer { w.stop() }
        let median = try injectorRunTime(w.pid)
        let mask = try ProcessStatus(pid: w.pid).blocked
        var written = 0
        var rng = SplitMix64(seed: 0xF00D)
        let iterations = 12
        for i in 0..<iterations {
            let delay = (Double(i) + Double(rng.below(1000)) / 1000) / Double(iterations) * 1.1 * median / 1e6
            let (code, _) = try killInjector(into: w.pid, after: delay)
            XCTAssertTrue(code == 0 || code == 128 + SIGKILL, "iteration \(i): injector ended with \(String(describing: code))")
            XCTAssertTrue(w.child.isRunning, "iteration \(i) (kill after \(Int(delay * 1e6)) us): the workload died")
            guard w.child.isRunning else { break }
            XCTAssertTrue(try waitUntilUntraced(w.pid), "iteration \(i): still traced")
            XCTAssertEqual(try ProcessStatus(pid: w.pid).blocked, mask, "iteration \(i): signal mask changed")
            // A report with more pages written: it goes on dirtying (a kill inside a borrowed poll could stall it
            // until its next command; the write below is one).
            try w.write(pages: [i, 100 + i])
            let before = written
            XCTAssertTrue(try waitUntil(timeout: 5, interval: 0) {
                let report = try w.waitFor("report", timeout: 5)
                written = (report["pages_written"] as? NSNumber)?.intValue ?? 0
                XCTAssertEqual((report["corrupt"] as? NSNumber)?.intValue, 0)
                return written > before
            }, "iteration \(i): no progress")
        }
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0, "\(verified)")
        print("InjectionSafety: memory workload, \(iterations) kills over 0-\(Int(1.1 * median)) us: alive, untraced, mask intact, "
              + "\(written) pages written, every page verifies")
    }

    /// The median time (us) from "go" to the result of `ferry-workload --inject-into PID` in a fresh process (cold,
    /// as in the kill runs), over 3 runs.
    func injectorRunTime(_ pid: Int32) throws -> Double {
        var cold: [Double] = []
        for _ in 0..<3 {
            let run = try ChildProcess(WorkloadProcess.binary, ["--inject-into", String(pid)])
            try run.waitFor(event: "ready", timeout: 30)
            let t0 = monotonicSeconds()
            run.send("go")
            try run.waitFor(event: "injected", timeout: 30)
            cold.append((monotonicSeconds() - t0) * 1e6)
            XCTAssertEqual(run.wait(timeout: 10), 0)
        }
        return cold.sorted()[1]
    }

    /// Starts `ferry-workload --inject-into PID`, tells it to go, kills it with SIGKILL `delay` seconds later;
    /// returns its exit code (0 or 137: killed) and whether it had finished the injection.
    func killInjector(into pid: Int32, after delay: Double) throws -> (code: Int32?, finished: Bool) {
        let injector = try ChildProcess(WorkloadProcess.binary, ["--inject-into", String(pid)])
        try injector.waitFor(event: "ready", timeout: 30)
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let ns = Int(deadline.tv_nsec) + Int(delay * 1e9)
        deadline.tv_sec += ns / 1_000_000_000
        deadline.tv_nsec = ns % 1_000_000_000
        injector.send("go")
        _ = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, nil)
        injector.kill(SIGKILL)
        let code = injector.wait(timeout: 10)
        _ = injector.drain(timeout: 1)
        return (code, injector.collected.stdout.contains("\"injected\""))
    }

    /// The target's descriptors that are userfaultfds (anon_inode:[userfaultfd]).
    func openUserfaultfds(_ pid: Int32) throws -> Int {
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
        return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)"))?.contains("userfaultfd") ?? false }.count
    }
}
