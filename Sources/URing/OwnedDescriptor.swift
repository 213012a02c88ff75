import Glibc
import SystemPackage

/// A file descriptor with one owner: closed when the owner is done with it, never twice.
///
/// Noncopyable, so ownership is visible in the types: a function that takes one `consuming`
/// becomes its owner. ``take()`` hands the raw descriptor over without closing it.
public struct OwnedDescriptor: ~Copyable {
    /// The descriptor number; valid as long as this value lives.
    public let rawValue: Int32

    /// Takes ownership of `rawValue`.
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    deinit { _ = Glibc.close(rawValue) }

    /// Gives up ownership: the caller now closes the descriptor.
    public consuming func take() -> Int32 {
        let value = rawValue
        discard self
        return value
    }
}
