import Glibc
import ProcessMemory

/// `ferry-workload --resume`: the destination half of a migrated workload. Maps the layout's regions at their
/// source addresses (MAP_FIXED_NOREPLACE), creates a userfaultfd (UFFD_USER_MODE_ONLY unless root), registers every
/// region in MISSING mode, and hands the descriptor and the layout to the fault handler with Firecracker's handshake.
/// From then on every first touch of a page faults and is served by the handler; the loop verifies what arrives.
/// Started early (FERRY_PRESTART=1, dest-agent --prestart-vm), it waits after the handshake for one byte on
/// that connection before it runs, and exits untouched if the connection closes first.
enum ResumeMode {
    static func setUp(socketPath: String?, layoutPath: String?) -> WorkloadMemory {
        guard let socketPath, let layoutPath else { Output.error("--resume needs --uffd-socket PATH and --layout FILE") }
        guard let f = fopen(layoutPath, "r") else { Output.error("cannot open --layout \(layoutPath): errno \(errno)") }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n <= 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        fclose(f)
        do {
            let mappings = try GuestMemoryMapping.decodeList(bytes)
            guard !mappings.isEmpty else { Output.error("layout \(layoutPath) has no mappings") }
            for m in mappings {
                _ = try AnonymousMemory.map(length: m.size, at: m.baseHostVirtAddr)
                madvise(UnsafeMutableRawPointer(bitPattern: UInt(m.baseHostVirtAddr)), Int(m.size), 15) // MADV_NOHUGEPAGE
            }
            let uffd = try Userfaultfd.create(nonBlocking: true, userModeOnly: getuid() != 0)
            try uffd.handshake(requesting: .eventRemove, required: [])
            for m in mappings { try uffd.register(m.range, mode: .missing) }
            let connection = try UFFDHandshake.send(socketPath: socketPath, mappings: mappings, uffd: uffd)
            if getenv("FERRY_PRESTART").map({ String(cString: $0) }) == "1" {
                // Pre-started (dest-agent --prestart-vm): run only on the go, one byte at switchover.
                // EOF or an error: the migration did not hand over, and this copy must never run.
                var go: UInt8 = 0
                var n: Int
                repeat { n = read(connection.rawValue, &go, 1) } while n < 0 && errno == EINTR
                guard n == 1 else {
                    Output.line("resume: no go from the destination agent (the migration did not hand over); not running")
                    exit(3)
                }
            }
            // Both stay open for the life of the process, as a VMM keeps them.
            _ = connection
            _ = uffd.release()
            let memory = WorkloadMemory(regions: mappings.map { ($0.baseHostVirtAddr, $0.size) })
            memory.finishesInterruptedWrite = true
            announce(memory, mode: "resume")
            return memory
        } catch {
            Output.error("resume: \(error)")
        }
    }
}
