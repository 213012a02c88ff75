/// Capability bits exchanged in `hello` / `helloAck`; the session uses the intersection.
///
/// Unknown bits are preserved by the decoder so a newer peer's offer can be intersected correctly.
public struct Features: OptionSet, Hashable, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Disk migration (disk layout, extents, rounds).
    public static let disk = Features(rawValue: 1 << 0)
    /// Memory migration (memory layout, page batches, rounds).
    public static let memory = Features(rawValue: 1 << 1)
    /// Memory post-copy: `pageRequest` / `pageReply` after switchover.
    public static let postcopy = Features(rawValue: 1 << 2)
    /// Disk post-copy: `diskFetch` / `diskReply` after switchover.
    public static let diskPostcopy = Features(rawValue: 1 << 3)
    /// Zero runs in `diskExtents` and `pageBatch` (always understood by v1 decoders).
    public static let zeroRuns = Features(rawValue: 1 << 4)
    /// Compressed payloads: `pageBatch` and `diskExtents` may carry their data as one zstd frame
    /// (``PayloadEncoding``). Without it in both hellos, every payload is raw.
    public static let compression = Features(rawValue: 1 << 5)
    /// Unused: v2 seals every frame after the handshake, always, with hello's `cipherSuite`.
    public static let encryption = Features(rawValue: 1 << 6)
    /// The urgent lane: a second connection (or queue) for frames flagged urgent.
    public static let urgentLane = Features(rawValue: 1 << 7)
    /// Resume after a link drop (hello with mode `.resume`).
    public static let resume = Features(rawValue: 1 << 8)

    /// The tunnel lane: a connection of the session that carries the VM's Ethernet frames (`tunnelFrames`).
    public static let tunnelLane = Features(rawValue: 1 << 9)

    /// Held blocks: the destination reports the SHA-256 of each block of a base image it already
    /// holds (`diskHeld`), and the source's bulk copy sends a block whose content matches as a `held`
    /// extent, without its bytes. Offered by a destination with a base image (`dest-agent --disk-base`).
    public static let heldBlocks = Features(rawValue: 1 << 10)

    /// Every bit this version defines.
    public static let allKnown: Features = [.disk, .memory, .postcopy, .diskPostcopy, .zeroRuns,
                                            .compression, .encryption, .urgentLane, .resume, .tunnelLane, .heldBlocks]
}

/// The AEAD that seals every frame after the handshake (docs/wire.md, "Authentication and sealing").
/// The connector proposes one in `hello`; the listener confirms it in `helloAck` or refuses.
public struct CipherSuite: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// No sealing. Only builds made for the sealed-versus-unsealed benchmark propose or accept it
    /// (`-D FERRY_UNSEALED_LINK`); a normal agent refuses it.
    public static let none = CipherSuite(rawValue: 0)
    /// AES-256-GCM with a 16-byte tag (the default: 5.6 GB/s per core here, BoringSSL's VAES-AVX2 code).
    public static let aes256gcm = CipherSuite(rawValue: 1)
    /// ChaCha20-Poly1305 with a 16-byte tag (for CPUs without AES instructions).
    public static let chacha20poly1305 = CipherSuite(rawValue: 2)

    /// Bytes the suite adds after each record of a sealed frame (its tag; ``SealedRecords``).
    public var tagSize: Int { self == .none ? 0 : 16 }

    public var description: String {
        switch self {
        case .none: return "none"
        case .aes256gcm: return "aes-256-gcm"
        case .chacha20poly1305: return "chacha20-poly1305"
        default: return "suite \(rawValue)"
        }
    }
}

/// Which agent sent a hello.
public enum Role: UInt8, Sendable, CaseIterable {
    /// The agent that owns the running VM and sends its state.
    case source = 1
    /// The agent that receives the state and resumes the VM.
    case dest = 2
}

/// A stream of the migration, for round ends, acks, resume points and digests.
public enum StreamKind: UInt8, Sendable, CaseIterable {
    /// Handshake and control frames.
    case control = 0
    /// One disk; the stream id is the disk id.
    case disk = 1
    /// Guest memory; the stream id is a region id, or 0 for all of memory.
    case memory = 2
    /// The opaque VM-state blob.
    case vmState = 3
}
