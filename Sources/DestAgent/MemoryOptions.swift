import ArgumentParser
import Foundation
import Glibc
import Logging
import MigrationEngine
import URing

/// `dest-agent`: how the memory is received and the VM started here.
struct MemoryOptions: ParsableArguments {
    @Option(name: .customLong("uffd-socket"), help: ArgumentHelp("Unix socket where the resumed VM hands over its userfaultfd (Firecracker's UFFD handshake).", valueName: "PATH"))
    var uffdSocket: String?

    @Option(name: .customLong("on-switchover"), help: ArgumentHelp("Shell command that starts the VM here once it is safe; gets FERRY_STATE_FILE, FERRY_UFFD_SOCKET, FERRY_LAYOUT_FILE, FERRY_NBD_SOCKET, FERRY_NBD_SOCKETS.", valueName: "CMD"))
    var onSwitchover: String?

    @Flag(name: .customLong("prestart-vm"), help: "Start --on-switchover's command as soon as the memory layout arrives, not at switchover: it hands over its userfaultfd then, with FERRY_PRESTART=1 in its environment, and must wait for one byte on that handshake's connection before it runs (EOF: never run; ferry-workload --resume does so). Takes the VM's start out of the downtime.")
    var prestartVM = false

    @Option(name: .customLong("mem-out"), help: ArgumentHelp("Also write the received memory as a Firecracker memory file.", valueName: "PATH"))
    var memOut: String?

    @Option(name: .customLong("prepaging-window"), help: "Pages requested around a faulting page that has not arrived (post-copy pre-paging).")
    var prepagingWindow: Int = 16

    @Option(name: .customLong("work-dir"), help: ArgumentHelp("Private work directory (made 0700) for the VM state, the layout and the hand-over journal; give one that survives a restart so a restarted agent finds its journal (default: a fresh directory under /tmp, removed afterwards).", valueName: "DIR"))
    var workDir: String?

    @Option(name: .customLong("vm-start-timeout"), help: "Seconds to wait for the started VM's UFFD handshake; after that the source is told the VM did not start (it resumes its copy).")
    var vmStartTimeout: Double = 30

    @Option(name: .customLong("urgent-priority"), help: "SO_PRIORITY of the urgent lane (6 = interactive band of pfifo_fast; 0: leave it).")
    var urgentPriority: Int32 = 6

    @Option(name: .long, help: ArgumentHelp("The VMM: process (started by --on-switchover, memory through --uffd-socket) or qemu (started by --vm-command before switchover, its device state loaded through QMP at switchover).", valueName: "KIND"))
    var vmm: String = "process"

    @Option(name: .customLong("vm-command"), help: ArgumentHelp("With --vmm qemu: shell command starting QEMU as soon as the migration begins. It must use -incoming defer, -qmp unix:$FERRY_QMP_SOCKET,server=on,wait=off, -object memory-backend-file,id=ram,size=$FERRY_RAM_SIZE,mem-path=$FERRY_RAM_FILE,share=on -machine memory-backend=ram, and its disks on $FERRY_NBD_SOCKET ($FERRY_NBD_SOCKETS); add -S so the guest runs only on Ferry's cont. See docs/qemu.md.", valueName: "CMD"))
    var vmCommand: String?

    @Option(name: .customLong("ram-dir"), help: ArgumentHelp("With --vmm qemu: tmpfs directory for the guest RAM file.", valueName: "DIR"))
    var ramDir: String = "/dev/shm"

    func validate() throws {
        if vmm != "process" && vmm != "qemu" { throw ValidationError("--vmm must be process or qemu, not '\(vmm)'") }
        if vmm == "qemu" {
            guard vmCommand != nil else { throw ValidationError("--vmm qemu needs --vm-command 'qemu-system-x86_64 ... -incoming defer ...'") }
            if onSwitchover != nil || uffdSocket != nil { throw ValidationError("--vmm qemu starts QEMU with --vm-command and serves its memory itself: leave out --on-switchover and --uffd-socket") }
        } else if vmCommand != nil {
            throw ValidationError("--vm-command goes with --vmm qemu")
        }
        if prestartVM && (onSwitchover == nil || uffdSocket == nil) {
            throw ValidationError("--prestart-vm starts --on-switchover's command early and takes its userfaultfd on --uffd-socket: give both")
        }
        if prepagingWindow < 1 || prepagingWindow > 256 { throw ValidationError("--prepaging-window must be 1 ... 256") }
    }

    /// Puts these options into the session's.
    func apply(to options: inout DestinationOptions) {
        options.uffdSocket = uffdSocket
        options.onSwitchover = onSwitchover
        options.prestartVM = prestartVM
        options.memOut = memOut
        options.prepagingWindow = prepagingWindow
        options.workDirectory = workDir
        options.urgentPriority = urgentPriority
        options.vmStartTimeout = vmStartTimeout
        if vmm == "qemu", let vmCommand {
            var qemu = QEMUStartOptions(command: vmCommand)
            qemu.ramDirectory = ramDir
            options.qemu = qemu
        }
    }
}
