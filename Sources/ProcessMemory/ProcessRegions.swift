/// One mapping of another process, as a line of `/proc/PID/maps` describes it.
public struct MemoryRegion: Hashable, Sendable, CustomStringConvertible {
    /// What backs a mapping, for choosing guest memory.
    public enum Kind: String, Sendable {
        /// Private anonymous memory (no path, `[heap]`, `[anon:NAME]`): where most VMMs keep guest RAM.
        case anonymous
        /// Shared memory: `/memfd:NAME`, `/dev/shm/NAME`, `/SYSV...` (shmem; needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM).
        case shmem
        /// A regular file mapping (libraries, the executable, data files).
        case file
        /// `[stack]`, `[vvar]`, `[vdso]`, `[vsyscall]` and other kernel-provided mappings.
        case special
    }

    public var range: AddressRange
    public var readable: Bool
    public var writable: Bool
    public var executable: Bool
    /// `p` (private, copy-on-write) rather than `s` (shared).
    public var isPrivate: Bool
    public var offset: UInt64
    public var inode: UInt64
    /// The path or pseudo-name, empty for plain anonymous memory.
    public var path: String
    public var kind: Kind

    public var description: String {
        "\(range) \(readable ? "r" : "-")\(writable ? "w" : "-")\(executable ? "x" : "-")\(isPrivate ? "p" : "s") \(kind.rawValue) \(path)"
    }

    /// True for what Ferry migrates by default: writable private anonymous memory, and memfd/shmem mappings.
    public var isGuestMemoryCandidate: Bool {
        guard readable, writable else { return false }
        switch kind {
        case .anonymous: return isPrivate
        case .shmem: return true
        case .file, .special: return false
        }
    }

    /// Parses one line of `/proc/PID/maps`: `start-end perms offset dev inode [path]`.
    public init(mapsLine line: Substring) throws(ProcessMemoryError) {
        let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard fields.count >= 5, fields[1].utf8.count == 4 else {
            throw ProcessMemoryError("malformed /proc/PID/maps line '\(line)'")
        }
        range = try AddressRange(parsing: fields[0])
        let perms = Array(fields[1].utf8)
        readable = perms[0] == UInt8(ascii: "r")
        writable = perms[1] == UInt8(ascii: "w")
        executable = perms[2] == UInt8(ascii: "x")
        isPrivate = perms[3] == UInt8(ascii: "p")
        offset = UInt64(fields[2], radix: 16) ?? 0
        inode = UInt64(fields[4]) ?? 0
        path = fields.count > 5 ? String(fields[5].drop(while: { $0 == " " })) : ""
        if path.isEmpty || path == "[heap]" || path.hasPrefix("[anon:") {
            kind = .anonymous
        } else if path.hasPrefix("/memfd:") || path.hasPrefix("/dev/shm/") || path.hasPrefix("/SYSV") {
            kind = .shmem
        } else if path.hasPrefix("[") {
            kind = .special
        } else {
            kind = .file
        }
    }
}

/// The memory map of another process (`/proc/PID/maps`) and the choice of its guest-memory regions.
///
/// Default choice: writable private anonymous mappings and memfd/shmem mappings, largest first; `[stack]`,
/// `[vvar]`, `[vdso]` and file-backed mappings are skipped. `select(ranges:)` takes an explicit list
/// (`--region START-END`), each of which must lie inside the process's mappings.
public struct ProcessRegions: Sendable {
    public let pid: Int32
    /// Every mapping, in address order.
    public let all: [MemoryRegion]

    /// Reads and parses /proc/PID/maps. Errors: ESRCH "no process PID", EACCES/EPERM for missing permission.
    public init(pid: Int32) throws(ProcessMemoryError) {
        guard pid > 0 else { throw ProcessMemoryError("no process \(pid): a PID must be positive", errno: .noSuchProcess) }
        self.pid = pid
        let text = try ProcFiles.readText(pid: pid, "maps")
        var regions: [MemoryRegion] = []
        for line in text.split(separator: "\n") where !line.isEmpty {
            regions.append(try MemoryRegion(mapsLine: line))
        }
        all = regions
    }

    /// Guest-memory candidates, largest first; those smaller than `minimumSize` bytes are left out.
    public func guestMemory(minimumSize: UInt64 = 0) -> [MemoryRegion] {
        all.filter { $0.isGuestMemoryCandidate && $0.range.length >= minimumSize }
            .sorted { $0.range.length != $1.range.length ? $0.range.length > $1.range.length : $0.range.start < $1.range.start }
    }

    /// The regions named explicitly (`--region START-END`): each must be page-aligned and covered by mappings
    /// of the process; the result keeps the caller's order, with the kind of the mapping holding each start.
    public func select(ranges: [AddressRange], pageSize: UInt64 = 4096) throws(ProcessMemoryError) -> [MemoryRegion] {
        var chosen: [MemoryRegion] = []
        for r in ranges {
            guard r.start % pageSize == 0, r.end % pageSize == 0 else {
                throw ProcessMemoryError("region \(r) is not aligned to the \(pageSize)-byte page size")
            }
            // Walk the mappings covering [start, end) with no gap.
            var cursor = r.start
            var first: MemoryRegion?
            for m in all where m.range.end > cursor && m.range.start <= cursor && cursor < r.end {
                if first == nil { first = m }
                cursor = m.range.end
            }
            guard var region = first, cursor >= r.end else {
                throw ProcessMemoryError("region \(r) is not mapped in process \(pid) (mapped up to \(hex(cursor)))",
                                         errno: .badAddress)
            }
            region.range = r
            chosen.append(region)
        }
        return chosen
    }

    /// The start of the first executable mapping (where a syscall can be injected, as CRIU's compel does).
    public var firstExecutableAddress: UInt64? {
        all.first { $0.executable && $0.kind == .file }?.range.start ?? all.first { $0.executable && $0.path != "[vsyscall]" }?.range.start
    }
}
