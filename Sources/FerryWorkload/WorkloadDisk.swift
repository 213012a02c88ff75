import CNBD
import Glibc
import ProcessMemory

/// The workload's disk: an NBD export on which every page whose index `p` is a multiple of `every` is mirrored to
/// block `p / every` (4096 bytes at offset `(p / every) * 4096`). A mirrored block holds exactly
/// `WorkloadPattern` of its page at the page's generation (all zeros for generation 0).
///
/// Every write of a mirrored page rewrites the memory page first, then the block with a synchronous `nbd_pwrite`
/// (returns after the server's reply). The workload is single-threaded, so at any pause (SIGSTOP, then the server
/// drains what it received) at most ONE mirrored page can have its disk block one generation behind memory, the write
/// in flight. `verify` checks that invariant block by block:
///
///     equal    disk generation == memory generation
///     lagging  disk generation == memory generation - 1, for at most one block
///     torn     anything else: a block ahead of memory, behind by more than one, failing the pattern for its page,
///              a page whose memory is corrupt, or every lagging block when more than one lags
///
/// so memory and disk found at a destination provably come from the same instant. All libnbd calls live here (one
/// C module per file keeps `fd_set` from clashing between modules).
///
/// Reconnect (`reconnectSeconds` > 0, as QEMU's `reconnect-delay`): when a read, write or flush fails because the
/// connection is lost (the handle is dead or closed, not an error reply from the server), the handle is closed and the
/// same endpoint is dialled every 100 ms for up to `reconnectSeconds`; once connected to an export of the same size,
/// the failed command is redone whole (a write of whole blocks is idempotent) and the caller goes on, after
/// `{"event":"disk_reconnected","after_ms":N,"attempts":N}`. The caller blocks meanwhile (the write stays synchronous
/// and after its memory write), so the invariant holds across the outage. No reconnect within the time: the command's
/// error, as without reconnect.
final class WorkloadDisk {
    static let blockSize = 4096
    /// Blocks per batched read or write (256 KiB). The workload's own buffers stay well under
    /// 1 MiB, so that source-agent's default choice of guest memory (writable anonymous mappings of
    /// at least 1 MiB) is the workload's memory alone, as it is a VMM's guest RAM.
    static let batchBlocks = 64

    let endpoint: String
    /// Mirror pages whose index is a multiple of this.
    let every: Int
    /// Memory pages of the workload.
    let pages: Int
    /// Mirrored blocks: ceil(pages / every).
    let blocks: Int
    /// The export's size in bytes.
    let size: UInt64
    /// Seconds to keep dialling after the connection is lost; 0 fails at once.
    let reconnectSeconds: Double
    /// The socket path of a `unix:PATH` endpoint (nil for a URI).
    private let unixPath: String?
    /// The connected handle; nil only after `close` or a reconnect that failed.
    private var handle: OpaquePointer?
    private var canFlush: Bool
    /// One block, 4096-aligned, reused by every mirrored write.
    private let block: UnsafeMutableRawPointer
    /// `batchBlocks` blocks, 4096-aligned: the initial write and `verify` reads.
    private let batch: UnsafeMutableRawPointer
    /// Mirrored writes since start, one per block written after a page write, a drop or a completed lag (the
    /// initial write of every block is not counted).
    private(set) var writes = 0
    /// Torn blocks found by every `verify` so far (the exit status is 3 when non-zero).
    private(set) var tornSeen = 0
    /// Reconnects after a lost connection since start.
    private(set) var reconnects = 0
    private var closed = false

