import Testing
import Wire

@Suite("The v2 hello exchange, driven through encoded frames")
struct HandshakeTests {
    let key: [UInt8] = Array("0123456789abcdef0123456789abcdef".utf8)
    let session = SessionID.random()
    let suites: Set<CipherSuite> = [.aes256gcm, .chacha20poly1305]

    /// Encodes and decodes a message, as the link would.
    func overWire(_ m: Message) throws -> Message {
        try #require(try withDecoded(try frameBytes(m)) { $0.message })
    }

    func hello(_ m: Message) throws -> Hello {
        guard case let .hello(hello) = m else { throw HandshakeTestError.unexpected(m.type) }
        return hello
    }
    func challenge(_ m: Message) throws -> Nonce {
        guard case let .challenge(nonce) = m else { throw HandshakeTestError.unexpected(m.type) }
        return nonce
    }
    func auth(_ m: Message) throws -> Bytes32 {
        guard case let .auth(proof) = m else { throw HandshakeTestError.unexpected(m.type) }
        return proof
    }
    func helloAck(_ m: Message) throws -> (Hello, Bytes32) {
        guard case let .helloAck(ack, proof) = m else { throw HandshakeTestError.unexpected(m.type) }
        return (ack, proof)
    }

    enum HandshakeTestError: Error { case unexpected(MessageType) }

    /// The code of the HandshakeError `body` throws; nil when it throws nothing (or something else).
    func code(_ body: () throws -> Void) -> ErrorCode? {
        do { try body(); return nil } catch let error as HandshakeError { return error.message.code } catch { return nil }
    }

    @Test("both sides authenticate and agree on keys; features are intersected; resume points travel back")
    func happyPath() throws {
        var connector = ConnectorHandshake(key: key, mode: .resume, features: [.disk, .memory, .resume, .urgentLane],
                                           sessionID: session,
                                           resumePoints: [ResumePoint(stream: .disk, streamID: 0, sequence: 10, offset: 1 << 20)])
        var listener = ListenerHandshake(key: key)
        let received = try hello(try overWire(connector.helloMessage))
        let nonce = try challenge(try overWire(try listener.challenge(for: received, suites: suites)))
        let proof = try auth(try overWire(try connector.prove(challenge: nonce)))
        try listener.verify(auth: proof)
        let mine = [ResumePoint(stream: .disk, streamID: 0, sequence: 8, offset: 1 << 19)]
        let reply = try listener.respond(supported: [.disk, .resume], resumePoints: mine)
        let (ack, ackProof) = try helloAck(try overWire(reply.message))
        let (peer, keys) = try connector.accept(ack, proof: ackProof)
        #expect(peer.features == [.disk, .resume])
        #expect(peer.resumePoints == mine)
        #expect(peer.mode == .resume)
        #expect(keys == reply.keys)
        #expect(keys.suite == .aes256gcm)
    }

    @Test("the listener reveals nothing keyed before the connector proved the key")
    func noOracle() throws {
        let connector = ConnectorHandshake(key: key, features: [.disk], sessionID: session)
        var listener = ListenerHandshake(key: key)
        let first = try listener.challenge(for: connector.hello, suites: suites)
        guard case .challenge = first else { Issue.record("the first answer is \(first.type)"); return }
        // No helloAck (no proof) for an unproved connector, whatever it sends next.
        #expect(code { _ = try listener.respond(supported: [.disk]) } == .protocolViolation)
        #expect(code { try listener.verify(auth: Bytes32.random()) } == .authenticationFailed)
        #expect(code { _ = try listener.respond(supported: [.disk]) } == .protocolViolation)
    }

