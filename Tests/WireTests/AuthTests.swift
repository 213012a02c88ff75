import Testing
import Wire

@Suite("Proofs and keys of the v2 handshake")
struct AuthTests {
    let key: [UInt8] = Array("a pre-shared key of 32 bytes....".utf8)
    let challenge = Nonce.random()
    let hello = Hello(role: .source, mode: .resume, features: [.disk, .memory, .resume], sessionID: .random(), nonce: .random(),
                      resumePoints: [ResumePoint(stream: .disk, streamID: 0, sequence: 3, offset: 4096)])

    var answer: Hello {
        var a = hello
        a.role = .dest
        a.nonce = challenge
        a.features = [.disk, .resume]
        a.resumePoints = []
        return a
    }

    @Test("the connector's proof covers every field of its hello and the challenge")
    func connectorProofCoversTheHello() {
        let proof = AuthProof.connectorProof(key: key, hello: hello, challenge: challenge)
        #expect(proof == AuthProof.connectorProof(key: key, hello: hello, challenge: challenge))
        var wrongKey = key
        wrongKey[0] ^= 1
        #expect(proof != AuthProof.connectorProof(key: wrongKey, hello: hello, challenge: challenge))
        #expect(proof != AuthProof.connectorProof(key: key, hello: hello, challenge: .random()))
        var changes: [Hello] = []
        var h = hello; h.features = [.disk]; changes.append(h)                      // a downgrade
        h = hello; h.cipherSuite = .none; changes.append(h)                          // a cipher downgrade
        h = hello; h.mode = .new; changes.append(h)
        h = hello; h.sessionID = .random(); changes.append(h)
        h = hello; h.resumePoints[0].offset += 4096; changes.append(h)               // a moved resume point
        h = hello; h.nonce = .random(); changes.append(h)
        h = hello; h.protocolVersion = 1; changes.append(h)
        for changed in changes {
            #expect(proof != AuthProof.connectorProof(key: key, hello: changed, challenge: challenge))
        }
    }

    @Test("the listener's proof covers its answer, and differs from the connector's (no reflection)")
    func listenerProofCoversTheAnswer() {
        let proof = AuthProof.listenerProof(key: key, hello: hello, challenge: challenge, answer: answer)
        var more = answer; more.features = [.disk, .memory, .resume]
        var points = answer; points.resumePoints = [ResumePoint(stream: .memory, streamID: 0, sequence: 1, offset: 99)]
        var suite = answer; suite.cipherSuite = .chacha20poly1305
        for changed in [more, points, suite] {
            #expect(proof != AuthProof.listenerProof(key: key, hello: hello, challenge: challenge, answer: changed))
        }
        #expect(proof != AuthProof.connectorProof(key: key, hello: hello, challenge: challenge))
    }

    @Test("keys differ per direction, per connection (nonces) and per answer")
    func keysAreFreshPerConnection() {
        let keys = SessionKeys.derive(key: key, hello: hello, challenge: challenge, answer: answer)
        #expect(keys.connectorToListener.count == 32 && keys.listenerToConnector.count == 32)
        #expect(keys.connectorToListener != keys.listenerToConnector)
        #expect(keys == SessionKeys.derive(key: key, hello: hello, challenge: challenge, answer: answer))
        var again = hello; again.nonce = .random()
        #expect(keys.connectorToListener != SessionKeys.derive(key: key, hello: again, challenge: challenge, answer: answer).connectorToListener)
        var other = answer; other.resumePoints = [ResumePoint(stream: .disk, streamID: 0, sequence: 1, offset: 0)]
        #expect(keys.listenerToConnector != SessionKeys.derive(key: key, hello: hello, challenge: challenge, answer: other).listenerToConnector)
    }

    @Test("proofs and keys match an independent HMAC/HKDF computation")
    func knownVectors() {
        // Computed with Python's hmac and hashlib (HKDF by RFC 5869 by hand; the same script gives the
        // protocol-2 vectors this test held before): key 0x00..0x1f,
        // session 1...16, connector nonce 0x40.., challenge 0x90.., hello v3 source resume aes-256-gcm
        // features 0x103 with resume point (disk 0, seq 10, offset 1 MiB), answer dest features 0x101
        // with resume point (disk 0, seq 8, offset 512 KiB). See docs/wire.md for the byte layout.
        let key = (0..<32).map(UInt8.init)
        let hello = Hello(role: .source, mode: .resume, features: [.disk, .memory, .resume], sessionID: sampleSession(),
                          nonce: sampleNonce(0x40), resumePoints: [ResumePoint(stream: .disk, streamID: 0, sequence: 10, offset: 1 << 20)])
        let answer = Hello(role: .dest, mode: .resume, features: [.disk, .resume], sessionID: sampleSession(),
                           nonce: sampleNonce(0x90), resumePoints: [ResumePoint(stream: .disk, streamID: 0, sequence: 8, offset: 1 << 19)])
        #expect(AuthProof.connectorProof(key: key, hello: hello, challenge: sampleNonce(0x90)).description
                == "83d484cb0c3988c68fcc5f74151df05503140fc8c87909534dd13dc4f567597e")
        #expect(AuthProof.listenerProof(key: key, hello: hello, challenge: sampleNonce(0x90), answer: answer).description
                == "05b4afacb76df33cda5e34511e9c1a35b4b2c28d6c4e436e1e89be6e2483f768")
        let keys = SessionKeys.derive(key: key, hello: hello, challenge: sampleNonce(0x90), answer: answer)
        #expect(Bytes32(keys.connectorToListener)!.description == "5f96bdc6c6da55f40ffe0b93db93d2779d811f22fa44968841f992ffd72bf152")
        #expect(Bytes32(keys.listenerToConnector)!.description == "90205cbd84e2ca468cfe5f37844d6c2d3887e3ddd0569905dc4b361e4c527555")
    }

    @Test("keys shorter than 32 bytes are not acceptable")
    func keyLength() {
        #expect(AuthProof.isAcceptableKey(key))
        #expect(!AuthProof.isAcceptableKey(Array(key.prefix(31))))
    }
}
