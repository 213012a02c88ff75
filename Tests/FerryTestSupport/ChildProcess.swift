import Foundation
import Glibc

/// A child process started with `posix_spawn` (not Foundation.Process, whose SIGCHLD handling
/// would race a test's own `waitpid`, e.g. the dirty tracker's ptrace), with its standard input on a
/// pipe and its standard output and error each on a pipe, a file, /dev/null or the test's own.
/// Reads lines of text or JSON from standard output with deadlines; reaps the child when done and
/// kills it (SIGKILL) if the test forgot to.
public final class ChildProcess {
    /// Where one of the child's output streams goes.
    public enum Output {
        /// A pipe the test reads (``nextLine(timeout:)``, ``collected``).
        case pipe
        /// Appended to this file (created, truncated first).
        case file(String)
        /// /dev/null.
        case discard
        /// The test process's own stream (the test log).
        case inherit
    }

    /// The child's process id.
    public let pid: pid_t
    /// The executable's path.
    public let executable: String
    private var stdinFD: Int32
    private var stdoutFD: Int32
    private var stderrFD: Int32
    private var outBuffer: [UInt8] = []
    private var errBuffer: [UInt8] = []
    private var stdoutClosed = false
    private var stderrClosed = false
    /// The exit code (or 128 + signal number) once reaped.
    public private(set) var exitStatus: Int32?
    /// The signal that ended the child, once reaped (nil: it exited).
    public private(set) var terminatingSignal: Int32?
    /// The child's peak resident set size in KiB over its whole life, once reaped (`ru_maxrss`
    /// from `wait4`). Beware: at `exec` the kernel folds the spawning process's resident set (this
    /// test process's, shared until then) into it, so it is at least that; an agent's own peak is
    /// its report's `peak_resident_bytes` (`VmHWM`).
    public private(set) var peakResidentKilobytes: Int?

