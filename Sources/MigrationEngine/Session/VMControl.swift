import Foundation
import ProcessMemory
import Glibc

/// The source's hold on the VM process: pause, resume after a failure, and the opaque VM-state
/// blob made at pause. SIGSTOP / SIGCONT by default (`kill`), the operator's `--pause-cmd` /
/// `--resume-cmd` for a VMM with its own API, or QEMU's QMP (``QEMUSourceVM``: `stop`, `cont`,
/// the device state by `migrate` with `x-ignore-shared`). After SIGSTOP it waits until
/// every thread of the process is really stopped (state `T` in /proc/PID/task/TID/stat), since a
/// signal is delivered asynchronously and a final dirty scan must not race a running thread.
public struct VMControl: Sendable {
    public let pid: Int32
    public let pauseCommand: String?
    public let resumeCommand: String?
    /// Run at pause to make the VM-state blob (see ``state()``).
    public let stateCommand: String?
    /// A QEMU driven through QMP: pause, resume and state go there.
    public let qemu: QEMUSourceVM?

    public init(pid: Int32, pauseCommand: String? = nil, resumeCommand: String? = nil, stateCommand: String? = nil) {
        self.pid = pid
        self.pauseCommand = pauseCommand
        self.resumeCommand = resumeCommand
        self.stateCommand = stateCommand
        qemu = nil
    }

    /// A QEMU VM controlled through its monitor.
    public init(qemu: QEMUSourceVM) {
        pid = qemu.pid
        pauseCommand = nil
        resumeCommand = nil
        stateCommand = nil
        self.qemu = qemu
    }

    /// Whether pause and resume are SIGSTOP and SIGCONT.
    public var usesSignals: Bool { qemu == nil && pauseCommand == nil }

    /// Runs the state command (if any) and returns the blob. The command gets FERRY_STATE_FILE (a
    /// path it may write, in a private directory) and FERRY_PID; if the last line it prints names
    /// an existing file, that file is the blob instead.
    public func state() throws -> [UInt8] {
        if let qemu { return try qemu.deviceState() }
        guard let command = stateCommand else { return [] }
        let directory = try PrivateDirectory(prefix: "ferry-state")
        defer { directory.remove() }
        let path = directory.path + "/vm-state.bin"
        let output = try ShellCommand.run(command, environment: ["FERRY_STATE_FILE": path, "FERRY_PID": "\(pid)"])
        var file = path
        if let last = output.split(separator: "\n").last.map({ $0.trimmingCharacters(in: .whitespaces) }),
           !last.isEmpty, FileManager.default.fileExists(atPath: last) {
            file = last
        }
        guard let data = FileManager.default.contents(atPath: file) else {
            throw SetupError("--state-cmd produced no state file (wrote nothing to FERRY_STATE_FILE and printed no existing path)")
        }
        return [UInt8](data)
    }

    /// Pauses the process. The corresponding system call is `kill(pid, SIGSTOP)`.
    public func pause() throws(ShellCommand.Failure) {
        if let qemu {
            do { try qemu.pause() } catch { throw ShellCommand.Failure(description: "QMP stop: \(error)") }
            return
        }
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
        if let qemu {
            do { try qemu.resume() } catch { throw ShellCommand.Failure(description: "QMP cont: \(error)") }
            return
        }
        if let resumeCommand {
            try ShellCommand.run(resumeCommand, environment: ["FERRY_PID": "\(pid)"])
            return
        }
        guard kill(pid, SIGCONT) == 0 else {
            throw ShellCommand.Failure(description: "kill(\(pid), SIGCONT) failed: errno \(errno)")
        }
    }

    /// Whether every thread of the process is in state T (stopped) or t (traced).
    func allThreadsStopped() -> Bool { ProcessFreeze.allThreadsStopped(pid: pid) }
}
