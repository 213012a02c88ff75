/// Whether a hello opens a new session or resumes one after a link drop.
public enum HelloMode: UInt8, Sendable, CaseIterable {
    /// A new session: resume points are empty, the session id is fresh.
    case new = 0
    /// Reconnect after a link drop: same session id, resume points say what was acknowledged.
    case resume = 1
}

/// The last point of a stream that the sender of a hello knows was acknowledged (or received):
/// transfer restarts after it on resume.
public struct ResumePoint: Hashable, Sendable {
    /// Which stream.
    public var stream: StreamKind
    /// Disk id or region id (0 for whole-memory / control streams).
    public var streamID: UInt32
    /// Last acknowledged frame sequence number of the stream.
    public var sequence: UInt64
    /// Last acknowledged byte offset (disk) or page index (memory) of the stream.
    public var offset: UInt64

    public init(stream: StreamKind, streamID: UInt32, sequence: UInt64, offset: UInt64) {
        self.stream = stream; self.streamID = streamID; self.sequence = sequence; self.offset = offset
    }

    static let size = 24
}

/// The first frame each agent sends (`hello` from the connecting side, `helloAck` in answer):
/// versions, features, role, session, resume points and the authentication nonce.
///
/// Layout (64 bytes + 24 per resume point):
/// `u16 protocolVersion, u8 role, u8 mode, u8 cipherSuite, u8 reserved, u16 resumeCount,
///  u64 features, 16 sessionID, 32 nonce, resumeCount × (u8 stream, u8 r, u16 r, u32 streamID,
///  u64 sequence, u64 offset)`.
public struct Hello: Hashable, Sendable {
    /// Most resume points a hello may carry.
    public static let maxResumePoints = 256

    /// The protocol version this module speaks: 2 (sealed frames, connector proves first).
    public static let currentProtocolVersion: UInt16 = 3

    /// Protocol (message set) version the sender speaks; ``currentProtocolVersion`` for this module.
    public var protocolVersion: UInt16
    /// Who is speaking.
    public var role: Role
    /// New session or resume.
    public var mode: HelloMode
    /// Cipher suite that seals every frame after the handshake: proposed (hello), confirmed (helloAck).
    public var cipherSuite: CipherSuite
    /// Features offered (hello) or accepted (helloAck; a subset of the offer).
    public var features: Features
    /// The session: random for a new one, the old one on resume.
    public var sessionID: SessionID
    /// The sender's fresh random challenge for this connection (never reused, also on resume).
    public var nonce: Nonce
    /// What the sender knows was acknowledged, per stream; empty for a new session.
    public var resumePoints: [ResumePoint]

    public init(protocolVersion: UInt16 = Hello.currentProtocolVersion, role: Role, mode: HelloMode = .new,
                cipherSuite: CipherSuite = .aes256gcm, features: Features, sessionID: SessionID,
                nonce: Nonce, resumePoints: [ResumePoint] = []) {
        self.protocolVersion = protocolVersion; self.role = role; self.mode = mode
        self.cipherSuite = cipherSuite; self.features = features; self.sessionID = sessionID
        self.nonce = nonce; self.resumePoints = resumePoints
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> Hello {
        let version = try r.u16("protocolVersion")
        let roleAt = r.frameOffset
        let rawRole = try r.u8("role")
        guard let role = Role(rawValue: rawRole) else { throw r.invalid("role", rawRole, at: roleAt) }
        let modeAt = r.frameOffset
        let rawMode = try r.u8("mode")
        guard let mode = HelloMode(rawValue: rawMode) else { throw r.invalid("mode", rawMode, at: modeAt) }
        let suite = CipherSuite(rawValue: try r.u8("cipherSuite"))
        try r.reserved(1, "reserved")
        let rawCount = try r.u16("resumeCount")
        let features = Features(rawValue: try r.u64("features"))
        let session = try r.sessionID("sessionID")
        let nonce = try r.bytes32("nonce")
        let count = try r.count(rawCount, elementSize: ResumePoint.size, max: maxResumePoints,
                                "resumeCount")
        var points: [ResumePoint] = []
        points.reserveCapacity(count)
        for _ in 0..<count {
            let kindAt = r.frameOffset
            let rawKind = try r.u8("resume.stream")
            guard let kind = StreamKind(rawValue: rawKind) else { throw r.invalid("resume.stream", rawKind, at: kindAt) }
            try r.reserved(3, "resume.reserved")
            let id = try r.u32("resume.streamID")
            let seq = try r.u64("resume.sequence")
            let off = try r.u64("resume.offset")
            points.append(ResumePoint(stream: kind, streamID: id, sequence: seq, offset: off))
        }
        return Hello(protocolVersion: version, role: role, mode: mode, cipherSuite: suite,
                     features: features, sessionID: session, nonce: nonce, resumePoints: points)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if resumePoints.count > Hello.maxResumePoints {
            throw .limitExceeded(type: type, field: "resumeCount", value: resumePoints.count, max: Hello.maxResumePoints)
        }
        return 64 + ResumePoint.size * resumePoints.count
    }

    /// The hello's metadata bytes exactly as they go on the wire (what the proofs and keys cover).
    public func canonicalBytes() -> [UInt8] {
        let size = 64 + ResumePoint.size * resumePoints.count
        return [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
            var w = ByteWriter(UnsafeMutableRawBufferPointer(buffer))
            write(to: &w)
            count = size
        }
    }

    func write(to w: inout ByteWriter) {
        w.u16(protocolVersion); w.u8(role.rawValue); w.u8(mode.rawValue); w.u8(cipherSuite.rawValue)
        w.zeros(1); w.u16(UInt16(resumePoints.count)); w.u64(features.rawValue)
        w.sessionID(sessionID); w.bytes32(nonce)
        for p in resumePoints {
            w.u8(p.stream.rawValue); w.zeros(3); w.u32(p.streamID); w.u64(p.sequence); w.u64(p.offset)
        }
    }
}
