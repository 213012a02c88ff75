import SystemPackage

/// The outcome of one io_uring operation: the caller's tag, the kernel's result and flags.
///
/// A value type copied out of the completion queue, so visiting completions allocates nothing.
/// `result` follows the kernel's convention: a byte count or descriptor when non-negative,
/// a negated errno when negative.
public struct Completion: Sendable, Equatable {
    /// The tag given when the operation was prepared.
    public let tag: UInt64
    /// Bytes moved, a new descriptor, or `-errno`.
    public let result: Int32
    /// `IORING_CQE_F_*` flags.
    public let flags: UInt32

    public init(tag: UInt64, result: Int32, flags: UInt32) {
        self.tag = tag
        self.result = result
        self.flags = flags
    }

    /// The error the operation ended with, or nil when it succeeded.
    public var errno: Errno? { result < 0 ? Errno(rawValue: -result) : nil }

    /// The result as a count of bytes (or a descriptor), throwing the operation's error.
    public func get() throws(Errno) -> Int {
        if result < 0 { throw Errno(rawValue: -result) }
        return Int(result)
    }
}
