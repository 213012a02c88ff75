import Glibc
import ProcessMemory

/// The workload's single-threaded loop: dirty pages at the set rate, report operations per second, and obey control
/// commands read from stdin (one per line):
///
///     write P1 P2 ...   verify-and-rewrite exactly these pages -> {"event":"written","count":N}
///     verify            touch and verify every page            -> {"event":"verified",...,"p50_us":...}
///                       and, with a disk, every mirrored block -> ...,"disk_blocks":N,"disk_equal":N,
///                                                                 "disk_lagging":N,"disk_torn":N[,"disk_first_torn":P]
///                       "interrupted_writes" is 1 when a resumed workload finished the write its pause cut
///     digest            SHA-256 of the memory                  -> {"event":"digest","sha256":"..."}
///     rate BYTES        set the dirty rate (bytes/s; 0 stops)  -> {"event":"rate","bytes_per_sec":N}
///     drop P1 P2 ...    madvise(MADV_DONTNEED) these pages     -> {"event":"dropped","count":N}
///                       (a mirrored page's block is zeroed too)
///     quit              exit (status 3 if any page was corrupt or any disk block torn)
///
/// With a disk (`WorkloadDisk`), every write of a mirrored page rewrites memory first, then its disk block.
struct WorkloadLoop {
    let memory: WorkloadMemory
    let disk: WorkloadDisk?
    var dirtyRate: UInt64
    let seconds: Double?
    let reportInterval: Double
    var rng: UInt64
    /// CPU work per page written (`--work-us`): writes not done for want of CPU are not caught up.
    var work: Work?
    /// A hot set (`--hot-pages`, `--hot-share`): that share of the writes goes to its pages.
    var hot: (pages: Int, share: Double)?

    /// A calibrated busy loop standing for a VM's computation: `iterations` of a multiply-add chain take
    /// about `microseconds` of CPU time on this machine (measured at startup, best of five runs).
    struct Work {
        let microseconds: Double
        let iterations: Int
        init(microseconds: Double) {
            self.microseconds = microseconds
            let probe = 200_000
            var best = Double.infinity
            for _ in 0..<5 {
                let t0 = WorkloadLoop.now()
                workSink ^= Self.spin(probe, seed: workSink | 1)
                best = min(best, WorkloadLoop.now() - t0)
            }
            iterations = max(1, Int(Double(probe) * microseconds / 1e6 / max(best, 1e-9)))
        }
        @inline(never)
        static func spin(_ n: Int, seed: UInt64) -> UInt64 {
            var x = seed
            for _ in 0..<n { x = x &* 6364136223846793005 &+ 1442695040888963407 }
            return x
        }
    }

