import CFerryShims
import SystemPackage

/// An owned userfaultfd descriptor and its ioctls: the kernel object behind both dirty tracking
/// (write-protect mode) and the destination's fault service (missing mode).
///
/// Noncopyable: closing it ends every registration made through it (unless another copy of the descriptor is open,
/// as after `pidfd_getfd`: the registration lives while any copy does).
public struct Userfaultfd: ~Copyable {
    /// The feature bits Ferry asks for (`UFFD_FEATURE_*`).
    public struct Features: OptionSet, Sendable, CustomStringConvertible {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// UFFD_FEATURE_EVENT_REMOVE (1<<3): madvise(MADV_DONTNEED/REMOVE) arrives as an event.
        public static let eventRemove = Features(rawValue: UInt64(FERRY_UFFD_FEATURE_EVENT_REMOVE))
        /// UFFD_FEATURE_MISSING_SHMEM (1<<5): missing mode on shmem (tmpfs, memfd) mappings.
        public static let missingShmem = Features(rawValue: 1 << 5)
        /// UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1<<12): write-protect mode on shmem and hugetlbfs.
        public static let wpHugetlbfsShmem = Features(rawValue: UInt64(FERRY_UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
        /// UFFD_FEATURE_WP_UNPOPULATED (1<<13): write-protect also pages never touched.
        public static let wpUnpopulated = Features(rawValue: UInt64(FERRY_UFFD_FEATURE_WP_UNPOPULATED))
        /// UFFD_FEATURE_WP_ASYNC (1<<15): writes to protected pages resolve in the kernel and are only recorded.
        public static let wpAsync = Features(rawValue: UInt64(FERRY_UFFD_FEATURE_WP_ASYNC))
        public var description: String { hex(rawValue) }
    }

    /// Registration modes (`UFFDIO_REGISTER_MODE_*`).
    public struct Mode: OptionSet, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let missing = Mode(rawValue: UInt64(FERRY_UFFDIO_REGISTER_MODE_MISSING))
        public static let writeProtect = Mode(rawValue: UInt64(FERRY_UFFDIO_REGISTER_MODE_WP))
    }

    /// How an UFFDIO_COPY ended.
    public enum CopyOutcome: Sendable, Equatable {
        /// The page was installed and the waiting threads woken.
        case copied
        /// The page was already there (EEXIST: another resolver won the race): not an error.
        case alreadyPresent
        /// EAGAIN: the mm changed (a REMOVE/UNMAP event is queued): read events, then retry.
        case retry
    }

    public let descriptor: FileDescriptor

    /// Takes ownership of an open userfaultfd.
    public init(adopting descriptor: FileDescriptor) { self.descriptor = descriptor }

    /// Creates a userfaultfd in this process (flags O_CLOEXEC|O_NONBLOCK, plus UFFD_USER_MODE_ONLY when not root).
    /// The corresponding system call is `userfaultfd`.
    public static func create(nonBlocking: Bool = true, userModeOnly: Bool = false) throws(ProcessMemoryError) -> Userfaultfd {
        var flags: CInt = 0o2000000 // O_CLOEXEC
        if nonBlocking { flags |= 0o4000 } // O_NONBLOCK
        if userModeOnly { flags |= 1 } // UFFD_USER_MODE_ONLY
        let fd = ferry_userfaultfd(flags)
        guard fd >= 0 else {
            throw ProcessMemoryError("userfaultfd(flags \(hex(UInt64(flags)))) failed (vm.unprivileged_userfaultfd=0 needs root or UFFD_USER_MODE_ONLY)",
                                     negated: fd)
        }
        return Userfaultfd(adopting: FileDescriptor(rawValue: fd))
    }

    deinit { try? descriptor.close() }

    /// Closes the descriptor now, reporting an error if close fails.
    public consuming func close() throws(ProcessMemoryError) {
        let fd = descriptor
        discard self
        do { try fd.close() } catch { throw ProcessMemoryError("close of userfaultfd \(fd.rawValue) failed", errno: error as? Errno) }
    }

    /// Gives up ownership without closing (the caller takes the descriptor).
    public consuming func release() -> FileDescriptor {
        let fd = descriptor
        discard self
        return fd
    }

