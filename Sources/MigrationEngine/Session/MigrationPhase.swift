/// The phases of one migration, as one value. ``SessionState`` is the only place the phase changes,
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

/// Who owns the VM: the one question a migration must be able to answer at every moment, on
/// both sides. Only ``SessionState`` changes it.
public enum VMOwner: String, Sendable, Equatable {
    /// The VM runs (or, paused, may be resumed) at the source: nothing was handed over.
    case source
    /// The source paused the VM and told the destination it may start it; the destination has not
    /// yet said that it runs there. The source must not resume it on its own: it reconnects and
    /// asks (docs/wire.md, "Hand-over").
    case offered
    /// The destination said the VM runs there (`resumed`): the source's copy is stale for ever.
    case destination
    /// Offered, and the destination could not be reached to settle it: it stays paused at the
    /// source until an operator decides.
    case unsettled

    /// The report's `vm_location` for this owner.
    public var location: String {
        switch self {
        case .source: return "source"
        case .destination: return "destination"
        case .offered, .unsettled: return "paused"
        }
    }
}

/// One migration's state on one side: its ``MigrationPhase`` and its ``VMOwner``, changed only
/// through these methods, so every transition is checked in one place. A dropped link changes
/// neither: the migration reconnects and resumes in the phase it was in.
public struct SessionState: Sendable {
    /// The phase now.
    public private(set) var phase: MigrationPhase = .connecting
    /// Who owns the VM now.
    public private(set) var owner: VMOwner = .source

    public init() {}

    /// Moves to `next`; an impossible transition is a bug and stops the program with both phases named.
    public mutating func move(to next: MigrationPhase) {
        precondition(phase.canMove(to: next), "migration phase cannot go from \(phase) to \(next)")
        phase = next
    }

    /// The source told the destination it may start the VM (switchover and the final data sent).
    public mutating func offer() {
        if owner == .source { owner = .offered }
    }

    /// The destination runs the VM.
    public mutating func handOver() {
        owner = .destination
    }

    /// The destination said, before running it, that the VM did not start there (or refused the
    /// offer explicitly): it is the source's again.
    public mutating func takeBack() {
        precondition(owner != .destination, "the VM cannot come back once the destination runs it")
        owner = .source
    }

    /// The destination could not be reached to settle an offer.
    public mutating func leaveUnsettled() {
        if owner == .offered { owner = .unsettled }
    }
}
