import SystemPackage

/// A failure in the NBD server or its block store: the errno and a message that says what failed,
/// with the numbers involved (e.g. "out-of-range read at 0x1000000+65536 beyond 16 MiB export").
public struct NBDBridgeError: Error, Sendable, CustomStringConvertible {
    /// The system error behind the failure (or the closest errno for a protocol violation).
    public let errno: Errno
    /// What failed, with the numbers.
    public let message: String

    public init(_ errno: Errno, _ message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { "\(message): \(errno) (errno \(errno.rawValue))" }
}
