import SystemPackage

/// Why an io_uring operation could not be queued or submitted.
///
/// `submissionQueueFull` is back-pressure, not a failure: reap completions with
/// ``IORing/drainCompletions(_:)`` or wait with ``IORing/submitAndWait(_:)``, then retry.
public enum IORingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Every submission slot is taken even after submitting what was queued.
    case submissionQueueFull
    /// The kernel refused a call; the errno says why.
    case system(Errno)

    public var description: String {
        switch self {
        case .submissionQueueFull:
            return "io_uring submission queue full: reap completions before queueing more"
        case .system(let errno):
            return "io_uring: \(errno) (errno \(errno.rawValue))"
        }
    }
}
