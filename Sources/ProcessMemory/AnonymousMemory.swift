import CFerryShims

/// Anonymous private memory mapped at a chosen address, as a resumed VM or workload needs it at the destination
/// (the same host virtual addresses as at the source).
public enum AnonymousMemory {
    /// Maps `length` bytes of MAP_PRIVATE|MAP_ANONYMOUS read-write memory; at exactly `address` when given
    /// (MAP_FIXED_NOREPLACE: fails with EEXIST rather than replace an existing mapping). Returns the address.
    /// The corresponding system call is `mmap`.
    public static func map(length: UInt64, at address: UInt64? = nil) throws(ProcessMemoryError) -> UInt64 {
        let r = ferry_mmap_anonymous(address ?? 0, length, address == nil ? 0 : 1)
        guard r >= 0 else {
            throw ProcessMemoryError("mmap of \(length) bytes" + (address.map { " at \(hex($0)) (MAP_FIXED_NOREPLACE)" } ?? ""), negated: r)
        }
        return UInt64(r)
    }

    /// Maps `length` bytes of shared memory backed by a memfd named `name` (shown as `/memfd:NAME` in maps), as
    /// VMMs that share guest RAM do. The corresponding system calls are `memfd_create`, `ftruncate` and `mmap`.
    public static func mapMemfd(length: UInt64, name: String) throws(ProcessMemoryError) -> UInt64 {
        let r = ferry_mmap_memfd(name, length)
        guard r >= 0 else { throw ProcessMemoryError("memfd '\(name)' of \(length) bytes: memfd_create/ftruncate/mmap", negated: r) }
        return UInt64(r)
    }
}