    /// Connects to `endpoint` (`unix:PATH`, `nbd+unix:///?socket=PATH`, `nbd://HOST[:PORT][/EXPORT]`) and checks
    /// that the export is writable and large enough for `pages` pages mirrored every `every`. `reconnectSeconds`:
    /// how long to keep dialling when the connection is lost later (0: fail at once).
    init(endpoint: String, every: Int, pages: Int, reconnectSeconds: Double = 0) throws(DiskError) {
        guard every >= 1 else { throw DiskError("--disk-every \(every): must be at least 1") }
        guard pages >= 1 else { throw DiskError("no memory pages to mirror") }
        guard reconnectSeconds >= 0 && reconnectSeconds.isFinite else {
            throw DiskError("--disk-reconnect \(reconnectSeconds): must be 0 or more seconds")
        }
        self.endpoint = endpoint
        self.every = every
        self.pages = pages
        self.reconnectSeconds = reconnectSeconds
        blocks = (pages + every - 1) / every
        guard let h = nbd_create() else { throw DiskError("nbd_create failed: \(Self.lastError())") }
        let connected: Int32
        if endpoint.hasPrefix("unix:") {
            let path = String(endpoint.dropFirst(5))
            guard !path.isEmpty else { nbd_close(h); throw DiskError("--disk-nbd \(endpoint): no socket path after unix:") }
            unixPath = path
            connected = nbd_connect_unix(h, path)
        } else if endpoint.hasPrefix("nbd://") || endpoint.hasPrefix("nbd+unix://") {
            guard nbd_supports_uri(h) == 1 else {
                nbd_close(h)
                throw DiskError("--disk-nbd \(endpoint): this libnbd has no URI support; use unix:PATH")
            }
            unixPath = nil
            connected = nbd_connect_uri(h, endpoint)
        } else {
            nbd_close(h)
            throw DiskError("--disk-nbd \(endpoint): expected unix:PATH, nbd+unix:///?socket=PATH or nbd://HOST:PORT")
        }
        guard connected == 0 else {
            let message = Self.lastError()
            nbd_close(h)
            throw DiskError("cannot connect to disk \(endpoint): \(message)")
        }
        let exportSize = nbd_get_size(h)
        guard exportSize >= 0 else {
            let message = Self.lastError()
            nbd_close(h)
            throw DiskError("cannot read the size of disk \(endpoint): \(message)")
        }
        size = UInt64(exportSize)
        let needed = UInt64(blocks) * UInt64(Self.blockSize)
        guard size >= needed else {
            nbd_close(h)
            throw DiskError("disk \(formatBytes(size)) too small for \(pages) pages mirrored every \(every): needs \(formatBytes(needed))")
        }
        guard nbd_is_read_only(h) != 1 else {
            nbd_close(h)
            throw DiskError("disk \(endpoint) is read-only: the workload writes its mirrored pages there")
        }
        canFlush = nbd_can_flush(h) == 1
        handle = h
        var b: UnsafeMutableRawPointer?
        var m: UnsafeMutableRawPointer?
        guard posix_memalign(&b, 4096, Self.blockSize) == 0, let b,
              posix_memalign(&m, 4096, Self.blockSize * Self.batchBlocks) == 0, let m else {
            nbd_close(h)
            throw DiskError("cannot allocate \(Self.blockSize * (Self.batchBlocks + 1)) bytes of disk buffers")
        }
        block = b
        batch = m
    }

    deinit {
        close()
        free(block)
        free(batch)
    }

    /// The block that mirrors `page`, or nil when the page is not mirrored.
    @inline(__always)
    func block(of page: Int) -> Int? { page % every == 0 ? page / every : nil }

    /// Writes `page`'s block at `generation` (zeros for 0) and waits for the server's reply (redone after a
    /// reconnect). Allocates nothing unless the write fails.
    func mirror(page: Int, generation: UInt64) throws(DiskError) {
        guard let b = block(of: page) else { return }
        Self.fillBlock(block, page: page, generation: generation)
        let offset = UInt64(b) * UInt64(Self.blockSize)
        while true {
            if let h = handle, nbd_pwrite(h, block, Self.blockSize, offset, 0) == 0 { break }
            try recover("disk write of page \(page) (block \(b), offset \(offset)) to \(endpoint)")
        }
        writes += 1
    }

    /// Writes every mirrored block at its page's generation (`generation(page)`) in 1 MiB writes, then flushes.
    func writeAll(generation: (Int) -> UInt64) throws(DiskError) {
        var first = 0
        while first < blocks {
            let count = min(Self.batchBlocks, blocks - first)
            for i in 0..<count {
                let page = (first + i) * every
                Self.fillBlock(batch + i * Self.blockSize, page: page, generation: generation(page))
            }
            let offset = UInt64(first) * UInt64(Self.blockSize)
            while true {
                if let h = handle, nbd_pwrite(h, batch, count * Self.blockSize, offset, 0) == 0 { break }
                try recover("initial disk write of blocks \(first)..<\(first + count) (offset \(offset)) to \(endpoint)")
            }
            first += count
        }
        try flush()
    }

    func flush() throws(DiskError) {
        while canFlush {
            if let h = handle, nbd_flush(h, 0) == 0 { return }
            try recover("disk flush of \(endpoint)")
        }
    }

    /// What `verify` found on the disk.
    struct VerifyReport {
        var blocks = 0, equal = 0, lagging = 0, torn = 0
        /// The lowest page whose block is torn.
        var firstTorn: Int?
        /// 1 when the one lagging block was brought level with memory (the interrupted write, completed).
        var completed = 0

