import Glibc
import ProcessMemory

/// `ferry-workload --probe-pid PID --as-user UID`: drops to an unprivileged user, then tries what an agent does to
/// a process (read its maps, open its pagemap, attach the dirty tracker) and prints each error as JSON, so a test
/// can check that missing permission gives a clear error.
enum PermissionProbe {
    static func run(pid: Int32, uid: UInt32) -> Int32 {
        guard setgroups(0, nil) == 0, setgid(uid) == 0, setuid(uid) == 0 else {
            Output.line("{\"event\":\"error\",\"message\":\"cannot drop to uid \(uid): errno \(errno)\"}")
            return 2
        }
        func entry(_ body: () throws(ProcessMemoryError) -> Void) -> String {
            do {
                try body()
                return "{\"errno\":0,\"message\":\"succeeded\"}"
            } catch {
                let message = String(error.description.map { $0 == "\"" ? "'" : $0 })
                return "{\"errno\":\(error.errno?.rawValue ?? -1),\"message\":\"\(message)\"}"
            }
        }
        let regions = entry { () throws(ProcessMemoryError) in _ = try ProcessRegions(pid: pid) }
        let reader = entry { () throws(ProcessMemoryError) in _ = try ProcessMemoryReader(pid: pid) }
        let tracker = entry { () throws(ProcessMemoryError) in
            _ = try DirtyTracker(pid: pid, regions: [try MemoryRegion(mapsLine: "7f0000000000-7f0000400000 rw-p 00000000 00:00 0")])
        }
        Output.line("{\"event\":\"probe\",\"uid\":\(getuid()),\"regions\":\(regions),\"reader\":\(reader),\"tracker\":\(tracker)}")
        return 0
    }
}
