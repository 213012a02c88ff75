import CFerryShims
import Foundation
import Glibc
import ProcessMemory
import QMP

/// The options a QEMU needs for Ferry to move its RAM, quoted in every refusal.
public enum QEMURequirements {
    public static let sharedRAM = "-object memory-backend-memfd,id=ram,size=<RAM>,share=on -machine memory-backend=ram "
        + "(or -object memory-backend-file,id=ram,size=<RAM>,mem-path=/dev/shm/<NAME>,share=on)"
}

/// A running QEMU at the source, driven through its QMP socket (`source-agent --vmm qemu --qmp
/// unix:PATH`): pause is QMP `stop`, resume after a failed migration is `cont`, and the VM-state
/// blob is QEMU's own migration stream made with the `x-ignore-shared` capability (device state
/// only: the RAM is in shared backends, which Ferry moves). The guest RAM is found from QEMU
/// itself: its memory backends (`query-memdev`, `qom-get mem-path`), then the one mapping of each
/// in QEMU's address space. RAM that is not in a shared backend is refused, with the options to use.
public final class QEMUSourceVM: @unchecked Sendable {
    /// One guest RAM backend and where QEMU maps it.
    public struct RAMBackend: Sendable, CustomStringConvertible {
        public let id: String
        public let size: UInt64
        /// The file behind it (memory-backend-file), or nil (memfd).
        public let path: String?
        public let range: AddressRange
        public var description: String { "\(id) (\(size >> 20) MiB at \(range)\(path.map { ", \($0)" } ?? ""))" }
    }

    private let qmp: QMPClient
    private let lock = NSLock()
    /// QEMU's PID (from the QMP socket's peer credentials).
    public let pid: Int32
    /// The guest RAM, one entry per backend.
    public let ram: [RAMBackend]
    public var version: String { qmp.version }

    /// Connects to QEMU's monitor at `qmpPath` and finds its RAM. `expectedPID` (from `--vm`), if
    /// given, must be the QEMU behind the socket.
    public init(qmpPath: String, expectedPID: Int32? = nil, timeout: Double = 10) throws {
        qmp = try QMPClient(path: qmpPath, timeout: timeout)
        guard qmp.peerPID > 0 else { throw SetupError("cannot tell which process serves QMP at \(qmpPath) (SO_PEERCRED)") }
        if let expectedPID, expectedPID != qmp.peerPID {
            throw SetupError("--vm \(expectedPID) is not the QEMU behind \(qmpPath) (that is PID \(qmp.peerPID))")
        }
        pid = qmp.peerPID
        ram = try Self.findRAM(qmp: qmp, pid: pid)
    }

    /// Stops the guest (QMP `stop`: vCPUs paused, in-flight block I/O drained).
    public func pause() throws {
        try lock.withLock { _ = try qmp.execute("stop") }
    }

    /// Runs the guest again here after a failed migration (QMP `cont`; it also takes the disks
    /// back from the inactive state QEMU's own migration leaves them in).
    public func resume() throws {
        try lock.withLock {
            _ = try qmp.execute("cont")
            // Its NICs tell the network it is here again (a tunnel had claimed its MAC).
            _ = try? qmp.execute("announce-self", QEMUAnnounce.arguments)
        }
    }

    /// The MAC addresses of the guest's NICs (QMP `query-rx-filter`), in QEMU's order.
    public func nicMACs() throws -> [MACAddress] {
        try lock.withLock {
            let filters = (try qmp.execute("query-rx-filter")) as? [[String: Any]] ?? []
            return filters.compactMap { ($0["main-mac"] as? String).flatMap(MACAddress.init(parsing:)) }
        }
    }

    /// Whether the guest runs (QMP `query-status`).
    public func isRunning() throws -> Bool {
        try lock.withLock { ((try qmp.execute("query-status")) as? [String: Any])?["running"] as? Bool ?? false }
    }

