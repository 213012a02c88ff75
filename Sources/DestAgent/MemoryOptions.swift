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

    func validate() throws {
        if prepagingWindow < 1 || prepagingWindow > 256 { throw ValidationError("--prepaging-window must be 1 ... 256") }
    }

    /// Puts these options into the session's.
    func apply(to options: inout DestinationOptions) {
        options.uffdSocket = uffdSocket
        options.onSwitchover = onSwitchover
        options.memOut = memOut
        options.prepagingWindow = prepagingWindow
        options.workDirectory = workDir
        options.urgentPriority = urgentPriority
        options.vmStartTimeout = vmStartTimeout
    }
}
