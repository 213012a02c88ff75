/// When to stop iterating and switch over, and when to throttle the writer: the pre-copy decision
/// of Clark et al. (2004) with the write throttle of Bradford et al. (2007), in QEMU's terms
/// (switch over once the remaining dirty bytes fit `bandwidth × max-downtime`), with one change:
/// the target is a ceiling, not an aim. Once the dirty bytes fit it, rounds go on while each still
/// shrinks the set to ``shrinkFactor`` of the one before or less, until the set fits ``floorSeconds``
/// of link: a writer that lets pre-copy converge gets the shortest pause it allows (a few short
/// rounds more: a 2.6 MB set at 24 MB/s is 110 ms of pause, and one more round of it 110 ms of
/// copying that leaves a fifth), and one that does not is paused as soon as it stops shrinking.
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
    /// ...or once a round left more than this fraction of the set before it.
    public var shrinkFactor: Double = 0.6

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
    public func decide(remainingBytes: UInt64, bandwidth: Double, dirtyRate: Double, round: Int,
                       elapsed: Double, throttled: Bool, previousRemainingBytes: UInt64? = nil) -> Decision {
        let budget = bandwidth * maxDowntime
        if Double(remainingBytes) <= budget {
            let fits = "\(remainingBytes) dirty bytes fit \(Int(maxDowntime * 1000)) ms at \(Int(bandwidth)) B/s"
            guard let previous = previousRemainingBytes else { return .switchover(reason: fits) }
            if Double(remainingBytes) <= bandwidth * floorSeconds {
                return .switchover(reason: "\(fits), and \(Int(floorSeconds * 1000)) ms")
            }
            if previous != .max && Double(remainingBytes) > Double(previous) * shrinkFactor {
                return .switchover(reason: "\(fits); the last round left \(remainingBytes * 100 / max(1, previous)) % of the \(previous) before it")
            }
            if round >= maxRounds || elapsed >= maxSeconds { return .switchover(reason: fits) }
            return .iterate
        }
        if round >= maxRounds { return .switchover(reason: "round limit \(maxRounds) reached") }
        if elapsed >= maxSeconds { return .switchover(reason: "time limit \(Int(maxSeconds)) s reached") }
        if !throttled, bandwidth > 0, dirtyRate > bandwidth * throttleAboveFraction {
            return .throttle(bytesPerSecond: UInt64(max(1, bandwidth * throttleTargetFraction)))
        }
        return .iterate
    }
}