    /// Starts `path` with `arguments`. `environment` replaces the test's environment when given.
    public init(_ path: String, _ arguments: [String], environment: [String: String]? = nil,
                stdout: Output = .pipe, stderr: Output = .inherit) throws {
        signal(SIGPIPE, SIG_IGN) // a child that died must fail the test, not kill the runner
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw SupportError("\(path) is not an executable file (not built or not installed?)")
        }
        var inPipe: [Int32] = [-1, -1], outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        guard pipe(&inPipe) == 0 else { throw SupportError("pipe for stdin of \(path) failed: errno \(errno)") }
        if case .pipe = stdout, pipe(&outPipe) != 0 { throw SupportError("pipe for stdout of \(path) failed: errno \(errno)") }
        if case .pipe = stderr, pipe(&errPipe) != 0 { throw SupportError("pipe for stderr of \(path) failed: errno \(errno)") }
        for fd in inPipe + outPipe + errPipe where fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        for (target, output, pipeEnds) in [(Int32(1), stdout, outPipe), (Int32(2), stderr, errPipe)] {
            switch output {
            case .pipe: posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], target)
            case .file(let file): posix_spawn_file_actions_addopen(&actions, target, file, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0o644)
            case .discard: posix_spawn_file_actions_addopen(&actions, target, "/dev/null", O_WRONLY, 0)
            case .inherit: break
            }
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let envStrings: [String]? = environment.map { $0.map { "\($0.key)=\($0.value)" } }
        let envp: [UnsafeMutablePointer<CChar>?]? = envStrings.map { $0.map { strdup($0) } + [nil] }
        defer { envp?.forEach { free($0) } }
        var child: pid_t = 0
        let rc: Int32
        if let envp {
            rc = posix_spawn(&child, path, &actions, nil, argv, envp)
        } else {
            rc = posix_spawn(&child, path, &actions, nil, argv, environ)
        }
        close(inPipe[0])
        if outPipe[1] >= 0 { close(outPipe[1]) }
        if errPipe[1] >= 0 { close(errPipe[1]) }
        guard rc == 0 else {
            for fd in [inPipe[1], outPipe[0], errPipe[0]] where fd >= 0 { close(fd) }
            throw SupportError("posix_spawn of \(path) failed: errno \(rc) (\(String(cString: strerror(rc))))")
        }
        pid = child
        executable = path
        stdinFD = inPipe[1]
        stdoutFD = outPipe[0]
        stderrFD = errPipe[0]
        stdoutClosed = stdoutFD < 0
        stderrClosed = stderrFD < 0
    }

    deinit {
        if exitStatus == nil {
            Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        for fd in [stdinFD, stdoutFD, stderrFD] where fd >= 0 { close(fd) }
    }

    // MARK: input

    /// Writes `line` and a newline to the child's standard input (ignored once it is closed).
    public func send(_ line: String) {
        guard stdinFD >= 0 else { return }
        let bytes = Array((line + "\n").utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(stdinFD, $0.baseAddress! + sent, bytes.count - sent) }
            if n <= 0 { if n < 0 && errno == EINTR { continue }; return }
            sent += n
        }
    }

    /// Closes the child's standard input (it reads end of file).
    public func closeInput() {
        if stdinFD >= 0 { close(stdinFD); stdinFD = -1 }
    }

    // MARK: output

    /// Reads what the output pipes have, waiting up to `timeout` seconds for something to arrive.
    /// Returns false when nothing arrived (timeout, or both pipes at end of file).
    @discardableResult
    private func pump(timeout: Double) -> Bool {
        var fds: [pollfd] = []
        if !stdoutClosed { fds.append(pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)) }
        if !stderrClosed { fds.append(pollfd(fd: stderrFD, events: Int16(POLLIN), revents: 0)) }
        if fds.isEmpty { return false }
        let ready = poll(&fds, nfds_t(fds.count), Int32(max(0, min(timeout, 3600)) * 1000))
        if ready <= 0 { return false }
        var chunk = [UInt8](repeating: 0, count: 65536)
        var got = false
        for p in fds where p.revents != 0 {
            let n = read(p.fd, &chunk, chunk.count)
            if n > 0 {
                got = true
                if p.fd == stdoutFD { outBuffer.append(contentsOf: chunk[0..<n]) } else { errBuffer.append(contentsOf: chunk[0..<n]) }
            } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                if p.fd == stdoutFD { stdoutClosed = true } else { stderrClosed = true }
                got = true
            }
        }
        return got
    }

    /// The next line of standard output (without its newline) within `timeout` seconds; nil on
    /// timeout (0: only what has already arrived). Throws once the child closed its standard
    /// output and every line was read.
    public func nextLine(timeout: Double) throws -> String? {
        let deadline = monotonicSeconds() + timeout
        while true {
            if let nl = outBuffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: outBuffer[0..<nl], as: UTF8.self)
                outBuffer.removeSubrange(0...nl)
                return line
            }
            if stdoutClosed {
                throw SupportError("\(name) closed its standard output (exited?)\(stderrTail)")
            }
            let left = deadline - monotonicSeconds()
            if left <= 0 {
                if !pump(timeout: 0) { return nil }   // only what has already arrived
                continue
            }
            pump(timeout: left)
        }
    }

    /// The next standard-output line that is a JSON object, within `timeout` seconds (other lines
    /// are skipped); nil on timeout.
    public func nextJSON(timeout: Double) throws -> [String: Any]? {
        let deadline = monotonicSeconds() + timeout
        while true {
            guard let line = try nextLine(timeout: max(0, deadline - monotonicSeconds())) else { return nil }
            if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] { return object }
        }
    }

    /// Waits for a JSON line whose "event" is `event`; a line with event "error" or "corrupt"
    /// (the workload's failures) throws, as does the deadline.
    @discardableResult
    public func waitFor(event: String, timeout: Double) throws -> [String: Any] {
        let deadline = monotonicSeconds() + timeout
        while true {
            let left = deadline - monotonicSeconds()
            guard left > 0, let object = try nextJSON(timeout: left) else { break }
            let e = object["event"] as? String
            if e == event { return object }
            if e == "error" || e == "corrupt" { throw SupportError("\(name) reported \(object) while waiting for '\(event)'") }
        }
        throw SupportError("\(name): no '\(event)' line within \(timeout) s\(stderrTail)")
    }

    /// Waits for a standard-output line equal to `text` (earlier lines are skipped).
    public func waitFor(line text: String, timeout: Double) throws {
        let deadline = monotonicSeconds() + timeout
        while true {
            let left = deadline - monotonicSeconds()
            guard left > 0, let line = try nextLine(timeout: left) else { break }
            if line == text { return }
        }
        throw SupportError("\(name): no line '\(text)' within \(timeout) s\(stderrTail)")
    }

    /// Reads both pipes until the child closes them or `timeout` seconds pass; returns whether it
    /// closed them.
    @discardableResult
    public func drain(timeout: Double) -> Bool {
        let deadline = monotonicSeconds() + timeout
        while !(stdoutClosed && stderrClosed) {
            let left = deadline - monotonicSeconds()
            if left <= 0 { return false }
            pump(timeout: left)
        }
        return true
    }

    /// Everything read from standard output and error so far, not yet taken as lines.
    public var collected: (stdout: String, stderr: String) {
        (String(decoding: outBuffer, as: UTF8.self), String(decoding: errBuffer, as: UTF8.self))
    }

    private var name: String { "\(URL(fileURLWithPath: executable).lastPathComponent) (pid \(pid))" }
    private var stderrTail: String {
        errBuffer.isEmpty ? "" : "; its stderr ends: " + String(decoding: errBuffer.suffix(2000), as: UTF8.self)
    }

    // MARK: lifetime

    /// Whether the child has not exited yet (reaps it if it has).
    public var isRunning: Bool { reap(block: false) == nil }

    @discardableResult
    private func reap(block: Bool) -> Int32? {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        var usage = rusage()
        let r = wait4(pid, &status, block ? 0 : WNOHANG, &usage)
        guard r == pid else { return nil }
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        terminatingSignal = (status & 0x7f) == 0 ? nil : status & 0x7f
        peakResidentKilobytes = usage.ru_maxrss
        exitStatus = code
        return code
    }

    /// Waits up to `timeout` seconds for the child to exit (draining its pipes meanwhile, so a
    /// chatty child cannot block on a full pipe); returns its exit code (128 + signal when killed),
    /// nil when it is still running.
    @discardableResult
    public func wait(timeout: Double) -> Int32? {
        let deadline = monotonicSeconds() + timeout
        while true {
            if let code = reap(block: false) { return code }
            let left = deadline - monotonicSeconds()
            if left <= 0 { return nil }
            if !pump(timeout: min(left, 0.01)) { usleep(2000) }
        }
    }

    /// Sends `signal` to the child if it still runs.
    public func kill(_ signal: Int32 = SIGTERM) {
        if exitStatus == nil { Glibc.kill(pid, signal) }
    }

    /// Closes standard input (and sends `quitCommand` first, if given), waits up to `grace`
    /// seconds, then kills the child. Returns its exit code.
    @discardableResult
    public func stop(quitCommand: String? = nil, grace: Double = 10) -> Int32 {
        if let quitCommand { send(quitCommand) }
        closeInput()
        if let code = wait(timeout: grace) { return code }
        Glibc.kill(pid, SIGKILL)
        return reap(block: true) ?? -1
    }
}

