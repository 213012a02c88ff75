import Wire

/// One part of the VM that a ``SourceSession`` migrates: a disk, or the memory. The session owns
/// the link, the phases, the convergence decision, the pause and the report; a stream knows only
/// its own data: what to send in the bulk copy, what is dirty, what is final, what the digest is.
///
/// The session calls every method from its one driving thread, except ``acknowledged(_:)``, which
/// the link's reader thread calls under the link's lock (see ``PeerLink/publish(_:)``).
protocol SourceStream: AnyObject {
    /// For logs: "disk 1", "memory".
    var label: String { get }
    /// The stream its acks, round ends and resume points name.
    var streamType: StreamKind { get }
    /// Its id within the stream type (the disk id; 0 for memory).
    var streamID: UInt32 { get }
    /// The features it needs on the main link.
    var features: Features { get }
    /// Whether it hands over before all of its data is at the destination (post-copy or hybrid):
    /// the rest is pushed, and pulled on demand over its urgent lane, after switchover.
    var isPostcopy: Bool { get }
    /// Whether it takes part in the bulk copy and the dirty rounds (false: post-copy from the start).
    var hasPrecopy: Bool { get }
    /// Bytes it migrates in all (for progress).
    var totalBytes: UInt64 { get }
    /// Data bytes it has sent so far (for progress).
    var sentBytes: UInt64 { get }

    /// Sends its layout frame (first thing on a new session).
    func announce(on link: PeerLink) throws(LinkError)
    /// Bytes of the bulk copy not yet sent (holes and never-touched pages included).
    var bulkRemaining: UInt64 { get }
    /// Sends up to about `budget` bytes of the bulk copy; returns true once the whole bulk copy
    /// (and its `roundEnd` for round 0) has been sent.
    func sendBulk(budget: Int, on link: PeerLink) throws(LinkError) -> Bool
    /// Takes the set of what was written since it was last sent and returns its size in bytes;
    /// ``sendRound(_:on:)`` or ``sendFinal(round:on:)`` sends it.
    func collectDirty() throws -> UInt64
    /// Sends what ``collectDirty()`` took as round `round`, then its `roundEnd`.
    func sendRound(_ round: Int, on link: PeerLink) throws(LinkError)
    /// Whether the destination has acknowledged every round sent (call under the link's lock).
    var roundsAcknowledged: Bool { get }
    /// The VM is paused: stop every change (a disk drains and holds its writes; memory takes its
    /// last dirty scan). Afterwards ``collectDirty()`` returns the final set.
    func freeze() throws
    /// The migration failed before hand-over: let the VM's writes through again.
    func thaw()
    /// What the `switchover` frame announces for this stream: bytes of disk or pages of memory still to come.
    var toCome: UInt64 { get }
    /// Just before the `switchover` frame (hybrid memory: the destination drops its stale pages).
    func beforeSwitchover(on link: PeerLink) throws(LinkError)
    /// Pre-copy: sends the final set as round `round` with its `roundEnd`. Post-copy: nothing yet.
    func sendFinal(round: Int, on link: PeerLink) throws(LinkError)
    /// The digest of its data at the pause. For a pre-copy stream, valid once ``sendFinal(round:on:)``
    /// returned; for a post-copy stream, once ``push(budget:on:)`` returned true.
    func digest() -> StreamDigest
    /// Post-copy: starts answering the destination's urgent requests on `lane` (a new lane after a
    /// reconnect replaces the old one).
    func serveUrgent(on lane: PeerLink) throws(LinkError)
    /// Post-copy: pushes up to about `budget` bytes of what the destination still lacks; true once
    /// everything (and the stream's `roundEnd`) has been sent.
    func push(budget: Int, on link: PeerLink) throws(LinkError) -> Bool
    /// The reader thread saw an acknowledgement for this stream. One that names what was never
    /// sent (a round whose `roundEnd` did not go, an offset past the end) is a protocol violation.
    func acknowledged(_ ack: Ack) throws(LinkError)
    /// After a reconnect: the destination's resume point for this stream (nil: it has none), so
    /// that everything it did not acknowledge goes again. A point past what was sent is a
    /// protocol violation, as for ``acknowledged(_:)``.
    func resume(from point: ResumePoint?, phase: MigrationPhase) throws(LinkError)
    /// Stops its threads (urgent lane) at the end.
    func stop()
    /// Fills its part of the report. `final` false: a live snapshot for the status endpoint, without the digest
    /// or percentiles (cheap enough to publish every 200 ms from the session's thread).
    func fill(_ report: inout MigrationReport, final: Bool)
}
