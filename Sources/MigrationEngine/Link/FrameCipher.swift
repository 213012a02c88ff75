import CFerryAEAD
import Glibc
import Wire

/// One direction of a connection's sealing (docs/wire.md, "Authentication and sealing"): an AEAD
/// (AES-256-GCM or ChaCha20-Poly1305: BoringSSL's EVP_AEAD, as vendored by swift-crypto, through
/// `CFerryAEAD`) whose key schedule is set up once. Each frame's 12-byte header is authenticated;
/// its body (metadata ‖ payload) is encrypted in records of ``SealedRecords/recordBytes``, each
/// followed by its 16-byte tag, under the nonce (record index, the frame's 64-bit sequence number in
/// this direction), counted here, never sent. A frame of two records or more is sealed or opened
/// by two threads at once (this one and a helper `CFerryAEAD` starts on first use).
///
/// A replayed, reordered, dropped or altered frame or record changes the nonce or the bytes a tag
/// covers, so ``open(header:sealed:records:into:)`` fails, and the link is dropped. Nothing is
/// allocated per frame: sealing reads the payload where it lives and writes the ciphertext where the
/// sender wants it (one pass, no separate copy); opening writes the plaintext where the receiver
/// wants it. Owned by one thread.
public final class FrameCipher {
    /// Bytes of the tag that follows every record of a sealed frame.
    public static let tagSize = SealedRecords.tagBytes
    private let context: OpaquePointer
    /// Frames sealed or opened so far: the next frame's sequence number.
    public private(set) var sequence: UInt64 = 0

    /// Whether the link's ciphers share large frames with a helper thread: yes, unless the
    /// environment sets `FERRY_AEAD_SERIAL` (to measure what the helper brings, docs/testing.md).
    public static let parallelByDefault = getenv("FERRY_AEAD_SERIAL") == nil

    /// A cipher for `suite` under the 32-byte `key` (each direction has its own key; the same
    /// context seals or opens); `parallel` false keeps every record on the calling thread.
    public init(suite: CipherSuite, key: [UInt8], parallel: Bool = FrameCipher.parallelByDefault) throws(LinkError) {
        let code: Int32
        switch suite {
        case .aes256gcm: code = Int32(FERRY_AEAD_AES_256_GCM.rawValue)
        case .chacha20poly1305: code = Int32(FERRY_AEAD_CHACHA20_POLY1305.rawValue)
        default: throw .local(.featureMismatch, reason: "cipher suite \(suite) cannot seal frames")
        }
        guard key.count == 32, let context = key.withUnsafeBufferPointer({ ferry_aead_new(code, $0.baseAddress, $0.count, parallel ? 1 : 0) }) else {
            throw .local(.internalError, reason: "BoringSSL could not set up \(suite) with a \(key.count)-byte key")
        }
        self.context = context
    }

    deinit { ferry_aead_free(context) }

    /// Seals one frame: `header` (12 bytes, already final: its length counts the tags,
    /// ``SealedRecords/overhead(bodyBytes:)``) is authenticated; `metadata` (at most one record) is
    /// encrypted in place; the rest (the payload's ciphertext with every record's tag after it) is
    /// written to `payloadOutput`, which has room for the payload and the tags. Returns false only
    /// if BoringSSL fails.
    public func seal(header: UnsafeRawPointer, metadata: UnsafeMutableRawBufferPointer, payload: UnsafeRawBufferPointer,
                     payloadOutput: UnsafeMutableRawPointer) -> Bool {
        defer { sequence += 1 }
        return ferry_aead_seal_frame(context, sequence, SealedRecords.recordBytes,
                                     header.assumingMemoryBound(to: UInt8.self), FrameHeader.size,
                                     metadata.baseAddress?.assumingMemoryBound(to: UInt8.self), metadata.count,
                                     payload.baseAddress?.assumingMemoryBound(to: UInt8.self), payload.count,
                                     payloadOutput.assumingMemoryBound(to: UInt8.self)) == 1
    }

    /// Opens one frame: `header` authenticated, the `records` records of `sealed` (each followed by
    /// its tag) decrypted into `output` (`sealed.count` − 16 × `records` bytes, apart from `sealed`).
    /// False: the frame was altered, replayed, reordered or another one was dropped before it
    /// (`output` then holds garbage).
    public func open(header: UnsafeRawPointer, sealed: UnsafeRawBufferPointer, records: Int,
                     into output: UnsafeMutableRawPointer) -> Bool {
        defer { sequence += 1 }
        return ferry_aead_open_frame(context, sequence, SealedRecords.recordBytes, records,
                                     header.assumingMemoryBound(to: UInt8.self), FrameHeader.size,
                                     sealed.baseAddress?.assumingMemoryBound(to: UInt8.self), sealed.count,
                                     output.assumingMemoryBound(to: UInt8.self)) == 1
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
