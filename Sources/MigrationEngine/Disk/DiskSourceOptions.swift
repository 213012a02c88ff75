import URing

/// How the source migrates its disk: where to, with which key, and the convergence policy.
public struct DiskSourceOptions: Sendable {
    /// The destination agent.
    public var destination: SocketAddress
    /// The shared key both agents hold.
    public var key: SharedKey
    /// When to switch over and when to throttle.
    public var policy: ConvergencePolicy
    /// Bytes per `diskExtents` frame (rounded down to whole blocks).
    public var chunkBytes: Int = 1 << 20
    /// Delay the throttle imposes on a write over its budget, in nanoseconds.
    public var throttleDelayNanoseconds: UInt64 = 2_000_000
    /// Give the migration up when the link stays down this long (seconds) before switchover.
    public var linkTimeout: Double = 60
    /// A receive that sees nothing for this long (seconds) counts as a dropped link.
    public var receiveTimeout: Double = 30
    /// Disk post-copy: hand the disk over at once and push it afterwards; the destination fetches
    /// what its VM needs first over the urgent lane.
    public var postcopy = false
    /// The disk id in the protocol.
    public var diskID: UInt32 = 1

    public init(destination: SocketAddress, key: SharedKey, policy: ConvergencePolicy = ConvergencePolicy()) {
        self.destination = destination
        self.key = key
        self.policy = policy
    }
}
