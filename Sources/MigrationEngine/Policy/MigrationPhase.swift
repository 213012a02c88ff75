/// The phases of one migration, as one value. ``PhaseTracker`` is the only place the phase changes,
/// so every transition is checked in one spot. A dropped link does not change the phase: the
/// migration reconnects and resumes in the phase it was in.
public enum MigrationPhase: Equatable, Sendable, CustomStringConvertible {
    case connecting
    case handshake
    /// Whole-disk (or whole-memory) copy.
    case bulk
    /// Dirty-block (dirty-page) round N, from 1.
    case round(Int)
    /// The VM is paused at the source; the last deltas are on their way.
    case switchover
    /// The destination serves; missing data is still being pulled or pushed.
    case postcopy
    /// Digests agreed.
    case complete
    /// Gave up; the VM keeps running at the source when this happens before switchover.
    case failed(String)

    public var description: String {
        switch self {
        case .connecting: return "connecting"
        case .handshake: return "handshake"
        case .bulk: return "bulk"
        case .round(let n): return "round \(n)"
        case .switchover: return "switchover"
        case .postcopy: return "post-copy"
        case .complete: return "complete"
        case .failed(let reason): return "failed: \(reason)"
        }
    }

    /// Whether the VM may still be resumed at the source (nothing has been handed over yet).
    public var isBeforeSwitchover: Bool {
        switch self {
        case .connecting, .handshake, .bulk, .round: return true
        default: return false
        }
    }

    /// Whether `next` may follow this phase.
    public func canMove(to next: MigrationPhase) -> Bool {
        switch (self, next) {
        case (_, .failed): return !isTerminal
        case (.connecting, .handshake), (.handshake, .bulk), (.handshake, .switchover): return true   // .switchover: post-copy at once
        case (.bulk, .round(1)), (.bulk, .switchover): return true
        case (.round(let n), .round(let m)): return m == n + 1
        case (.round, .switchover): return true
        case (.switchover, .postcopy), (.switchover, .complete): return true
        case (.postcopy, .complete): return true
        default: return false
        }
    }

    /// Complete and failed are final.
    public var isTerminal: Bool {
        switch self {
        case .complete, .failed: return true
        default: return false
        }
    }
}

/// Holds the current ``MigrationPhase`` and enforces its transitions.
public struct PhaseTracker: Sendable {
    /// The phase now.
    public private(set) var current: MigrationPhase = .connecting

    public init() {}

    /// Moves to `next`; an impossible transition is a bug and stops the program with both phases named.
    public mutating func move(to next: MigrationPhase) {
        precondition(current.canMove(to: next), "migration phase cannot go from \(current) to \(next)")
        current = next
    }
}
