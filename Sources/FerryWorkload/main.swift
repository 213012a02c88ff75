import ArgumentParser
import Glibc
import ProcessMemory

/// `ferry-workload`: a process whose memory Ferry migrates in tests, demos and drills.
struct FerryWorkloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry-workload",
        abstract: "A process with N MiB of memory dirtied at a set rate in a verifiable pattern.",
        discussion: """
        Prints JSON lines on stdout: {"event":"region",...} (start address and
        size) at startup, {"event":"ready"} when filled, {"event":"report",...}
        every --report-interval seconds. Reads commands on stdin: write P1 P2 ... |
        verify | digest | rate BYTES | drop P1 P2 ... | quit (--kvm: verify | quit).

        A disk (--disk-nbd): page p with p % K == 0 (K = --disk-every) is mirrored
        to disk block p/K (4096 bytes at (p/K)*4096), holding the page's pattern at
        the page's generation; the disk needs ceil(pages/K) blocks. Each write of a
        mirrored page rewrites memory, then its block (a synchronous NBD write), so
        at any pause every block equals its page's generation but at most one (the
        write in flight), one generation behind; anything else is torn. 'verify'
        checks that and adds "disk_blocks", "disk_equal", "disk_lagging",
        "disk_torn" and, when torn, "disk_first_torn" (a page); it completes the one
        lagging write. Reports add "disk_writes". A torn block makes 'quit' exit 3.

        With --disk-reconnect S, a read, write or flush that fails because the
        NBD connection is lost waits while the same endpoint is dialled every
        100 ms for up to S seconds, then is redone whole and the workload goes on
        (memory still first, the write still synchronous), after
        {"event":"disk_reconnected","after_ms":N,"attempts":N}; reports and the
        exit line count "disk_reconnects". Without it (or past S seconds) a lost
        connection ends the workload with a JSON error and exit status 2.

        --pidfile PATH: once ready (after the "ready" line), the PID and a newline
        are written to PATH.tmp, renamed to PATH (as QEMU's -pidfile). A path that
        cannot be written is refused at startup: JSON error, exit status 2.

        Examples:
          ferry-workload --memory 512M --dirty-rate 20M
          ferry-workload --memory 64M --dirty-rate 0 --layout-out /tmp/layout.json
          ferry-workload --resume --uffd-socket /tmp/uffd.sock \\
            --layout /tmp/layout.json --dirty-rate 20M
          ferry-workload --kvm --seconds 30
          truncate -s 32M /tmp/disk.img; nbdkit -U /tmp/disk.sock file /tmp/disk.img
          ferry-workload --memory 64M --dirty-rate 10M \\
            --disk-nbd unix:/tmp/disk.sock --disk-every 2
          ferry-workload --memory 64M --dirty-rate 4M --pidfile /tmp/vm.pid \\
            --disk-nbd unix:/tmp/disk.sock --disk-every 2 --disk-reconnect 20
          ferry-workload --resume --uffd-socket /tmp/uffd.sock \\
            --layout /tmp/layout.json --dirty-rate 10M --disk-every 2 \\
            --disk-nbd 'nbd+unix:///?socket=/tmp/dest-disk.sock'
        """)

    @Option(help: "Memory size (K, M, G suffixes), e.g. 512M.")
    var memory: String = "64M"
    @Option(help: "Bytes per second to dirty (K, M, G suffixes); 0 dirties only on command.")
    var dirtyRate: String = "0"
    @Option(help: "Stop after this many seconds (default: run until 'quit' or a signal).")
    var seconds: Double?
    @Option(help: "CPU work done for each page written, in microseconds (a calibrated loop): the workload is then CPU-bound, dirtying as fast as its CPU time allows up to --dirty-rate, and writes it falls behind on are not caught up (a throttled VM loses them as work not done).")
    var workUs: Double = 0
    @Option(help: "A hot set: this share of the writes (0-1) goes to the first --hot-pages pages.")
    var hotShare: Double = 0
    @Option(help: "The hot set's size in pages (with --hot-share).")
    var hotPages: Int = 0
    @Option(help: "Seconds between reports.")
    var reportInterval: Double = 1
    @Option(help: "Pages filled at startup (default: all); the rest stay untouched.")
    var fillPages: Int?
    @Option(help: "Map the memory at this hex address (MAP_FIXED_NOREPLACE).")
    var address: String?
    @Option(help: "Write the memory layout (Firecracker mapping JSON) to this file.")
    var layoutOut: String?
    @Flag(help: "Back the memory with a memfd mapped MAP_SHARED (shmem, as /memfd:ferry-guest) instead of anonymous memory.")
    var memfd = false
    @Flag(help: "Allow transparent huge pages (default: MADV_NOHUGEPAGE, for exact 4 KiB dirty tracking).")
    var thp = false
    @Flag(help: "Resume mode: map --layout, register userfaultfd MISSING, hand it to --uffd-socket, then run.")
    var resume = false
    @Option(help: "Resume mode: the fault handler's Unix socket.")
    var uffdSocket: String?
    @Option(help: "Resume mode: the layout file (Firecracker mapping JSON).")
    var layout: String?
    @Option(help: "The disk's NBD endpoint: unix:PATH, nbd+unix:///?socket=PATH or nbd://HOST:PORT (in resume mode: the destination's).")
    var diskNbd: String?
    @Option(help: "Mirror every K-th page (index p % K == 0) to disk block p / K.")
    var diskEvery: Int?
    @Option(help: "Seconds to keep reconnecting to --disk-nbd (every 100 ms) when the connection is lost; 0 fails at once.")
    var diskReconnect: Double = 0
    @Option(help: "Once ready, write the PID to this file (PATH.tmp, then renamed).")
    var pidfile: String?
    @Flag(help: "KVM mode: a minimal guest whose vCPU writes guest RAM in a loop.")
    var kvm = false
    @Option(help: "Probe mode (for tests): try to inspect this PID as --as-user and print the errors as JSON.")
    var probePid: Int32?
    @Option(help: "Probe mode: the user id to drop to first.")
    var asUser: UInt32 = 65534
    @Option(help: .hidden)   // tests: a target for ptrace injection (sleep, read, spin); see InjectionTarget.swift
    var injectionTarget: String?
    @Option(help: .hidden)   // tests: injection target's extra spinning threads
    var targetThreads: Int = 0
    @Flag(help: .hidden)     // tests: injection target under a seccomp filter that kills it at userfaultfd
    var seccompDenyUserfaultfd = false
    @Option(help: .hidden)   // tests: inject userfaultfd into this PID once told to on stdin; see Injector.swift
    var injectInto: Int32?
    @Option(help: .hidden)   // tests: how many injections --inject-into does
    var injectTimes: Int = 1

    func run() throws {
        if let probePid { throw ExitCode(PermissionProbe.run(pid: probePid, uid: asUser)) }
        if let injectInto { throw ExitCode(Injector.run(pid: injectInto, times: injectTimes)) }
        if let injectionTarget {
            InjectionTarget.run(mode: injectionTarget, threads: targetThreads, denyUserfaultfd: seccompDenyUserfaultfd)
        }
        if kvm && diskNbd != nil { Output.error("--kvm has no disk: --disk-nbd works with the memory workload only") }
        guard diskReconnect >= 0 && diskReconnect.isFinite else { Output.error("bad --disk-reconnect \(diskReconnect): must be 0 or more seconds") }
        if diskReconnect > 0 && diskNbd == nil { Output.error("--disk-reconnect needs --disk-nbd") }
        let pidWriter = pidfile.map { Pidfile(checking: $0) }
        if kvm {
            throw ExitCode(KVMGuest.run(memory: parseSize(memory) ?? (2 << 20), seconds: seconds, reportInterval: reportInterval, pidfile: pidWriter))
        }
        guard let rate = parseSize(dirtyRate) else { Output.error("bad --dirty-rate '\(dirtyRate)'") }
        if let diskEvery, diskEvery < 1 { Output.error("bad --disk-every \(diskEvery): must be at least 1") }
        if diskEvery != nil && diskNbd == nil { Output.error("--disk-every needs --disk-nbd") }
        let workload: WorkloadMemory
        var disk: WorkloadDisk?
        if resume {
            workload = ResumeMode.setUp(socketPath: uffdSocket, layoutPath: layout)
            // The destination's disk as migrated: no initial write, the blocks are compared by 'verify'.
            disk = attachDisk(pages: workload.totalPages)
        } else {
            guard let size = parseSize(memory), size >= 4096 else { Output.error("bad --memory '\(memory)'") }
            let rounded = (size + 4095) & ~4095
            var fixed: UInt64 = 0
            if let address {
                guard let a = UInt64(address.hasPrefix("0x") ? String(address.dropFirst(2)) : address, radix: 16) else {
                    Output.error("bad --address '\(address)'")
                }
                fixed = a
            }
            let p: UInt64
            if memfd {
                do { p = try AnonymousMemory.mapMemfd(length: rounded, name: "ferry-guest") } catch { Output.error("\(error)") }
            } else {
                p = ferry_mmap(fixed, rounded, fixed != 0)
            }
            if !thp { madvise(UnsafeMutableRawPointer(bitPattern: UInt(p)), Int(rounded), 15) } // MADV_NOHUGEPAGE
            workload = WorkloadMemory(regions: [(p, rounded)])
            announce(workload, mode: "run")
            if let layoutOut {
                let json = GuestMemoryMapping.encodeList([GuestMemoryMapping(baseHostVirtAddr: p, size: rounded, offset: 0)])
                guard let f = fopen(layoutOut, "w") else { Output.error("cannot write --layout-out \(layoutOut)") }
                _ = json.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
                fclose(f)
            }
            disk = attachDisk(pages: workload.totalPages)
            let filled = min(fillPages ?? workload.totalPages, workload.totalPages)
            workload.fill(pages: filled)
            if let disk {
                // Every mirrored block at its page's generation: 1 when filled, else 0 (zeros).
                do { try disk.writeAll { $0 < filled ? 1 : 0 } } catch { Output.error("\(error)") }
            }
        }
        var diskFields = ""
        if let disk { diskFields = ",\"disk_blocks\":\(disk.blocks),\"disk_every\":\(disk.every),\"disk_size\":\(disk.size)" }
        Output.line("{\"event\":\"ready\",\"pid\":\(getpid()),\"pages\":\(workload.totalPages)\(diskFields)}")
        pidWriter?.write()
        var loop = WorkloadLoop(memory: workload, disk: disk, dirtyRate: rate, seconds: seconds, reportInterval: reportInterval)
        guard workUs >= 0, hotShare >= 0, hotShare <= 1, hotPages >= 0 else { Output.error("--work-us, --hot-share (0-1) and --hot-pages must not be negative") }
        loop.work = workUs > 0 ? WorkloadLoop.Work(microseconds: workUs) : nil
        loop.hot = hotShare > 0 && hotPages > 0 ? (min(hotPages, workload.totalPages), hotShare) : nil
        let status = loop.run()
        if status != 0 { throw ExitCode(status) }
    }
}

