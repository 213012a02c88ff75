/// A refused handshake step: the `error` frame to send to the peer before closing.
public struct HandshakeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The frame to send (code and reason).
    public var message: ErrorMessage
    public init(_ code: ErrorCode, _ reason: String) { message = .truncating(code: code, reason: reason) }
    public var description: String { "\(message.code): \(message.reason)" }
}

/// The connecting side of the authenticated hello exchange (docs/wire.md, "Authentication"), pure:
/// it builds the frames and checks the answers; the caller moves the bytes.
///
/// `hello` → (peer) `helloAck` → ``accept(_:proof:)`` → `auth`.
public struct ConnectorHandshake: Sendable {
    /// The hello this side sends (its nonce is fresh for every connection).
    public let hello: Hello
    let key: [UInt8]

    /// Prepares a hello with a fresh random nonce. `resumePoints` non-empty or `mode == .resume` for a reconnect.
    public init(key: [UInt8], role: Role = .source, mode: HelloMode = .new, features: Features,
                sessionID: SessionID, resumePoints: [ResumePoint] = [], nonce: Nonce = .random()) {
        self.key = key
        hello = Hello(role: role, mode: mode, features: features, sessionID: sessionID, nonce: nonce,
                      resumePoints: resumePoints)
    }

    /// The first frame to send.
    public var helloMessage: Message { .hello(hello) }

    /// Checks the listener's `helloAck` (version, role, session, cipher suite, features, proof) and
    /// returns the `auth` frame to send and the listener's hello (accepted features, its resume points).
    public func accept(_ ack: Hello, proof: Bytes32) throws(HandshakeError) -> (auth: Message, peer: Hello) {
        if ack.protocolVersion != hello.protocolVersion {
            throw HandshakeError(.unsupportedVersion, "peer speaks protocol \(ack.protocolVersion), this side \(hello.protocolVersion)")
        }
        if ack.role == hello.role { throw HandshakeError(.protocolViolation, "peer claims the same role \(ack.role)") }
        if ack.sessionID != hello.sessionID {
            throw HandshakeError(.protocolViolation, "helloAck names session \(ack.sessionID), expected \(hello.sessionID)")
        }
        if ack.nonce == hello.nonce { throw HandshakeError(.authenticationFailed, "peer echoed this side's nonce") }
        guard AuthProof.verify(proof, key: key, peerNonce: ack.nonce, localNonce: hello.nonce,
                               sessionID: hello.sessionID, peerRole: ack.role) else {
            throw HandshakeError(.authenticationFailed, "the \(ack.role) agent's proof for session \(hello.sessionID) does not verify")
        }
        if ack.cipherSuite != .none {
            throw HandshakeError(.featureMismatch, "peer chose cipher suite \(ack.cipherSuite.rawValue); v1 supports none")
        }
        if !hello.features.isSuperset(of: ack.features) {
            throw HandshakeError(.featureMismatch, "peer accepted features 0x\(String(ack.features.rawValue, radix: 16)) "
                                 + "beyond the offer 0x\(String(hello.features.rawValue, radix: 16))")
        }
        let mine = AuthProof.computeBytes(key: key, localNonce: hello.nonce, peerNonce: ack.nonce,
                                          sessionID: hello.sessionID, role: hello.role)
        return (.auth(proof: mine), ack)
    }
}

/// The listening side of the authenticated hello exchange, pure: answers a `hello` with a `helloAck`
/// and checks the `auth` that follows. No frame other than `auth` may be processed before
/// ``verify(auth:)`` succeeds.
public struct ListenerHandshake: Sendable {
    /// The listener's answer, once ``respond(to:supported:resumePoints:)`` succeeded.
    public private(set) var reply: Hello?
    /// The connector's hello.
    public private(set) var peer: Hello?
    let key: [UInt8]
    let role: Role
    let nonce: Nonce

    /// A listener with role `role` (normally `.dest`) and a fresh nonce.
    public init(key: [UInt8], role: Role = .dest, nonce: Nonce = .random()) {
        self.key = key; self.role = role; self.nonce = nonce
    }

    /// Checks a `hello` and returns the `helloAck` to send: the accepted features are the offer
    /// intersected with `supported`, the cipher suite is none, and `resumePoints` are this side's
    /// (what it has applied, for a resume).
    public mutating func respond(to hello: Hello, supported: Features,
                                 resumePoints: [ResumePoint] = []) throws(HandshakeError) -> Message {
        if hello.protocolVersion != 1 {
            throw HandshakeError(.unsupportedVersion, "peer speaks protocol \(hello.protocolVersion), this side 1")
        }
        if hello.role == role { throw HandshakeError(.protocolViolation, "peer claims the same role \(role)") }
        if hello.nonce == nonce { throw HandshakeError(.authenticationFailed, "peer echoed this side's nonce") }
        var answer = Hello(role: role, mode: hello.mode, features: hello.features.intersection(supported),
                           sessionID: hello.sessionID, nonce: nonce, resumePoints: resumePoints)
        answer.cipherSuite = .none
        let proof = AuthProof.computeBytes(key: key, localNonce: nonce, peerNonce: hello.nonce,
                                           sessionID: hello.sessionID, role: role)
        peer = hello
        reply = answer
        return .helloAck(answer, proof: proof)
    }

    /// Checks the connector's `auth` proof (constant time). Throws `authenticationFailed` if it does
    /// not verify, or `protocolViolation` if no hello was answered yet.
    public func verify(auth proof: Bytes32) throws(HandshakeError) {
        guard let peer else { throw HandshakeError(.protocolViolation, "auth before hello") }
        guard AuthProof.verify(proof, key: key, peerNonce: peer.nonce, localNonce: nonce,
                               sessionID: peer.sessionID, peerRole: peer.role) else {
            throw HandshakeError(.authenticationFailed, "the \(peer.role) agent's proof for session \(peer.sessionID) does not verify")
        }
    }
}
