import CFerryShims
import Foundation
import Glibc
import Logging
import Synchronization
import URing
import Wire

/// The destination's door: accepts connections on the listening socket and authenticates each on
/// a thread of its own, so a stray, silent, slow or hostile connection (a port scanner, a health
/// check, a slow-loris) never stalls the migration or the source's reconnect. Before a connection
/// has proved the key it costs little and not for long:
/// - one handshake deadline for the whole exchange (``PeerLink/handshakeTimeout``), however its
///   bytes trickle in;
/// - frames of at most 16 KiB and a 96 KiB buffer (``FrameReceiver/handshakeMaxFrameSize``), a
///   thread with a 512 KiB stack;
/// - at most ``maxPending`` such connections: when one more arrives, the oldest unauthenticated one
///   is cut to make room (a real source proves the key within a few round trips, so flooding the
///   door only costs the flood's own connections), and past twice that (cut ones not yet gone)
///   the new one is closed at once. A thread the system refuses to make refuses that connection.
/// Authenticated links go to `deliver`; the listener keeps waiting whatever happens to one connection.
final class LinkAcceptor: @unchecked Sendable {
    /// Unauthenticated connections at most.
    static let maxPending = 64
    /// Stack of a handshake thread.
    static let handshakeStack = 512 << 10
    private let listener: URing.OwnedDescriptor
    private let key: SharedKey
    private let receiveTimeout: Double
    private let decide: @Sendable (Hello) throws(LinkError) -> SessionHandshake.Admission
    private let deliver: @Sendable (PeerLink) -> Void
    private let logger: Logger
    private let stopped = Atomic<Bool>(false)
    /// Connections in their handshake: descriptor → when it was accepted (monotonic ns).
    private let pending = Locked<[Int32: UInt64]>([:])
    /// Connections cut or refused before authenticating, for the log.
    private let refusedCount = Atomic<Int>(0)

    init(listener: consuming URing.OwnedDescriptor, key: SharedKey, receiveTimeout: Double, logger: Logger,
         decide: @escaping @Sendable (Hello) throws(LinkError) -> SessionHandshake.Admission,
         deliver: @escaping @Sendable (PeerLink) -> Void) {
        self.listener = listener
        self.key = key
        self.receiveTimeout = receiveTimeout
        self.logger = logger
        self.decide = decide
        self.deliver = deliver
    }

    /// Starts the accepting thread.
    func start() {
        let started = DetachedThread.spawn(name: "ferry-acceptor") { [self] in
            while !stopped.load(ordering: .relaxed) {
                guard let connection = Socket.accept(from: listener.rawValue, timeout: 0.2) else { continue }
                admit(connection.take())
            }
        }
        if let started { logger.critical("cannot start the acceptor thread", metadata: ["error": "\(started)"]) }
    }

    /// Makes room for `fd` if needed and starts its handshake.
    private func admit(_ fd: Int32) {
        let now = ferry_monotonic_ns()
        let admitted: Bool = pending.withLock { table in
            if table.count >= 2 * Self.maxPending { return false }
            if table.count >= Self.maxPending, let oldest = table.min(by: { $0.value < $1.value }) {
                Socket.shutdownBoth(oldest.key)   // its handshake fails at once; its thread closes it
                table[oldest.key] = UInt64.max     // counted until its thread is gone, never cut twice
            }
            table[fd] = now
            return true
        }
        guard admitted else {
            Glibc.close(fd)
            noteRefusal("too many unauthenticated connections")
            return
        }
        let failed = DetachedThread.spawn(name: "ferry-handshake", stackSize: Self.handshakeStack) { [self] in
            defer { _ = pending.withLock { $0.removeValue(forKey: fd) } }
            do {
                let link = try PeerLink.accept(fd: fd, key: key, receiveTimeout: receiveTimeout, decide: decide)
                if stopped.load(ordering: .relaxed) { link.close(); return }
                deliver(link)
            } catch {
                noteRefusal("\(error)")
            }
        }
        if let failed {
            _ = pending.withLock { $0.removeValue(forKey: fd) }
            Glibc.close(fd)
            noteRefusal("no thread for its handshake: \(failed)")
        }
    }

    /// Logs a refused connection: each of the first 10, then one in 100.
    private func noteRefusal(_ reason: String) {
        let count = refusedCount.add(1, ordering: .relaxed).newValue
        if count <= 10 || count % 100 == 0 {
            logger.warning("refused a connection", metadata: ["error": "\(reason)", "refused_so_far": "\(count)"])
        }
    }

    /// Stops accepting (the thread notices within 200 ms).
    func stop() { stopped.store(true, ordering: .relaxed) }
}
