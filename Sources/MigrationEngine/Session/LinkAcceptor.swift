import Foundation
import Glibc
import Logging
import Synchronization
import URing
import Wire

/// The destination's door: accepts connections on the listening socket and authenticates each on
/// a thread of its own, so a stray, silent or hostile connection (a port scanner, a health check)
/// is refused without ever stalling the migration or the source's reconnect. At most
/// ``maxPending`` handshakes run at once; past that a connection is closed at once. Authenticated
/// links go to `deliver`; the listener keeps waiting whatever happens to one connection.
final class LinkAcceptor: @unchecked Sendable {
    /// Handshakes in progress at most.
    static let maxPending = 32
    private let listener: URing.OwnedDescriptor
    private let key: SharedKey
    private let receiveTimeout: Double
    private let decide: @Sendable (Hello) throws(LinkError) -> SessionHandshake.Admission
    private let deliver: @Sendable (PeerLink) -> Void
    private let logger: Logger
    private let stopped = Atomic<Bool>(false)
    private let pending = Atomic<Int>(0)

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
        let thread = Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                guard let connection = Socket.accept(from: listener.rawValue, timeout: 0.2) else { continue }
                let fd = connection.take()
                guard pending.add(1, ordering: .relaxed).newValue <= Self.maxPending else {
                    pending.subtract(1, ordering: .relaxed)
                    logger.warning("refused a connection: too many handshakes in progress", metadata: ["limit": "\(Self.maxPending)"])
                    Glibc.close(fd)
                    continue
                }
                let handshake = Thread { [self] in
                    defer { pending.subtract(1, ordering: .relaxed) }
                    do {
                        let link = try PeerLink.accept(fd: fd, key: key, receiveTimeout: receiveTimeout, decide: decide)
                        if stopped.load(ordering: .relaxed) { link.close(); return }
                        deliver(link)
                    } catch {
                        logger.warning("refused a connection", metadata: ["error": "\(error)"])
                    }
                }
                handshake.name = "ferry-handshake"
                handshake.start()
            }
        }
        thread.name = "ferry-acceptor"
        thread.start()
    }

    /// Stops accepting (the thread notices within 200 ms).
    func stop() { stopped.store(true, ordering: .relaxed) }
}
