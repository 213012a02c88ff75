import ArgumentParser
import Foundation
import Logging
import MigrationEngine
import NBDBridge
import URing

/// `dest-agent`: runs on the destination host. It accepts one migration from a source-agent,
/// writes the disk it receives to an image, and from switchover on serves that image over NBD to
/// the resumed VM.
@main
struct DestAgent: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dest-agent",
        abstract: "Receive a live migration from a source-agent and serve the migrated disk over NBD.",
        discussion: """
        The agent listens for the source and checks that it holds the same shared key. For a disk it writes the image to --disk as it arrives and, once the digests of both sides agree at switchover, serves it on --nbd (with disk post-copy: at once, fetching missing blocks first). For memory it receives the pages, starts the VM with --on-switchover, and serves its page faults through --uffd-socket. It survives link drops: a source that reconnects resumes where it left off. After the migration it serves the disk until SIGTERM (or exits with --exit-after-migration).

        Examples:
          dest-agent --listen 0.0.0.0:7070 --key-file ferry.key \\
            --disk vm.img --nbd unix:/run/ferry/vm.sock
          dest-agent --listen 0.0.0.0:7071 --key-file ferry.key \\
            --uffd-socket /run/ferry/uffd.sock --on-switchover ./start-vm.sh
        """
    )

    @Option(name: .long, help: ArgumentHelp("Where to accept the source: HOST:PORT.", valueName: "HOST:PORT"))
    var listen: String

    @Option(name: .customLong("key-file"), help: ArgumentHelp("File with the shared key (at least 16 bytes) both agents prove they hold.", valueName: "PATH"))
    var keyFile: String

    @Option(name: .long, help: ArgumentHelp("Image to write the migrated disk to (created or emptied).", valueName: "OUT.img"))
    var disk: String?

    @Option(name: .long, help: ArgumentHelp("Where to serve the migrated disk over NBD: unix:PATH or tcp:HOST:PORT.", valueName: "ENDPOINT"))
    var nbd: String?

    @OptionGroup(title: "Memory migration (without --disk)")
    var memory: MemoryOptions

    func validate() throws {
        if (disk == nil) != (nbd == nil) { throw ValidationError("--disk and --nbd go together") }
    }

    @Option(name: .customLong("link-timeout"), help: "Give up if the source does not come back within this many seconds after a link drop.")
    var linkTimeout: Double = 60

    @Option(name: .customLong("accept-timeout"), help: "Give up if no source connects within this many seconds (0: wait for ever).")
    var acceptTimeout: Double = 0

    @Option(name: .long, help: ArgumentHelp("Write the JSON migration report here.", valueName: "PATH"))
    var report: String?

    @Flag(name: .customLong("exit-after-migration"), help: "Exit when the migration ends instead of serving the disk on.")
    var exitAfterMigration = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    func run() throws {
        SignalWaiter.blockAll()
        let logger = AgentLogging.make(label: "ferry.dest", level: logLevel)
        guard let disk, let nbd else {
            return try memory.receive(listen: listen, keyFile: keyFile, acceptTimeout: acceptTimeout, reportPath: report, logger: logger)
        }
        let key = try SharedKey(contentsOf: keyFile)
        var options = DiskDestinationOptions(listen: try SocketAddress(parsing: listen), key: key, imagePath: disk,
                                             nbdEndpoint: try NBDEndpoint.parse(nbd))
        options.linkTimeout = linkTimeout
        options.acceptTimeout = acceptTimeout
        let migration = DiskDestinationMigration(options: options, logger: logger)
        let background = BackgroundMigration(reportPath: report, logger: logger) { migration.run() }

        while true {
            switch SignalWaiter.wait() {
            case .stop(let signal):
                logger.info("stopping", metadata: ["signal": "\(signal)"])
                migration.server?.shutdown(drain: true)
                return
            case .workFinished:
                let completed = background.completed
                if exitAfterMigration || migration.server == nil {
                    migration.server?.shutdown(drain: true)
                    if !completed { throw ExitCode(1) }
                    return
                }
                logger.info("serving the migrated disk until SIGTERM")
            }
        }
    }
}
