import Glibc

/// Runs an operator's hook (`--pause-cmd`, `--resume-cmd`, `--state-cmd`, `--on-switchover`) with
/// `/bin/sh -c`, with extra environment variables. Spawned with `posix_spawn`.
public enum ShellCommand {
    /// Why a hook failed.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// Starts `command` and returns its PID without waiting. Its stdout is `stdoutFD` when given.
    /// The corresponding C function is `posix_spawn`.
    public static func start(_ command: String, environment extra: [String: String] = [:],
                             stdoutFD: Int32? = nil) throws(Failure) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdoutFD { posix_spawn_file_actions_adddup2(&actions, stdoutFD, 1) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The agents block SIGTERM/SIGINT/SIGUSR1 for sigwait: the hook must start with them unblocked.
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK))
        var env: [String] = []
        var index = 0
        while let entry = environ[index] {
            let text = String(cString: entry)
            let name = text.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
            if extra[name] == nil { env.append(text) }
            index += 1
        }
        for (name, value) in extra { env.append("\(name)=\(value)") }
        let argv: [UnsafeMutablePointer<CChar>?] = ["/bin/sh", "-c", command].map { (text: String) in strdup(text) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = env.map { (text: String) in strdup(text) } + [nil]
        defer {
            for a in argv { free(a) }
            for e in envp { free(e) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/bin/sh", &actions, &attributes, argv, envp)
        guard rc == 0 else { throw Failure(description: "cannot start '\(command)': posix_spawn errno \(rc)") }
        return pid
    }

    /// Runs `command` to the end; fails unless it exits with status 0 within `timeout` seconds.
    /// Returns what it printed on stdout.
    @discardableResult
    public static func run(_ command: String, environment: [String: String] = [:], timeout: Double = 60) throws(Failure) -> String {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw Failure(description: "pipe for '\(command)' failed: errno \(errno)") }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        let pid: pid_t
        do { pid = try start(command, environment: environment, stdoutFD: fds[1]) } catch {
            close(fds[0]); close(fds[1]); throw error
        }
        close(fds[1])
        defer { close(fds[0]) }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        let deadline = monotonicSeconds() + timeout
        while true {
            var poller = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
            let left = deadline - monotonicSeconds()
            if left <= 0 {
                kill(pid, SIGKILL)
                var status: Int32 = 0
                waitpid(pid, &status, 0)
                throw Failure(description: "'\(command)' did not finish within \(Int(timeout)) s")
            }
            let ready = poll(&poller, 1, Int32(min(left, 1) * 1000))
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { continue }
            let n = read(fds[0], &chunk, chunk.count)
            if n <= 0 { break }
            output.append(contentsOf: chunk[0..<n])
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exited = status & 0x7f == 0
        let code = (status >> 8) & 0xff
        guard exited && code == 0 else {
            throw Failure(description: "'\(command)' failed: " + (exited ? "exit status \(code)" : "killed by signal \(status & 0x7f)"))
        }
        return String(decoding: output, as: UTF8.self)
    }

    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