extension FerryWorkloadCommand {
    /// Connects --disk-nbd (nil without it), exiting with a JSON error when it fails or is too small.
    func attachDisk(pages: Int) -> WorkloadDisk? {
        guard let diskNbd else { return nil }
        do {
            return try WorkloadDisk(endpoint: diskNbd, every: diskEvery ?? 1, pages: pages, reconnectSeconds: diskReconnect)
        } catch {
            Output.error("\(error)")
        }
    }
}

func announce(_ w: WorkloadMemory, mode: String) {
    for r in w.regions {
        Output.line("{\"event\":\"region\",\"mode\":\"\(mode)\",\"pid\":\(getpid()),\"start\":\(r.base),\"start_hex\":\"0x\(String(r.base, radix: 16))\",\"size\":\(r.pages * 4096),\"page_size\":4096}")
    }
}

/// mmap of anonymous private memory, exiting with a JSON error on failure.
func ferry_mmap(_ address: UInt64, _ size: UInt64, _ fixed: Bool) -> UInt64 {
    let r: Int64
    do { r = Int64(try AnonymousMemory.map(length: size, at: fixed ? address : nil)) } catch { Output.error("\(error)") }
    if r < 0 { Output.error("mmap of \(size) bytes at 0x\(String(address, radix: 16)) failed: errno \(-r)") }
    return UInt64(r)
}

FerryWorkloadCommand.main()
