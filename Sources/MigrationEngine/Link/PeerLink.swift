import CFerryShims
import Foundation
import Glibc
import Synchronization
import SystemPackage
import URing
import Wire

/// One authenticated connection to the peer agent. Any thread may send (``send(_:)`` or, for a run
/// of bulk frames, ``withSender(_:)``): the sending half sits behind a lock that is taken once per
/// frame or per run, never per byte. A reader thread hands every incoming frame to `onFrame` and
/// records the first failure (or the owner reads with ``receive(during:)``). A keepalive thread
/// (``startKeepalive(every:)``) sends a `keepalive` whenever nothing else was sent for a while, so a
/// long step on this side (a VM-state command, a VM start) never looks like a dead link to the
/// peer. `close()` shuts the socket, which ends the reader and the keepalive thread.
public final class PeerLink: @unchecked Sendable {
    /// What the handshake agreed.
    public let agreement: SessionHandshake.Agreement
    private let descriptor: Int32
    private let senderLock = NSLock()
    private let senderBox: SenderBox
    private let receiverBox: ReceiverBox
    private let condition = NSCondition()
    private var failure: LinkError?
    private var readerDone = false
    private let closed = Atomic<Bool>(false)
    private let lastSendNanoseconds = Atomic<UInt64>(0)

    /// Holds the sending half so it can be used under ``senderLock`` from any thread.
    private final class SenderBox: @unchecked Sendable {
        var sender: FrameSender
        init(_ sender: consuming FrameSender) { self.sender = sender }
    }

    /// Holds the receiving half so it can move to the reader thread.
    private final class ReceiverBox: @unchecked Sendable {
        var receiver: FrameReceiver
        init(_ receiver: consuming FrameReceiver) { self.receiver = receiver }
    }

    private init(descriptor: Int32, agreement: SessionHandshake.Agreement, sender: consuming FrameSender,
                 receiver: consuming FrameReceiver) {
        self.descriptor = descriptor
        self.agreement = agreement
        self.senderBox = SenderBox(sender)
        self.receiverBox = ReceiverBox(receiver)
    }

    /// Sends one frame (its payload is read in place during the call).
    public func send(_ message: Message) throws(LinkError) {
        senderLock.lock(); defer { senderLock.unlock() }
        try senderBox.sender.send(message)
        lastSendNanoseconds.store(ferry_monotonic_ns(), ordering: .relaxed)
    }

    /// Runs `body` with the sending half held: for a run of frames sent back to back (bulk data),
    /// taking the lock once.
    public func withSender<R>(_ body: (inout FrameSender) throws(LinkError) -> R) throws(LinkError) -> R {
        senderLock.lock(); defer { senderLock.unlock() }
        defer { lastSendNanoseconds.store(ferry_monotonic_ns(), ordering: .relaxed) }
        return try body(&senderBox.sender)
    }

    /// Bulk payloads sent from now on go compressed when `policy` says it pays (when the link agreed on
    /// `compression`; otherwise nothing changes).
    public func compress(with policy: CompressionPolicy) {
        guard agreement.features.contains(.compression), policy.mode != .off else { return }
        senderLock.lock(); defer { senderLock.unlock() }
        senderBox.sender.compress(with: policy)
    }

    /// Bytes of this connection's stream the peer's TCP has acknowledged: what crossed the link (bytes sent
    /// also count what still waits in the socket's send buffer, seconds of it on a slow link).
    public var bytesAcknowledged: UInt64 { ferry_tcp_bytes_acked(descriptor) }
    /// The link's round trip without its queues (TCP_INFO's minimum), in seconds; 0 before it is known.
    public var minimumRoundTrip: Double { Double(ferry_tcp_min_rtt_us(descriptor)) / 1e6 }

    /// Bytes sent on this connection so far, headers included.
    public var bytesSent: UInt64 {
        senderLock.lock(); defer { senderLock.unlock() }
        return senderBox.sender.bytesSent
    }

    /// Starts a thread that sends a `keepalive` whenever no frame went out for `interval` seconds,
    /// until the link closes or fails. It never waits behind a send in progress (data is flowing
    /// then anyway).
    public func startKeepalive(every interval: Double = 1) {
        let thread = Thread { [self] in
            let nanos = UInt64(interval * 1e9)
            while !closed.load(ordering: .relaxed) && failureSeen == nil {
                usleep(UInt32(min(interval, 0.2) * 1e6))
                let now = ferry_monotonic_ns()
                guard now &- lastSendNanoseconds.load(ordering: .relaxed) >= nanos else { continue }
                guard senderLock.try() else { continue }
                let sent = (try? senderBox.sender.send(.keepalive(Keepalive(timestampNanoseconds: now, isEcho: false)))) != nil
                senderLock.unlock()
                if !sent { return }
                lastSendNanoseconds.store(now, ordering: .relaxed)
            }
        }
        thread.name = "ferry-keepalive"
        thread.start()
    }

