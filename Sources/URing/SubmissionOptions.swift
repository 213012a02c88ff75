import CURing

/// Per-operation flags for a submission (`IOSQE_*`).
public struct SubmissionOptions: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// The next submission starts only after this one completes successfully (`IOSQE_IO_LINK`).
    public static let linkNext = SubmissionOptions(rawValue: UInt8(1 << IOSQE_IO_LINK_BIT))
    /// This submission starts only after every earlier one completes (`IOSQE_IO_DRAIN`).
    public static let drainBefore = SubmissionOptions(rawValue: UInt8(1 << IOSQE_IO_DRAIN_BIT))
    /// Go straight to the kernel's async worker instead of trying inline (`IOSQE_ASYNC`).
    public static let forceAsync = SubmissionOptions(rawValue: UInt8(1 << IOSQE_ASYNC_BIT))
}

/// The kernel's `struct __kernel_timespec`, as io_uring timeouts take it.
public typealias KernelTimespec = __kernel_timespec

extension KernelTimespec {
    /// A timespec of `nanoseconds`.
    public init(nanoseconds: UInt64) {
        self.init(tv_sec: Int64(nanoseconds / 1_000_000_000), tv_nsec: Int64(nanoseconds % 1_000_000_000))
    }
}
