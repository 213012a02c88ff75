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
        Without --dest it only serves the disk (the VM's block device) until SIGTERM, which drains in-flight requests and flushes before exit. With --dest it also migrates the disk: the whole image, then rounds of dirty blocks while the VM keeps writing, throttling the writer when it dirties faster than the link drains, then a pause of about --max-downtime to send the rest. With --disk-postcopy the destination takes over at once and fetches what its VM needs first. With --vm PID it migrates the memory of a running process instead (pre-copy, post-copy or hybrid). If a migration fails before hand-over, the VM keeps running here and the report says why.

        Examples:
          head -c 32 /dev/urandom > ferry.key
          source-agent --disk vm.img --nbd unix:/run/ferry/vm.sock
          source-agent --disk vm.img --nbd unix:/run/ferry/vm.sock \\
            --dest 10.0.0.2:7070 --key-file ferry.key --report disk.json
          source-agent --vm 4242 --mode hybrid \\
            --dest 10.0.0.2:7071 --key-file ferry.key --report mem.json
        """
    )

    @Option(name: .long, help: ArgumentHelp("The VM's disk image (raw), served over NBD and migrated.", valueName: "IMG"))
    var disk: String?

    @Option(name: .long, help: ArgumentHelp("Where to serve the disk over NBD: unix:PATH or tcp:HOST:PORT. Repeatable.", valueName: "ENDPOINT"))
    var nbd: [String] = []

    @Option(name: .long, help: ArgumentHelp("The dest-agent to migrate to (HOST:PORT). Without it, only serve.", valueName: "HOST:PORT"))
    var dest: String?

    @Option(name: .customLong("key-file"), help: ArgumentHelp("File with the shared key (at least 16 bytes) both agents prove they hold.", valueName: "PATH"))
    var keyFile: String?

    @Option(name: .customLong("max-downtime"), help: "Switch over once the remaining dirty data can be sent in this many seconds.")
    var maxDowntime: Double = 0.3

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

    @Flag(name: .customLong("exit-after-migration"), help: "Exit when the migration ends (status 0 if it completed) instead of serving on.")
    var exitAfterMigration = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @OptionGroup(title: "Memory migration")
    var memory: MemoryOptions

    func validate() throws {
        if memory.vm != nil {
            if disk != nil { throw ValidationError("--disk with --vm in one run is not supported yet: run one source-agent per part") }
            if dest == nil || keyFile == nil { throw ValidationError("--vm needs --dest HOST:PORT and --key-file") }
        }
        if disk == nil && memory.vm == nil { throw ValidationError("give --disk IMG (the VM's disk image) or --vm PID (a process whose memory to migrate)") }
        if memory.vm == nil && nbd.isEmpty && dest == nil { throw ValidationError("give --nbd to serve the disk, --dest to migrate it, or both") }
        if dest != nil && keyFile == nil { throw ValidationError("--dest needs --key-file (make one with: head -c 32 /dev/urandom > ferry.key)") }
        if blockSize < 4096 || blockSize > 1 << 20 || blockSize & (blockSize - 1) != 0 {
            throw ValidationError("--block-size must be a power of two from 4096 to 1048576")
        }
        if maxDowntime <= 0 { throw ValidationError("--max-downtime must be positive") }
    }

    func run() throws {
        SignalWaiter.blockAll()
        let logger = AgentLogging.make(label: "ferry.source", level: logLevel)
        if memory.vm != nil {
            return try memory.migrate(dest: dest!, keyFile: keyFile!, policy: ConvergencePolicy(maxDowntime: maxDowntime, maxRounds: maxRounds, maxSeconds: maxTime),
                                      reportPath: report, logger: logger)
        }
        let disk = self.disk!
        let store = try FileBlockStore(path: disk)
        let server = try NBDServer(store: store, options: NBDServer.Options(dirtyBlockSize: UInt64(blockSize)))
        for text in nbd {
            let bound = try server.listen(NBDEndpoint.parse(text))
            logger.info("serving disk", metadata: ["image": "\(disk)", "bytes": "\(store.size)", "nbd": "\(bound)"])
        }
        server.start()

        var migration: BackgroundMigration? = nil
        if let dest {
            let key = try SharedKey(contentsOf: keyFile!)
            var options = DiskSourceOptions(destination: try SocketAddress(parsing: dest), key: key,
                                            policy: ConvergencePolicy(maxDowntime: maxDowntime, maxRounds: maxRounds, maxSeconds: maxTime,
                                                                      throttleAboveFraction: throttleAbove, throttleTargetFraction: throttleTo))
            options.throttleDelayNanoseconds = UInt64(throttleDelayMs * 1e6)
            options.linkTimeout = linkTimeout
            options.postcopy = diskPostcopy
            let diskMigration = DiskSourceMigration(server: server, store: store, options: options, logger: logger)
            migration = BackgroundMigration(reportPath: report, logger: logger) { diskMigration.run() }
        }

        while true {
            switch SignalWaiter.wait() {
            case .stop(let signal):
                logger.info("stopping: draining in-flight requests", metadata: ["signal": "\(signal)"])
                server.shutdown(drain: true)
                return
            case .workFinished:
                if migration?.completed == true {
                    // The VM now runs at the destination: nothing may write here any more.
                    logger.info("migration completed; the disk is served by the destination now")
                    server.shutdown(drain: false)
                    return
                }
                if exitAfterMigration {
                    server.shutdown(drain: true)
                    throw ExitCode(1)
                }
                if migration?.report?.vmLocation ?? "source" == "source" {
                    logger.warning("migration failed; still serving the disk to the VM here")
                } else {
                    logger.error("migration failed after hand-over; writes stay held here (see the report)")
                }
            }
        }
    }
}
