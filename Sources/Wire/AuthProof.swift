import Crypto

/// Mutual authentication with a pre-shared key: each side proves it holds the key by an
/// HMAC-SHA256 over both nonces, the session id and its own role.
///
/// The proof of the side with role R is
/// `HMAC-SHA256(key, "ferry-auth-v1\0" ‖ R ‖ nonce of R ‖ nonce of the peer ‖ sessionID)`.
/// The role byte stops a proof from being reflected back to its sender, the two fresh nonces stop
/// replay, and the session id binds the proof to the session being opened or resumed.
/// The only module file that uses Crypto (the fuzz harness builds without it).
public enum AuthProof {
    /// Size of a proof in bytes.
    public static let size = 32
    /// Shortest key accepted by ``isAcceptableKey(_:)``: 16 bytes (128 bits).
    public static let minimumKeyLength = 16

    static let label: [UInt8] = Array("ferry-auth-v1".utf8) + [0]

    /// Whether `key` is long enough to be used.
    public static func isAcceptableKey(_ key: [UInt8]) -> Bool { key.count >= minimumKeyLength }

    /// The proof that the side with `role`, whose own nonce is `localNonce`, holds `key`.
    /// Returns 32 bytes.
    public static func compute(key: [UInt8], localNonce: Nonce, peerNonce: Nonce,
                               sessionID: SessionID, role: Role) -> [UInt8] {
        var mac = HMAC<SHA256>(key: SymmetricKey(data: key))
        mac.update(data: label)
        mac.update(data: [role.rawValue])
        mac.update(data: localNonce.bytes)
        mac.update(data: peerNonce.bytes)
        mac.update(data: sessionID.bytes)
        return Array(mac.finalize())
    }

    /// The proof as the 32-byte value carried by `helloAck` and `auth`.
    public static func computeBytes(key: [UInt8], localNonce: Nonce, peerNonce: Nonce,
                                    sessionID: SessionID, role: Role) -> Bytes32 {
        Bytes32(compute(key: key, localNonce: localNonce, peerNonce: peerNonce, sessionID: sessionID, role: role))!
    }

    /// Checks a peer's proof in constant time. `peerRole` and `peerNonce` are the prover's;
    /// `localNonce` is the verifier's own nonce (the prover's "peer nonce").
    public static func verify(_ proof: some Collection<UInt8>, key: [UInt8], peerNonce: Nonce,
                              localNonce: Nonce, sessionID: SessionID, peerRole: Role) -> Bool {
        let expected = compute(key: key, localNonce: peerNonce, peerNonce: localNonce,
                               sessionID: sessionID, role: peerRole)
        return constantTimeEqual(expected, proof)
    }

    /// ``verify(_:key:peerNonce:localNonce:sessionID:peerRole:)`` for a proof taken from a frame.
    public static func verify(_ proof: Bytes32, key: [UInt8], peerNonce: Nonce,
                              localNonce: Nonce, sessionID: SessionID, peerRole: Role) -> Bool {
        verify(proof.bytes, key: key, peerNonce: peerNonce, localNonce: localNonce,
               sessionID: sessionID, peerRole: peerRole)
    }

    /// Compares two byte sequences in time that depends only on their lengths.
    public static func constantTimeEqual(_ a: [UInt8], _ b: some Collection<UInt8>) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for (x, y) in zip(a, b) { diff |= x ^ y }
        return diff == 0
    }
}
