import Wire

/// The part of the VM that the destination side of a session receives: a disk, or the memory.
/// ``DestinationSession`` routes each frame to the stream it belongs to, asks each whether the VM
/// may start, and collects their reports.
protocol DestinationStream: AnyObject {
    /// For logs: "disk 1", "memory".
    var label: String { get }
    /// The stream type its frames carry.
    var streamType: StreamKind { get }
    /// Its id within the type.
    var streamID: UInt32 { get }
    /// Applies one of its frames (data, round end, discard). Acks go back on `link`.
    func receive(_ message: Message, on link: PeerLink) throws(LinkError)
    /// Where this side got to, for a source that reconnects.
    var resumePoints: [ResumePoint] { get }
    /// Switchover: the source paused; `postcopy` says whether this stream is handed over before its data is all here.
    func switchover(postcopy: Bool) throws(LinkError)
    /// Whether the VM may run with this stream now: a pre-copy stream has everything and its digest
    /// equals `theirs`; a post-copy stream is ready to serve with fetch-on-demand. Throws a
    /// ``LinkError/local(_:reason:)`` that says why not.
    func checkReady(theirs: StreamDigest?) throws(LinkError)
    /// This side's digest (for the closing `complete`).
    func digest() -> StreamDigest
    /// Whether every byte has arrived (post-copy: the push ended).
    var isComplete: Bool { get }
    /// Whether the stream was switched over in post-copy: only then does it take data after the VM started.
    var isPostcopy: Bool { get }
    /// A new urgent lane for this stream (post-copy), replacing any earlier one.
    func attachUrgent(_ lane: PeerLink) throws(LinkError)
    /// Fills its part of the report. `final` false: a live snapshot for the status endpoint, without the digest
    /// or percentiles (cheap enough to publish every 200 ms from the session's thread).
    func fill(_ report: inout MigrationReport, final: Bool)
    /// Stops its threads at the end of the agent.
    func stop()
}
