import SystemPackage
import Wire

/// Why the migration link failed: the socket, the peer's frames, the peer's word, or the clock.
public enum LinkError: Error, Sendable, CustomStringConvertible {
    /// A socket call failed (`ECONNRESET`, `EPIPE`, `ECONNREFUSED`, ...).
    case socket(Errno, during: String)
    /// This side cannot go on (it tells the peer with this code).
    case local(ErrorCode, reason: String)
    /// Reading or writing local storage failed: not cured by reconnecting.
    case storage(Errno, during: String)
    /// The peer closed the connection.
    case closed(during: String)
    /// The peer sent bytes that are not a valid frame.
    case malformed(WireError)
    /// The peer sent a valid frame at the wrong moment.
    case unexpected(MessageType, expecting: String)
    /// The peer reported an error and will close.
    case peer(ErrorCode, reason: String)
    /// The peer refused the connection before the handshake authenticated it (a wrong key, an old
    /// version, busy): its word about the connection, never about the VM.
    case refusedByPeer(ErrorCode, reason: String)
    /// This side refused the peer's handshake (an error frame with the code was sent).
    case refused(ErrorCode, reason: String)
    /// The peer's proof of the shared key did not verify.
    case authenticationFailed(String)
    /// A sealed frame did not open: something on the path altered, replayed, reordered, dropped or
    /// injected bytes. The link is dropped and, like any dropped link, resumed on a new connection
    /// with fresh keys.
    case tampered(String)
    /// Nothing arrived within the allowed time.
    case timedOut(during: String, seconds: Double)

    /// Whether reconnecting and resuming may cure it (a dropped or silent link, not a refusal).
    public var isRetryable: Bool {
        switch self {
        case .socket, .closed, .timedOut, .tampered: return true
        case .peer(let code, _), .refusedByPeer(let code, _): return code.isRetryable
        case .malformed, .unexpected, .authenticationFailed, .refused, .storage, .local: return false
        }
    }

    public var description: String {
        switch self {
        case .socket(let errno, let during): return "link \(during): \(errno)"
        case .local(let code, let reason): return "\(reason) (\(code))"
        case .storage(let errno, let during): return "storage failure \(during): \(errno)"
        case .closed(let during): return "link closed by the peer during \(during)"
        case .malformed(let error): return "malformed frame from the peer: \(error)"
        case .unexpected(let type, let expecting): return "unexpected \(type) frame from the peer (expecting \(expecting))"
        case .peer(let code, let reason): return "peer reported \(code): \(reason)"
        case .refused(let code, let reason): return "refused the peer's handshake (\(code)): \(reason)"
        case .refusedByPeer(let code, let reason): return "the peer refused the connection (\(code)): \(reason)"
        case .authenticationFailed(let reason): return "authentication failed: \(reason)"
        case .tampered(let reason): return "link tampered with: \(reason)"
        case .timedOut(let during, let seconds): return "no frame from the peer for \(seconds) s during \(during)"
        }
    }
}

extension LinkError {
    /// The `error` frame code that tells the peer about this failure.
    public var wireCode: ErrorCode {
        switch self {
        case .local(let code, _), .refused(let code, _), .peer(let code, _), .refusedByPeer(let code, _): return code
        case .storage: return .storageFailure
        case .authenticationFailed, .tampered: return .authenticationFailed
        case .timedOut: return .timeout
        case .malformed, .unexpected: return .protocolViolation
        case .socket, .closed: return .internalError
        }
    }
}
