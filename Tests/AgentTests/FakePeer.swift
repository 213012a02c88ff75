import FerryTestSupport
import Foundation
import Glibc
@testable import MigrationEngine
import URing
import Wire

/// A scriptable fake peer for engine-level protocol tests: ONE side of Ferry's real protocol (the
/// real authenticated handshake, `PeerLink.connect` as a source or `PeerLink.accept` as a
/// destination, and real frames over a real TCP socket) driven step by step by a test, against a
/// REAL agent process on the other side. The fake sends exactly what the script says, in its order
/// (frames out of order, a wrong digest, an error code, a cut), and checks what comes back:
///
///     let peer = try FakePeer.source(port: destPort, key: key)       // hello → helloAck → auth → ack
///     try peer.run([
///         .send(.diskLayout(layout)),
///         .send(.complete(digests)),                                   // before any switchover
///         .expectError(.protocolViolation),                            // the agent refuses
///     ])
///
///     let peer = try listener.accept(key: key)                         // a source-agent connected
///     let offer = try peer.run([.readUntil(.switchover), .readUntil(.complete), .cut])
///
/// Reading skips keepalives. A fake destination acknowledges every `roundEnd` at once, as the real
/// one does, so the source never waits on it. A failed step throws ``FakePeerError`` naming the
/// step and what arrived instead.
final class FakePeer {
    /// One step of a script.
    enum Step {
        /// Sends one frame. A payload must outlive the step: make it with ``FakePeer/payload(_:)``.
        case send(Message)
        /// Sends one frame sealed as usual, its metadata (after the header) rewritten by the closure
        /// after encoding: values the encoder refuses (a block size of 0, an extent past 2^64).
        case sendRewritten(Message, (UnsafeMutableRawBufferPointer) -> Void)
        /// Reads frames until one of this type (the earlier ones are returned too). An error frame
        /// or a closed link fails the step.
        case readUntil(MessageType)
        /// Reads until the agent sends `error(code)`; only acks may come before it, and the link
        /// must not close without it.
        case expectError(ErrorCode)
        /// Reads until the agent sends `error(code)`, whatever comes before it (a source-agent's
        /// data); the link must not close without it.
        case drainUntilError(ErrorCode)
        /// Closes the connection at once: for the agent, the link was cut.
        case cut
    }

    /// A frame the fake read: its type, and the message unless it carries bulk bytes (those are a
    /// view into the receive buffer, gone at the next read).
    struct Frame {
        let type: MessageType
        let message: Message?
    }

    /// Every feature a destination may accept.
    static let destinationFeatures: Features = [.disk, .memory, .zeroRuns, .resume, .diskPostcopy, .postcopy, .urgentLane]

    let link: PeerLink
    /// The agent's hello (a fake destination only).
    let hello: Hello?
    /// The reason of the last error the agent sent (see ``Step/expectError(_:)``).
    private(set) var lastErrorReason: String?
    /// How long one reading step may take, keepalives included (seconds): an agent that keeps the
    /// link alive but never answers fails the step instead of holding the test.
    var stepTimeout: Double = 120
    private let acknowledgesRounds: Bool
    private var buffers: [UnsafeMutableRawBufferPointer] = []

    private init(link: PeerLink, hello: Hello?, acknowledgesRounds: Bool) {
        self.link = link
        self.hello = hello
        self.acknowledgesRounds = acknowledgesRounds
    }

    deinit {
        link.close()
        for buffer in buffers { buffer.deallocate() }
    }

    /// A fake source: connects to a dest-agent on 127.0.0.1:`port` and runs the source's handshake.
    /// A refusal (unknown session, busy, wrong key) is thrown as the agent's `LinkError`.
    static func source(port: UInt16, key: SharedKey, session: SessionID = .random(), mode: HelloMode = .new,
                       features: Features = [.disk, .memory, .zeroRuns, .resume]) throws -> FakePeer {
        let address = try SocketAddress(host: "127.0.0.1", port: port)
        let link = try PeerLink.connect(to: address, key: key, sessionID: session, features: features, mode: mode,
                                        resumePoints: [], receiveTimeout: 120)
        return FakePeer(link: link, hello: nil, acknowledgesRounds: false)
    }

    /// A fake destination on a connection `listener` accepted: runs the destination's handshake.
    fileprivate static func destination(fd: Int32, key: SharedKey,
                                        admission: (Hello) -> SessionHandshake.Admission) throws -> FakePeer {
        var hello: Hello? = nil
        let link = try PeerLink.accept(fd: fd, key: key, receiveTimeout: 120) { (offer: Hello) throws(LinkError) -> SessionHandshake.Admission in
            hello = offer
            return admission(offer)
        }
        return FakePeer(link: link, hello: hello, acknowledgesRounds: true)
    }

