import Wire

/// The opening exchange of every connection, with mutual authentication by a shared key. Wire's
/// pure `ConnectorHandshake` / `ListenerHandshake` build and check the frames; this type moves them:
///
///     initiator (source)                    acceptor (destination)
///     hello(role, features, session, nA) →
///                                          ← helloAck(hello(role, features ∩ offer, session, nB), proof_dest)
///     auth(proof_source)                 →
///                                          ← ack(control, 0, 0, 0)  or  resumed  (or error)
///
/// The acceptor's last frame settles who owns the VM on a resume (docs/wire.md, "Hand-over"):
/// `resumed` means the destination already runs it.
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
        let connector = ConnectorHandshake(key: key.bytes, role: .source, mode: mode, features: features,
                                           sessionID: sessionID, resumePoints: resumePoints)
        try sender.send(connector.helloMessage)
        let answer = try receiver.receive(during: "handshake")
        guard case .helloAck(let ack, let proof) = answer.message else {
            throw .unexpected(answer.header.type, expecting: "helloAck")
        }
        let auth: Message, peer: Hello
        do {
            (auth, peer) = try connector.accept(ack, proof: proof)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        try sender.send(auth)
        let verdict = try receiver.receive(during: "handshake")
        let handedOver: Bool
        switch verdict.message {
        case .ack: handedOver = false
        case .resumed: handedOver = true
        default: throw .unexpected(verdict.header.type, expecting: "ack or resumed after auth")
        }
        return Agreement(features: peer.features, sessionID: sessionID, mode: mode,
                         peerResumePoints: peer.resumePoints, handedOver: handedOver)
    }

    /// Runs the acceptor's side. `decide` sees the initiator's hello (authenticated only once this
    /// returns) and answers what to accept, or throws ``LinkError/peer(_:reason:)`` to refuse with
    /// that code (sent to the initiator as an error frame).
    public static func accept(sender: inout FrameSender, receiver: inout FrameReceiver, key: SharedKey,
                              decide: (Hello) throws(LinkError) -> Admission) throws(LinkError) -> Agreement {
        let opening = try receiver.receive(during: "handshake")
        guard case .hello(let peer) = opening.message else {
            try? sender.send(.error(.truncating(code: .protocolViolation, reason: "expected hello, got \(opening.header.type)")))
            throw .unexpected(opening.header.type, expecting: "hello")
        }
        let admission: Admission
        do {
            admission = try decide(peer)
        } catch {
            if case .peer(let code, let reason) = error { try? sender.send(.error(.truncating(code: code, reason: reason))) }
            throw error
        }
        var listener = ListenerHandshake(key: key.bytes)
        let reply: Message
        do {
            reply = try listener.respond(to: peer, supported: admission.features, resumePoints: admission.resumePoints)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        try sender.send(reply)
        let answer = try receiver.receive(during: "handshake")
        guard case .auth(let proof) = answer.message else { throw .unexpected(answer.header.type, expecting: "auth") }
        do {
            try listener.verify(auth: proof)
        } catch {
            try? sender.send(.error(error.message))
            throw LinkError(refusal: error)
        }
        try sender.send(admission.handedOver ? .resumed(VMResumed(sinceSwitchoverNanoseconds: 0))
                                             : .ack(Ack(stream: .control, streamID: 0, sequence: 0, offset: 0)))
        return Agreement(features: peer.features.intersection(admission.features), sessionID: peer.sessionID,
                         mode: peer.mode, peerResumePoints: peer.resumePoints, handedOver: admission.handedOver)
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
