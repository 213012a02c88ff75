import CLibCrypto
import Wire

/// One direction of a connection's sealing (docs/wire.md, "Authentication and sealing"): an AEAD
/// (AES-256-GCM or ChaCha20-Poly1305, OpenSSL's EVP) whose key schedule is set up once, and whose
/// 96-bit nonce is 4 zero bytes and the frame's 64-bit sequence number in this direction
/// (little-endian), counted here, never sent. Each frame's 12-byte header is authenticated (AAD);
/// everything after it is encrypted, and the 16-byte tag follows it.
///
/// A replayed, reordered, dropped or altered frame changes the nonce or the bytes the tag covers,
/// so ``open(header:body:tag:)`` fails, and the link is dropped. Nothing is allocated per frame;
/// sealing reads the payload where it lives and writes the ciphertext where the sender wants it
/// (one pass, no separate copy), opening works in place. Owned by one thread.
public final class FrameCipher {
    /// Bytes of the tag that follows every sealed frame.
    public static let tagSize = 16
    private let context: OpaquePointer
    private let sealing: Bool
    private var nonce = [UInt8](repeating: 0, count: 12)
    /// Frames sealed or opened so far: the next frame's nonce.
    public private(set) var sequence: UInt64 = 0

    /// A cipher for `suite` under the 32-byte `key`, sealing (`sealing`) or opening.
    public init(suite: CipherSuite, key: [UInt8], sealing: Bool) throws(LinkError) {
        let cipher: OpaquePointer?
        switch suite {
        case .aes256gcm: cipher = EVP_aes_256_gcm()
        case .chacha20poly1305: cipher = EVP_chacha20_poly1305()
        default: throw .local(.featureMismatch, reason: "cipher suite \(suite) cannot seal frames")
        }
        guard key.count == 32, let cipher, let context = EVP_CIPHER_CTX_new() else {
            throw .local(.internalError, reason: "libcrypto could not set up \(suite)")
        }
        self.context = context
        self.sealing = sealing
        let ok = key.withUnsafeBufferPointer { key in
            sealing ? EVP_EncryptInit_ex(context, cipher, nil, key.baseAddress, nil) == 1
                    : EVP_DecryptInit_ex(context, cipher, nil, key.baseAddress, nil) == 1
        }
        guard ok else {
            EVP_CIPHER_CTX_free(context)
            throw .local(.internalError, reason: "libcrypto refused the \(suite) key")
        }
    }

    deinit { EVP_CIPHER_CTX_free(context) }

    /// Sets the next frame's nonce and authenticates its header.
    private func begin(header: UnsafeRawPointer) -> Bool {
        withUnsafeBytes(of: sequence.littleEndian) { counter in
            nonce.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: 4).copyMemory(from: counter.baseAddress!, byteCount: 8) }
        }
        sequence += 1
        var written: Int32 = 0
        return nonce.withUnsafeBufferPointer { iv in
            sealing ? EVP_EncryptInit_ex(context, nil, nil, nil, iv.baseAddress) == 1
                    : EVP_DecryptInit_ex(context, nil, nil, nil, iv.baseAddress) == 1
        } && (sealing ? EVP_EncryptUpdate(context, nil, &written, header.assumingMemoryBound(to: UInt8.self), Int32(FrameHeader.size))
                      : EVP_DecryptUpdate(context, nil, &written, header.assumingMemoryBound(to: UInt8.self), Int32(FrameHeader.size))) == 1
    }

    /// Encrypts `count` bytes from `input` to `output` (which may be the same place).
    private func update(_ input: UnsafeRawPointer, to output: UnsafeMutableRawPointer, count: Int) -> Bool {
        var offset = 0
        while offset < count {
            let chunk = Int32(min(count - offset, 1 << 30))
            var written: Int32 = 0
            let ok = sealing
                ? EVP_EncryptUpdate(context, (output + offset).assumingMemoryBound(to: UInt8.self), &written,
                                    (input + offset).assumingMemoryBound(to: UInt8.self), chunk)
                : EVP_DecryptUpdate(context, (output + offset).assumingMemoryBound(to: UInt8.self), &written,
                                    (input + offset).assumingMemoryBound(to: UInt8.self), chunk)
            guard ok == 1, written == chunk else { return false }
            offset += Int(chunk)
        }
        return true
    }

    /// Seals one frame: `header` (12 bytes, already final: its length counts the tag) is
    /// authenticated; `metadata` is encrypted in place; `payload` is encrypted into `payloadOutput`;
    /// the tag is written at `tag`. Returns false only if libcrypto fails.
    public func seal(header: UnsafeRawPointer, metadata: UnsafeMutableRawBufferPointer, payload: UnsafeRawBufferPointer,
              payloadOutput: UnsafeMutableRawPointer, tag: UnsafeMutableRawPointer) -> Bool {
        guard begin(header: header) else { return false }
        if metadata.count > 0 && !update(metadata.baseAddress!, to: metadata.baseAddress!, count: metadata.count) { return false }
        if payload.count > 0 && !update(payload.baseAddress!, to: payloadOutput, count: payload.count) { return false }
        var written: Int32 = 0
        var scratch: UInt8 = 0
        guard EVP_EncryptFinal_ex(context, &scratch, &written) == 1 else { return false }
        return EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_AEAD_GET_TAG, Int32(Self.tagSize), tag) == 1
    }

    /// Opens one frame in place: `header` authenticated, `body` decrypted where it is, checked
    /// against the 16 bytes at `tag`. False: the frame was altered, replayed, reordered or another
    /// one was dropped before it (`body` then holds garbage).
    public func open(header: UnsafeRawPointer, body: UnsafeMutableRawBufferPointer, tag: UnsafeRawPointer) -> Bool {
        guard begin(header: header) else { return false }
        if body.count > 0 && !update(body.baseAddress!, to: body.baseAddress!, count: body.count) { return false }
        guard EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_AEAD_SET_TAG, Int32(Self.tagSize), UnsafeMutableRawPointer(mutating: tag)) == 1 else {
            return false
        }
        var written: Int32 = 0
        var scratch: UInt8 = 0
        return EVP_DecryptFinal_ex(context, &scratch, &written) == 1
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
