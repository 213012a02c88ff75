import ArgumentParser
import Foundation
import Logging
import MigrationEngine
import NBDBridge
import URing

/// `dest-agent`: runs on the destination host. It accepts one migration of a whole VM from a
/// source-agent (its disks, its memory, its VM state), starts the VM when it is safe, serves its
/// disks over NBD and its page faults through userfaultfd.
@main
struct DestAgent: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dest-agent",
        abstract: "Receive a live migration of a VM (disks, memory, VM state) from a source-agent and run it here.",
        discussion: """
        The agent listens for the source and checks that it holds the same shared key; stray or unauthenticated connections are refused and it keeps waiting. Each disk goes to its --disk image as it arrives (the N-th disk of the source to the N-th --disk, served on the N-th --nbd); memory goes into a local copy. The VM starts only when it is safe: every pre-copy part here with digests equal to the source's, every post-copy part ready to fetch on demand. Then the disks are served, --on-switchover starts the VM (with FERRY_STATE_FILE, FERRY_LAYOUT_FILE, FERRY_UFFD_SOCKET, FERRY_NBD_SOCKET and FERRY_NBD_SOCKETS in its environment; if it exits before the VM connects, the source is told at once and resumes its copy), and its page faults are served through --uffd-socket. A hand-over journal is synced to --work-dir before the source is told the VM runs here, so a restarted agent still knows. Link drops are survived: a source that reconnects resumes where it left off. After the migration it serves the disks until SIGTERM (or exits with --exit-after-migration).

        Examples:
          dest-agent --listen 0.0.0.0:7070 --key-file ferry.key \\
            --disk vm.img --nbd unix:/run/ferry/vm.sock
          dest-agent --listen 0.0.0.0:7070 --key-file ferry.key \\
            --disk vm.img --nbd unix:/run/ferry/vm.sock --work-dir /var/lib/ferry \\
            --uffd-socket /run/ferry/uffd.sock --on-switchover ./start-vm.sh
          dest-agent --listen 0.0.0.0:7070 --key-file ferry.key --vmm qemu \\
            --disk vm.img --nbd unix:/run/ferry/vm.sock --vm-command 'exec qemu-system-x86_64 \\
              -accel kvm -m 4G -machine pc,memory-backend=ram -S -incoming defer \\
              -object memory-backend-file,id=ram,size=$FERRY_RAM_SIZE,mem-path=$FERRY_RAM_FILE,share=on \\
              -qmp unix:$FERRY_QMP_SOCKET,server=on,wait=off \\
              -blockdev driver=nbd,server.type=unix,server.path=$FERRY_NBD_SOCKET,node-name=d0 \\
              -device virtio-blk-pci,drive=d0 ...'
        """
    )

    @Option(name: .long, help: ArgumentHelp("Where to accept the source: HOST:PORT.", valueName: "HOST:PORT"))
    var listen: String

    @Option(name: .customLong("key-file"), help: ArgumentHelp("File with the shared key both agents prove they hold and from which every connection's sealing keys are derived: at least 32 random bytes (or 64 hex digits, or base64), readable by its owner only. Make one with: (umask 077; head -c 32 /dev/urandom > ferry.key).", valueName: "PATH"))
    var keyFile: String

    @Option(name: .long, help: ArgumentHelp("Image to write a migrated disk to (created or emptied). Repeatable, one per disk of the VM.", valueName: "OUT.img"))
    var disk: [String] = []

    @Option(name: .customLong("disk-base"), help: ArgumentHelp("An image this host already holds of a disk: a shared base image, or the copy a previous migration left (the --disk image itself, which is then kept instead of emptied). Its blocks are hashed (SHA-256) and reported to the source, whose bulk copy does not send a block this image holds with the same content; the final digests check every block. One per --disk, in the same order; an empty value for a disk without one. It must not change during the migration.", valueName: "BASE.img"))
    var diskBase: [String] = []

    @Option(name: .long, help: ArgumentHelp("Where to serve a migrated disk over NBD: unix:PATH or tcp:HOST:PORT. One per --disk, in the same order.", valueName: "ENDPOINT"))
    var nbd: [String] = []

    @Flag(name: .customLong("nbd-allow-remote"), help: "Allow a tcp: --nbd on an address other hosts can reach (anything but 127.0.0.0/8, ::1 and localhost; 0.0.0.0 and :: are every interface). NBD has no authentication: anyone who can reach the port can read and write the disk. Only on a trusted network; unix:PATH is safer.")
    var nbdAllowRemote = false

    @Option(name: .customLong("export-name"), help: ArgumentHelp("Serve each disk only under this NBD export name (and the default, empty one); without it, under any name.", valueName: "NAME"))
    var exportName: String = ""

    @OptionGroup(title: "Memory and VM start")
    var memory: MemoryOptions

    @OptionGroup(title: "The VM's network")
    var network: NetworkOptions

    func validate() throws {
        if disk.count != nbd.count { throw ValidationError("give one --nbd per --disk (got \(disk.count) --disk, \(nbd.count) --nbd)") }
        if diskBase.count > disk.count { throw ValidationError("give at most one --disk-base per --disk (got \(diskBase.count) --disk-base, \(disk.count) --disk)") }
        for base in diskBase where !base.isEmpty {
            guard access(base, R_OK) == 0 else { throw ValidationError("--disk-base \(base): \(String(cString: strerror(errno)))") }
        }
        for text in nbd {
            do { _ = try NBDEndpoint.parse(text, allowRemote: nbdAllowRemote) } catch { throw ValidationError(error.message) }
        }
        if linkTimeout <= 0 { throw ValidationError("--link-timeout must be positive") }
    }

    @Option(name: .customLong("link-timeout"), help: "Before hand-over: give up if the source does not come back within this many seconds after a link drop.")
    var linkTimeout: Double = 60

    @Option(name: .customLong("accept-timeout"), help: "Give up if no source connects within this many seconds (0: wait for ever).")
    var acceptTimeout: Double = 0

    @Option(name: .long, help: ArgumentHelp("Write the JSON migration report here.", valueName: "PATH"))
    var report: String?

    @Flag(name: .customLong("exit-after-migration"), help: "Exit when the migration ends instead of serving the disks on.")
    var exitAfterMigration = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Option(name: .long, help: ArgumentHelp("Serve the migration live over HTTP at this address: GET /metrics (Prometheus text: bytes received, phase, faults, and the fault latency as a histogram) and GET /status (JSON in QEMU's query-migrate shape). Example: --metrics tcp:127.0.0.1:9188.", valueName: "tcp:HOST:PORT"))
    var metrics: String?

    func run() throws {
        SignalWaiter.blockAll()
        let logger = AgentLogging.make(label: "ferry.dest", level: logLevel)
        var options = DestinationOptions(listen: try SocketAddress(parsing: listen), key: try SharedKey(contentsOf: keyFile))
        options.disks = try zip(disk, nbd).enumerated().map { index, pair in
            let base = index < diskBase.count && !diskBase[index].isEmpty ? diskBase[index] : nil
            return DiskTarget(imagePath: pair.0, nbdEndpoint: try NBDEndpoint.parse(pair.1), exportName: exportName, basePath: base)
        }
        options.linkTimeout = linkTimeout
        options.acceptTimeout = acceptTimeout
        if let metrics { options.status = try StatusEndpoint.serve(metrics, role: "destination", logger: logger) }
        memory.apply(to: &options)
        try network.apply(to: &options)
        let session = DestinationSession(options: options, logger: logger, vmExited: { SignalWaiter.wake() })
        let background = BackgroundMigration(reportPath: report, logger: logger) { session.run() }
        func finish() throws {
            session.shutdown()
            if let pid = session.startedPID { var status: Int32 = 0; _ = waitpid(pid, &status, WNOHANG) }   // the --on-switchover shell
            guard var final = background.report else { throw ExitCode(1) }
            session.refresh(&final)
            if let report { try? final.write(to: report) }
            if let memory = final.memory, memory.faultsOnReceived + memory.faultsOnMissing > 0 {
                logger.info("fault service", metadata: [
                    "faults_on_received": "\(memory.faultsOnReceived)", "faults_on_missing": "\(memory.faultsOnMissing)",
                    "received_p50_us": "\(memory.faultLatencyReceived.p50Us)", "missing_p50_us": "\(memory.faultLatencyMissing.p50Us)"])
            }
            if final.status != "completed" { throw ExitCode(1) }
        }

        while true {
            switch SignalWaiter.wait() {
            case .go:
                continue
            case .stop(let signal):
                logger.info("stopping", metadata: ["signal": "\(signal)"])
                return try finish()
            case .workFinished:
                guard let result = background.report else { continue }   // the VM exited before the migration ended
                if result.status != "completed" && result.vmLocation != "destination" { return try finish() }
                if exitAfterMigration { return try finish() }
                let faultsServed = session.faultService.map { !$0.hasFinished } ?? false
                if !session.nbdServers.isEmpty || faultsServed {
                    logger.info("serving the migrated VM (disks and faults) until it exits or SIGTERM")
                    continue
                }
                return try finish()
            }
        }
    }
}