/// What a finished tool run printed and how it ended.
public struct ToolResult: CustomStringConvertible {
    /// Exit code (128 + signal when killed; -1 when it timed out and was killed).
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// The run was killed at its deadline.
    public var timedOut: Bool
    public var description: String { "status \(status)\(timedOut ? " (timed out)" : "")\nstdout: \(stdout)\nstderr: \(stderr)" }
}

/// Runs `path` with `arguments` to completion (standard input `stdin`, then end of file), and
/// collects its output. Killed after `timeout` seconds (then `timedOut` is set and status is -1).
public func runTool(_ path: String, _ arguments: [String], stdin: String? = nil,
                    environment: [String: String]? = nil, timeout: Double = 60) throws -> ToolResult {
    let child = try ChildProcess(path, arguments, environment: environment, stdout: .pipe, stderr: .pipe)
    if let stdin {
        let bytes = Array(stdin.utf8)
        // Small inputs only (a script): written whole before reading.
        child.sendRaw(bytes)
    }
    child.closeInput()
    let closed = child.drain(timeout: timeout)
    var status = closed ? child.wait(timeout: max(5, timeout / 10)) : nil
    let timedOut = status == nil
    if timedOut { child.kill(SIGKILL); _ = child.wait(timeout: 10); status = -1 }
    let output = child.collected
    return ToolResult(status: status ?? -1, stdout: output.stdout, stderr: output.stderr, timedOut: timedOut)
}

extension ChildProcess {
    /// Writes raw bytes to the child's standard input.
    func sendRaw(_ bytes: [UInt8]) {
        guard stdinFD >= 0 else { return }
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(stdinFD, $0.baseAddress! + sent, bytes.count - sent) }
            if n <= 0 { if n < 0 && errno == EINTR { continue }; return }
            sent += n
        }
    }
}
