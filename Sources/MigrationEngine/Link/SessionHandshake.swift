import CFerryShims
import Wire

/// The opening exchange of every connection: mutual authentication by a shared key, then every
/// later frame sealed with keys of this connection's own. Wire's pure `ConnectorHandshake` /
/// `ListenerHandshake` build and check the frames; this type moves them and switches the sender
/// and receiver to sealed frames at the exact frame where each direction's key takes effect:
///
///     initiator (source)                         acceptor (destination)
///     hello(role, mode, suite, features, session, resume points, Nc) →
///                                               ← challenge(Nl)                   (nothing keyed yet)
///     auth(proof over hello ‖ Nl)             →
///                                               ← helloAck(its hello, proof over the whole exchange)
///     ══════ every frame from here on is sealed, each direction with its own key ══════
///                                               ← ack(control)  or  resumed  or  error(code)
///
/// The acceptor's verdict is sealed, so nobody on the path can forge "the VM runs here" or a
/// refusal that would make the source resume its copy. An error before `helloAck` (a wrong key,
/// an old version) is not authenticated: the initiator never takes it as the destination's word
/// about the VM. The whole exchange has one deadline (``PeerLink/handshakeTimeout``), however
/// the bytes trickle in.
public enum SessionHandshake {
    /// What the handshake agreed.
    public struct Agreement: Sendable {
        /// The features both sides use.
        public var features: Features
        /// The session the connection belongs to.
        public var sessionID: SessionID
        /// New session or resume.
        public var mode: HelloMode
        /// The peer's resume points (the acceptor's, as seen by the initiator; the initiator's, as
        /// seen by the acceptor).
        public var peerResumePoints: [ResumePoint]
        /// Whether the acceptor answered `resumed`: the VM already runs at the destination.
        public var handedOver: Bool
        /// The AEAD that seals the connection's frames.
        public var suite: CipherSuite
        /// The initiator's measure of the path's round trip, in seconds: from its hello to the
        /// challenge (0 on the acceptor's side).
        public var roundTrip: Double = 0
    }

    /// The acceptor's answer to a hello.
    public struct Admission: Sendable {
        /// Features this side supports (the agreement is their intersection with the offer).
        public var features: Features
        /// What this side has applied, for a resumed session.
        public var resumePoints: [ResumePoint]
        /// Whether the VM already runs here (answer `resumed` instead of `ack`).
        public var handedOver: Bool
        public init(features: Features, resumePoints: [ResumePoint] = [], handedOver: Bool = false) {
            self.features = features
            self.resumePoints = resumePoints
            self.handedOver = handedOver
        }
    }

