import Foundation
import Logging
import Synchronization

/// Logging and report output shared by both agents.
public enum AgentLogging {
    /// A logger printing to standard error at `level` (an unknown level name means info).
    public static func make(label: String, level: String) -> Logger {
        var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = Logger.Level(rawValue: level) ?? .info
        return logger
    }

    /// Logs a migration's result and writes its report, if a path was given.
    public static func finish(_ report: MigrationReport, writingTo path: String?, logger: Logger) {
        logger.info("migration \(report.status)", metadata: [
            "total_ms": "\(Int(report.totalTimeMs))", "downtime_ms": "\(String(format: "%.1f", report.downtimeMs))",
            "wire_bytes": "\(report.wireBytes)", "reconnects": "\(report.reconnects)",
            "digests_agree": "\(report.digestsAgree)", "reason": "\(report.reason)"])
        if let path {
            do { try report.write(to: path) } catch { logger.error("cannot write the report", metadata: ["path": "\(path)", "error": "\(error)"]) }
        }
    }
}

/// A migration running on its own thread. When it ends, its report is logged and written (if a
/// path was given), kept for the main thread, and the main thread's ``SignalWaiter/wait()`` wakes.
public final class BackgroundMigration: Sendable {
    private let result = Mutex<MigrationReport?>(nil)

    /// Starts `work` on a new thread.
    public init(reportPath: String?, logger: Logger, _ work: @escaping @Sendable () -> MigrationReport) {
        Thread { [self] in
            let report = work()
            AgentLogging.finish(report, writingTo: reportPath, logger: logger)
            result.withLock { $0 = report }
            SignalWaiter.wake()
        }.start()
    }

    /// The report, once the migration has ended.
    public var report: MigrationReport? { result.withLock { $0 } }

    /// Whether it ended and completed.
    public var completed: Bool { report?.status == "completed" }
}
