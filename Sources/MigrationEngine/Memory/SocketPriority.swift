import Foundation
import Glibc

/// Marks the urgent lane's sockets with `SO_PRIORITY` (TC_PRIO_INTERACTIVE, 6, by default), so a
/// priority queue at the bottleneck (pfifo_fast's band 0, a WAN router's expedited class) sends
/// page requests and replies ahead of the bulk push, as QEMU's postcopy-preempt channel intends.
enum SocketPriority {
    /// TC_PRIO_INTERACTIVE: band 0 of pfifo_fast's default priomap.
    static let interactive: Int32 = 6

    /// The descriptors of this process that are sockets (readlink of /proc/self/fd/N is "socket:[...]").
    static func socketDescriptors() -> Set<Int32> {
        var result = Set<Int32>()
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return result }
        var target = [CChar](repeating: 0, count: 64)
        for entry in entries {
            guard let fd = Int32(entry) else { continue }
            let n = readlink("/proc/self/fd/\(entry)", &target, target.count - 1)
            guard n > 0 else { continue }
            target[n] = 0
            if String(cString: target).hasPrefix("socket:") { result.insert(fd) }
        }
        return result
    }

    /// Sets `SO_PRIORITY` on `fd`. The corresponding C function is `setsockopt`.
    static func set(_ fd: Int32, priority: Int32) -> Bool {
        var value = priority
        return setsockopt(fd, SOL_SOCKET, SO_PRIORITY, &value, socklen_t(MemoryLayout<Int32>.size)) == 0
    }
}