        var json: String {
            var s = ",\"disk_blocks\":\(blocks),\"disk_equal\":\(equal),\"disk_lagging\":\(lagging),\"disk_torn\":\(torn)"
            if let firstTorn { s += ",\"disk_first_torn\":\(firstTorn)" }
            return s
        }
    }

    /// How one block compares with its memory page.
    enum BlockState: Equatable {
        case equal, lagging
        case torn(reason: String)
    }

    /// Classifies a block against its page: generations equal, disk exactly one behind, or torn.
    static func classify(disk: WorkloadPattern.Verdict, memory: WorkloadPattern.Verdict) -> BlockState {
        guard let m = generation(memory) else { return .torn(reason: "memory_corrupt") }
        guard let d = generation(disk) else { return .torn(reason: "pattern") }
        if d == m { return .equal }
        if m >= 1 && d == m - 1 { return .lagging }
        return .torn(reason: d > m ? "ahead" : "behind")
    }

    static func generation(_ v: WorkloadPattern.Verdict) -> UInt64? {
        switch v {
        case .untouched: return 0
        case .valid(let g): return g
        case .corrupt: return nil
        }
    }

    /// Reads every mirrored block (1 MiB at a time, each batch's memory pages read first) and compares it with its
    /// memory page. The caller has touched every page already (`WorkloadMemory.verifyAll`), so in resume mode memory
    /// has arrived through its faults before its block is compared. When exactly one block lags, its write is
    /// completed (the block rewritten at the memory generation) so that a later pause starts from an equal disk.
    func verify(against memory: WorkloadMemory) throws(DiskError) -> VerifyReport {
        var report = VerifyReport(blocks: blocks)
        var memoryVerdicts = [WorkloadPattern.Verdict](repeating: .untouched, count: Self.batchBlocks)
        var laggingPages: [Int] = []
        var events = 0
        var first = 0
        while first < blocks {
            let count = min(Self.batchBlocks, blocks - first)
            for i in 0..<count { memoryVerdicts[i] = memory.verdict((first + i) * every) }
            let offset = UInt64(first) * UInt64(Self.blockSize)
            while true {
                if let h = handle, nbd_pread(h, batch, count * Self.blockSize, offset, 0) == 0 { break }
                try recover("disk read of blocks \(first)..<\(first + count) (offset \(offset)) from \(endpoint)")
            }
            for i in 0..<count {
                let page = (first + i) * every
                let disk = WorkloadPattern.verify(batch + i * Self.blockSize, index: UInt64(page), pageSize: Self.blockSize)
                switch Self.classify(disk: disk, memory: memoryVerdicts[i]) {
                case .equal: report.equal += 1
                case .lagging: laggingPages.append(page)
                case .torn(let reason):
                    report.torn += 1
                    if report.firstTorn == nil { report.firstTorn = page }
                    if events < 16 {
                        events += 1
                        tornEvent(page: page, reason: reason, disk: disk, memory: memoryVerdicts[i])
                    }
                }
            }
            first += count
        }
        if laggingPages.count == 1 {
            report.lagging = 1
            let page = laggingPages[0]
            if let g = Self.generation(memory.verdict(page)) {
                try mirror(page: page, generation: g)
                report.completed = 1
            }
        } else if laggingPages.count > 1 {
            // Only one write can be in flight at a pause: several blocks one behind are a disk from another instant.
            report.torn += laggingPages.count
            report.firstTorn = min(report.firstTorn ?? Int.max, laggingPages[0])
            for page in laggingPages.prefix(max(0, 16 - events)) {
                tornEvent(page: page, reason: "lagging_many", disk: nil, memory: memory.verdict(page))
            }
        }
        tornSeen += report.torn
        return report
    }

    private func tornEvent(page: Int, reason: String, disk: WorkloadPattern.Verdict?, memory: WorkloadPattern.Verdict) {
        var s = "{\"event\":\"torn\",\"page\":\(page),\"block\":\(page / every),\"reason\":\"\(reason)\""
        if let disk, let d = Self.generation(disk) { s += ",\"disk_generation\":\(d)" }
        if let m = Self.generation(memory) { s += ",\"memory_generation\":\(m)" }
        Output.line(s + "}")
    }

    /// Flushes and disconnects (NBD_CMD_DISC). Idempotent.
    func close() {
        guard !closed else { return }
        closed = true
        guard let h = handle else { return }
        handle = nil
        if canFlush { _ = nbd_flush(h, 0) }
        _ = nbd_shutdown(h, 0)
        nbd_close(h)
    }

    // MARK: - Reconnect

