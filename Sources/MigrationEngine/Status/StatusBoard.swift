import CFerryShims
import Synchronization

/// What an agent shows while it migrates: the latest snapshot of its report, published by the session's own
/// thread at most every `interval` (a report filled without digests, so it costs a few microseconds), and read
/// by the status endpoint (`--metrics`): `/status` in QEMU's `query-migrate` shape, `/metrics` for Prometheus.
/// The fault-latency recorders of a destination are read at scrape time, off the fault path.
public final class StatusBoard: Sendable {
    /// QEMU's `MigrationStatus` values that Ferry's phases map to.
    public enum Status: String, Sendable, CaseIterable {
        case none, setup, active, device, postcopyActive = "postcopy-active", completed, failed
    }

    /// One published moment.
    public struct Snapshot: Sendable {
        public var status: Status = .none
        /// The session's phase ("bulk", "round 3", "switchover", ...).
        public var phase: String = ""
        /// The report as it stands (digests left out while running).
        public var report: MigrationReport
        /// Monotonic nanoseconds of the publication.
        public var at: UInt64 = 0
        /// Whether the source's disk write throttle is on.
        public var throttled = false
    }

    private let state: Mutex<Snapshot>
    private let recorders = Mutex<[(kind: String, recorder: LatencyRecorder)]>([])
    private let lastPublish = Atomic<UInt64>(0)
    /// Publications closer together than this are skipped (nanoseconds).
    public let interval: UInt64

    public init(role: String, intervalSeconds: Double = 0.2) {
        state = Mutex(Snapshot(report: MigrationReport(role: role)))
        interval = UInt64(intervalSeconds * 1e9)
    }

    /// Whether a periodic publication is due (the caller then builds its snapshot and publishes it).
    public func due() -> Bool {
        ferry_monotonic_ns() &- lastPublish.load(ordering: .relaxed) >= interval
    }

    /// Publishes the migration's state now.
    public func publish(phase: MigrationPhase, report: MigrationReport, throttled: Bool = false) {
        let now = ferry_monotonic_ns()
        lastPublish.store(now, ordering: .relaxed)
        state.withLock { $0 = Snapshot(status: Self.status(of: phase), phase: "\(phase)", report: report, at: now, throttled: throttled) }
    }

    /// The latest publication.
    public func snapshot() -> Snapshot { state.withLock { $0 } }

    /// A destination's fault-latency recorder, exported as a histogram labelled `kind`.
    public func addFaultLatency(kind: String, _ recorder: LatencyRecorder) {
        recorders.withLock { list in
            if !list.contains(where: { $0.kind == kind }) { list.append((kind, recorder)) }
        }
    }

    /// The recorders added so far.
    func faultLatencyRecorders() -> [(kind: String, recorder: LatencyRecorder)] { recorders.withLock { $0 } }

    /// QEMU's status for one of Ferry's phases.
    public static func status(of phase: MigrationPhase) -> Status {
        switch phase {
        case .connecting, .handshake: return .setup
        case .bulk, .round: return .active
        case .switchover: return .device
        case .postcopy: return .postcopyActive
        case .complete: return .completed
        case .failed: return .failed
        }
    }
}
