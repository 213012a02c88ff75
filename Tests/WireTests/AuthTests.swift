import Testing
import Wire

@Suite("Mutual authentication proofs")
struct AuthTests {
    let key: [UInt8] = Array("a pre-shared key of 32 bytes....".utf8)
    let sourceNonce = Nonce.random()
    let destNonce = Nonce.random()
    let session = SessionID.random()

    @Test("a proof verifies with the right key, nonces, session and role")
    func rightKeyVerifies() {
        let destProof = AuthProof.compute(key: key, localNonce: destNonce, peerNonce: sourceNonce,
                                          sessionID: session, role: .dest)
        #expect(destProof.count == 32)
        #expect(AuthProof.verify(destProof, key: key, peerNonce: destNonce, localNonce: sourceNonce,
                                 sessionID: session, peerRole: .dest))
        let sourceProof = AuthProof.computeBytes(key: key, localNonce: sourceNonce, peerNonce: destNonce,
                                                 sessionID: session, role: .source)
        #expect(AuthProof.verify(sourceProof, key: key, peerNonce: sourceNonce, localNonce: destNonce,
                                 sessionID: session, peerRole: .source))
        #expect(sourceProof.bytes != destProof, "the two sides' proofs must differ")
    }

    @Test("a proof fails with a wrong key, swapped nonces, wrong role, wrong session or a flipped bit")
    func wrongInputsFail() {
        let proof = AuthProof.compute(key: key, localNonce: destNonce, peerNonce: sourceNonce,
                                      sessionID: session, role: .dest)
        var wrongKey = key
        wrongKey[0] ^= 1
        #expect(!AuthProof.verify(proof, key: wrongKey, peerNonce: destNonce, localNonce: sourceNonce,
                                  sessionID: session, peerRole: .dest))
        #expect(!AuthProof.verify(proof, key: key, peerNonce: sourceNonce, localNonce: destNonce,
                                  sessionID: session, peerRole: .dest), "swapped nonces accepted")
        #expect(!AuthProof.verify(proof, key: key, peerNonce: destNonce, localNonce: sourceNonce,
                                  sessionID: session, peerRole: .source), "reflected proof accepted")
        #expect(!AuthProof.verify(proof, key: key, peerNonce: destNonce, localNonce: sourceNonce,
                                  sessionID: SessionID.random(), peerRole: .dest))
        #expect(!AuthProof.verify(proof, key: key, peerNonce: destNonce, localNonce: Nonce.random(),
                                  sessionID: session, peerRole: .dest), "replayed proof accepted for a new nonce")
        for bit in 0..<256 {
            var flipped = proof
            flipped[bit / 8] ^= UInt8(1 << (bit % 8))
            #expect(!AuthProof.verify(flipped, key: key, peerNonce: destNonce, localNonce: sourceNonce,
                                      sessionID: session, peerRole: .dest))
        }
        #expect(!AuthProof.verify(Array(proof.dropLast()), key: key, peerNonce: destNonce, localNonce: sourceNonce,
                                  sessionID: session, peerRole: .dest))
    }

    @Test("the proof matches an independent HMAC-SHA256 test vector")
    func knownVector() {
        // Pin the output against an independent implementation so a
        // change of the proof's input layout is caught: key = 0x00..0x1f, nonces 0x40.., 0x90..,
        // session 1...16, role dest. Value computed once with Python's hmac module:
        // hmac.new(bytes(range(32)), b"ferry-auth-v1\0" + b"\x02" + bytes(range(0x90,0xb0))
        //          + bytes(range(0x40,0x60)) + bytes(range(1,17)), "sha256").hexdigest()
        let key = (0..<32).map(UInt8.init)
        let proof = AuthProof.computeBytes(key: key, localNonce: sampleNonce(0x90), peerNonce: sampleNonce(0x40),
                                           sessionID: sampleSession(), role: .dest)
        #expect(proof.description == AuthVector.expected)
    }

    @Test("the handshake messages carry proofs through the wire unchanged")
    func handshakeOverWire() throws {
        let hello = Hello(role: .source, features: [.disk], sessionID: session, nonce: sourceNonce)
        let destProof = AuthProof.computeBytes(key: key, localNonce: destNonce, peerNonce: sourceNonce,
                                               sessionID: session, role: .dest)
        var reply = hello
        reply.role = .dest
        reply.nonce = destNonce
        let bytes = try frameBytes(.helloAck(reply, proof: destProof))
        let ok = try withDecoded(bytes) { frame -> Bool in
            guard case let .helloAck(h, proof) = frame.message else { return false }
            return AuthProof.verify(proof, key: key, peerNonce: h.nonce, localNonce: sourceNonce,
                                    sessionID: h.sessionID, peerRole: h.role)
        }
        #expect(ok == true)
        #expect(AuthProof.isAcceptableKey(key))
        #expect(!AuthProof.isAcceptableKey(Array(key.prefix(15))))
    }
}

enum AuthVector {
    static let expected = "6a70b781ad2a3438cb853eda04e5cafc51187f17ef6d49d397af4f98d44c8bc4"
}
