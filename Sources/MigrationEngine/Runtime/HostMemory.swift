import Glibc

/// This host's memory, for the limits a destination puts on what a source may ask it to hold.
enum HostMemory {
    /// Bytes of physical RAM (`sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE)`; 1 GiB if unknown).
    static let physicalBytes: UInt64 = {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, size > 0 else { return 1 << 30 }
        return UInt64(pages) * UInt64(size)
    }()
}
