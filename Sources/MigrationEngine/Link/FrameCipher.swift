import CFerryAEAD
import Wire

/// One direction of a connection's sealing (docs/wire.md, "Authentication and sealing"): an AEAD
/// (AES-256-GCM or ChaCha20-Poly1305: BoringSSL's EVP_AEAD, as vendored by swift-crypto, through
/// `CFerryAEAD`) whose key schedule is set up once, and whose 96-bit nonce is 4 zero bytes and the
/// frame's 64-bit sequence number in this direction (little-endian), counted here, never sent.
/// Each frame's 12-byte header is authenticated (AAD); everything after it is encrypted, and the
/// 16-byte tag follows it.
///
/// A replayed, reordered, dropped or altered frame changes the nonce or the bytes the tag covers,
/// so ``open(header:body:tag:)`` fails, and the link is dropped. Nothing is allocated per frame;
/// sealing reads the payload where it lives and writes the ciphertext where the sender wants it
/// (one pass, no separate copy), opening works in place. Owned by one thread.
public final class FrameCipher {
    /// Bytes of the tag that follows every sealed frame.
    public static let tagSize = 16
    private let context: OpaquePointer
    private var nonce = [UInt8](repeating: 0, count: 12)
    /// Frames sealed or opened so far: the next frame's nonce.
    public private(set) var sequence: UInt64 = 0

    /// A cipher for `suite` under the 32-byte `key`. The same context seals or opens; `sealing`
    /// only says which this one is for (each direction has its own key).
    public init(suite: CipherSuite, key: [UInt8], sealing: Bool) throws(LinkError) {
        let code: Int32
        switch suite {
        case .aes256gcm: code = Int32(FERRY_AEAD_AES_256_GCM.rawValue)
        case .chacha20poly1305: code = Int32(FERRY_AEAD_CHACHA20_POLY1305.rawValue)
        default: throw .local(.featureMismatch, reason: "cipher suite \(suite) cannot seal frames")
        }
        guard key.count == 32, let context = key.withUnsafeBufferPointer({ ferry_aead_new(code, $0.baseAddress, $0.count) }) else {
            throw .local(.internalError, reason: "BoringSSL could not set up \(suite) with a \(key.count)-byte key")
        }
        self.context = context
    }

    deinit { ferry_aead_free(context) }

    /// The next frame's nonce (and counts it).
    private func advance() {
        withUnsafeBytes(of: sequence.littleEndian) { counter in
            nonce.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: 4).copyMemory(from: counter.baseAddress!, byteCount: 8) }
        }
        sequence += 1
    }

    /// Seals one frame: `header` (12 bytes, already final: its length counts the tag) is
    /// authenticated; `metadata` is encrypted in place; `payload` is encrypted into `payloadOutput`,
    /// and the tag is written right after it (`payloadOutput + payload.count`). Returns false only
    /// if BoringSSL fails.
    public func seal(header: UnsafeRawPointer, metadata: UnsafeMutableRawBufferPointer, payload: UnsafeRawBufferPointer,
                     payloadOutput: UnsafeMutableRawPointer) -> Bool {
        advance()
        return nonce.withUnsafeBufferPointer { nonce in
            ferry_aead_seal(context, nonce.baseAddress, header.assumingMemoryBound(to: UInt8.self), FrameHeader.size,
                            metadata.baseAddress?.assumingMemoryBound(to: UInt8.self), metadata.count,
                            payload.baseAddress?.assumingMemoryBound(to: UInt8.self), payload.count,
                            payloadOutput.assumingMemoryBound(to: UInt8.self)) == 1
        }
    }

    /// Opens one frame in place: `header` authenticated, `body` decrypted where it is, checked
    /// against the 16 bytes at `tag`. False: the frame was altered, replayed, reordered or another
    /// one was dropped before it (`body` then holds garbage).
    public func open(header: UnsafeRawPointer, body: UnsafeMutableRawBufferPointer, tag: UnsafeRawPointer) -> Bool {
        advance()
        return nonce.withUnsafeBufferPointer { nonce in
            ferry_aead_open(context, nonce.baseAddress, header.assumingMemoryBound(to: UInt8.self), FrameHeader.size,
                            body.baseAddress?.assumingMemoryBound(to: UInt8.self), body.count,
                            tag.assumingMemoryBound(to: UInt8.self)) == 1
        }
    }
}

/// Which cipher suites this build proposes and accepts. Normal builds always seal; only a build made
/// with `-D FERRY_UNSEALED_LINK` (the sealed-versus-unsealed benchmark, scripts/bench-seal.sh) sends
/// frames in the clear, and it can talk only to another such build.
enum LinkSealing {
    #if FERRY_UNSEALED_LINK
    static let proposed: CipherSuite = .none
    static let accepted: Set<CipherSuite> = [.none]
    #else
    static let proposed: CipherSuite = .aes256gcm
    static let accepted: Set<CipherSuite> = [.aes256gcm, .chacha20poly1305]
    #endif
}
