import Foundation

/// The JSON report an agent writes at the end (`--report PATH`). Field names follow QEMU's
/// `query-migrate` where one exists, so an operator of QEMU recognises them.
public struct MigrationReport: Codable, Sendable {
    /// "completed" or "failed".
    public var status: String = "failed"
    /// Why it failed, or why it switched over.
    public var reason: String = ""
    /// Which agent wrote it: "source" or "destination".
    public var role: String
    /// From start to digests agreed, in milliseconds.
    public var totalTimeMs: Double = 0
    /// From start to the end of the handshake.
    public var setupTimeMs: Double = 0
    /// From pausing writes at the source to the destination serving them.
    public var downtimeMs: Double = 0
    /// Dirty bytes at the last round ÷ bandwidth, as QEMU's `expected-downtime`.
    public var expectedDowntimeMs: Double = 0
    /// Bytes on the wire in both directions, frame headers included.
    public var wireBytes: UInt64 = 0
    /// Link bandwidth the source measured, in Mbit/s.
    public var mbps: Double = 0
    /// Reconnects after a link drop.
    public var reconnects: Int = 0
    /// Whether both agents' digests agreed.
    public var digestsAgree: Bool = false
    /// The disk part, when a disk was migrated.
    public var disk: DiskReport?

    public init(role: String) { self.role = role }

    /// The disk part of a report.
    public struct DiskReport: Codable, Sendable {
        /// Bytes in the image.
        public var total: UInt64 = 0
        /// Bytes sent as data, all phases.
        public var transferred: UInt64 = 0
        /// Bytes sent as zero runs (QEMU's "duplicate").
        public var duplicate: UInt64 = 0
        /// Data bytes of the bulk copy.
        public var bulkBytes: UInt64 = 0
        /// Data bytes of the dirty rounds before switchover.
        public var deltaBytes: UInt64 = 0
        /// Data bytes sent while paused (QEMU's "downtime-bytes").
        public var downtimeBytes: UInt64 = 0
        /// Data bytes pulled or pushed after switchover (disk post-copy).
        public var postcopyBytes: UInt64 = 0
        /// Dirty rounds before switchover (QEMU's `dirty-sync-count`, less the first).
        public var rounds: Int = 0
        /// Blocks sent in each round: bulk first, then each dirty round, then the final one.
        public var blocksPerRound: [UInt64] = []
        /// Dirty rate the source measured at the last round, bytes/s.
        public var dirtyRate: Double = 0
        /// Seconds the write throttle was on.
        public var throttleSeconds: Double = 0
        /// Writes the throttle delayed.
        public var throttledWrites: UInt64 = 0
        /// Total delay the throttle imposed, in milliseconds.
        public var throttleDelayMs: Double = 0
        /// Reads at the destination that had to fetch a missing block from the source.
        public var postcopyRequests: UInt64 = 0
        /// Block size of dirty tracking.
        public var blockSize: Int = 0
        public init() {}
    }

    /// Writes the report as pretty JSON with snake_case keys.
    public func write(to path: String) throws {
        try jsonData().write(to: URL(fileURLWithPath: path))
    }

    /// The report as JSON.
    public func jsonData() throws -> Data {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self)
    }
}
