import ArgumentParser
import Foundation
import Glibc
import Logging
import MigrationEngine
import URing

/// `dest-agent` without `--disk`: receive a process's memory and resume it here.
struct MemoryOptions: ParsableArguments {
    @Option(name: .customLong("uffd-socket"), help: ArgumentHelp("Unix socket where the resumed VM hands over its userfaultfd (Firecracker's UFFD handshake).", valueName: "PATH"))
    var uffdSocket: String?

    @Option(name: .customLong("on-switchover"), help: ArgumentHelp("Shell command that starts the VM here at switchover; gets FERRY_STATE_FILE, FERRY_UFFD_SOCKET, FERRY_LAYOUT_FILE.", valueName: "CMD"))
    var onSwitchover: String?

    @Option(name: .customLong("mem-out"), help: ArgumentHelp("Also write the received memory as a Firecracker memory file.", valueName: "PATH"))
    var memOut: String?

    @Option(name: .customLong("prepaging-window"), help: "Pages requested around a faulting page that has not arrived (post-copy pre-paging).")
    var prepagingWindow: Int = 16

    @Option(name: .customLong("work-dir"), help: ArgumentHelp("Where the state and layout files go (default: a directory under /tmp).", valueName: "DIR"))
    var workDir: String?

    @Option(name: .customLong("vm-start-timeout"), help: "Seconds to wait for the started VM's UFFD handshake; after that the source is told the VM did not start (it resumes its copy).")
    var vmStartTimeout: Double = 30

    @Option(name: .customLong("urgent-priority"), help: "SO_PRIORITY of the urgent lane (6 = interactive band of pfifo_fast; 0: leave it).")
    var urgentPriority: Int32 = 6

    func validate() throws {
        if onSwitchover != nil && uffdSocket == nil { throw ValidationError("--on-switchover needs --uffd-socket (where the started VM hands over its memory)") }
        if prepagingWindow < 1 || prepagingWindow > 256 { throw ValidationError("--prepaging-window must be 1 ... 256") }
    }

    /// Receives memory, resumes the VM, serves its faults until it exits (or SIGTERM); writes the
    /// report at the end of the migration and again, with the fault figures, at exit.
    func receive(listen: String, keyFile: String, acceptTimeout: Double, reportPath: String?, logger: Logger) throws {
        var options = MemoryDestinationOptions(listen: try SocketAddress(parsing: listen), key: try SharedKey(contentsOf: keyFile))
        options.uffdSocket = uffdSocket
        options.onSwitchover = onSwitchover
        options.memOut = memOut
        options.prepagingWindow = prepagingWindow
        options.workDirectory = workDir
        options.urgentPriority = urgentPriority
        options.handshakeTimeout = vmStartTimeout
        options.acceptTimeout = acceptTimeout
        let migration = MemoryDestinationMigration(options: options, logger: logger, vmExited: { SignalWaiter.wake() })
        let background = BackgroundMigration(reportPath: reportPath, logger: logger) { migration.run() }
        func finish() throws {
            migration.faultService?.stop()
            if let pid = migration.startedPID { var status: Int32 = 0; _ = waitpid(pid, &status, WNOHANG) }   // the --on-switchover shell
            guard var report = background.report else { throw ExitCode(1) }
            migration.refresh(&report)
            if let reportPath { try? report.write(to: reportPath) }
            if let memory = report.memory {
                logger.info("fault service", metadata: [
                    "faults_on_received": "\(memory.faultsOnReceived)", "faults_on_missing": "\(memory.faultsOnMissing)",
                    "received_p50_us": "\(memory.faultLatencyReceived.p50Us)", "missing_p50_us": "\(memory.faultLatencyMissing.p50Us)"])
            }
            if report.status != "completed" { throw ExitCode(1) }
        }
        while true {
            switch SignalWaiter.wait() {
            case .stop(let signal):
                logger.info("stopping", metadata: ["signal": "\(signal)"])
                return try finish()
            case .workFinished:
                guard let report = background.report else { continue }   // the VM exited before the migration ended
                if report.status != "completed" { return try finish() }
                if let service = migration.faultService, !service.hasFinished {
                    logger.info("serving the resumed VM's faults until it exits or SIGTERM")
                    continue
                }
                return try finish()
            }
        }
    }
}

