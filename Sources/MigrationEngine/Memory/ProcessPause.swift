import Foundation
import Glibc

/// Pauses and resumes the migrating process: SIGSTOP / SIGCONT by default (`kill`), or the
/// operator's `--pause-cmd` / `--resume-cmd` for a VMM with its own API. After SIGSTOP it waits
/// until every thread of the process is really stopped (state `T` in /proc/PID/task/TID/stat), since
/// a signal is delivered asynchronously and a final dirty scan must not race a running thread.
public struct ProcessPause: Sendable {
    public let pid: Int32
    public let pauseCommand: String?
    public let resumeCommand: String?

    public init(pid: Int32, pauseCommand: String?, resumeCommand: String?) {
        self.pid = pid
        self.pauseCommand = pauseCommand
        self.resumeCommand = resumeCommand
    }

    /// Pauses the process. The corresponding system call is `kill(pid, SIGSTOP)`.
    public func pause() throws(ShellCommand.Failure) {
        if let pauseCommand {
            try ShellCommand.run(pauseCommand, environment: ["FERRY_PID": "\(pid)"])
            return
        }
        guard kill(pid, SIGSTOP) == 0 else {
            throw ShellCommand.Failure(description: "kill(\(pid), SIGSTOP) failed: errno \(errno)")
        }
        let deadline = ShellCommand.monotonicSeconds() + 5
        while !allThreadsStopped() {
            if ShellCommand.monotonicSeconds() > deadline {
                throw ShellCommand.Failure(description: "process \(pid) did not stop within 5 s of SIGSTOP")
            }
            usleep(200)
        }
    }

    /// Resumes the process at the source. The corresponding system call is `kill(pid, SIGCONT)`.
    public func resume() throws(ShellCommand.Failure) {
        if let resumeCommand {
            try ShellCommand.run(resumeCommand, environment: ["FERRY_PID": "\(pid)"])
            return
        }
        guard kill(pid, SIGCONT) == 0 else {
            throw ShellCommand.Failure(description: "kill(\(pid), SIGCONT) failed: errno \(errno)")
        }
    }

    /// Whether every thread of the process is in state T (stopped) or t (traced).
    func allThreadsStopped() -> Bool {
        guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") else { return false }
        for tid in tasks {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { return false }
            let state = stat[stat.index(close, offsetBy: 2)]
            if state != "T" && state != "t" { return false }
        }
        return true
    }
}
