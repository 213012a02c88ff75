import SystemPackage
import URing

/// URing's ring under a name that does not collide with swift-system's own `IORing`.
typealias Ring = URing.IORing

extension IORingError {
    /// The errno behind a ring error; a full queue reads as `EAGAIN`.
    var errno: Errno {
        switch self {
        case .system(let errno): return errno
        case .submissionQueueFull: return .resourceTemporarilyUnavailable
        }
    }
}
