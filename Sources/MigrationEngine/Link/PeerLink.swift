import Foundation
import Glibc
import SystemPackage
import URing
import Wire

/// One authenticated connection to the peer agent: the sending half is used by the thread that
/// drives the migration; a reader thread hands every incoming frame to `onFrame` and records the
/// first failure. `close()` shuts the socket, which ends the reader.
public final class PeerLink: @unchecked Sendable {
    /// What the handshake agreed.
    public let agreement: SessionHandshake.Agreement
    private let descriptor: Int32
    /// The sending half; only the driving thread touches it.
    public var sender: FrameSender
    private let receiverBox: ReceiverBox
    private let condition = NSCondition()
    private var failure: LinkError?
    private var readerDone = false

    /// Holds the receiving half so it can move to the reader thread.
    private final class ReceiverBox: @unchecked Sendable {
        var receiver: FrameReceiver
        init(_ receiver: consuming FrameReceiver) { self.receiver = receiver }
    }

    private init(descriptor: Int32, agreement: SessionHandshake.Agreement, sender: consuming FrameSender,
                 receiver: consuming FrameReceiver) {
        self.descriptor = descriptor
        self.agreement = agreement
        self.sender = sender
        self.receiverBox = ReceiverBox(receiver)
    }

    deinit { Glibc.close(descriptor) }

    /// The longest a handshake may wait for the peer's next frame (seconds).
    public static let handshakeTimeout = 10.0

    /// Connects to `address` and runs the initiator's handshake.
    public static func connect(to address: SocketAddress, key: SharedKey, sessionID: SessionID, features: Features,
                               mode: HelloMode, resumePoints: [ResumePoint], receiveTimeout: Double) throws(LinkError) -> PeerLink {
        let fd: Int32
        do {
            let owned = try Socket.connect(to: address)
            try? Socket.setBufferSizes(owned.rawValue, send: 4 << 20, receive: 4 << 20)
            fd = owned.take()
        } catch {
            throw .socket(error, during: "connect to \(address)")
        }
        do {
            var sender = try FrameSender(fd: fd)
            var receiver = try FrameReceiver(fd: fd, timeoutSeconds: min(receiveTimeout, handshakeTimeout))
            let agreement = try SessionHandshake.initiate(sender: &sender, receiver: &receiver, key: key, sessionID: sessionID,
                                                          features: features, mode: mode, resumePoints: resumePoints)
            receiver.timeoutSeconds = receiveTimeout
            return PeerLink(descriptor: fd, agreement: agreement, sender: sender, receiver: receiver)
        } catch let error as LinkError {
            Glibc.close(fd)
            throw error
        } catch {
            Glibc.close(fd)
            throw .socket(error as? Errno ?? .ioError, during: "handshake")
        }
    }

    /// Runs the acceptor's handshake on an accepted connection `fd` (the link owns it from now on).
    public static func accept(fd: Int32, key: SharedKey, receiveTimeout: Double,
                              decide: (Hello) throws(LinkError) -> SessionHandshake.Admission)
        throws(LinkError) -> PeerLink {
        do {
            var sender = try FrameSender(fd: fd)
            var receiver = try FrameReceiver(fd: fd, timeoutSeconds: min(receiveTimeout, handshakeTimeout))
            let agreement = try SessionHandshake.accept(sender: &sender, receiver: &receiver, key: key, decide: decide)
            receiver.timeoutSeconds = receiveTimeout
            return PeerLink(descriptor: fd, agreement: agreement, sender: sender, receiver: receiver)
        } catch let error as LinkError {
            Glibc.close(fd)
            throw error
        } catch {
            Glibc.close(fd)
            throw .socket(error as? Errno ?? .ioError, during: "handshake")
        }
    }

    /// Starts the reader thread: every frame goes to `onFrame` on that thread (its payload is valid
    /// only during the call). A throw from `onFrame`, or a link failure, ends the reader and is
    /// recorded as ``failure``.
    public func startReader(name: String, onFrame: @escaping @Sendable (DecodedFrame) throws(LinkError) -> Void) {
        let thread = Thread { [self] in
            while true {
                do throws(LinkError) {
                    let frame = try receiverBox.receiver.receive(during: "migration")
                    try onFrame(frame)
                } catch {
                    finish(error)
                    return
                }
            }
        }
        thread.name = name
        thread.start()
    }

    /// Lets the reader use the receiving half directly (for a reader that runs its own loop).
    public func receive(during phase: String) throws(LinkError) -> DecodedFrame {
        try receiverBox.receiver.receive(during: phase)
    }

    private func finish(_ error: LinkError) {
        condition.lock()
        if failure == nil { failure = error }
        readerDone = true
        condition.broadcast()
        condition.unlock()
        // A send blocked on a peer that stopped reading must not wait for ever: the failure the
        // reader saw ends it too (it fails with EPIPE at once).
        Socket.shutdownBoth(descriptor)
    }

    /// The first failure the reader saw, if any.
    public var failureSeen: LinkError? {
        condition.lock(); defer { condition.unlock() }
        return failure
    }

    /// Blocks until `predicate` holds (checked under the link's lock after every frame event), the
    /// reader fails, or `timeout` seconds pass.
    public func wait(timeout: Double, during phase: String, until predicate: () -> Bool) throws(LinkError) {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock(); defer { condition.unlock() }
        while !predicate() {
            if let failure { throw failure }
            if !condition.wait(until: deadline) {
                if predicate() { return }
                throw .timedOut(during: phase, seconds: timeout)
            }
        }
    }

    /// Runs `body` under the link's lock and wakes waiters: how the reader publishes state.
    public func publish<R>(_ body: () throws -> R) rethrows -> R {
        condition.lock()
        defer { condition.broadcast(); condition.unlock() }
        return try body()
    }

    /// `SO_PRIORITY` for the urgent lane: TC_PRIO_INTERACTIVE, band 0 of pfifo_fast's default
    /// priomap, so a priority queue at the bottleneck sends fault requests and replies ahead of
    /// bulk data (as QEMU's postcopy-preempt channel intends).
    public static let interactivePriority: Int32 = 6

    /// Sets the connection's `SO_PRIORITY`. Returns false (errno set) when the kernel refuses.
    ///
    /// The corresponding C function is `setsockopt`.
    @discardableResult
    public func setPriority(_ priority: Int32) -> Bool {
        (try? Socket.setOption(descriptor, SOL_SOCKET, SO_PRIORITY, priority)) != nil
    }

    /// Shuts the connection down in both directions; the reader ends with `closed`.
    public func close() {
        Socket.shutdownBoth(descriptor)
    }

    /// Waits (briefly) for the reader thread to end after ``close()``.
    public func waitForReader(timeout: Double = 5) {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock(); defer { condition.unlock() }
        while !readerDone { if !condition.wait(until: deadline) { return } }
    }
}
