import Testing
import Wire

@Suite("The authenticated hello exchange, driven through encoded frames")
struct HandshakeTests {
    let key: [UInt8] = Array("0123456789abcdef0123456789abcdef".utf8)
    let session = SessionID.random()

    /// Encodes and decodes a message, as the link would.
    func overWire(_ m: Message) throws -> Message {
        try #require(try withDecoded(try frameBytes(m)) { $0.message })
    }

    /// The hello of a hello message; the test fails (not passes) when it is another message.
    func hello(_ m: Message, sourceLocation: SourceLocation = #_sourceLocation) throws -> Hello {
        guard case let .hello(hello) = m else {
            Issue.record("expected a hello, got \(m.type)", sourceLocation: sourceLocation)
            throw HandshakeTestError.unexpected(m.type)
        }
        return hello
    }

    /// The hello and proof of a helloAck message; the test fails when it is another message.
    func helloAck(_ m: Message, sourceLocation: SourceLocation = #_sourceLocation) throws -> (Hello, Bytes32) {
        guard case let .helloAck(ack, proof) = m else {
            Issue.record("expected a helloAck, got \(m.type)", sourceLocation: sourceLocation)
            throw HandshakeTestError.unexpected(m.type)
        }
        return (ack, proof)
    }

    /// The proof of an auth message; the test fails when it is another message.
    func auth(_ m: Message, sourceLocation: SourceLocation = #_sourceLocation) throws -> Bytes32 {
        guard case let .auth(proof) = m else {
            Issue.record("expected an auth, got \(m.type)", sourceLocation: sourceLocation)
            throw HandshakeTestError.unexpected(m.type)
        }
        return proof
    }

    enum HandshakeTestError: Error { case unexpected(MessageType) }

    @Test("both sides authenticate; features are intersected; resume points travel back")
    func happyPath() throws {
        let connector = ConnectorHandshake(key: key, mode: .resume, features: [.disk, .memory, .resume, .urgentLane],
                                           sessionID: session,
                                           resumePoints: [ResumePoint(stream: .disk, streamID: 0, sequence: 10, offset: 1 << 20)])
        var listener = ListenerHandshake(key: key)
        let received = try hello(try overWire(connector.helloMessage))
        let mine = [ResumePoint(stream: .disk, streamID: 0, sequence: 8, offset: 1 << 19)]
        let ackMessage = try listener.respond(to: received, supported: [.disk, .resume], resumePoints: mine)
        let (ack, proof) = try helloAck(try overWire(ackMessage))
        let (auth, peer) = try connector.accept(ack, proof: proof)
        #expect(peer.features == [.disk, .resume])
        #expect(peer.resumePoints == mine)
        #expect(peer.mode == .resume)
        let sourceProof = try self.auth(try overWire(auth))
        try listener.verify(auth: sourceProof)
    }

    @Test("a listener with the wrong key is refused by the connector, and vice versa")
    func wrongKeys() throws {
        var other = key
        other[5] ^= 0x20
        let connector = ConnectorHandshake(key: key, features: [.disk], sessionID: session)
        var impostor = ListenerHandshake(key: other)
        let (ack, proof) = try helloAck(try impostor.respond(to: connector.hello, supported: [.disk]))
        #expect(throws: HandshakeError.self) { _ = try connector.accept(ack, proof: proof) }
        do { _ = try connector.accept(ack, proof: proof); Issue.record("a wrong-key listener accepted") } catch {
            #expect(error.message.code == .authenticationFailed)
        }

        let impostorConnector = ConnectorHandshake(key: other, features: [.disk], sessionID: session)
        var listener = ListenerHandshake(key: key)
        let (ack2, proof2) = try helloAck(try listener.respond(to: impostorConnector.hello, supported: [.disk]))
        // The impostor cannot verify the listener's proof; if it sends a proof anyway, it fails.
        #expect(throws: HandshakeError.self) { _ = try impostorConnector.accept(ack2, proof: proof2) }
        let forged = AuthProof.computeBytes(key: other, localNonce: impostorConnector.hello.nonce, peerNonce: ack2.nonce,
                                            sessionID: session, role: .source)
        do { try listener.verify(auth: forged); Issue.record("forged auth accepted") } catch {
            #expect(error.message.code == .authenticationFailed)
        }
    }

    @Test("a reflected proof, a changed session id and extra features are refused")
    func tampering() throws {
        let connector = ConnectorHandshake(key: key, features: [.disk], sessionID: session)
        var listener = ListenerHandshake(key: key)
        let (ack, proof) = try helloAck(try listener.respond(to: connector.hello, supported: [.disk, .memory]))
        // The listener's own proof sent back as the connector's auth (reflection).
        do { try listener.verify(auth: proof); Issue.record("reflected proof accepted") } catch {
            #expect(error.message.code == .authenticationFailed)
        }
        var otherSession = ack
        otherSession.sessionID = SessionID.random()
        do { _ = try connector.accept(otherSession, proof: proof); Issue.record("session change accepted") } catch {
            #expect(error.message.code == .protocolViolation)
        }
        var sameRole = ack
        sameRole.role = .source
        #expect(throws: HandshakeError.self) { _ = try connector.accept(sameRole, proof: proof) }
        var more = ack
        more.features = [.disk, .memory]
        do { _ = try connector.accept(more, proof: proof); Issue.record("extra features accepted") } catch {
            #expect(error.message.code == .featureMismatch)
        }
        let fresh = ListenerHandshake(key: key)
        #expect(throws: HandshakeError(.protocolViolation, "auth before hello")) { try fresh.verify(auth: proof) }
    }
}
