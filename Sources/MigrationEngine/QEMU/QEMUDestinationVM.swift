import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import QMP

/// How the destination starts a QEMU (`dest-agent --vmm qemu --vm-command CMD`).
public struct QEMUStartOptions: Sendable {
    /// The shell command that starts QEMU with `-incoming defer`, its QMP on $FERRY_QMP_SOCKET and its
    /// RAM backend on $FERRY_RAM_FILE (`memory-backend-file,...,mem-path=$FERRY_RAM_FILE,share=on`).
    public var command: String
    /// A tmpfs directory for the RAM file (missing-page service needs shmem).
    public var ramDirectory: String = "/dev/shm"

    public init(command: String) { self.command = command }
}

/// A QEMU at the destination, started before switchover as libvirt does (so its start-up is not
/// downtime): waiting in `-incoming defer`, its RAM backend on the file Ferry fills, its disks on
/// Ferry's NBD sockets (requests held until hand-over). At switchover its device state (made by
/// the source's QEMU with `x-ignore-shared`) is loaded with `migrate-incoming`, and `cont` runs it.
/// QEMU knows nothing of Ferry's memory service: in post-copy a userfaultfd is injected into it
/// (see ``MemoryDestinationStream``).
public final class QEMUDestinationVM: @unchecked Sendable {
    /// The `/bin/sh -c` that runs the command.
    public let shellPID: pid_t
    /// QEMU's PID (the QMP socket's peer).
    public let pid: Int32
    /// Where QEMU maps the RAM file.
    public let ramAddress: UInt64
    private let qmp: QMPClient
    private let logger: Logger

    /// Starts `command` with `environment` (FERRY_RAM_FILE, FERRY_QMP_SOCKET, ... set by the
    /// caller), waits up to `timeout` seconds for its monitor at `qmpPath`, and checks that it waits
    /// for an incoming migration with its RAM on `ramFile` (`ramSize` bytes). The QEMU is killed
    /// again when any check fails.
    public init(command: String, environment: [String: String], qmpPath: String, ramFile: String, ramSize: UInt64,
                timeout: Double, logger: Logger) throws {
        self.logger = logger
        let shell = try ShellCommand.start(command, environment: environment)
        shellPID = shell
        var client: QMPClient? = nil
        let deadline = ferry_monotonic_ns() + UInt64(timeout * 1e9)
        do {
            while client == nil {
                var status: Int32 = 0
                if waitpid(shell, &status, WNOHANG) == shell, status != 0 {
                    throw SetupError("--vm-command exited (" + (status & 0x7f == 0 ? "status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)")
                                     + ") before QEMU's monitor came up at \(qmpPath)")
                }
                if access(qmpPath, F_OK) == 0 { client = try? QMPClient(path: qmpPath, timeout: 2) }
                if client == nil {
                    guard ferry_monotonic_ns() < deadline else {
                        throw SetupError("QEMU's monitor did not come up at $FERRY_QMP_SOCKET (\(qmpPath)) within \(Int(timeout)) s: "
                                         + "start QEMU with -qmp unix:$FERRY_QMP_SOCKET,server=on,wait=off")
                    }
                    usleep(20_000)
                }
            }
            let qmp = client!
            pid = qmp.peerPID
            let status = ((try qmp.execute("query-status")) as? [String: Any])?["status"] as? String ?? "?"
            guard status == "inmigrate" else {
                throw SetupError("QEMU is '\(status)', not waiting for a migration: start it with -incoming defer")
            }
            _ = try qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
            let resolved = (ramFile as NSString).resolvingSymlinksInPath
            let maps = try ProcessRegions(pid: pid)
            guard let mapping = maps.all.first(where: {
                $0.path == resolved && $0.offset == 0 && $0.range.length == ramSize && !$0.isPrivate && $0.writable
            }) else {
                throw SetupError("QEMU (PID \(pid)) does not map $FERRY_RAM_FILE as its RAM: use -object memory-backend-file,id=ram,"
                                 + "size=$FERRY_RAM_SIZE,mem-path=$FERRY_RAM_FILE,share=on -machine memory-backend=ram")
            }
            ramAddress = mapping.range.start
            self.qmp = qmp
            logger.info("QEMU waits for the migration", metadata: ["pid": "\(pid)", "version": "\(qmp.version)",
                                                                   "ram": "\(mapping.range)", "qmp": "\(qmpPath)"])
        } catch {
            client?.close()
            Self.kill(shell: shell, qemu: client?.peerPID ?? 0)
            throw error
        }
    }

    /// Loads the device state from `statePath` (QMP `getfd` + `migrate-incoming fd:`) and waits,
    /// up to `timeout` seconds, for QEMU to report it `completed`; then runs the guest (`cont`).
    public func loadStateAndRun(statePath: String, timeout: Double = 60) throws {
        let fd = open(statePath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SetupError("cannot open the VM state \(statePath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        _ = try qmp.execute("getfd", ["fdname": "ferry-state"], passing: fd)
        _ = try qmp.execute("migrate-incoming", ["uri": "fd:ferry-state"])
        do { try qmp.waitForMigration(timeout: timeout, interval: 0.0005) } catch {
            throw SetupError("QEMU could not load the device state: \(error)")
        }
        _ = try qmp.execute("cont")
    }

    /// Has the guest's NICs announce themselves (QMP `announce-self`: RARPs from each NIC's MAC),
    /// so that the bridge here and the switches beyond it learn at once where the VM now is.
    public func announce() throws {
        _ = try qmp.execute("announce-self", QEMUAnnounce.arguments)
    }

    /// Whether QEMU still runs.
    public var isAlive: Bool { Glibc.kill(pid, 0) == 0 }

    /// Ends a QEMU that must not run here (the migration failed before hand-over).
    public func kill() {
        qmp.close()
        Self.kill(shell: shellPID, qemu: pid)
    }

    private static func kill(shell: pid_t, qemu: Int32) {
        if qemu > 0 { Glibc.kill(qemu, SIGKILL) }
        Glibc.kill(shell, SIGKILL)
        var status: Int32 = 0
        for _ in 0..<200 where waitpid(shell, &status, WNOHANG) == 0 { usleep(5_000) }
    }
}
