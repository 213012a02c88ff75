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
    /// Where the downtime went, at the source: pause (the VMM's stop), state (its device state),
    /// final_scan (last dirty scan and disk quiesce), offer_sent (final deltas, pages, state and
    /// `complete` written to the link), until_resumed (the rest: the link, the destination's checks
    /// and VM start, the `resumed` reply). Milliseconds.
    public var downtimeSteps: [String: Double] = [:]
    /// Bytes on the wire in both directions, frame headers included.
    public var wireBytes: UInt64 = 0
    /// Link bandwidth the source measured, in Mbit/s.
    public var mbps: Double = 0
    /// Reconnects after a link drop.
    public var reconnects: Int = 0
    /// Where the VM runs after this migration: "source" (it never left, or was resumed there),
    /// "destination" (handed over), or "paused" (hand-over may have happened and the destination
    /// could not be reached to settle it: an operator decides).
    public var vmLocation: String = "source"
    /// Whether both agents' digests agreed.
    public var digestsAgree: Bool = false
    /// The first disk's part, when a disk was migrated (the same as `disks[0]`).
    public var disk: DiskReport?
    /// Every disk's part, in disk-id order.
    public var disks: [DiskReport] = []
    /// Where the migration stands: the phase it ended in (or is in).
    public var phase: String = ""
    /// The memory part, when a process's memory was migrated.
    public var memory: MemoryReport?
    /// The network part, when the VM's traffic was tunnelled (docs/network.md).
    public var network: NetworkReport?
    /// Source: what compression did to the bulk payloads (nil with `--compression off`).
    public var compression: CompressionReport?
    /// This agent's peak resident set so far, in bytes, when the report was written (`VmHWM`).
    public var peakResidentBytes: UInt64 = 0

    public init(role: String) { self.role = role }

    /// What compression did, per kind of stream (docs/wire.md, "Compression").
    public struct CompressionReport: Codable, Sendable {
        /// "auto", "on" or "off".
        public var mode: String
        public var memory: Part?
        public var disk: Part?

        public struct Part: Codable, Sendable {
            /// Data bytes the bulk frames carried, and the payload bytes that went on the wire for them.
            public var dataBytes: UInt64
            public var payloadBytes: UInt64
            /// payload ÷ data (1: nothing saved).
            public var ratio: Double
            /// Frames sent compressed, and raw (compression did not pay, or did not shrink them).
            public var framesCompressed: UInt64
            public var framesRaw: UInt64
            /// Time spent compressing.
            public var compressSeconds: Double
            /// The last estimates the decision used: compressed ÷ data, and data bytes compressed per second.
            public var estimatedRatio: Double
            public var estimatedSpeed: Double
        }
    }

    /// What the tunnel between the old and the new host carried for the VM.
    public struct NetworkReport: Codable, Sendable {
        /// The bridge the VM's NIC is on here, and this agent's port on it.
        public var bridge: String = ""
        public var port: String = ""
        /// The VM's MAC and IPv4 addresses (given or seen in its frames).
        public var vmMac: String = ""
        public var vmAddresses: [String] = []
        /// Frames and bytes carried to the VM (old host to new) and from it (new host to old), and dropped.
        public var tunnel: TunnelCounters = TunnelCounters()
        /// How long the tunnel carried traffic after the hand-over, in seconds (so far, or in all).
        public var tunnelSeconds: Double = 0
        /// Destination: from the VM's start here to its first frame on this bridge, in milliseconds.
        public var firstFrameMs: Double?
        /// The --on-network-moved hook's outcome ("" when there was none).
        public var hook: String = ""
        public init() {}
    }

    /// The disk part of a report.
    public struct DiskReport: Codable, Sendable {
        /// The disk's id in the session (1, 2, ... in `--disk` order).
        public var diskID: UInt32 = 1
        /// This side's digest of the image (SHA-256 over per-block XXH3 hashes).
        public var digest: String = ""
        /// Bytes in the image.
        public var total: UInt64 = 0
        /// Bytes sent as data, all phases.
        public var transferred: UInt64 = 0
        /// Bytes sent as zero runs (QEMU's "duplicate").
        public var duplicate: UInt64 = 0
        /// Bytes not sent because the destination's base image already held them (`dest-agent --disk-base`).
        public var held: UInt64 = 0
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
        /// Source, while migrating: bytes not yet sent (the bulk copy's rest and the blocks dirty now; QEMU's
        /// `remaining`). Not in the final report.
        public var remaining: UInt64?
        /// Source, while migrating: whether the write throttle is on. Not in the final report.
        public var throttleActive: Bool?
        public init() {}
    }

    /// Fault-latency percentiles, in microseconds.
    public struct LatencySummary: Codable, Sendable {
        public var count: Int = 0
        public var p50Us: Double = 0
        public var p90Us: Double = 0
        public var p99Us: Double = 0
        public var maxUs: Double = 0
        public init(count: Int = 0, p50Us: Double = 0, p90Us: Double = 0, p99Us: Double = 0, maxUs: Double = 0) {
            self.count = count; self.p50Us = p50Us; self.p90Us = p90Us; self.p99Us = p99Us; self.maxUs = maxUs
        }
    }

    /// The memory part of a report, named after QEMU's `query-migrate` "ram" section where one exists.
    public struct MemoryReport: Codable, Sendable {
        /// "precopy", "postcopy" or "hybrid".
        public var mode: String = ""
        /// How dirty pages were tracked ("uffd-wp-async+pagemap-scan" or "content-hash").
        public var trackingMethod: String = ""
        /// Page size in bytes.
        public var pageSize: Int = 4096
        /// Bytes in the migrated regions.
        public var total: UInt64 = 0
        /// Bytes of pages the process had ever touched when the migration began (resident or swapped).
        public var touched: UInt64 = 0
        /// Data bytes sent (pages with content), all phases.
        public var transferred: UInt64 = 0
        /// Pages sent as zero runs (QEMU's "duplicate"), never-touched pages included.
        public var duplicate: UInt64 = 0
        /// Pages sent with their content (QEMU's "normal").
        public var normal: UInt64 = 0
        /// Data bytes sent before the pause.
        public var precopyBytes: UInt64 = 0
        /// Data bytes of the bulk copy (round 0), what a reconnect sent again included.
        public var bulkBytes: UInt64 = 0
        /// Data bytes sent while paused, before the destination resumed.
        public var downtimeBytes: UInt64 = 0
        /// Data bytes sent after the destination resumed (pushed and requested).
        public var postcopyBytes: UInt64 = 0
        /// Dirty scans (QEMU's `dirty-sync-count`).
        public var dirtySyncCount: Int = 0
        /// Pages sent per round: round 0 (touched pages), each dirty round, then the final set.
        public var pagesPerRound: [UInt64] = []
        /// Dirty rate at the last round, bytes/s.
        public var dirtyRate: Double = 0
        /// Dirty rate at the last round, pages/s (QEMU's `dirty-pages-rate`).
        public var dirtyPagesRate: Double = 0
        /// Bytes not yet at the destination when the report was made (QEMU's `remaining`).
        public var remaining: UInt64 = 0
        /// The session's measured link throughput, Mbit/s (QEMU's `mbps`).
        public var mbps: Double = 0
        /// Urgent page requests (QEMU's `postcopy-requests`).
        public var postcopyRequests: UInt64 = 0
        /// Pages delivered in answers to requests (the faulting page and its pre-paged neighbours).
        public var pagesRequested: UInt64 = 0
        /// Pages the source pushed after switchover in the background stream.
        public var pagesPushed: UInt64 = 0
        /// Destination: faults served from pages already received.
        public var faultsOnReceived: UInt64 = 0
        /// Destination: faults on pages not yet received (each waited for an urgent request).
        public var faultsOnMissing: UInt64 = 0
        /// Fault latency for faults on received pages (event read to UFFDIO_COPY / UFFDIO_ZEROPAGE done).
        public var faultLatencyReceived: LatencySummary = LatencySummary()
        /// Fault latency for faults on missing pages (event read to the reply's page installed).
        public var faultLatencyMissing: LatencySummary = LatencySummary()
        /// Bytes of the VM-state blob carried.
        public var vmStateBytes: UInt64 = 0
        /// Time to compute this side's digest, in milliseconds (off the downtime path).
        public var digestTimeMs: Double = 0
        /// This side's SHA-256 of the memory at pause.
        public var digest: String = ""
        /// Source: the memory write throttle, when it was engaged.
        public var throttle: ThrottleReport?
        public init() {}
    }

    /// What the memory write throttle did and what it cost the VM (source only).
    public struct ThrottleReport: Codable, Sendable {
        /// "wp" (a dirty limit by synchronous write-protection) or "cpu" (a cgroup CPU limit).
        public var method: String = ""
        /// The dirty round after which it was engaged.
        public var engagedAfterRound: Int = 0
        /// The limit on newly dirtied memory it aimed at, bytes/s.
        public var limitBytesPerSecond: UInt64 = 0
        /// How long it was engaged (until it was lifted before the pause), milliseconds.
        public var engagedMs: Double = 0
        /// The VM's CPU use (CPUs: CPU-seconds per second) from tracking's start until the throttle, and while it was on.
        public var cpuBefore: Double = 0
        public var cpuThrottled: Double = 0
        /// The workload's slowdown as its CPU use shows it: 1 - cpuThrottled / cpuBefore.
        public var slowdown: Double = 0
        /// The dirty rate in the round before it was engaged and over every round with it, bytes/s.
        public var dirtyRateBefore: Double = 0
        public var dirtyRateThrottled: Double = 0
        /// Time the VM's threads were held: wp, summed over the write faults held; cpu, the cgroup's throttled time. Milliseconds.
        public var heldMs: Double = 0
        /// wp: write faults served.
        public var faults: UInt64 = 0
        /// cpu: the last CPU limit, in CPUs.
        public var cpuLimit: Double = 0
        public init() {}
    }

    /// Writes the report as pretty JSON with snake_case keys.
    public func write(to path: String) throws {
        var report = self
        report.peakResidentBytes = HostMemory.peakResidentBytes() ?? 0
        try report.jsonData().write(to: URL(fileURLWithPath: path), options: .atomic)   // readers never see half a report
    }

    /// The report as JSON.
    public func jsonData() throws -> Data {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self)
    }
}
