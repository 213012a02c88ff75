import Synchronization

/// Counters of an ``NBDServer`` (relaxed atomics; read them any time).
public final class NBDServerStats: Sendable {
    let connectionsAccepted = Atomic<UInt64>(0)
    let connectionsOpen = Atomic<Int>(0)
    let connectionsRefused = Atomic<UInt64>(0)
    let handshakesFailed = Atomic<UInt64>(0)
    let requests = Atomic<UInt64>(0)
    let bytesRead = Atomic<UInt64>(0)
    let bytesWritten = Atomic<UInt64>(0)
    let errorReplies = Atomic<UInt64>(0)
    let protocolViolations = Atomic<UInt64>(0)
    let syncs = Atomic<UInt64>(0)

    init() {}

    /// A copy of the counters.
    public struct Snapshot: Sendable, Equatable, CustomStringConvertible {
        /// Connections given a thread of their own (refused ones are not counted here).
        public var connectionsAccepted: UInt64
        public var connectionsOpen: Int
        /// Connections turned away: at ``NBDServer/Options/maxConnections``, or when their thread
        /// could not be created.
        public var connectionsRefused: UInt64
        public var handshakesFailed: UInt64
        public var requests: UInt64
        public var bytesRead: UInt64
        public var bytesWritten: UInt64
        public var errorReplies: UInt64
        /// Connections closed for breaking the protocol (bad magic, absurd lengths).
        public var protocolViolations: UInt64
        /// `fdatasync`s of the store's descriptor that completed successfully (FLUSH, and writes,
        /// trims and zeroes with FUA), counted when the kernel reports them done.
        public var syncs: UInt64

        public var description: String {
            "connections \(connectionsAccepted) (open \(connectionsOpen), refused \(connectionsRefused), failed handshakes \(handshakesFailed)), "
                + "requests \(requests), read \(bytesRead) B, written \(bytesWritten) B, "
                + "error replies \(errorReplies), protocol violations \(protocolViolations), syncs \(syncs)"
        }
    }

    /// The counters now.
    public var snapshot: Snapshot {
        Snapshot(connectionsAccepted: connectionsAccepted.load(ordering: .relaxed),
                 connectionsOpen: connectionsOpen.load(ordering: .relaxed),
                 connectionsRefused: connectionsRefused.load(ordering: .relaxed),
                 handshakesFailed: handshakesFailed.load(ordering: .relaxed),
                 requests: requests.load(ordering: .relaxed),
                 bytesRead: bytesRead.load(ordering: .relaxed),
                 bytesWritten: bytesWritten.load(ordering: .relaxed),
                 errorReplies: errorReplies.load(ordering: .relaxed),
                 protocolViolations: protocolViolations.load(ordering: .relaxed),
                 syncs: syncs.load(ordering: .relaxed))
    }
}
