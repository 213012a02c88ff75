import ArgumentParser
import Foundation
import Glibc
import Logging
import MigrationEngine
import URing

/// `source-agent --vm PID ...`: how the VM process is paused and its memory migrated.
struct MemoryOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Migrate the memory of this running process (a KVM VMM or any process).", valueName: "PID"))
    var vm: Int32?

    @Option(name: .customLong("vm-pidfile"), help: ArgumentHelp("Read the VM's PID from this file, waiting up to --vm-wait seconds for it to appear: the VMM writes it once started (QEMU's -pidfile), after it has connected to the disks served here.", valueName: "PATH"))
    var vmPidfile: String?

    @Option(name: .customLong("vm-wait"), help: "Seconds to wait for --vm-pidfile.")
    var vmWait: Double = 60

    @Option(name: .long, help: ArgumentHelp("The VMM: process (any process; SIGSTOP/SIGCONT or --pause-cmd/--resume-cmd/--state-cmd) or qemu (driven through --qmp: stop, cont, device state by migrate with x-ignore-shared; RAM found from QEMU's shared memory backends).", valueName: "KIND"))
    var vmm: String = "process"

    @Option(name: .long, help: ArgumentHelp("With --vmm qemu: QEMU's QMP socket (unix:PATH, from -qmp unix:PATH,server=on,wait=off). --vm may then be left out: the PID is the socket's peer.", valueName: "unix:PATH"))
    var qmp: String?

    @Option(name: .long, help: "precopy, postcopy or hybrid (some pre-copy rounds, then post-copy).")
    var mode: String = "precopy"

    @Option(name: .customLong("region"), help: ArgumentHelp("A memory region to migrate, START-END in hex (repeatable; default: the writable anonymous and memfd mappings of at least 1 MiB, largest first).", valueName: "START-END"))
    var regions: [String] = []

    @Option(name: .customLong("precopy-rounds"), help: "Hybrid: dirty-page rounds before switching to post-copy.")
    var precopyRounds: Int = 2

    @Option(name: .customLong("pause-cmd"), help: ArgumentHelp("Shell command that pauses the VM (default: SIGSTOP). FERRY_PID is set.", valueName: "CMD"))
    var pauseCmd: String?

    @Option(name: .customLong("resume-cmd"), help: ArgumentHelp("Shell command that resumes the VM here after a failure (default: SIGCONT).", valueName: "CMD"))
    var resumeCmd: String?

    @Option(name: .customLong("state-cmd"), help: ArgumentHelp("Shell command run at pause that writes the VM-state blob to $FERRY_STATE_FILE (or prints the path of a file holding it as its last line).", valueName: "CMD"))
    var stateCmd: String?

    @Option(name: .customLong("push-delay-target-ms"), help: "Post-copy: queueing delay the push stream may add at the bottleneck (delay-based pacing); 0: push at full speed (links that prioritise the urgent lane). Below the jitter of the path and the destination's apply time the window collapses to its 128 KiB floor (seen at 2 ms with a real VM under TCG: the push fell to ~5 MB/s on a 300 Mbit/s link).")
    var pushDelayTargetMs: Double = 10

    @Option(name: .customLong("urgent-priority"), help: "SO_PRIORITY of the urgent lane (6 = interactive band of pfifo_fast; 0: leave it).")
    var urgentPriority: Int32 = 6

    @Option(name: .long, help: "Dirty tracking: auto (kernel write-protect + PAGEMAP_SCAN, else content hashing) or hash.")
    var tracking: String = "auto"

    @Option(name: .customLong("memory-throttle"), help: ArgumentHelp("When pre-copy does not converge (the VM dirties more than --throttle-above of the link), slow the VM's writers to --throttle-to of it: wp (a dirty limit: pages not yet written since the last scan are write-protected and let through at that pace; only new dirtying waits; needs kernel dirty tracking, else the migration goes on unthrottled), cpu (a cgroup CPU limit on the VM's process, as QEMU's auto-converge), or off.", valueName: "METHOD"))
    var memoryThrottle: String = "wp"

    /// Whether a VM (its memory) is part of the migration.
    var hasVM: Bool { vm != nil || vmPidfile != nil || qmp != nil }

    /// The QEMU behind --qmp, connected once (nil for --vmm process).
    func qemu(pid: Int32?, logger: Logger) throws -> QEMUSourceVM? {
        guard vmm == "qemu", let qmp else { return nil }
        let vm = try QEMUSourceVM(qmpPath: String(qmp.dropFirst("unix:".count)), expectedPID: pid, timeout: vmWait)
        logger.info("QEMU found through QMP", metadata: ["pid": "\(vm.pid)", "version": "\(vm.version)",
                                                         "ram": "\(vm.ram.map(\.description).joined(separator: "; "))"])
        return vm
    }

    /// The VM's PID: --vm, or read from --vm-pidfile once it appears.
    func resolvePID(logger: Logger) throws -> Int32? {
        if let vm { return vm }
        guard let path = vmPidfile else { return nil }
        let deadline = ContinuousClock.now + .milliseconds(Int(vmWait * 1000))
        while ContinuousClock.now < deadline {
            if let text = try? String(contentsOfFile: path, encoding: .utf8),
               let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 {
                guard kill(pid, 0) == 0 || errno == EPERM else {
                    throw ValidationError("--vm-pidfile \(path) names PID \(pid), which is not running")
                }
                logger.info("the VM's PID", metadata: ["pid": "\(pid)", "pidfile": "\(path)"])
                return pid
            }
            usleep(50_000)
        }
        throw ValidationError("--vm-pidfile \(path) did not name a PID within \(Int(vmWait)) s")
    }

    func validate() throws {
        if vm != nil && vmPidfile != nil { throw ValidationError("give --vm PID or --vm-pidfile PATH, not both") }
        if vmm != "process" && vmm != "qemu" { throw ValidationError("--vmm must be process or qemu, not '\(vmm)'") }
        if vmm == "qemu" {
            guard let qmp, qmp.hasPrefix("unix:"), qmp.count > 5 else { throw ValidationError("--vmm qemu needs --qmp unix:PATH (QEMU's -qmp unix:PATH,server=on,wait=off)") }
            if pauseCmd != nil || resumeCmd != nil || stateCmd != nil { throw ValidationError("--vmm qemu pauses, resumes and saves the VM through QMP: leave out --pause-cmd, --resume-cmd and --state-cmd") }
            if !regions.isEmpty { throw ValidationError("--vmm qemu finds the guest RAM from QEMU's memory backends: leave out --region") }
        } else if qmp != nil {
            throw ValidationError("--qmp goes with --vmm qemu")
        }
        guard hasVM else { return }
        if MemoryMigrationMode(rawValue: mode) == nil { throw ValidationError("--mode must be precopy, postcopy or hybrid, not '\(mode)'") }
        if tracking != "auto" && tracking != "hash" { throw ValidationError("--tracking must be auto or hash, not '\(tracking)'") }
        if MemoryThrottleMethod(rawValue: memoryThrottle) == nil { throw ValidationError("--memory-throttle must be wp, cpu or off, not '\(memoryThrottle)'") }
        if precopyRounds < 0 { throw ValidationError("--precopy-rounds must not be negative") }
        if (pauseCmd == nil) != (resumeCmd == nil) {
            throw ValidationError("--pause-cmd and --resume-cmd go together: a VM paused through its VMM's API is not resumed by SIGCONT")
        }
        if let bad = regions.first(where: { $0.split(separator: "-").count != 2 }) {
            throw ValidationError("--region \(bad): expected START-END in hex")
        }
    }

    /// The memory stream's options, or nil without --vm.
    func streamOptions(pid: Int32?, qemu: QEMUSourceVM?) throws -> MemoryStreamOptions? {
        guard let pid = qemu?.pid ?? pid else { return nil }
        var options = MemoryStreamOptions(pid: pid)
        options.mode = MemoryMigrationMode(rawValue: mode)!
        if let qemu { options.regions = qemu.ram.map(\.range) } else { try options.setRegions(parsing: regions) }
        options.precopyRounds = precopyRounds
        options.pushDelayTarget = pushDelayTargetMs / 1000
        options.urgentPriority = urgentPriority
        options.contentHashTracking = tracking == "hash"
        options.throttle = MemoryThrottleMethod(rawValue: memoryThrottle) ?? .off
        return options
    }

    /// How the VM is paused, resumed after a failure and asked for its state; nil without --vm.
    func vmControl(pid: Int32?, qemu: QEMUSourceVM?) -> VMControl? {
        if let qemu { return VMControl(qemu: qemu) }
        return pid.map { VMControl(pid: $0, pauseCommand: pauseCmd, resumeCommand: resumeCmd, stateCommand: stateCmd) }
    }
}
