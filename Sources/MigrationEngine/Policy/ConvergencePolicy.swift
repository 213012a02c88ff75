/// When to stop iterating and switch over, and when to throttle the writer: the pre-copy decision
/// of Clark et al. (2004) with the write throttle of Bradford et al. (2007), in QEMU's terms
/// (switch over once the remaining dirty bytes fit `bandwidth × max-downtime`), with one change:
/// the target is a ceiling, not an aim, and it is the whole pause (``pauseOverhead`` of it is not data).
/// Once the dirty bytes fit it, rounds go on while another
/// one pays: while what the VM would dirty as this set crosses the link and its acknowledgement
/// comes back (the dirty rate × (set ÷ bandwidth + round trip)) is at most ``shrinkFactor`` of the
/// set, or the last round left at most that much of the set before it, and the last round did
/// shrink it (``stallFactor``); until the set fits ``floorSeconds`` of link. A writer
/// that lets pre-copy converge gets the shortest pause it allows (a few short rounds more: a 2.2 MB
/// set at 24 MB/s is 92 ms of pause, one more round of it leaves about 0.7 MB), and one that does
/// not (a hot set, rewritten faster than a round) is paused as soon as another round would not shrink it.
public struct ConvergencePolicy: Sendable, Equatable {
    /// The downtime to aim at, in seconds (QEMU's `downtime-limit`, 0.3 s by default there).
    public var maxDowntime: Double
    /// Stop iterating after this many dirty rounds, whatever is left.
    public var maxRounds: Int
    /// Stop iterating after this many seconds of migration, whatever is left.
    public var maxSeconds: Double
    /// Engage the throttle when the writer dirties faster than this fraction of the bandwidth.
    public var throttleAboveFraction: Double
    /// When engaged, the throttle lets the writer dirty at most this fraction of the bandwidth.
    public var throttleTargetFraction: Double
    /// Below the target, switch over once the dirty bytes fit this much link time (seconds)...
    public var floorSeconds: Double = 0.01
    /// ...or once another round would leave more than this fraction of the set...
    public var shrinkFactor: Double = 0.6
    /// ...or once the last round left more than this fraction of the set before it (it stopped shrinking).
    public var stallFactor: Double = 0.95
    /// Seconds of the pause that are not the last dirty data: stopping the VM, its state, the last scan,
    /// the offer and the destination's start (measured: 50-55 ms for a QEMU guest, 15-25 ms for a
    /// process). The data must fit what the target leaves of them (half the target when they would take
    /// more), so that the measured downtime keeps within the target plus the one round trip of the hand-over.
    public var pauseOverhead: Double = 0.06

    public init(maxDowntime: Double = 0.3, maxRounds: Int = 30, maxSeconds: Double = 3600,
                throttleAboveFraction: Double = 0.5, throttleTargetFraction: Double = 0.3) {
        self.maxDowntime = maxDowntime
        self.maxRounds = maxRounds
        self.maxSeconds = maxSeconds
        self.throttleAboveFraction = throttleAboveFraction
        self.throttleTargetFraction = throttleTargetFraction
    }

    /// What to do after a round.
    public enum Decision: Equatable, Sendable {
        /// Another round.
        case iterate
        /// Another round, with the writer throttled to `bytesPerSecond`.
        case throttle(bytesPerSecond: UInt64)
        /// Pause and send the rest; `reason` says which condition held.
        case switchover(reason: String)
    }

    /// Decides from what a round measured.
    /// - Parameters:
    ///   - remainingBytes: dirty bytes not yet sent.
    ///   - bandwidth: measured link throughput, bytes/s.
    ///   - dirtyRate: bytes/s the writer dirtied during the last round.
    ///   - round: rounds done so far.
    ///   - elapsed: seconds since the migration began.
    ///   - throttled: whether the throttle is already on.
    ///   - previousRemainingBytes: what the round before left (`.max` after the bulk copy); nil: switch
    ///     over as soon as the rest fits the target, with no rounds to shrink it further.
    ///   - roundTrip: the link's round trip in seconds (0: unknown), which every round adds to the
    ///     time the VM dirties pages while the round is sent and acknowledged.
    public func decide(remainingBytes: UInt64, bandwidth: Double, dirtyRate: Double, round: Int,
                       elapsed: Double, throttled: Bool, previousRemainingBytes: UInt64? = nil, roundTrip: Double = 0) -> Decision {
        // What the target leaves for data (half of it when the overhead would take more).
        let dataTime = maxDowntime > 2 * pauseOverhead ? maxDowntime - pauseOverhead : maxDowntime / 2
        let budget = bandwidth * dataTime
        if Double(remainingBytes) <= budget {
            let fits = "\(remainingBytes) dirty bytes fit \(Int(dataTime * 1000)) ms (the \(Int(maxDowntime * 1000)) ms target less \(Int(pauseOverhead * 1000)) ms of pause) at \(Int(bandwidth)) B/s"
            guard let previous = previousRemainingBytes else { return .switchover(reason: fits) }
            if Double(remainingBytes) <= bandwidth * floorSeconds {
                return .switchover(reason: "\(fits), and \(Int(floorSeconds * 1000)) ms")
            }
            // Another round pays if it is predicted to leave at most `shrinkFactor` of the set, or if
            // the last one did (a set measured after queued rounds drained can shrink more than
            // predicted, and a VM's page heat makes the next set smaller than the rate says).
            let next = dirtyRate * (Double(remainingBytes) / max(bandwidth, 1) + roundTrip)
            let lastShrank = previous == .max || Double(remainingBytes) <= Double(previous) * shrinkFactor
            if next > Double(remainingBytes) * shrinkFactor && !lastShrank {
                return .switchover(reason: "\(fits); another round would leave about \(Int(next)) of them")
            }
            if previous != .max && Double(remainingBytes) > Double(previous) * stallFactor {
                return .switchover(reason: "\(fits); the last round left \(remainingBytes * 100 / max(1, previous)) % of the \(previous) before it")
            }
            if round >= maxRounds || elapsed >= maxSeconds { return .switchover(reason: fits) }
            return .iterate
        }
        if round >= maxRounds { return .switchover(reason: "round limit \(maxRounds) reached") }
        if elapsed >= maxSeconds { return .switchover(reason: "time limit \(Int(maxSeconds)) s reached") }
        // Above the target: throttle a writer faster than `throttleAboveFraction` of the link, or one
        // whose set stopped shrinking (pre-copy does not converge: slow the writers rather than give
        // up on the downtime).
        let stalled = previousRemainingBytes.map { $0 != .max && Double(remainingBytes) > Double($0) * stallFactor } ?? false
        if !throttled, bandwidth > 0, dirtyRate > bandwidth * throttleAboveFraction || stalled {
            return .throttle(bytesPerSecond: UInt64(max(1, bandwidth * throttleTargetFraction)))
        }
        return .iterate
    }
}