    @Test("a wrong key fails on either side")
    func wrongKeys() throws {
        var other = key
        other[5] ^= 0x20
        // A connector with the wrong key: its proof fails at the listener.
        var impostor = ConnectorHandshake(key: other, features: [.disk], sessionID: session)
        var listener = ListenerHandshake(key: key)
        let nonce = try challenge(try listener.challenge(for: impostor.hello, suites: suites))
        let forged = try auth(try impostor.prove(challenge: nonce))
        #expect(code { try listener.verify(auth: forged) } == .authenticationFailed)
        // A listener with the wrong key: its helloAck fails at the connector.
        var connector = ConnectorHandshake(key: key, features: [.disk], sessionID: session)
        var fake = ListenerHandshake(key: other)
        let nonce2 = try challenge(try fake.challenge(for: connector.hello, suites: suites))
        _ = try connector.prove(challenge: nonce2)
        let (proofFromOther, _) = (AuthProof.listenerProof(key: other, hello: connector.hello, challenge: nonce2,
                                                           answer: Hello(role: .dest, features: [.disk], sessionID: session, nonce: nonce2)), 0)
        #expect(code { _ = try connector.accept(Hello(role: .dest, features: [.disk], sessionID: session, nonce: nonce2), proof: proofFromOther) }
                == .authenticationFailed)
    }

    @Test("a hello altered on the path (downgrade) fails the connector's proof; an altered helloAck fails the listener's")
    func downgrades() throws {
        var connector = ConnectorHandshake(key: key, features: [.disk, .memory, .postcopy], sessionID: session)
        var listener = ListenerHandshake(key: key)
        var altered = connector.hello
        altered.features = [.disk]
        let nonce = try challenge(try listener.challenge(for: altered, suites: suites))
        let proof = try auth(try connector.prove(challenge: nonce))
        #expect(code { try listener.verify(auth: proof) } == .authenticationFailed)

        var connector2 = ConnectorHandshake(key: key, features: [.disk, .memory], sessionID: session,
                                            resumePoints: [])
        var listener2 = ListenerHandshake(key: key)
        let nonce2 = try challenge(try listener2.challenge(for: connector2.hello, suites: suites))
        try listener2.verify(auth: try auth(try connector2.prove(challenge: nonce2)))
        let (ack, ackProof) = try helloAck(try listener2.respond(supported: [.disk, .memory],
                                                                 resumePoints: [ResumePoint(stream: .disk, streamID: 0, sequence: 5, offset: 1 << 20)]).message)
        var moved = ack
        moved.resumePoints[0].offset = 1 << 30                        // "I have everything": the source would skip data
        #expect(code { _ = try connector2.accept(moved, proof: ackProof) } == .authenticationFailed)
        var fewer = ack
        fewer.features = [.disk]
        #expect(code { _ = try connector2.accept(fewer, proof: ackProof) } == .authenticationFailed)
        // The connector's own proof sent back as the listener's (reflection).
        let own = AuthProof.connectorProof(key: key, hello: connector2.hello, challenge: nonce2)
        #expect(code { _ = try connector2.accept(ack, proof: own) } == .authenticationFailed)
        _ = try connector2.accept(ack, proof: ackProof)
    }

    @Test("an old version, an unknown or unsealed suite, the same role and an echoed nonce are refused")
    func refusals() throws {
        var h = Hello(role: .source, features: [.disk], sessionID: session, nonce: .random())
        var l = ListenerHandshake(key: key)
        h.protocolVersion = 1
        #expect(code { _ = try l.challenge(for: h, suites: suites) } == .unsupportedVersion)
        h.protocolVersion = Hello.currentProtocolVersion
        h.cipherSuite = .none
        #expect(code { _ = try l.challenge(for: h, suites: suites) } == .featureMismatch)
        h.cipherSuite = CipherSuite(rawValue: 9)
        #expect(code { _ = try l.challenge(for: h, suites: suites) } == .featureMismatch)
        h.cipherSuite = .chacha20poly1305
        h.role = .dest
        #expect(code { _ = try l.challenge(for: h, suites: suites) } == .protocolViolation)
        h.role = .source
        let echo = ListenerHandshake(key: key, nonce: h.nonce)
        var e = echo
        #expect(code { _ = try e.challenge(for: h, suites: suites) } == .authenticationFailed)
        _ = try l.challenge(for: h, suites: suites)
        #expect(code { _ = try l.challenge(for: h, suites: suites) } == .protocolViolation)   // a second hello
    }
}