    /// A payload that lives as long as the peer: `bytes`, copied.
    func payload(_ bytes: [UInt8]) -> Payload {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 16)
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        buffers.append(buffer)
        return Payload(UnsafeRawBufferPointer(rebasing: buffer[0..<bytes.count]))
    }

    /// Runs `script`; returns the frames it read, in order.
    @discardableResult
    func run(_ script: [Step]) throws -> [Frame] {
        var read: [Frame] = []
        for (index, step) in script.enumerated() {
            let name = "step \(index + 1) (\(step))"
            switch step {
            case .send(let message):
                do { try link.send(message) } catch { throw FakePeerError("\(name): sending failed: \(error)") }
            case .sendRewritten(let message, let rewrite):
                do {
                    try link.withSender { (sender: inout FrameSender) throws(LinkError) in try sender.send(message, rewritingMetadata: rewrite) }
                } catch { throw FakePeerError("\(name): sending failed: \(error)") }
            case .readUntil(let type):
                let deadline = monotonicSeconds() + stepTimeout
                while true {
                    let frame: Frame
                    do { frame = try next(until: deadline) } catch { throw FakePeerError("\(name): \(error); read before it: \(read.map(\.type))") }
                    read.append(frame)
                    if frame.type == type { break }
                }
            case .expectError(let code), .drainUntilError(let code):
                let deadline = monotonicSeconds() + stepTimeout
                var skipped = 0
                do {
                    var frame = try next(until: deadline)
                    while true {
                        if frame.type == .ack { read.append(frame) } else if case .drainUntilError = step { skipped += 1 } else { break }
                        frame = try next(until: deadline)
                    }
                    throw FakePeerError("\(name): got \(frame.type)\(frame.message.map { " \($0)" } ?? "") instead of error(\(code))")
                } catch let error as LinkError {
                    guard case .peer(let got, let reason) = error else {
                        throw FakePeerError("\(name): the link failed without error(\(code)) after \(skipped) other frames: \(error)")
                    }
                    guard got == code else { throw FakePeerError("\(name): got error(\(got)) \"\(reason)\" instead of error(\(code))") }
                    lastErrorReason = reason
                }
            case .cut:
                link.close()
            }
        }
        return read
    }

    /// The next frame within `seconds`, or nil when none came (keepalives do not count): for a
    /// script that reads and writes by turns (a fuzzer). The link stays usable after nil.
    func nextFrame(within seconds: Double) throws(LinkError) -> Frame? {
        link.setReceiveTimeout(max(0.01, seconds))
        defer { link.setReceiveTimeout(120) }
        do { return try next(until: monotonicSeconds() + seconds) } catch {
            if case .timedOut = error { return nil }
            throw error
        }
    }

    /// The next frame that is not a keepalive; a fake destination acknowledges a `roundEnd` at once.
    /// Past `deadline` (keepalives still coming) it fails with ``LinkError/timedOut(during:seconds:)``.
    private func next(until deadline: Double = .infinity) throws(LinkError) -> Frame {
        while true {
            guard monotonicSeconds() < deadline else { throw .timedOut(during: "fake peer script (step deadline)", seconds: stepTimeout) }
            let decoded = try link.receive(during: "fake peer script")
            let message = decoded.message
            switch message {
            case .keepalive:
                continue
            case .roundEnd(let end) where acknowledgesRounds:
                // A source that refused something sends its `error` and closes: that error may already wait
                // in the receive buffer while this ack finds the socket closed (EPIPE). The next receive reports it.
                try? link.send(.ack(Ack(stream: end.stream, streamID: end.streamID, sequence: UInt64(end.round) + 1, offset: 0)))
            case .diskExtents, .diskReply, .pageBatch, .pageReply, .vmState:
                return Frame(type: decoded.header.type, message: nil)
            default:
                break
            }
            return Frame(type: decoded.header.type, message: message)
        }
    }
}

extension Array where Element == FakePeer.Frame {
    /// The digests of the last `complete` among these frames.
    var lastCompletion: Wire.Completion? {
        for frame in reversed() { if case .complete(let completion)? = frame.message { return completion } }
        return nil
    }

    /// How many frames of `type` there are.
    func count(of type: MessageType) -> Int { filter { $0.type == type }.count }
}

/// Where a real source-agent connects to a fake destination: a listening TCP socket on 127.0.0.1
/// (a free port). Each ``accept(key:while:timeout:admission:)`` answers one connection's handshake.
final class FakeListener {
    let port: UInt16
    private let fd: Int32

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SupportError("socket failed: errno \(errno)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else { close(fd); throw SupportError("bind/listen on 127.0.0.1 failed: errno \(errno)") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        self.fd = fd
        port = UInt16(bigEndian: address.sin_port)
    }

    deinit { close(fd) }

    /// Whether a connection is waiting to be accepted (without waiting for one).
    var hasPendingConnection: Bool {
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&poller, 1, 0) == 1
    }

    /// Accepts every connection waiting and closes it at once, unanswered: a source-agent's
    /// reconnect then fails fast instead of waiting for a handshake that will not come.
    func dropPendingConnections() {
        while hasPendingConnection {
            let connection = Glibc.accept(fd, nil, nil)
            guard connection >= 0 else { return }
            close(connection)
        }
    }

    /// Accepts the next connection (within `timeout` seconds, and only while `keepWaiting` holds:
    /// pass the agent's liveness, so a test fails at once when the agent exited instead) and
    /// answers its handshake with `admission` (by default: every feature, not handed over).
    func accept(key: SharedKey, while keepWaiting: () -> Bool = { true }, timeout: Double = 60,
                admission: (Hello) -> SessionHandshake.Admission = { _ in .init(features: FakePeer.destinationFeatures) }) throws -> FakePeer {
        let deadline = monotonicSeconds() + timeout
        while true {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&poller, 1, 100) == 1 {
                let connection = Glibc.accept(fd, nil, nil)
                if connection >= 0 {
                    _ = fcntl(connection, F_SETFD, FD_CLOEXEC)
                    return try FakePeer.destination(fd: connection, key: key, admission: admission)
                }
            }
            guard keepWaiting() else { throw FakePeerError("no connection came: the agent stopped waiting (exited?)") }
            guard monotonicSeconds() < deadline else { throw FakePeerError("no connection within \(Int(timeout)) s") }
        }
    }
}

/// A step of a fake peer's script that did not go as scripted.
struct FakePeerError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
