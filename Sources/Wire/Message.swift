/// Every message of the Ferry migration protocol, one case per ``MessageType``.
///
/// Cases that carry bulk bytes (`diskExtents`, `diskReply`, `pageBatch`, `pageReply`, `vmState`)
/// hold a ``Payload``: a view, not a copy. A decoded message is valid only while the buffer it was
/// decoded from is; copy what you keep. Frame layouts are in docs/wire.md.
public enum Message: Equatable, Sendable {
    /// The connecting side's opening (normally the source): versions, features, session, nonce.
    case hello(Hello)
    /// The listener's fresh nonce, the only answer to `hello` before the connector has proved the key.
    case challenge(nonce: Nonce)
    /// The connecting side's proof of the key (over its hello and the challenge).
    case auth(proof: Bytes32)
    /// The listener's answer once `auth` verified: what it accepts, and its proof over the whole exchange.
    case helloAck(Hello, proof: Bytes32)
    /// A disk to be migrated.
    case diskLayout(DiskLayout)
    /// Disk data and zero extents: bulk copy (round 0) or dirty-block deltas (round ≥ 1).
    case diskExtents(DiskExtents)
    /// Urgent: the destination needs a disk range now (disk post-copy).
    case diskFetch(DiskFetch)
    /// Urgent: the answer to `diskFetch`.
    case diskReply(requestID: UInt64, extents: DiskExtents)
    /// Urgent: the destination wrote this range itself (disk post-copy); the source need not send it.
    case diskSkip(DiskRange)
    /// What the destination already holds of a disk: the SHA-256 of each block of its base image.
    case diskHeld(DiskHeld)
    /// The memory to be migrated.
    case memoryLayout(GuestMemoryLayout)
    /// Memory pages: data runs and zero runs.
    case pageBatch(PageBatch)
    /// Urgent: the destination's VM faulted on pages that have not arrived (post-copy).
    case pageRequest(PageRequest)
    /// Urgent: the answer to `pageRequest`.
    case pageReply(requestID: UInt64, batch: PageBatch)
    /// Hybrid post-copy: the destination's copies of these pages are stale; drop them, they come again.
    case pageDiscard(PageRange)
    /// The end of a round of one stream.
    case roundEnd(RoundEnd)
    /// The source has paused the VM: what is still to come.
    case switchover(Switchover)
    /// A chunk of the opaque VM-state blob.
    case vmState(VMStateChunk)
    /// The end: digests to compare.
    case complete(Completion)
    /// The destination has resumed the VM: from now on it owns the VM.
    case resumed(VMResumed)
    /// Acknowledgement for flow control and resume.
    case ack(Ack)
    /// Liveness probe or echo, for RTT.
    case keepalive(Keepalive)
    /// An error with a code and a reason.
    case error(ErrorMessage)
    /// The VM's Ethernet frames, over the tunnel lane.
    case tunnelFrames(TunnelFrames)

    /// The header type of this message.
    public var type: MessageType {
        switch self {
        case .hello: return .hello
        case .helloAck: return .helloAck
        case .auth: return .auth
        case .challenge: return .challenge
        case .diskLayout: return .diskLayout
        case .diskExtents: return .diskExtents
        case .diskFetch: return .diskFetch
        case .diskReply: return .diskReply
        case .diskSkip: return .diskSkip
        case .diskHeld: return .diskHeld
        case .memoryLayout: return .memoryLayout
        case .pageBatch: return .pageBatch
        case .pageRequest: return .pageRequest
        case .pageReply: return .pageReply
        case .pageDiscard: return .pageDiscard
        case .roundEnd: return .roundEnd
        case .switchover: return .switchover
        case .vmState: return .vmState
        case .complete: return .complete
        case .resumed: return .resumed
        case .ack: return .ack
        case .keepalive: return .keepalive
        case .tunnelFrames: return .tunnelFrames
        case .error: return .error
        }
    }

    /// The bulk bytes the message carries after its metadata (empty for most messages).
    public var payload: Payload {
        switch self {
        case .diskExtents(let m): return m.payload
        case .diskReply(_, let m): return m.payload
        case .pageBatch(let m): return m.payload
        case .pageReply(_, let m): return m.payload
        case .vmState(let m): return m.payload
        case .tunnelFrames(let m): return m.payload
        case .diskHeld(let m): return m.hashes
        default: return .empty
        }
    }
}
