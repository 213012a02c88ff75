import ArgumentParser
import Foundation
import Logging
import MigrationEngine
import NBDBridge
import URing

/// `source-agent`: runs beside the VM on the source host. It serves the VM's disk over NBD (so it
/// sees every write) and, given a destination, migrates the disk there while the VM runs.
@main
struct SourceAgent: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "source-agent",
        abstract: "Serve a VM's disk over NBD and live-migrate it to a dest-agent.",
        discussion: """
        Without --dest it only serves the disk(s) (the VM's block devices) until SIGTERM, which drains in-flight requests and flushes before exit. With --dest it migrates the whole VM in one session over one link: every --disk (the whole image, then rounds of dirty blocks while the VM keeps writing, throttling a writer faster than the link) and, with --vm PID, the memory of the VM process (pre-copy, post-copy or hybrid) and its VM-state blob (--state-cmd). One convergence decision covers disk and memory together; then ONE pause stops the VM and quiesces every disk, and the final deltas, pages and state go before one hand-over. With --disk-postcopy the destination serves the disks at once and fetches what its VM needs first. A dropped link is resumed where it stopped, in every phase. If a migration fails before hand-over, the VM keeps running here and the report says why; after it, the VM runs at the destination and never again here.

        Examples:
          head -c 32 /dev/urandom > ferry.key
          source-agent --disk vm.img --nbd unix:/run/ferry/vm.sock
          source-agent --vm 4242 --disk vm.img --nbd unix:/run/ferry/vm.sock \\
            --dest 10.0.0.2:7070 --key-file ferry.key --report vm.json
          source-agent --vm 4242 --mode hybrid \\
            --dest 10.0.0.2:7070 --key-file ferry.key --report mem.json
          source-agent --vmm qemu --qmp unix:/run/vm/qmp.sock --disk vm.img --nbd unix:/run/ferry/vm.sock \\
            --dest 10.0.0.2:7070 --key-file ferry.key --mode postcopy   # see docs/qemu.md
        """
    )

    @Option(name: .long, help: ArgumentHelp("A disk image (raw) of the VM, served over NBD and migrated. Repeatable: a VM may have several disks.", valueName: "IMG"))
    var disk: [String] = []

    @Option(name: .long, help: ArgumentHelp("Where to serve a disk over NBD: unix:PATH or tcp:HOST:PORT. With several --disk, the N-th --nbd serves the N-th disk; with one disk, every --nbd serves it.", valueName: "ENDPOINT"))
    var nbd: [String] = []

    @Flag(name: .customLong("nbd-allow-remote"), help: "Allow a tcp: --nbd on an address other hosts can reach (anything but 127.0.0.0/8, ::1 and localhost; 0.0.0.0 and :: are every interface). NBD has no authentication: anyone who can reach the port can read and write the disk. Only on a trusted network; unix:PATH is safer.")
    var nbdAllowRemote = false

    @Option(name: .customLong("export-name"), help: ArgumentHelp("Serve each disk only under this NBD export name (and the default, empty one). Without it a disk is served under any name a client asks for (QEMU's export=, nbd+unix:///NAME?socket=), as nbdkit does.", valueName: "NAME"))
    var exportName: String = ""

    @Option(name: .long, help: ArgumentHelp("The dest-agent to migrate to (HOST:PORT). Without it, only serve.", valueName: "HOST:PORT"))
    var dest: String?

    @Option(name: .customLong("key-file"), help: ArgumentHelp("File with the shared key both agents prove they hold and from which every connection's sealing keys are derived: at least 32 random bytes (or 64 hex digits, or base64), readable by its owner only. Make one with: (umask 077; head -c 32 /dev/urandom > ferry.key).", valueName: "PATH"))
    var keyFile: String?

    @Option(name: .customLong("max-downtime"), help: "The pause to aim within, in seconds: switch over once the remaining dirty data can be sent in this time less --pause-overhead (the measured downtime then stays within it plus one round trip).")
    var maxDowntime: Double = 0.3

    @Option(name: .customLong("pause-overhead"), help: "Seconds of the pause that are not data (stopping the VM, its state, the last scan, the destination's start; about 0.05 for QEMU).")
    var pauseOverhead: Double = 0.06

    @Option(name: .customLong("max-rounds"), help: "Switch over after this many dirty-block rounds at most.")
    var maxRounds: Int = 30

    @Option(name: .customLong("max-time"), help: "Switch over after this many seconds of migration at most.")
    var maxTime: Double = 3600

    @Option(name: .customLong("block-size"), help: "Dirty-tracking block size in bytes (a power of two).")
    var blockSize: Int = 65536

    @Option(name: .customLong("throttle-above"), help: "Throttle writes when they dirty faster than this fraction of the link bandwidth.")
    var throttleAbove: Double = 0.5

    @Option(name: .customLong("throttle-to"), help: "While throttled, let writes dirty at most this fraction of the link bandwidth.")
    var throttleTo: Double = 0.3

    @Option(name: .customLong("throttle-delay-ms"), help: "Delay of a throttled write, in milliseconds.")
    var throttleDelayMs: Double = 2

    @Flag(name: .customLong("disk-postcopy"), help: "Disk post-copy: hand the disk over at once; the destination serves it while the rest arrives, fetching what its VM reads first.")
    var diskPostcopy = false

    @Option(name: .customLong("link-timeout"), help: "Before hand-over: give the migration up (the VM keeps running here) if the link stays down this many seconds. After hand-over the agent retries until the destination answers.")
    var linkTimeout: Double = 60

    @Option(name: .long, help: ArgumentHelp("Write the JSON migration report here.", valueName: "PATH"))
    var report: String?

    @Option(name: .long, help: ArgumentHelp("Compress bulk pages and blocks with zstd: auto (when the link is slower than compression and the data shrinks, measured as it goes: a WAN yes, loopback or random data no), on, or off. The report's \"compression\" says what it saved.", valueName: "auto|on|off"))
    var compression: String = "auto"

    @Option(name: .long, help: ArgumentHelp("Serve the migration live over HTTP at this address: GET /metrics (Prometheus text: bytes, remaining, dirty rate, round, phase, throttle, as QEMU's query-migrate names them) and GET /status (JSON in query-migrate's shape). Example: --metrics tcp:127.0.0.1:9187.", valueName: "tcp:HOST:PORT"))
    var metrics: String?

    @Flag(name: .customLong("migrate-on-signal"), help: "Serve the disks and wait for SIGUSR2 before migrating (the agent runs beside the VM for its whole life; the operator or a drill says when to move it).")
    var migrateOnSignal = false

    @Flag(name: .customLong("exit-after-migration"), help: "Exit when the migration ends (status 0 if it completed) instead of serving on. After a FAILED migration that also stops serving the disks the VM still runs on here: for tests and scripted disk copies, not beside a live VM (there, leave it out and watch --report).")
    var exitAfterMigration = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @OptionGroup(title: "Memory migration")
    var memory: MemoryOptions

    @OptionGroup(title: "The VM's network")
    var network: NetworkOptions

    func validate() throws {
        guard CompressionMode(rawValue: compression) != nil else { throw ValidationError("--compression must be auto, on or off (got '\(compression)')") }
        if memory.hasVM && (dest == nil || keyFile == nil) { throw ValidationError("--vm (or --qmp) needs --dest HOST:PORT and --key-file") }
        if disk.isEmpty && !memory.hasVM { throw ValidationError("give --disk IMG (the VM's disk image), --vm PID (the VM process whose memory to migrate), or both") }
        if !disk.isEmpty && nbd.isEmpty && dest == nil { throw ValidationError("give --nbd to serve the disk, --dest to migrate it, or both") }
        if disk.count > 1 && nbd.count != disk.count { throw ValidationError("with \(disk.count) disks give one --nbd per disk (got \(nbd.count))") }
        for text in nbd {
            do { _ = try NBDEndpoint.parse(text, allowRemote: nbdAllowRemote) } catch { throw ValidationError(error.message) }
        }
        if dest != nil && keyFile == nil { throw ValidationError("--dest needs --key-file (make one with: head -c 32 /dev/urandom > ferry.key)") }
        if blockSize < 4096 || blockSize > 1 << 20 || blockSize & (blockSize - 1) != 0 {
            throw ValidationError("--block-size must be a power of two from 4096 to 1048576")
        }
        if maxDowntime <= 0 { throw ValidationError("--max-downtime must be positive") }
        if pauseOverhead < 0 { throw ValidationError("--pause-overhead must not be negative") }
        if linkTimeout <= 0 { throw ValidationError("--link-timeout must be positive") }
    }

    func run() throws {
        SignalWaiter.blockAll()
        let logger = AgentLogging.make(label: "ferry.source", level: logLevel)
        // Every disk: served over NBD here, so every write is seen.
        var served: [(server: NBDServer, store: FileBlockStore, options: DiskStreamOptions)] = []
        for (index, image) in disk.enumerated() {
            let store = try FileBlockStore(path: image)
            let server = try NBDServer(store: store, options: NBDServer.Options(exportName: exportName, dirtyBlockSize: UInt64(blockSize)))
            for text in disk.count == 1 ? nbd : [nbd[index]] {
                let bound = try server.listen(NBDEndpoint.parse(text))
                logger.info("serving disk", metadata: ["image": "\(image)", "bytes": "\(store.size)", "nbd": "\(bound)"])
            }
            try server.start()
            var options = DiskStreamOptions(diskID: UInt32(index + 1))
            options.throttleDelayNanoseconds = UInt64(throttleDelayMs * 1e6)
            options.postcopy = diskPostcopy
            served.append((server, store, options))
        }
        func shutdownDisks(drain: Bool) { for disk in served { disk.server.shutdown(drain: drain) } }

        var migration: BackgroundMigration? = nil
        var session: SourceSession? = nil
        var sourceQEMU: QEMUSourceVM? = nil
        if dest != nil && migrateOnSignal {
            logger.info("serving; the migration starts on SIGUSR2", metadata: ["pid": "\(getpid())"])
            waiting: while true {
                switch SignalWaiter.wait() {
                case .go: break waiting
                case .stop(let signal):
                    logger.info("stopping before any migration: draining in-flight requests", metadata: ["signal": "\(signal)"])
                    shutdownDisks(drain: true)
                    return
                case .workFinished: continue
                }
            }
        }
        if let dest {
            var options = SessionOptions(destination: try SocketAddress(parsing: dest), key: try SharedKey(contentsOf: keyFile!))
            options.policy = ConvergencePolicy(maxDowntime: maxDowntime, maxRounds: maxRounds, maxSeconds: maxTime,
                                               throttleAboveFraction: throttleAbove, throttleTargetFraction: throttleTo)
            options.policy.pauseOverhead = pauseOverhead
            options.linkTimeout = linkTimeout
            options.compression = CompressionPolicy(mode: CompressionMode(rawValue: compression)!)
            do {
                if let metrics { options.status = try StatusEndpoint.serve(metrics, role: "source", logger: logger) }
                options.network = try network.tunnelOptions()
                let pid = try memory.resolvePID(logger: logger)
                let qemu = try memory.qemu(pid: pid, logger: logger)
                sourceQEMU = qemu
                let created = try SourceSession(options: options, vm: memory.vmControl(pid: pid, qemu: qemu), disks: served,
                                                memory: try memory.streamOptions(pid: pid, qemu: qemu), logger: logger)
                session = created
                migration = BackgroundMigration(reportPath: report, logger: logger) { created.run() }
            } catch {
                logger.error("cannot start the migration", metadata: ["error": "\(error)"])
                shutdownDisks(drain: true)
                throw ExitCode(1)
            }
        }

        while true {
            switch SignalWaiter.wait() {
            case .stop(let signal):
                if let session, migration?.report == nil {
                    logger.info("stopping: cancelling the migration", metadata: ["signal": "\(signal)"])
                    session.cancel()
                    continue   // its end wakes this loop
                }
                logger.info("stopping: draining in-flight requests", metadata: ["signal": "\(signal)"])
                shutdownDisks(drain: true)
                return
            case .go:
                continue   // one migration per run
            case .workFinished:
                guard let migration, let result = migration.report else { continue }
                if result.status == "completed" {
                    // The VM now runs at the destination: nothing may write here any more.
                    logger.info("migration completed; the VM runs at the destination")
                    if let sourceQEMU {
                        // Its copy is stale: ended, as libvirt does, so that nobody can `cont` it.
                        sourceQEMU.quit()
                        logger.info("the source QEMU was told to quit", metadata: ["pid": "\(sourceQEMU.pid)"])
                    }
                    shutdownDisks(drain: false)
                    if let session, session.tunnel != nil { lingerWithTunnel(session, report: result, logger: logger) }
                    return
                }
                if exitAfterMigration || served.isEmpty {
                    shutdownDisks(drain: true)
                    throw ExitCode(1)
                }
                if result.vmLocation == "source" {
                    logger.warning("migration failed; still serving the disk to the VM here")
                } else {
                    logger.error("migration failed after hand-over; writes stay held here (see the report)")
                }
            }
        }
    }

    /// After the hand-over: the tunnel carries the VM's traffic for `--tunnel-linger` seconds or
    /// until SIGTERM/SIGINT, then ends; the report is written again with what it carried.
    private func lingerWithTunnel(_ session: SourceSession, report result: MigrationReport, logger: Logger) {
        guard let tunnel = session.tunnel else { return }
        logger.info("tunnel: carrying the VM's traffic to the destination", metadata: ["linger_s": "\(network.tunnelLinger)",
                                                                                     "end": "SIGTERM, or the linger time"])
        let deadline = ContinuousClock.now + .milliseconds(Int64(network.tunnelLinger * 1000))
        Thread {
            while ContinuousClock.now < deadline { usleep(200_000) }
            SignalWaiter.wake()
        }.start()
        lingering: while ContinuousClock.now < deadline {
            switch SignalWaiter.wait() {
            case .stop(let signal):
                logger.info("tunnel: ended by signal", metadata: ["signal": "\(signal)"])
                break lingering
            case .go, .workFinished:
                continue
            }
        }
        tunnel.stop()
        var final = result
        final.network = session.networkReport()
        if let network = final.network {
            logger.info("tunnel: ended", metadata: ["frames_to_vm": "\(network.tunnel.framesToVM)", "frames_from_vm": "\(network.tunnel.framesFromVM)",
                                                    "bytes": "\(network.tunnel.bytesToVM + network.tunnel.bytesFromVM)", "dropped": "\(network.tunnel.dropped)"])
        }
        if let report { try? final.write(to: report) }
    }
}
