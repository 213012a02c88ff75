import Crypto

/// Mutual authentication with a pre-shared key, and the per-direction sealing keys it yields
/// (docs/wire.md, "Authentication and sealing").
///
/// The exchange is `hello` (connector, nonce Nc) → `challenge` (listener, nonce Nl) → `auth`
/// (connector) → `helloAck` (listener). Each proof is an HMAC-SHA256 under the shared key over a
/// label naming the prover's side and the SHA-256 of the transcript so far:
///
///     T1 = hello ‖ Nl                       proof(connector) = HMAC(K, "ferry-auth-v2 connector\0" ‖ SHA256(T1))
///     T2 = hello ‖ Nl ‖ helloAck's hello    proof(listener)  = HMAC(K, "ferry-auth-v2 listener\0"  ‖ SHA256(T2))
///
/// where `hello` stands for the canonical encoding of a ``Hello`` (its 64 + 24·n metadata bytes), so
/// every field (version, mode, cipher suite, features, session, resume points) is covered: a
/// downgrade or an altered resume point fails the proof. The connector proves first: the listener
/// reveals nothing that depends on the key to anyone who has not proved it (no offline oracle).
/// The labels stop reflection; the fresh nonces stop replay.
///
/// With the module's other file that uses Crypto (``SessionKeys``), the only place Wire touches
/// cryptography (the fuzz harness builds without them).
public enum AuthProof {
    /// Size of a proof in bytes.
    public static let size = 32
    /// Shortest key accepted by ``isAcceptableKey(_:)``: 32 bytes (256 bits), as made by
    /// `head -c 32 /dev/urandom`.
    public static let minimumKeyLength = 32

    static let connectorLabel: [UInt8] = Array("ferry-auth-v2 connector".utf8) + [0]
    static let listenerLabel: [UInt8] = Array("ferry-auth-v2 listener".utf8) + [0]

    /// Whether `key` is long enough to be used.
    public static func isAcceptableKey(_ key: [UInt8]) -> Bool { key.count >= minimumKeyLength }

    /// SHA-256 of the transcript `hello ‖ challenge [‖ answer]`.
    static func transcriptHash(hello: Hello, challenge: Nonce, answer: Hello?) -> [UInt8] {
        var hash = SHA256()
        hash.update(data: hello.canonicalBytes())
        hash.update(data: challenge.bytes)
        if let answer { hash.update(data: answer.canonicalBytes()) }
        return Array(hash.finalize())
    }

    static func mac(key: [UInt8], label: [UInt8], transcript: [UInt8]) -> [UInt8] {
        var mac = HMAC<SHA256>(key: SymmetricKey(data: key))
        mac.update(data: label)
        mac.update(data: transcript)
        return Array(mac.finalize())
    }

    /// The connector's proof: over its `hello` and the listener's `challenge`.
    public static func connectorProof(key: [UInt8], hello: Hello, challenge: Nonce) -> Bytes32 {
        Bytes32(mac(key: key, label: connectorLabel, transcript: transcriptHash(hello: hello, challenge: challenge, answer: nil)))!
    }

    /// The listener's proof: over the connector's `hello`, the `challenge` and the listener's `answer`.
    public static func listenerProof(key: [UInt8], hello: Hello, challenge: Nonce, answer: Hello) -> Bytes32 {
        Bytes32(mac(key: key, label: listenerLabel, transcript: transcriptHash(hello: hello, challenge: challenge, answer: answer)))!
    }

    /// Compares two byte sequences in time that depends only on their lengths.
    public static func constantTimeEqual(_ a: [UInt8], _ b: some Collection<UInt8>) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for (x, y) in zip(a, b) { diff |= x ^ y }
        return diff == 0
    }
}

/// The two keys that seal a connection's frames, one per direction, derived once both proofs
/// verified:
///
///     PRK  = HKDF-Extract(salt: Nc ‖ Nl, IKM: K)
///     keys = HKDF-Expand(PRK, info: "ferry-v2 frame keys\0" ‖ suite ‖ SHA256(hello ‖ Nl ‖ helloAck's hello), 64)
///     connectorToListener = keys[0..<32], listenerToConnector = keys[32..<64]
///
/// Both nonces are fresh for every connection, so every connection (first, resumed, urgent lane)
/// has keys of its own, and a frame's AEAD nonce can be its sequence number in its direction.
public struct SessionKeys: Sendable, Equatable {
    /// The suite the keys are for.
    public let suite: CipherSuite
    /// Seals what the connector sends.
    public let connectorToListener: [UInt8]
    /// Seals what the listener sends.
    public let listenerToConnector: [UInt8]

    static let label: [UInt8] = Array("ferry-v2 frame keys".utf8) + [0]

    /// Derives the keys of the exchange `hello` → `challenge` → `answer` under shared key `key`.
    public static func derive(key: [UInt8], hello: Hello, challenge: Nonce, answer: Hello) -> SessionKeys {
        var info = label
        info.append(answer.cipherSuite.rawValue)
        info.append(contentsOf: AuthProof.transcriptHash(hello: hello, challenge: challenge, answer: answer))
        let derived = HKDF<SHA256>.deriveKey(inputKeyMaterial: SymmetricKey(data: key),
                                             salt: hello.nonce.bytes + challenge.bytes, info: info, outputByteCount: 64)
        let bytes = derived.withUnsafeBytes { Array($0) }
        return SessionKeys(suite: answer.cipherSuite, connectorToListener: Array(bytes[0..<32]),
                           listenerToConnector: Array(bytes[32..<64]))
    }
}