    /// Runs the initiator's side on a fresh connection.
    public static func initiate(sender: inout FrameSender, receiver: inout FrameReceiver, key: SharedKey,
                                sessionID: SessionID, features: Features, mode: HelloMode = .new,
                                resumePoints: [ResumePoint] = []) throws(LinkError) -> Agreement {
        var connector = ConnectorHandshake(key: key.bytes, role: .source, mode: mode, features: features,
                                           sessionID: sessionID, resumePoints: resumePoints, suite: LinkSealing.proposed)
        let helloSent = ferry_monotonic_ns()
        try sender.send(connector.helloMessage)
        let challenge = try unauthenticated { () throws(LinkError) in try receiver.receive(during: "handshake") }
        let roundTrip = Double(ferry_monotonic_ns() &- helloSent) / 1e9
        guard case .challenge(let nonce) = challenge.message else {
            throw .unexpected(challenge.header.type, expecting: "challenge")
        }
        let auth: Message
        do {
            auth = try connector.prove(challenge: nonce)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        try sender.send(auth)
        let answer = try unauthenticated { () throws(LinkError) in try receiver.receive(during: "handshake") }
        guard case .helloAck(let ack, let proof) = answer.message else {
            throw .unexpected(answer.header.type, expecting: "helloAck")
        }
        let peer: Hello, keys: SessionKeys
        do {
            (peer, keys) = try connector.accept(ack, proof: proof)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        try sender.startSealing(keys.suite, key: keys.connectorToListener)
        try receiver.startOpening(keys.suite, key: keys.listenerToConnector)
        let verdict = try receiver.receive(during: "handshake")
        let handedOver: Bool
        switch verdict.message {
        case .ack: handedOver = false
        case .resumed: handedOver = true
        default: throw .unexpected(verdict.header.type, expecting: "ack or resumed after helloAck")
        }
        return Agreement(features: peer.features, sessionID: sessionID, mode: mode,
                         peerResumePoints: peer.resumePoints, handedOver: handedOver, suite: keys.suite, roundTrip: roundTrip)
    }

    /// An error frame before the keys exist is not the destination's authenticated word: it may
    /// refuse a connection (wrong key, old version, busy) but says nothing about the VM.
    private static func unauthenticated(_ body: () throws(LinkError) -> DecodedFrame) throws(LinkError) -> DecodedFrame {
        do {
            return try body()
        } catch {
            if case .peer(let code, let reason) = error {
                if code == .authenticationFailed { throw .authenticationFailed("the destination refused this side's proof: \(reason)") }
                throw .refusedByPeer(code, reason: reason)
            }
            throw error
        }
    }

    /// Runs the acceptor's side. `decide` sees the initiator's hello once the initiator has proved
    /// the key, and answers what to accept, or throws ``LinkError/peer(_:reason:)`` to refuse with
    /// that code (sent to the initiator as a sealed error frame).
    public static func accept(sender: inout FrameSender, receiver: inout FrameReceiver, key: SharedKey,
                              decide: (Hello) throws(LinkError) -> Admission) throws(LinkError) -> Agreement {
        var listener = ListenerHandshake(key: key.bytes)
        let opening = try receiver.receive(during: "handshake")
        guard case .hello(let peer) = opening.message else {
            try? sender.send(.error(.truncating(code: .protocolViolation, reason: "expected hello, got \(opening.header.type)")))
            throw .unexpected(opening.header.type, expecting: "hello")
        }
        let challenge: Message
        do {
            challenge = try listener.challenge(for: peer, suites: LinkSealing.accepted)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        try sender.send(challenge)
        let answer = try receiver.receive(during: "handshake")
        guard case .auth(let proof) = answer.message else {
            try? sender.send(.error(.truncating(code: .protocolViolation, reason: "expected auth, got \(answer.header.type)")))
            throw .unexpected(answer.header.type, expecting: "auth")
        }
        do {
            try listener.verify(auth: proof)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        // The initiator holds the key: from here on, what it is told is sealed.
        var refusal: LinkError?
        var admission = Admission(features: [])
        do { admission = try decide(peer) } catch { refusal = error }
        let reply: (message: Message, keys: SessionKeys)
        do {
            reply = try listener.respond(supported: admission.features, resumePoints: admission.resumePoints)
        } catch {
            throw LinkError(refusal: error)
        }
        try sender.send(reply.message)
        try sender.startSealing(reply.keys.suite, key: reply.keys.listenerToConnector)
        try receiver.startOpening(reply.keys.suite, key: reply.keys.connectorToListener)
        if let refusal {
            if case .peer(let code, let reason) = refusal { try? sender.send(.error(.truncating(code: code, reason: reason))) }
            throw refusal
        }
        try sender.send(admission.handedOver ? .resumed(VMResumed(sinceSwitchoverNanoseconds: 0))
                                             : .ack(Ack(stream: .control, streamID: 0, sequence: 0, offset: 0)))
        return Agreement(features: peer.features.intersection(admission.features), sessionID: peer.sessionID,
                         mode: peer.mode, peerResumePoints: peer.resumePoints, handedOver: admission.handedOver,
                         suite: reply.keys.suite)
    }
}

extension LinkError {
    /// A handshake step this side refused (the error frame has been sent to the peer).
    init(refusal: HandshakeError) {
        if refusal.message.code == .authenticationFailed {
            self = .authenticationFailed(refusal.message.reason)
        } else {
            self = .refused(refusal.message.code, reason: refusal.message.reason)
        }
    }
}