    /// After a failed command (`what` failed): when the connection is lost and reconnecting is allowed, closes the
    /// handle and reconnects (the caller then redoes the command); otherwise throws the command's error.
    private func recover(_ what: String) throws(DiskError) {
        guard !closed, let h = handle else { throw DiskError("\(what) failed: disk \(endpoint) is not connected") }
        let error = Self.lastError()
        let lost = nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1
        guard lost && reconnectSeconds > 0 else { throw DiskError("\(what) failed: \(error)") }
        handle = nil
        nbd_close(h)
        try reconnect(after: "\(what) failed: \(error)")
    }

    /// Dials the endpoint every 100 ms until connected or `reconnectSeconds` have passed; checks the export is the
    /// same size and writable, prints `disk_reconnected`. `failure`: the lost command, for the error when it gives up.
    private func reconnect(after failure: String) throws(DiskError) {
        let start = WorkloadLoop.now()
        let deadline = start + reconnectSeconds
        var attempts = 0
        var lastError = ""
        while true {
            let attemptStart = WorkloadLoop.now()
            attempts += 1
            switch connectOnce(deadline: deadline) {
            case .success(let h):
                let exportSize = nbd_get_size(h)
                guard exportSize >= 0, UInt64(exportSize) == size else {
                    let found = exportSize >= 0 ? formatBytes(UInt64(exportSize)) : "unknown (\(Self.lastError()))"
                    nbd_close(h)
                    throw DiskError("\(failure); reconnected to \(endpoint) but its size is \(found), was \(formatBytes(size))")
                }
                guard nbd_is_read_only(h) != 1 else {
                    nbd_close(h)
                    throw DiskError("\(failure); reconnected to \(endpoint) but the disk is read-only now")
                }
                canFlush = nbd_can_flush(h) == 1
                handle = h
                reconnects += 1
                let afterMs = Int(((WorkloadLoop.now() - start) * 1000).rounded())
                Output.line("{\"event\":\"disk_reconnected\",\"after_ms\":\(afterMs),\"attempts\":\(attempts)}")
                return
            case .failure(let e):
                lastError = e.description
            }
            let now = WorkloadLoop.now()
            if now >= deadline { break }
            let next = min(attemptStart + 0.1, deadline)
            if next > now { usleep(UInt32((next - now) * 1_000_000)) }
        }
        throw DiskError("\(failure); no reconnect to \(endpoint) within \(fmt(reconnectSeconds)) s (\(attempts) attempts, last: \(lastError))")
    }

    /// One connection attempt (nonblocking connect and handshake, given up at `deadline`): a handle ready for
    /// commands, or why not.
    private func connectOnce(deadline: Double) -> Result<OpaquePointer, DiskError> {
        guard let h = nbd_create() else { return .failure(DiskError("nbd_create failed: \(Self.lastError())")) }
        let started = unixPath.map { nbd_aio_connect_unix(h, $0) } ?? nbd_aio_connect_uri(h, endpoint)
        var error: String?
        if started != 0 {
            error = Self.lastError()
        } else {
            while nbd_aio_is_connecting(h) == 1 {
                let left = deadline - WorkloadLoop.now()
                guard left > 0 else { error = "connection and handshake not done in time"; break }
                if nbd_poll(h, Int32(min(left, 1) * 1000) + 1) < 0 { error = Self.lastError(); break }
            }
        }
        if error == nil && nbd_aio_is_ready(h) == 1 { return .success(h) }
        let message = error ?? Self.lastError()
        nbd_close(h)
        return .failure(DiskError(message))
    }

    /// Fills one block with `page`'s pattern at `generation`, or zeros for generation 0 (an untouched page).
    @inline(__always)
    static func fillBlock(_ to: UnsafeMutableRawPointer, page: Int, generation: UInt64) {
        if generation == 0 {
            memset(to, 0, blockSize)
        } else {
            WorkloadPattern.fill(to, index: UInt64(page), generation: generation, pageSize: blockSize)
        }
    }

    static func lastError() -> String {
        if let e = nbd_get_error() { return String(cString: e) }
        return "errno \(nbd_get_errno())"
    }
}

/// A disk setup or I/O failure, with what failed and the numbers involved.
struct DiskError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// 16 MiB, 6 KiB or 12345 bytes: exact, in the largest unit that divides the size.
func formatBytes(_ n: UInt64) -> String {
    if n >= 1 << 30 && n % (1 << 30) == 0 { return "\(n >> 30) GiB" }
    if n >= 1 << 20 && n % (1 << 20) == 0 { return "\(n >> 20) MiB" }
    if n >= 1 << 10 && n % (1 << 10) == 0 { return "\(n >> 10) KiB" }
    return "\(n) bytes"
}
