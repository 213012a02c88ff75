import Foundation
import Glibc

/// This host's memory, for the limits a destination puts on what a source may ask it to hold.
public enum HostMemory {
    /// Bytes of physical RAM (`sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE)`; 1 GiB if unknown).
    static let physicalBytes: UInt64 = {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, size > 0 else { return 1 << 30 }
        return UInt64(pages) * UInt64(size)
    }()

    /// This process's peak resident set since its `exec`, in bytes (`VmHWM` of /proc/self/status;
    /// nil if unreadable). Unlike `getrusage`'s `ru_maxrss`, it leaves out the memory of the process
    /// that spawned this one, which the kernel folds into `ru_maxrss` at `exec`.
    public static func peakResidentBytes() -> UInt64? {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kilobytes = UInt64(line.dropFirst("VmHWM:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") else { return nil }
        return kilobytes << 10
    }
}
