/// A refused handshake step: the `error` frame to send to the peer before closing.
public struct HandshakeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The frame to send (code and reason).
    public var message: ErrorMessage
    public init(_ code: ErrorCode, _ reason: String) { message = .truncating(code: code, reason: reason) }
    public var description: String { "\(message.code): \(message.reason)" }
}

/// The connecting side of the authenticated hello exchange (docs/wire.md, "Authentication and
/// sealing"), pure: it builds the frames and checks the answers; the caller moves the bytes.
///
/// `hello` → (peer) `challenge` → ``prove(challenge:)`` → `auth` → (peer) `helloAck` →
/// ``accept(_:proof:)`` → the keys that seal the rest of the connection.
public struct ConnectorHandshake: Sendable {
    /// The hello this side sends (its nonce is fresh for every connection).
    public let hello: Hello
    let key: [UInt8]
    private var challenge: Nonce?

    /// Prepares a hello with a fresh random nonce, proposing `suite`. `mode == .resume` for a reconnect.
    public init(key: [UInt8], role: Role = .source, mode: HelloMode = .new, features: Features,
                sessionID: SessionID, resumePoints: [ResumePoint] = [], suite: CipherSuite = .aes256gcm,
                nonce: Nonce = .random()) {
        self.key = key
        hello = Hello(role: role, mode: mode, cipherSuite: suite, features: features, sessionID: sessionID,
                      nonce: nonce, resumePoints: resumePoints)
    }

    /// The first frame to send.
    public var helloMessage: Message { .hello(hello) }

    /// Answers the listener's challenge with this side's proof (the `auth` frame to send).
    public mutating func prove(challenge nonce: Nonce) throws(HandshakeError) -> Message {
        if challenge != nil { throw HandshakeError(.protocolViolation, "a second challenge") }
        if nonce == hello.nonce { throw HandshakeError(.authenticationFailed, "peer echoed this side's nonce") }
        challenge = nonce
        return .auth(proof: AuthProof.connectorProof(key: key, hello: hello, challenge: nonce))
    }

    /// Checks the listener's `helloAck` (its proof over the whole exchange, then version, role,
    /// session, nonce, suite, features) and returns the listener's hello (accepted features, its
    /// resume points) and the keys that seal the rest of the connection.
    public func accept(_ ack: Hello, proof: Bytes32) throws(HandshakeError) -> (peer: Hello, keys: SessionKeys) {
        guard let challenge else { throw HandshakeError(.protocolViolation, "helloAck before challenge") }
        let expected = AuthProof.listenerProof(key: key, hello: hello, challenge: challenge, answer: ack)
        guard AuthProof.constantTimeEqual(expected.bytes, proof.bytes) else {
            throw HandshakeError(.authenticationFailed, "the listener's proof for session \(hello.sessionID) does not verify")
        }
        if ack.protocolVersion != hello.protocolVersion {
            throw HandshakeError(.unsupportedVersion, "peer speaks protocol \(ack.protocolVersion), this side \(hello.protocolVersion)")
        }
        if ack.role == hello.role { throw HandshakeError(.protocolViolation, "peer claims the same role \(ack.role)") }
        if ack.sessionID != hello.sessionID {
            throw HandshakeError(.protocolViolation, "helloAck names session \(ack.sessionID), expected \(hello.sessionID)")
        }
        if ack.nonce != challenge { throw HandshakeError(.protocolViolation, "helloAck's nonce is not the challenge") }
        if ack.cipherSuite != hello.cipherSuite {
            throw HandshakeError(.featureMismatch, "peer confirmed cipher suite \(ack.cipherSuite), this side proposed \(hello.cipherSuite)")
        }
        if !hello.features.isSuperset(of: ack.features) {
            throw HandshakeError(.featureMismatch, "peer accepted features 0x\(String(ack.features.rawValue, radix: 16)) "
                                 + "beyond the offer 0x\(String(hello.features.rawValue, radix: 16))")
        }
        return (ack, SessionKeys.derive(key: key, hello: hello, challenge: challenge, answer: ack))
    }
}

/// The listening side of the authenticated hello exchange, pure: answers a `hello` with a
/// `challenge` (nothing that depends on the key), checks the `auth` that follows, and only then
/// answers with its `helloAck` and derives the keys. No frame other than `auth` may be processed
/// before ``verify(auth:)`` succeeds.
public struct ListenerHandshake: Sendable {
    /// The connector's hello, once ``challenge(for:suites:)`` accepted it.
    public private(set) var peer: Hello?
    private var verified = false
    let key: [UInt8]
    let role: Role
    let nonce: Nonce

    /// A listener with role `role` (normally `.dest`) and a fresh nonce.
    public init(key: [UInt8], role: Role = .dest, nonce: Nonce = .random()) {
        self.key = key; self.role = role; self.nonce = nonce
    }

    /// Checks a `hello` (version, role, nonce, a suite in `suites`) and returns the `challenge` to send.
    public mutating func challenge(for hello: Hello, suites: Set<CipherSuite>) throws(HandshakeError) -> Message {
        if peer != nil { throw HandshakeError(.protocolViolation, "a second hello") }
        if hello.protocolVersion != Hello.currentProtocolVersion {
            throw HandshakeError(.unsupportedVersion, "peer speaks protocol \(hello.protocolVersion), this side \(Hello.currentProtocolVersion)")
        }
        if hello.role == role { throw HandshakeError(.protocolViolation, "peer claims the same role \(role)") }
        if hello.nonce == nonce { throw HandshakeError(.authenticationFailed, "peer echoed this side's nonce") }
        if !suites.contains(hello.cipherSuite) {
            throw HandshakeError(.featureMismatch, "peer proposed cipher suite \(hello.cipherSuite); this side accepts \(suites.map(\.description).sorted().joined(separator: ", "))")
        }
        peer = hello
        return .challenge(nonce: nonce)
    }

    /// Checks the connector's `auth` proof (constant time). Throws `authenticationFailed` if it does
    /// not verify, or `protocolViolation` if no hello was challenged yet.
    public mutating func verify(auth proof: Bytes32) throws(HandshakeError) {
        guard let peer else { throw HandshakeError(.protocolViolation, "auth before hello") }
        let expected = AuthProof.connectorProof(key: key, hello: peer, challenge: nonce)
        guard AuthProof.constantTimeEqual(expected.bytes, proof.bytes) else {
            throw HandshakeError(.authenticationFailed, "the \(peer.role) agent's proof for session \(peer.sessionID) does not verify")
        }
        verified = true
    }

    /// Once `auth` verified: the `helloAck` to send (the accepted features are the offer
    /// intersected with `supported`; `resumePoints` are this side's, for a resume) and the keys
    /// that seal the rest of the connection.
    public func respond(supported: Features, resumePoints: [ResumePoint] = []) throws(HandshakeError) -> (message: Message, keys: SessionKeys) {
        guard let peer, verified else { throw HandshakeError(.protocolViolation, "helloAck before a verified auth") }
        let answer = Hello(role: role, mode: peer.mode, cipherSuite: peer.cipherSuite, features: peer.features.intersection(supported),
                           sessionID: peer.sessionID, nonce: nonce, resumePoints: resumePoints)
        let proof = AuthProof.listenerProof(key: key, hello: peer, challenge: nonce, answer: answer)
        return (.helloAck(answer, proof: proof), SessionKeys.derive(key: key, hello: peer, challenge: nonce, answer: answer))
    }
}