    init(memory: WorkloadMemory, disk: WorkloadDisk?, dirtyRate: UInt64, seconds: Double?, reportInterval: Double) {
        self.memory = memory
        self.disk = disk
        self.dirtyRate = dirtyRate
        self.seconds = seconds
        self.reportInterval = reportInterval
        rng = UInt64(getpid()) &* 0x9E37_79B9_7F4A_7C15 | 1
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// The next page to write: uniform over the memory, or from the hot set with its share.
    mutating func pickPage() -> Int {
        if let hot, Double(nextRandom() >> 11) / Double(1 << 53) < hot.share {
            return Int(nextRandom() % UInt64(hot.pages))
        }
        return Int(nextRandom() % UInt64(memory.totalPages))
    }

    mutating func nextRandom() -> UInt64 {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        return rng
    }

    mutating func run() -> Int32 {
        let start = Self.now()
        var lastTick = start
        var lastReport = start
        var writtenAtReport = memory.pagesWritten
        var owed = 0.0
        var stdinOpen = true
        var lineBuffer: [UInt8] = []
        var readBuffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let now = Self.now()
            if let seconds, now - start >= seconds { break }
            // Dirty what is due since the last tick.
            owed += Double(dirtyRate) * (now - lastTick) / Double(memory.pageSize)
            lastTick = now
            if work != nil { owed = min(owed, Double(dirtyRate) * 0.05 / Double(memory.pageSize)) }   // no catching up beyond 50 ms
            var due = Int(owed)
            owed -= Double(due)
            if due > memory.totalPages { due = memory.totalPages }
            for _ in 0..<due {
                if let work {
                    workSink ^= Work.spin(work.iterations, seed: workSink | 1)
                }
                write(pickPage())
            }
            if now - lastReport >= reportInterval {
                let ops = Double(memory.pagesWritten - writtenAtReport) / (now - lastReport)
                Output.line("{\"event\":\"report\",\"t\":\(fmt(now - start)),\"ops_per_sec\":\(fmt(ops)),\"pages_written\":\(memory.pagesWritten),\"pages_verified\":\(memory.pagesVerified),\"corrupt\":\(memory.corrupt)\(diskCounts)}")
                lastReport = now
                writtenAtReport = memory.pagesWritten
            }
            // Wait for a command or the next tick (10 ms when dirtying, else until the next report).
            let wait = dirtyRate > 0 ? 10 : Int32(max(1, min(100, (reportInterval - (Self.now() - lastReport)) * 1000)))
            var p = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
            let ready = stdinOpen ? poll(&p, 1, Int32(wait)) : { usleep(UInt32(wait) * 1000); return 0 }()
            if ready > 0 {
                let n = read(0, &readBuffer, readBuffer.count)
                if n <= 0 { stdinOpen = false; continue }
                lineBuffer.append(contentsOf: readBuffer[0..<n])
                while let nl = lineBuffer.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = String(decoding: lineBuffer[0..<nl], as: UTF8.self)
                    lineBuffer.removeSubrange(0...nl)
                    if !command(line) { return finish() }
                }
            }
        }
        Output.line("{\"event\":\"exit\",\"pages_written\":\(memory.pagesWritten),\"pages_verified\":\(memory.pagesVerified),\"corrupt\":\(memory.corrupt)\(diskCounts)}")
        return finish()
    }

    /// Disconnects the disk; the exit status: 3 if any page was ever corrupt or any disk block torn, else 0.
    func finish() -> Int32 {
        disk?.close()
        return memory.corrupt > 0 || (disk?.tornSeen ?? 0) > 0 ? 3 : 0
    }

    /// `,"disk_writes":N,"disk_torn_seen":N,"disk_reconnects":N` with a disk, else nothing.
    var diskCounts: String {
        guard let disk else { return "" }
        return ",\"disk_writes\":\(disk.writes),\"disk_torn_seen\":\(disk.tornSeen),\"disk_reconnects\":\(disk.reconnects)"
    }

    /// Verify-and-rewrites page `p` at the next generation, then (when mirrored) its disk block at that generation.
    func write(_ p: Int) {
        let g = memory.dirty(p)
        guard let disk else { return }
        do { try disk.mirror(page: p, generation: g) } catch { Output.error("\(error)") }
    }

    /// Runs one control command; false means quit.
    mutating func command(_ line: String) -> Bool {
        let words = line.split(separator: " ")
        guard let verb = words.first else { return true }
        switch verb {
        case "write":
            var count = 0
            for w in words.dropFirst() {
                guard let p = Int(w), p >= 0, p < memory.totalPages else {
                    Output.line("{\"event\":\"error\",\"message\":\"page \(w) outside 0..<\(memory.totalPages)\"}")
                    return true
                }
                write(p)
                count += 1
            }
            Output.line("{\"event\":\"written\",\"count\":\(count),\"corrupt\":\(memory.corrupt)}")
        case "drop":
            var count = 0
            for w in words.dropFirst() {
                guard let p = Int(w), p >= 0, p < memory.totalPages else { continue }
                guard madvise(memory.pointer(p), memory.pageSize, 4) == 0 else { continue } // MADV_DONTNEED
                count += 1
                // The page now reads as zeros (generation 0): so does its block, memory first as for any write.
                do { try disk?.mirror(page: p, generation: 0) } catch { Output.error("\(error)") }
            }
            Output.line("{\"event\":\"dropped\",\"count\":\(count)}")
        case "verify":
            let r = memory.verifyAll()
            let sorted = r.touchNanos.sorted()
            var diskReport = ""
            if let disk {
                do { diskReport = try disk.verify(against: memory).json } catch { Output.error("\(error)") }
            }
            Output.line("{\"event\":\"verified\",\"pages\":\(memory.totalPages),\"valid\":\(r.valid),\"untouched\":\(r.untouched),\"corrupt\":\(r.corrupt),\"interrupted_writes\":\(memory.interruptedWrites),\"p50_us\":\(fmt(percentile(sorted, 0.5))),\"p90_us\":\(fmt(percentile(sorted, 0.9))),\"p99_us\":\(fmt(percentile(sorted, 0.99))),\"max_us\":\(fmt(percentile(sorted, 1.0)))\(diskReport)}")
        case "digest":
            Output.line("{\"event\":\"digest\",\"sha256\":\"\(memory.digest())\"}")
        case "rate":
            dirtyRate = words.count > 1 ? parseSize(String(words[1])) ?? dirtyRate : dirtyRate
            Output.line("{\"event\":\"rate\",\"bytes_per_sec\":\(dirtyRate)}")
        case "quit", "exit":
            Output.line("{\"event\":\"exit\",\"pages_written\":\(memory.pagesWritten),\"pages_verified\":\(memory.pagesVerified),\"corrupt\":\(memory.corrupt)\(diskCounts)}")
            return false
        default:
            Output.line("{\"event\":\"error\",\"message\":\"unknown command \(verb)\"}")
        }
        return true
    }
}

/// Where the work loop's results go: a global the optimiser must keep, so the loop is never removed.
nonisolated(unsafe) var workSink: UInt64 = 1

func fmt(_ x: Double) -> String {
    let r = (x * 1000).rounded() / 1000
    return String(r)
}
