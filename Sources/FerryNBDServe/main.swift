// ferry-nbd-serve: serves a disk image with Ferry's NBD server until SIGTERM/SIGINT, which drains
// in-flight requests and flushes before exit. For benchmarks and manual checks, until
// `source-agent --disk IMG --nbd ENDPOINT` exists.
//
//   ferry-nbd-serve IMAGE ENDPOINT [ENDPOINT...] [--read-only] [--export NAME] [--slots N] [--nbd-allow-remote]
//   ENDPOINT: unix:/path/to.sock | tcp:HOST:PORT (off the loopback only with --nbd-allow-remote: NBD has no authentication)
import Glibc
import NBDBridge

func printError(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

var positional: [String] = []
var readOnly = false
var exportName = ""
var slots = 64
var allowRemote = false
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--read-only": readOnly = true
    case "--export": exportName = arguments.next() ?? ""
    case "--slots": slots = Int(arguments.next() ?? "") ?? slots
    case "--nbd-allow-remote": allowRemote = true
    default: positional.append(argument)
    }
}
guard positional.count >= 2 else {
    printError("usage: ferry-nbd-serve IMAGE ENDPOINT [ENDPOINT...] [--read-only] [--export NAME] [--slots N] [--nbd-allow-remote]")
    exit(2)
}

// Block SIGTERM and SIGINT in every thread; the main thread waits for them with sigwait.
var signals = sigset_t()
sigemptyset(&signals)
sigaddset(&signals, SIGTERM)
sigaddset(&signals, SIGINT)
pthread_sigmask(SIG_BLOCK, &signals, nil)

do {
    let store = try FileBlockStore(path: positional[0], readOnly: readOnly)
    let server = try NBDServer(store: store, options: .init(exportName: exportName, readOnly: readOnly, requestSlots: slots))
    for text in positional.dropFirst() {
        let bound = try server.listen(NBDEndpoint.parse(text, allowRemote: allowRemote))
        print("ferry-nbd-serve: serving \(positional[0]) (\(store.size) bytes) on \(bound)")
    }
    try server.start()
    fflush(nil)
    var received: Int32 = 0
    sigwait(&signals, &received)
    server.shutdown(drain: true)
    print("ferry-nbd-serve: stopped after signal \(received): \(server.stats.snapshot)")
} catch {
    printError("ferry-nbd-serve: \(error)")
    exit(1)
}
