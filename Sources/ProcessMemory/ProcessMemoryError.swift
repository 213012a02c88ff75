import SystemPackage

/// The one error type of ProcessMemory: what failed, the numbers involved, and the kernel's errno.
///
/// `message` is meant for an operator's log ("process_vm_readv of 0x7f0000000000+65536 in pid 4242 failed");
/// `errno` is the kernel's reason when a system call failed, `nil` for a malformed input.
public struct ProcessMemoryError: Error, Sendable, CustomStringConvertible {
    /// The kernel's error code, when a system call failed.
    public var errno: Errno?
    /// What failed, with the numbers involved.
    public var message: String
    /// Set when Ferry refused to inject a system call into a process (its seccomp filter, a zombie, another
    /// tracer) before touching it: `errno` is nil then, the decision is Ferry's.
    public var refusal: InjectionRefusal?

    public init(_ message: String, errno: Errno? = nil) {
        self.message = message
        self.errno = errno
    }

    /// Builds an error from a shim's negative return value (-errno).
    init(_ message: String, negated code: some BinaryInteger) {
        self.init(message, errno: Errno(rawValue: -CInt(truncatingIfNeeded: code)))
    }

    public var description: String {
        if let errno { return "\(message): \(errno) (errno \(errno.rawValue))" }
        return message
    }
}

@inline(__always)
func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
