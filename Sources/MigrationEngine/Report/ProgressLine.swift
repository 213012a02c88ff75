import Foundation
import Glibc

/// The one-line progress display on a terminal, as `virsh migrate --verbose` gives: phase (with the round), percent,
/// bytes, rate, dirty rate, throttle state, ETA.
/// Redrawn in place at most every 250 ms; silent when standard error is not a terminal.
public struct ProgressLine: Sendable {
    private let enabled: Bool
    /// Where the line is drawn (standard error).
    private let fd: Int32
    private var lastDraw: UInt64 = 0

    public init(enabled: Bool = isatty(STDERR_FILENO) != 0, fd: Int32 = STDERR_FILENO) {
        self.enabled = enabled
        self.fd = fd
    }

    /// Redraws the line if it is due.
    public mutating func update(phase: MigrationPhase, sentBytes: UInt64, totalBytes: UInt64, dirtyRate: Double,
                                bandwidth: Double, throttled: Bool, remainingBytes: UInt64, parts: String = "", force: Bool = false) {
        guard enabled else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        guard force || now - lastDraw > 250_000_000 else { return }
        lastDraw = now
        let eta = bandwidth > 0 ? Double(remainingBytes) / bandwidth : 0
        let percent = totalBytes == 0 ? 0 : min(100, Double(sentBytes) * 100 / Double(totalBytes))
        let line = String(format: "\r\u{1B}[K%@  %3.0f%%  %@ sent of %@ (%@)  %.1f MB/s  dirty %.1f MB/s  throttle %@  ETA %.1f s",
                          phase.description, percent, Self.mib(sentBytes), Self.mib(totalBytes), parts, bandwidth / 1e6,
                          dirtyRate / 1e6, throttled ? "ON" : "off", eta)
        draw(line)
    }

    /// Ends the line so later output starts on a fresh one.
    public func finish() {
        guard enabled else { return }
        draw("\n")
    }

    private func draw(_ text: String) {
        var text = text
        text.withUTF8 { _ = Glibc.write(fd, $0.baseAddress, $0.count) }
    }

    private static func mib(_ bytes: UInt64) -> String { String(format: "%.1f MiB", Double(bytes) / 1_048_576) }
}