    deinit { Glibc.close(descriptor) }

    /// The longest a whole handshake may take, however the peer's bytes trickle in (seconds).
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
            receiver.deadlineNanoseconds = ferry_monotonic_ns() + UInt64(handshakeTimeout * 1e9)
            let agreement = try SessionHandshake.initiate(sender: &sender, receiver: &receiver, key: key, sessionID: sessionID,
                                                          features: features, mode: mode, resumePoints: resumePoints)
            receiver.timeoutSeconds = receiveTimeout
            receiver.deadlineNanoseconds = nil
            if agreement.features.contains(.compression) { receiver.acceptCompressed() }
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
            receiver.deadlineNanoseconds = ferry_monotonic_ns() + UInt64(handshakeTimeout * 1e9)
            let agreement = try SessionHandshake.accept(sender: &sender, receiver: &receiver, key: key, decide: decide)
            receiver.timeoutSeconds = receiveTimeout
            receiver.deadlineNanoseconds = nil
            if agreement.features.contains(.compression) { receiver.acceptCompressed() }
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
    /// recorded as ``failure``. When the failure is this side's verdict on the peer's frames (a
    /// frame that does not decode, comes at the wrong moment or names what does not exist), the
    /// peer is told with an `error` frame first (docs/wire.md, "Errors").
    public func startReader(name: String, onFrame: @escaping @Sendable (DecodedFrame) throws(LinkError) -> Void) {
        let thread = Thread { [self] in
            while true {
                do throws(LinkError) {
                    let frame = try receiverBox.receiver.receive(during: "migration")
                    try onFrame(frame)
                } catch {
                    tellPeer(error)
                    finish(error)
                    return
                }
            }
        }
        thread.name = name
        thread.start()
    }

    /// Sends `error` as an `error` frame if it is this side's verdict (not a failure of the link
    /// itself, nor the peer's own error). A send in progress on another thread (a bulk run into a
    /// peer that stopped reading) is waited for at most a second: then the link just closes.
    private func tellPeer(_ error: LinkError) {
        switch error {
        case .local, .unexpected, .malformed, .storage: break
        default: return
        }
        guard !closed.load(ordering: .relaxed), senderLock.lock(before: Date(timeIntervalSinceNow: 1)) else { return }
        defer { senderLock.unlock() }
        try? senderBox.sender.send(.error(.truncating(code: error.wireCode, reason: "\(error)")))
    }

    /// Sets how long a receive may see no bytes before it fails (seconds).
    public func setReceiveTimeout(_ seconds: Double) {
        receiverBox.receiver.timeoutSeconds = seconds
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
        let deadline = ContinuousClock.now + .nanoseconds(Int64(min(timeout, 1e9) * 1e9))
        condition.lock(); defer { condition.unlock() }
        while !predicate() {
            if let failure { throw failure }
            // The lock's wait takes a wall-clock date: wait in short slices against the monotonic deadline.
            if ContinuousClock.now >= deadline { throw .timedOut(during: phase, seconds: timeout) }
            _ = condition.wait(until: Date(timeIntervalSinceNow: 0.05))
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

    /// The peer's numeric host ("" when unknown).
    public var peerHost: String { (try? Socket.peerAddress(of: descriptor))?.host ?? "" }
    /// This side's numeric host on the connection ("" when unknown).
    public var localHost: String { (try? Socket.localAddress(of: descriptor))?.host ?? "" }

    /// Shuts the connection down in both directions; the reader ends with `closed`.
    public func close() {
        closed.store(true, ordering: .relaxed)
        Socket.shutdownBoth(descriptor)
    }

    /// Waits (briefly) for the reader thread to end after ``close()``.
    public func waitForReader(timeout: Double = 5) {
        let deadline = ContinuousClock.now + .nanoseconds(Int64(timeout * 1e9))
        condition.lock(); defer { condition.unlock() }
        while !readerDone && ContinuousClock.now < deadline { _ = condition.wait(until: Date(timeIntervalSinceNow: 0.05)) }
    }
}