    /// The device state: QEMU's migration stream with `x-ignore-shared` (the shared RAM is left
    /// out), written into a memfd handed to QEMU with `getfd` and migrated to `fd:`. Waits for
    /// the migration's `completed` (at most `timeout` seconds). Call with the guest stopped.
    public func deviceState(timeout: Double = 60) throws -> [UInt8] {
        try lock.withLock {
            let memfd = ferry_memfd_create("ferry-vm-state")
            guard memfd >= 0 else { throw SetupError("memfd_create for the VM state failed: \(String(cString: strerror(-memfd)))") }
            defer { close(memfd) }
            _ = try qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
            _ = try? qmp.execute("closefd", ["fdname": "ferry-state"])   // left over by an earlier, failed attempt
            _ = try qmp.execute("getfd", ["fdname": "ferry-state"], passing: memfd)
            _ = try qmp.execute("migrate", ["uri": "fd:ferry-state"])
            do { try qmp.waitForMigration(timeout: timeout, cancelOnTimeout: true) } catch {
                throw SetupError("QEMU could not save its device state: \(error)")
            }
            let size = lseek(memfd, 0, SEEK_END)
            guard size > 0 else { throw SetupError("QEMU's device state is empty") }
            var bytes = [UInt8](repeating: 0, count: Int(size))
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeMutableBytes { pread(memfd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
                guard n > 0 else { throw SetupError("reading QEMU's device state failed: \(String(cString: strerror(errno)))") }
                done += n
            }
            return bytes
        }
    }

    /// Ends the stale copy after the VM runs at the destination (QMP `quit`), as libvirt does.
    public func quit() {
        lock.withLock { _ = try? qmp.execute("quit", timeout: 5) }
    }

    // MARK: - Finding the RAM

    static func findRAM(qmp: QMPClient, pid: Int32) throws -> [RAMBackend] {
        let memdevs = (try qmp.execute("query-memdev")) as? [[String: Any]] ?? []
        guard !memdevs.isEmpty else {
            throw SetupError("QEMU (PID \(pid)) keeps its RAM outside any memory backend, so it cannot be shared with Ferry; start it with \(QEMURequirements.sharedRAM)")
        }
        let maps = try ProcessRegions(pid: pid)
        var used = Set<UInt64>()
        var found: [RAMBackend] = []
        for memdev in memdevs {
            let id = memdev["id"] as? String ?? "?"
            let size = (memdev["size"] as? NSNumber)?.uint64Value ?? 0
            guard memdev["share"] as? Bool == true else {
                throw SetupError("QEMU's memory backend '\(id)' is not shared (share=off): its pages cannot be tracked and moved below QEMU; start it with \(QEMURequirements.sharedRAM)")
            }
            var path: String? = nil
            if let memPath = (try? qmp.execute("qom-get", ["path": "/objects/\(id)", "property": "mem-path"])) as? String {
                let type = ferry_filesystem_type(memPath)
                guard type >= 0 else { throw SetupError("memory backend '\(id)': cannot statfs its file \(memPath)") }
                guard type == 0x0102_1994 else {   // TMPFS_MAGIC
                    throw SetupError("memory backend '\(id)' is on \(memPath), which is not tmpfs (hugetlbfs and disk files are not supported); use /dev/shm or \(QEMURequirements.sharedRAM)")
                }
                path = (memPath as NSString).resolvingSymlinksInPath
            }
            let candidates = maps.all.filter { region in
                guard region.range.length == size, region.readable, region.writable, !region.isPrivate, region.offset == 0,
                      !used.contains(region.range.start) else { return false }
                if let path { return region.path == path }
                return region.path.hasPrefix("/memfd:memory-backend-memfd")
            }
            guard let mapping = candidates.first else {
                throw SetupError("memory backend '\(id)' (\(size) bytes\(path.map { ", \($0)" } ?? "")) has no matching shared mapping in QEMU's address space (PID \(pid)); supported: \(QEMURequirements.sharedRAM)")
            }
            used.insert(mapping.range.start)
            found.append(RAMBackend(id: id, size: size, path: path, range: mapping.range))
        }
        return found
    }
}

/// The arguments of QMP `announce-self`: five RARP rounds from each NIC, 50 ms apart at first
/// (QEMU's own defaults after an incoming migration).
enum QEMUAnnounce {
    static var arguments: [String: Any] { ["initial": 50, "max": 550, "rounds": 5, "step": 100] }
}
