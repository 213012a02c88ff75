import CFerryTestShims
import Glibc

/// The page-cache state of a file range (cachestat(2), Linux 6.5+): how many of its pages are
/// cached, dirty (written, not yet on the device) and under writeback. Lets a test see whether a
/// flush really reached the device, which reading the data back cannot show.
public struct PageCacheState: Sendable, Equatable, CustomStringConvertible {
    public var cached: UInt64
    public var dirty: UInt64
    public var writeback: UInt64

    /// The state of `[offset, offset+length)` of the file at `path` (length 0: to the end).
    /// Throws with the errno when the kernel has no cachestat (ENOSYS) or the file cannot be opened.
    public init(path: String, offset: UInt64 = 0, length: UInt64 = 0) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SupportError("open \(path) for cachestat failed: errno \(errno)") }
        defer { close(fd) }
        var out = ferry_cachestat()
        let r = ferry_test_cachestat(fd, offset, length, &out)
        guard r == 0 else { throw SupportError("cachestat of \(path) [\(offset), +\(length)) failed: errno \(-r)") }
        cached = out.nr_cache
        dirty = out.nr_dirty
        writeback = out.nr_writeback
    }

    /// Whether this kernel has cachestat(2) (probes /proc/self/exe).
    public static var isAvailable: Bool {
        let fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var out = ferry_cachestat()
        return ferry_test_cachestat(fd, 0, 4096, &out) == 0
    }

    public var description: String { "\(cached) pages cached, \(dirty) dirty, \(writeback) under writeback" }
}
