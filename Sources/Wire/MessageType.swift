/// The one-byte message type in a frame header, grouped by phase (see docs/wire.md).
public enum MessageType: UInt8, CaseIterable, Sendable {
    // Handshake and authentication.
    case hello = 0x01
    case helloAck = 0x02
    case auth = 0x03
    case challenge = 0x04
    // Disk.
    case diskLayout = 0x10
    case diskExtents = 0x11
    case diskFetch = 0x12
    case diskReply = 0x13
    case diskSkip = 0x14
    case diskHeld = 0x15
    // Memory.
    case memoryLayout = 0x20
    case pageBatch = 0x21
    case pageRequest = 0x22
    case pageReply = 0x23
    case pageDiscard = 0x24
    // Phases.
    case roundEnd = 0x30
    case switchover = 0x31
    case vmState = 0x32
    case complete = 0x33
    case resumed = 0x34
    // Control.
    case ack = 0x40
    case keepalive = 0x41
    case error = 0x42
    // Network.
    case tunnelFrames = 0x50

    /// Whether frames of this type travel on the urgent lane by default
    /// (the post-copy requests, their replies, and `diskSkip`).
    public var isUrgentByDefault: Bool {
        switch self {
        case .diskFetch, .diskReply, .diskSkip, .pageRequest, .pageReply: return true
        default: return false
        }
    }
}
