/// What every dirty-page tracker offers the migration engine: pages written since the previous scan.
///
/// Implementations: `DirtyTracker` (kernel tracking: injected userfaultfd, WP_ASYNC, PAGEMAP_SCAN) and
/// `HashDirtyTracker` (content hashing, the fallback). `AnyDirtyPageTracker.attach` picks the best available.
public protocol DirtyPageTracker: ~Copyable {
    /// A short name of the method, for the agent's log ("uffd-wp-async+pagemap-scan" or "content-hash").
    var method: String { get }
    /// The regions tracked.
    var regions: [MemoryRegion] { get }
    /// Replaces the contents of `runs` with the pages written since the previous scan. The first scan reports every
    /// page of the regions (use `ProcessMemoryReader.residency` to skip pages never touched).
    mutating func scanDirty(into runs: inout PageRunBuffer) throws(ProcessMemoryError)
    /// Stops tracking and releases the kernel resources.
    consuming func detach() throws(ProcessMemoryError)
}

/// Either tracker, chosen at attach time: the kernel method when this kernel and target allow it, else hashing.
public enum AnyDirtyPageTracker: ~Copyable, DirtyPageTracker {
    case kernel(DirtyTracker)
    case hash(HashDirtyTracker)

    /// For the content-hash tracker, where the sender records what it sent (nil for the kernel
    /// tracker, which sees writes themselves).
    public var sentHashes: SentPageHashes? {
        switch self {
        case .hash(let tracker): return tracker.sentHashes
        case .kernel: return nil
        }
    }

    /// Attaches the kernel tracker; if that fails (old kernel, no ptrace permission, a seccomp'd target), attaches
    /// the content-hash tracker and sets `fallbackReason` to the kernel tracker's error (nil when it succeeded).
    public static func attach(pid: Int32, regions: [MemoryRegion],
                              fallbackReason: inout ProcessMemoryError?) throws(ProcessMemoryError) -> AnyDirtyPageTracker {
        do {
            let t = try DirtyTracker(pid: pid, regions: regions)
            fallbackReason = nil
            return .kernel(t)
        } catch {
            fallbackReason = error
            return .hash(try HashDirtyTracker(pid: pid, regions: regions))
        }
    }

    public var method: String {
        switch self {
        case .kernel(let t): return t.method
        case .hash(let t): return t.method
        }
    }

    public var regions: [MemoryRegion] {
        switch self {
        case .kernel(let t): return t.regions
        case .hash(let t): return t.regions
        }
    }

    public mutating func scanDirty(into runs: inout PageRunBuffer) throws(ProcessMemoryError) {
        switch consume self {
        case .kernel(var t):
            var failure: ProcessMemoryError?
            do { try t.scanDirty(into: &runs) } catch { failure = error }
            self = .kernel(t)
            if let failure { throw failure }
        case .hash(var t):
            var failure: ProcessMemoryError?
            do { try t.scanDirty(into: &runs) } catch { failure = error }
            self = .hash(t)
            if let failure { throw failure }
        }
    }

    /// The kernel tracker's dirty limit, once engaged.
    public var dirtyLimit: DirtyLimit? {
        switch self {
        case .kernel(let t): return t.dirtyLimit
        case .hash: return nil
        }
    }

    /// Engages or sets the kernel tracker's dirty limit (``DirtyTracker/throttleWrites(bytesPerSecond:)``); the
    /// content-hash tracker has none.
    public mutating func throttleWrites(bytesPerSecond: UInt64) throws(ProcessMemoryError) {
        switch consume self {
        case .kernel(var t):
            var failure: ProcessMemoryError?
            do { try t.throttleWrites(bytesPerSecond: bytesPerSecond) } catch { failure = error }
            self = .kernel(t)
            if let failure { throw failure }
        case .hash(let t):
            self = .hash(t)
            throw ProcessMemoryError("the write-protect throttle needs kernel dirty tracking; this process is tracked by content hashing")
        }
    }

    public consuming func detach() throws(ProcessMemoryError) {
        switch consume self {
        case .kernel(let t): try t.detach()
        case .hash(let t): try t.detach()
        }
    }
}