    /// Negotiates the API and features; returns the feature mask the kernel granted, and fails unless every
    /// feature in `required` was granted (older kernels silently drop features they lack).
    /// The corresponding ioctl is `UFFDIO_API`.
    @discardableResult
    public func handshake(requesting features: Features, required: Features? = nil) throws(ProcessMemoryError) -> Features {
        var granted: UInt64 = 0
        let r = ferry_uffdio_api(descriptor.rawValue, features.rawValue, &granted, nil)
        guard r == 0 else { throw ProcessMemoryError("UFFDIO_API with features \(features) failed", negated: r) }
        let got = Features(rawValue: granted)
        let need = required ?? features
        guard got.isSuperset(of: need) else {
            throw ProcessMemoryError("UFFDIO_API granted features \(got) lacking \(Features(rawValue: need.rawValue & ~granted)) of the \(need) required",
                                     errno: .notSupported)
        }
        return got
    }

    /// Registers a page-aligned range. The corresponding ioctl is `UFFDIO_REGISTER`.
    public func register(_ range: AddressRange, mode: Mode) throws(ProcessMemoryError) {
        var ioctls: UInt64 = 0
        let r = ferry_uffdio_register(descriptor.rawValue, range.start, range.length, mode.rawValue, &ioctls)
        guard r == 0 else {
            throw ProcessMemoryError("UFFDIO_REGISTER of \(range) (\(range.length >> 20) MiB) mode \(mode.rawValue) failed"
                                     + (r == -16 ? " (EBUSY: another userfaultfd still holds this range)" : ""), negated: r)
        }
    }

    /// Unregisters a range. The corresponding ioctl is `UFFDIO_UNREGISTER`.
    public func unregister(_ range: AddressRange) throws(ProcessMemoryError) {
        let r = ferry_uffdio_unregister(descriptor.rawValue, range.start, range.length)
        guard r == 0 else { throw ProcessMemoryError("UFFDIO_UNREGISTER of \(range) failed", negated: r) }
    }

    /// Installs `source` (whole pages) at `address` and wakes the faulting threads. EEXIST is `.alreadyPresent`,
    /// EAGAIN is `.retry`. The corresponding ioctl is `UFFDIO_COPY`.
    @inline(__always)
    public func copy(_ source: UnsafeRawBufferPointer, to address: UInt64, writeProtect: Bool = false) throws(ProcessMemoryError) -> CopyOutcome {
        var copied: Int64 = 0
        let r = ferry_uffdio_copy(descriptor.rawValue, address, source.baseAddress, UInt64(source.count), writeProtect ? 2 : 0, &copied)
        switch r {
        case 0: return .copied
        case -17: return .alreadyPresent // EEXIST
        case -11: return .retry // EAGAIN
        default:
            throw ProcessMemoryError("UFFDIO_COPY of \(source.count) bytes to \(hex(address)) failed (copied \(copied))", negated: r)
        }
    }

    /// Maps zero pages over `range` and wakes the faulting threads (EEXIST is `.alreadyPresent`).
    /// The corresponding ioctl is `UFFDIO_ZEROPAGE`.
    @inline(__always)
    public func zero(_ range: AddressRange) throws(ProcessMemoryError) -> CopyOutcome {
        var zeroed: Int64 = 0
        let r = ferry_uffdio_zeropage(descriptor.rawValue, range.start, range.length, 0, &zeroed)
        switch r {
        case 0: return .copied
        case -17: return .alreadyPresent
        case -11: return .retry
        default: throw ProcessMemoryError("UFFDIO_ZEROPAGE of \(range) failed (zeroed \(zeroed))", negated: r)
        }
    }

    /// Wakes threads waiting on faults in `range`. The corresponding ioctl is `UFFDIO_WAKE`.
    public func wake(_ range: AddressRange) throws(ProcessMemoryError) {
        let r = ferry_uffdio_wake(descriptor.rawValue, range.start, range.length)
        guard r == 0 else { throw ProcessMemoryError("UFFDIO_WAKE of \(range) failed", negated: r) }
    }

    /// Reads up to `events.count` (at most 64) pending events without blocking (the descriptor is O_NONBLOCK);
    /// returns how many were read, 0 when none is pending. The corresponding system call is `read`.
    @inline(__always)
    public func readEvents(into events: UnsafeMutableBufferPointer<ferry_uffd_event>) throws(ProcessMemoryError) -> Int {
        let n = ferry_uffd_read_events(descriptor.rawValue, events.baseAddress, CInt(min(events.count, 64)))
        guard n >= 0 else { throw ProcessMemoryError("read of userfaultfd \(descriptor.rawValue) events failed", negated: n) }
        return Int(n)
    }
}
