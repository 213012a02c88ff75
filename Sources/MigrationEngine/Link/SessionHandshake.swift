import Wire

/// The opening exchange of every connection, with mutual authentication by a shared key:
///
///     initiator (source)                    acceptor (destination)
///     hello(role, features, session, nA) →
///                                          ← helloAck(hello(role, features ∩ offer, session, nB), proof_dest)
///     auth(proof_source)                 →
///                                          ← ack(control, 0, 0)       (or error(authenticationFailed))
///
/// A proof is HMAC-SHA256(key, label ‖ role ‖ own nonce ‖ peer nonce ‖ session); each side checks
/// the other's in constant time before anything else is sent (docs/wire.md, "Handshake").
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
    }

    /// Runs the initiator's side on a fresh connection.
    public static func initiate(sender: inout FrameSender, receiver: inout FrameReceiver, key: SharedKey,
                                sessionID: SessionID, features: Features, mode: HelloMode = .new,
                                resumePoints: [ResumePoint] = []) throws(LinkError) -> Agreement {
        let nonce = Nonce.random()
        try sender.send(.hello(Hello(role: .source, mode: mode, features: features, sessionID: sessionID,
                                     nonce: nonce, resumePoints: resumePoints)))
        let answer = try receiver.receive(during: "handshake")
        guard case .helloAck(let peer, let proof) = answer.message else {
            throw .unexpected(answer.header.type, expecting: "helloAck")
        }
        guard peer.sessionID == sessionID, peer.role == .dest else {
            throw .authenticationFailed("the destination answered for another session or role")
        }
        guard AuthProof.verify(proof, key: key.bytes, peerNonce: peer.nonce, localNonce: nonce,
                               sessionID: sessionID, peerRole: .dest) else {
            try? sender.send(.error(.truncating(code: .authenticationFailed, reason: "the destination's proof of the shared key is wrong")))
            throw .authenticationFailed("the destination does not hold the same shared key")
        }
        try sender.send(.auth(proof: AuthProof.computeBytes(key: key.bytes, localNonce: nonce, peerNonce: peer.nonce,
                                                            sessionID: sessionID, role: .source)))
        let verdict = try receiver.receive(during: "handshake")
        guard case .ack = verdict.message else { throw .unexpected(verdict.header.type, expecting: "ack of auth") }
        return Agreement(features: peer.features.intersection(features), sessionID: sessionID, mode: mode,
                         peerResumePoints: peer.resumePoints)
    }

    /// Runs the acceptor's side. `decide` sees the initiator's hello (authenticated only after
    /// this returns) and answers the features to accept and the acceptor's resume points, or throws
    /// a ``LinkError/peer(_:reason:)`` to refuse (sent to the initiator as an error frame).
    public static func accept(sender: inout FrameSender, receiver: inout FrameReceiver, key: SharedKey,
                              decide: (Hello) throws(LinkError) -> (features: Features, resumePoints: [ResumePoint]))
        throws(LinkError) -> Agreement {
        let opening = try receiver.receive(during: "handshake")
        guard case .hello(let peer) = opening.message else {
            try? sender.send(.error(.truncating(code: .protocolViolation, reason: "expected hello, got \(opening.header.type)")))
            throw .unexpected(opening.header.type, expecting: "hello")
        }
        guard peer.role == .source else {
            try? sender.send(.error(.truncating(code: .protocolViolation, reason: "only a source may open a session")))
            throw .unexpected(.hello, expecting: "hello from a source")
        }
        let decision: (features: Features, resumePoints: [ResumePoint])
        do {
            decision = try decide(peer)
        } catch {
            if case .peer(let code, let reason) = error { try? sender.send(.error(.truncating(code: code, reason: reason))) }
            throw error
        }
        let nonce = Nonce.random()
        let proof = AuthProof.computeBytes(key: key.bytes, localNonce: nonce, peerNonce: peer.nonce,
                                           sessionID: peer.sessionID, role: .dest)
        try sender.send(.helloAck(Hello(role: .dest, mode: peer.mode, features: decision.features.intersection(peer.features),
                                        sessionID: peer.sessionID, nonce: nonce, resumePoints: decision.resumePoints),
                                  proof: proof))
        let reply = try receiver.receive(during: "handshake")
        guard case .auth(let peerProof) = reply.message else { throw .unexpected(reply.header.type, expecting: "auth") }
        guard AuthProof.verify(peerProof, key: key.bytes, peerNonce: peer.nonce, localNonce: nonce,
                               sessionID: peer.sessionID, peerRole: .source) else {
            try? sender.send(.error(.truncating(code: .authenticationFailed, reason: "the source's proof of the shared key is wrong")))
            throw .authenticationFailed("the source does not hold the same shared key")
        }
        try sender.send(.ack(Ack(stream: .control, streamID: 0, sequence: 0, offset: 0)))
        return Agreement(features: decision.features.intersection(peer.features), sessionID: peer.sessionID,
                         mode: peer.mode, peerResumePoints: peer.resumePoints)
    }
}
