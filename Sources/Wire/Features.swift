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
    /// Reserved: payload compression (not implemented in v1; never set it).
    public static let compression = Features(rawValue: 1 << 5)
    /// Reserved: encryption with the `cipherSuite` named in hello (not implemented in v1).
    public static let encryption = Features(rawValue: 1 << 6)
    /// The urgent lane: a second connection (or queue) for frames flagged urgent.
    public static let urgentLane = Features(rawValue: 1 << 7)
    /// Resume after a link drop (hello with mode `.resume`).
    public static let resume = Features(rawValue: 1 << 8)

    /// Every bit v1 defines.
    public static let allKnown: Features = [.disk, .memory, .postcopy, .diskPostcopy, .zeroRuns,
                                            .compression, .encryption, .urgentLane, .resume]
}

/// The cipher suite named in hello. v1 defines only ``none``; the field exists so that
/// encryption can be added without changing the frame layout (see docs/wire.md).
public struct CipherSuite: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// No encryption: frames travel in the clear after authentication.
    public static let none = CipherSuite(rawValue: 0)
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
