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

/// A result handed from the migration thread to the main thread.
public final class MigrationOutcome: Sendable {
    private let value = Mutex<Bool?>(nil)
    public init() {}
    public func set(_ completed: Bool) { value.withLock { $0 = completed } }
    public func get() -> Bool? { value.withLock { $0 } }
}
