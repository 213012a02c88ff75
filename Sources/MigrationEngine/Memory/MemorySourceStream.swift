import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Wire

/// How the memory stream of a source session moves a process's memory.
public struct MemoryStreamOptions: Sendable {
    /// The process whose memory moves (a VMM, or any process).
    public var pid: Int32
    /// Pre-copy, post-copy or hybrid.
    public var mode: MemoryMigrationMode = .precopy
    /// Explicit regions (`--region START-END`); empty: the process's guest-memory candidates, largest first.
    public var regions: [AddressRange] = []
    /// Regions smaller than this are left out of the default choice.
    public var minimumRegionSize: UInt64 = 1 << 20
    /// Hybrid: dirty rounds before switching to post-copy.
    public var precopyRounds: Int = 2
    /// Post-copy push pacing: the queueing delay (seconds) the push may add at the bottleneck
    /// (``PushPacer``); 0 pushes as fast as the link takes it.
    public var pushDelayTarget: Double = 0.010
    /// SO_PRIORITY of the urgent lane's socket (6, TC_PRIO_INTERACTIVE; 0 leaves it alone).
    public var urgentPriority: Int32 = PeerLink.interactivePriority
    /// Track dirty pages by content hashing even where the kernel method works (`--tracking hash`).
    public var contentHashTracking = false
    /// Pages per `pageBatch` frame.
    public var batchPages: Int = 256
    /// How to slow the process's writers when pre-copy does not converge (`--memory-throttle`).
    public var throttle: MemoryThrottleMethod = .writeProtect

    public init(pid: Int32) { self.pid = pid }

    /// Sets ``regions`` from `--region START-END` texts (hex); throws on a malformed one.
    public mutating func setRegions(parsing texts: [String]) throws {
        regions = try texts.map { try AddressRange(parsing: $0) }
    }
}

/// A running process's memory as one stream of a ``SourceSession``:
///
/// - pre-copy (Clark et al. 2004): the bulk copy sends every page the process ever touched (pagemap
///   residency; never-touched pages travel as zero runs, with no content), then rounds of the pages
///   the dirty tracker saw written, then the final set while the VM is paused.
/// - post-copy (Hines & Gopalan 2009): nothing before the pause; afterwards the destination pulls
///   the pages its VM faults on over the urgent lane (``PageRequestServer``) while this stream
///   pushes the rest, restarting near the latest fault.
/// - hybrid: the first dirty rounds as pre-copy, then post-copy for the pages dirtied since (the
///   destination is told to discard its stale copies of them before switchover).
///
/// Every page sent is hashed as it goes (``PageHashes``), so the digest of the memory at the
/// pause costs nothing at switchover. Every round the destination has not acknowledged is kept,
/// and goes again after a reconnect, as do pushed pages it did not acknowledge.
final class MemorySourceStream: SourceStream, @unchecked Sendable {
    let label = "memory"
    let streamType: StreamKind = .memory
    let streamID: UInt32 = 0
    let options: MemoryStreamOptions
    let regions: [SourceRegion]
    private let shared: [Bool]
    private let logger: Logger
    let pageSize = 4096
    private var builder: PageBatchBuilder
    private var tracker: AnyDirtyPageTracker?
    private var scanBuffer = PageRunBuffer(capacity: 4096)
    let hashes: PageHashes
    let totalBytes: UInt64
    private let totalPages: Int
    private(set) var trackingMethod: String

    // Bulk copy (round 0).
    private var residents: [PageSet] = []
    private var bulkRegion = 0, bulkPage = 0
    private var bulkDone = false
    private var touchedBytes: UInt64 = 0
    private var bulkDataPages: UInt64 = 0

    // Dirty rounds.
    private var pending: [PageSet]
    private var unacknowledged: [(round: Int, pages: [PageSet])] = []
    /// The highest round the destination acknowledged (written under the link's lock).
    private var completedRoundAtPeer = -1
    /// The highest round whose `roundEnd` was sent (under the link's lock, set before it goes): no
    /// ack may say more was applied.
    private var lastRoundEnd = -1
    /// The `switchover` went (or is going) out: from now on the urgent lane answers requests.
    private var offered = false
    private var pagesPerRound: [UInt64] = []
    private var scans = 0
    private var frozen = false
    private var dataPagesAtFreeze: UInt64 = 0
    private var downtimeBytes: UInt64 = 0
    /// The write throttle, when `options.throttle` names one and pre-copy tracks dirty pages.
    private let throttle: MemoryThrottle?
    /// Engaging it failed (no kernel tracking, no cgroup): not tried again.
    private var throttleUnavailable = false

    // Post-copy.
    private var needed: [PageSet] = []
    private var requestServer: PageRequestServer?
    private var pushCursor = (region: 0, page: 0)
    private var lastHint = UInt64.max
    private var pushed: UInt64 = 0
    private var pushDone = false
    private var pushStartPages: UInt64 = 0
    /// Under the link's lock: the pacer, and the push frames the destination has not acknowledged.
    private var pacer = PushPacer(targetNanoseconds: 2_000_000)
    private var inFlight = PushLedger()

    init(options: MemoryStreamOptions, logger: Logger) throws {
        self.options = options
        self.logger = logger
        let map = try ProcessRegions(pid: options.pid)
        let chosen: [ProcessMemory.MemoryRegion]
        if options.regions.isEmpty {
            chosen = map.guestMemory(minimumSize: options.minimumRegionSize)
        } else {
            chosen = try map.select(ranges: options.regions)
        }
        guard !chosen.isEmpty else {
            throw SetupError("process \(options.pid) has no writable anonymous or memfd mapping of at least \(options.minimumRegionSize) bytes; name one with --region START-END")
        }
        regions = SourceRegion.numbered(chosen.map(\.range))
        shared = chosen.map { $0.kind == .shmem }
        totalBytes = regions.reduce(0) { $0 + $1.range.length }
        totalPages = regions.reduce(0) { $0 + $1.pageCount }
        hashes = PageHashes(pageCount: totalPages, pageSize: pageSize)
        pending = regions.map { PageSet(pageCount: $0.pageCount) }
        builder = try PageBatchBuilder(pid: options.pid, batchPages: options.batchPages, pageSize: pageSize)
        builder.pageHashes = hashes
        trackingMethod = "none (post-copy)"
        throttle = options.throttle != .off && options.mode != .postcopy ? MemoryThrottle(method: options.throttle, pid: options.pid) : nil
        if options.mode != .postcopy {
            var fallback: ProcessMemoryError? = nil
            var attached: AnyDirtyPageTracker
            if options.contentHashTracking {
                attached = .hash(try HashDirtyTracker(pid: options.pid, regions: chosen))
            } else {
                attached = try AnyDirtyPageTracker.attach(pid: options.pid, regions: chosen, fallbackReason: &fallback)
            }
            if let fallback {
                logger.warning("kernel dirty tracking unavailable; using content hashing", metadata: ["reason": "\(fallback)"])
            }
            trackingMethod = attached.method
            // The first scan arms tracking (it reports every page): writes from now on are seen.
            var discard = PageRunBuffer(capacity: 1024)
            try attached.scanDirty(into: &discard)
            scans += 1
            builder.sentHashes = attached.sentHashes
            tracker = consume attached
        }
        pacer.targetNanoseconds = options.pushDelayTarget * 1e9
        logger.info("migrating memory", metadata: [
            "pid": "\(options.pid)", "mode": "\(options.mode.rawValue)", "regions": "\(regions.map { "\($0.range)" })",
            "bytes": "\(totalBytes)", "tracking": "\(trackingMethod)"])
    }

    deinit {
        pacer.deallocate()
        throttle?.lift()
        if let attached = tracker.take() { try? attached.detach() }
    }

    var features: Features { options.mode.isPostcopy ? [.memory, .zeroRuns, .postcopy, .urgentLane] : [.memory, .zeroRuns] }
    var isPostcopy: Bool { options.mode.isPostcopy }
    var hasPrecopy: Bool { options.mode != .postcopy }
    var sentBytes: UInt64 { (builder.dataPages + builder.zeroPages) * UInt64(pageSize) }

    // MARK: - Before the pause

    func announce(on link: PeerLink) throws(LinkError) {
        try link.send(.memoryLayout(GuestMemoryLayout(pageSize: UInt32(pageSize), regions: regions.map(\.wire))))
    }

    var bulkRemaining: UInt64 {
        guard !bulkDone, options.mode != .postcopy else { return 0 }
        let position = bulkRegion < regions.count ? regions[bulkRegion].firstGlobalPage + bulkPage : totalPages
        return UInt64(totalPages - position) * UInt64(pageSize)
    }

    func sendBulk(budget: Int, on link: PeerLink) throws(LinkError) -> Bool {
        if bulkDone { return true }
        if residents.isEmpty {
            do {
                residents = try regions.indices.map { try residency(of: $0) }
            } catch {
                throw .local(.storageFailure, reason: "reading the residency of process \(options.pid): \(error)")
            }
            touchedBytes = UInt64(residents.reduce(0) { $0 + $1.count }) * UInt64(pageSize)
        }
        var spent = 0
        while bulkRegion < regions.count && spent < budget {
            let region = regions[bulkRegion]
            let resident = residents[bulkRegion]
            if bulkPage >= region.pageCount {
                bulkRegion += 1
                bulkPage = 0
                continue
            }
            let before = builder.dataPages
            bulkPage = try sendPages(of: bulkRegion, from: bulkPage, limit: region.pageCount, mayHoldData: { resident.contains($0) }, on: link)
            spent += Int(builder.dataPages - before) * pageSize + 4096
        }
        guard bulkRegion >= regions.count else { return false }
        link.publish { lastRoundEnd = max(lastRoundEnd, 0) }
        try link.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: 0, itemsSent: UInt64(totalPages),
                                         bytesSent: builder.dataPages * UInt64(pageSize), dirtyRemaining: 0)))
        pagesPerRound.append(UInt64(totalPages))
        bulkDataPages = builder.dataPages
        bulkDone = true
        logger.info("memory bulk copy sent", metadata: ["touched_bytes": "\(touchedBytes)", "data_pages": "\(builder.dataPages)"])
        return true
    }

    func collectDirty() throws -> UInt64 {
        if var attached = tracker.take() {
            do {
                try attached.scanDirty(into: &scanBuffer)
            } catch {
                tracker = consume attached
                throw error
            }
            tracker = consume attached
            scans += 1
            addToPending(scanBuffer)
        }
        return UInt64(pending.reduce(0) { $0 + $1.count }) * UInt64(pageSize)
    }

    func sendRound(_ round: Int, on link: PeerLink) throws(LinkError) {
        let before = builder.dataPages
        var pages: UInt64 = 0
        for index in regions.indices {
            let set = pending[index]
            var cursor = 0
            while let first = set.firstMember(from: cursor) {
                var end = first + 1
                while end < regions[index].pageCount && set.contains(end) && end - first < builder.batchPages { end += 1 }
                try sendBatch(region: index, first: first, count: end - first, mayHoldData: { _ in true }, on: link)
                pages += UInt64(end - first)
                cursor = end
            }
        }
        link.publish {
            unacknowledged.append((round, pending))
            lastRoundEnd = max(lastRoundEnd, round)
        }
        pending = regions.map { PageSet(pageCount: $0.pageCount) }
        try link.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: UInt32(round), itemsSent: pages,
                                         bytesSent: (builder.dataPages - before) * UInt64(pageSize), dirtyRemaining: 0)))
        pagesPerRound.append(pages)
        if frozen { downtimeBytes += (builder.dataPages - before) * UInt64(pageSize) }
    }

    var roundsAcknowledged: Bool { unacknowledged.isEmpty }

    // MARK: - The write throttle

    /// Whether this stream can slow its writers (`--memory-throttle` wp or cpu, with pre-copy).
    var canThrottle: Bool { throttle != nil && !throttleUnavailable }
    /// Whether the throttle holds the writers now (engaged, not yet lifted).
    var isThrottled: Bool { throttle?.isActive ?? false }

    /// Engages the throttle: the writers are slowed to `limit` newly dirtied bytes per second;
    /// `dirtyRate` is what the last round measured.
    func throttle(to limit: UInt64, dirtyRate: Double, round: Int) {
        guard let throttle, !throttle.isEngaged, !throttleUnavailable else { return }
        do {
            switch throttle.method {
            case .writeProtect:
                guard var attached = tracker.take() else { return }
                var failure: (any Error)?
                do { try attached.throttleWrites(bytesPerSecond: limit) } catch { failure = error }
                let thread = attached.dirtyLimit
                tracker = consume attached
                if let failure { throw failure }
                throttle.engaged(limit: limit, dirtyRate: dirtyRate, round: round, writeProtect: thread)
            case .cpu:
                try throttle.engageCPU(limit: limit, dirtyRate: dirtyRate, round: round)
            case .off:
                return
            }
        } catch {
            // Not fatal: the migration goes on as without a throttle (it may end at a round or time limit).
            throttleUnavailable = true
            logger.warning("memory write throttle unavailable; going on without it", metadata: ["method": "\(throttle.method.rawValue)", "error": "\(error)"])
            return
        }
        logger.info("memory write throttle on", metadata: ["method": "\(throttle.method.rawValue)", "limit": "\(limit)",
                                                           "dirty_rate": "\(Int(dirtyRate))"])
    }

    /// Another round with the throttle on dirtied `bytes` in `seconds`: the CPU limit follows it.
    func adjustThrottle(dirtied bytes: UInt64, in seconds: Double) {
        do { try throttle?.adjust(dirtied: bytes, in: seconds) } catch {
            logger.warning("the memory write throttle's limit could not be set; the last one holds", metadata: ["error": "\(error)"])
        }
    }

    /// Lifts the throttle before the pause.
    func liftThrottle() { throttle?.lift() }

    // MARK: - The pause

    func freeze() throws {
        guard !frozen else { return }
        throttle?.lift()
        frozen = true
        dataPagesAtFreeze = builder.dataPages
        if var attached = tracker.take() {
            try attached.scanDirty(into: &scanBuffer)
            scans += 1
            addToPending(scanBuffer)
            // The tracker's hash table goes with it: nothing may record into it any more.
            builder.sentHashes = nil
            try attached.detach()
        }
        if options.mode.isPostcopy {
            needed = regions.map { PageSet(pageCount: $0.pageCount) }
            if options.mode == .postcopy {
                for set in needed { set.insertAll() }
            } else {
                for (index, set) in pending.enumerated() {
                    var cursor = 0
                    while let page = set.firstMember(from: cursor) { needed[index].insert(page); cursor = page + 1 }
                }
            }
            pushStartPages = UInt64(needed.reduce(0) { $0 + $1.count })
        }
    }

    /// Nothing to let through: the session resumes the process itself.
    func thaw() {}

    var toCome: UInt64 {
        options.mode.isPostcopy ? pushStartPages : UInt64(pending.reduce(0) { $0 + $1.count })
    }

    func beforeSwitchover(on link: PeerLink) throws(LinkError) {
        offered = true
        requestServer?.acceptRequests()
        guard options.mode == .hybrid else { return }
        // Before switchover, so the destination has dropped its stale copies of the pages dirtied
        // since the last round before it can resume the VM.
        for (index, set) in needed.enumerated() {
            var cursor = 0
            while let first = set.firstMember(from: cursor) {
                var end = first + 1
                while end < regions[index].pageCount && set.contains(end) && end - first < Int(UInt32.max) { end += 1 }
                try link.send(.pageDiscard(PageRange(regionID: regions[index].id, pageIndex: UInt64(first), count: UInt32(end - first))))
                cursor = end
            }
        }
    }

    func sendFinal(round: Int, on link: PeerLink) throws(LinkError) {
        guard !options.mode.isPostcopy else { return }
        try sendRound(round, on: link)
    }

    func digest() -> StreamDigest { StreamDigest(stream: .memory, streamID: 0, digest: hashes.digest()) }

    // MARK: - Post-copy

    func serveUrgent(on lane: PeerLink) throws(LinkError) {
        if options.urgentPriority > 0 && !lane.setPriority(options.urgentPriority) {
            logger.warning("cannot set SO_PRIORITY on the urgent lane", metadata: ["errno": "\(errno)"])
        }
        if requestServer == nil {
            do {
                requestServer = try PageRequestServer(pid: options.pid, regions: regions, hashes: hashes, logger: logger)
            } catch {
                throw .local(.storageFailure, reason: "cannot read process \(options.pid) for page requests: \(error)")
            }
        }
        if offered { requestServer!.acceptRequests() }
        requestServer!.start(on: lane)
    }

    /// Post-copy's background stream: every page still needed, in small batches, jumping to the
    /// latest fault whenever a new one arrives. Pages already delivered on the urgent lane are skipped.
    func push(budget: Int, on link: PeerLink) throws(LinkError) -> Bool {
        guard !pushDone else { return true }
        if residents.isEmpty {
            do { residents = try regions.indices.map { try residency(of: $0) } } catch {
                throw .local(.storageFailure, reason: "reading the residency of process \(options.pid): \(error)")
            }
        }
        guard let server = requestServer else { throw .local(.internalError, reason: "post-copy push before the urgent lane") }
        // Small frames: a reply never queues behind more than one of them at the bottleneck.
        let pushBatchPages = min(builder.batchPages, 16)
        let pacing = options.pushDelayTarget > 0
        var spent = 0
        while spent < budget {
            if let failure = link.failureSeen { throw failure }
            let hint = server.latestFault.load(ordering: .acquiring)
            if hint != lastHint && hint != UInt64.max {
                lastHint = hint
                pushCursor = (Int(hint >> 40), Int(hint & ((1 << 40) - 1)))
            }
            let set = needed[pushCursor.region]
            guard let first = set.firstMember(from: pushCursor.page) else {
                // This region is done from the cursor on: next region, or wrap around; done when all are empty.
                if needed.allSatisfy({ $0.firstMember(from: 0) == nil }) { break }
                pushCursor = ((pushCursor.region + 1) % regions.count, 0)
                continue
            }
            let region = regions[pushCursor.region]
            let delivered = server.delivered[pushCursor.region]
            var end = first
            while end < region.pageCount && end - first < pushBatchPages && set.contains(end) && !delivered.contains(end) { end += 1 }
            if end == first {
                set.remove(first)   // delivered by a reply already
                pushCursor.page = first + 1
                continue
            }
            // Wait for room in the pacer's window (the destination acknowledges every push frame),
            // and never more unacknowledged frames than the ledger holds.
            try link.wait(timeout: 60, during: "post-copy push") { (!pacing || pacer.maySend) && !inFlight.isFull }
            let resident = residents[pushCursor.region]
            let regionIndex = pushCursor.region
            try sendBatch(region: regionIndex, first: first, count: end - first, mayHoldData: { resident.contains($0) }, on: link) { message in
                // Recorded before sending: the acknowledgement may come back before send returns.
                let bytes = UInt64((try? FrameEncoder.frameSize(of: message)) ?? 0)
                link.publish {
                    pacer.sent(bytes: bytes)
                    inFlight.append(frame: pacer.framesSent, region: regionIndex, first: first, count: end - first)
                }
            }
            for p in first..<end { set.remove(p) }
            pushed += UInt64(end - first)
            spent += (end - first) * pageSize
            pushCursor.page = end
        }
        guard needed.allSatisfy({ $0.firstMember(from: 0) == nil }) else { return false }
        link.publish { lastRoundEnd = max(lastRoundEnd, pagesPerRound.count) }
        try link.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: UInt32(pagesPerRound.count), itemsSent: pushed,
                                         bytesSent: 0, dirtyRemaining: 0)))
        pagesPerRound.append(pushed)
        pushDone = true
        logger.info("memory push done", metadata: ["pages": "\(pushed)", "final_window_bytes": "\(Int(link.publish { pacer.window }))"])
        return true
    }

    // MARK: - Acknowledgements and resume

    func acknowledged(_ ack: Ack) throws(LinkError) {
        if ack.streamID == 0 {
            try check(sequence: ack.sequence, offset: ack.offset, in: "ack")
            completedRoundAtPeer = max(completedRoundAtPeer, Int(ack.sequence) - 1)
            let completed = completedRoundAtPeer
            unacknowledged.removeAll { $0.round <= completed }
        } else if ack.streamID == PushPacer.ackStreamID {
            guard ack.offset <= pacer.framesSent else {
                throw .local(.protocolViolation, reason: "ack of \(ack.offset) post-copy push frames applied; \(pacer.framesSent) were sent")
            }
            pacer.acknowledged(upTo: ack.offset)
            inFlight.acknowledge(upTo: ack.offset)
        } else {
            throw .local(.protocolViolation, reason: "ack for memory stream id \(ack.streamID) (0: rounds, 1: post-copy push)")
        }
    }

    /// An ack or resume point says rounds up to `sequence - 1` and the bulk copy up to global page
    /// `offset` were applied: neither may go past what was sent.
    private func check(sequence: UInt64, offset: UInt64, in what: String) throws(LinkError) {
        guard sequence <= UInt64(lastRoundEnd + 1) else {
            throw .local(.protocolViolation, reason: "\(what) for memory says round \(sequence &- 1) was applied; "
                         + (lastRoundEnd < 0 ? "no roundEnd was sent yet" : "the last roundEnd sent was round \(lastRoundEnd)"))
        }
        guard offset <= UInt64(totalPages) else {
            throw .local(.protocolViolation, reason: "\(what) for memory says its bulk copy was applied up to page \(offset) of \(totalPages)")
        }
    }

    /// What was not acknowledged goes again: the bulk copy from the destination's high-water page,
    /// every unacknowledged round's pages, and pushed pages whose frames were not applied.
    func resume(from point: ResumePoint?, phase: MigrationPhase) throws(LinkError) {
        if let point { try check(sequence: point.sequence, offset: point.offset, in: "resume point") }
        let round = Int(point?.sequence ?? 0) - 1
        let highWater = Int(point?.offset ?? 0)
        completedRoundAtPeer = max(completedRoundAtPeer, round)
        let completed = completedRoundAtPeer
        unacknowledged.removeAll { $0.round <= completed }
        for (_, sets) in unacknowledged {
            for (index, set) in sets.enumerated() {
                var cursor = 0
                while let page = set.firstMember(from: cursor) { pending[index].insert(page); cursor = page + 1 }
            }
        }
        unacknowledged.removeAll()
        if hasPrecopy && completed < 0 {
            // Round 0 was not acknowledged: from the high-water page on, it goes again.
            if !bulkDone {
                let (region, page) = locate(globalPage: highWater)
                if (region, page) < (bulkRegion, bulkPage) { (bulkRegion, bulkPage) = (region, page) }
            } else {
                for (index, region) in regions.enumerated() {
                    let start = max(0, highWater - region.firstGlobalPage)
                    guard start < region.pageCount else { continue }
                    for page in start..<region.pageCount where residents.isEmpty || residents[index].contains(page) {
                        pending[index].insert(page)
                    }
                }
            }
        }
    }

    /// The destination's count of push frames applied, from its second resume point: frames after
    /// it may be lost, so their pages are needed again. `restarted` (that point's sequence is 1):
    /// the destination agent was restarted after hand-over and holds no page any more (the VM kept
    /// those it had), so every page is pushed again and every request answered again.
    func resumePush(applied: UInt64, restarted: Bool) throws(LinkError) {
        guard options.mode.isPostcopy, !needed.isEmpty else { return }
        guard restarted || applied <= pacer.framesSent else {
            throw .local(.protocolViolation, reason: "resume point of \(applied) post-copy push frames applied; \(pacer.framesSent) were sent")
        }
        if restarted {
            for set in needed { set.insertAll() }
            for set in requestServer?.delivered ?? [] { set.removeAll() }
            pacer.deallocate()
            pacer = PushPacer(targetNanoseconds: options.pushDelayTarget * 1e9)
            inFlight = PushLedger()
            pushCursor = (0, 0)
            lastHint = .max
            if pushDone { pagesPerRound.removeLast() }
            pushDone = false
            logger.warning("the destination agent restarted: pushing every page again")
            return
        }
        for entry in inFlight.lost(after: applied) {
            for page in entry.first..<(entry.first + entry.count) { needed[entry.region].insert(page) }
        }
        pacer.restart(at: applied)
        if pushDone && needed.contains(where: { $0.firstMember(from: 0) != nil }) {
            pushDone = false
            pushed = 0
            pagesPerRound.removeLast()
        }
    }

    func stop() {
        throttle?.lift()
        requestServer?.stop()
    }

    func fill(_ report: inout MigrationReport, final: Bool) {
        var memory = MigrationReport.MemoryReport()
        memory.mode = options.mode.rawValue
        memory.trackingMethod = trackingMethod
        memory.pageSize = pageSize
        memory.total = totalBytes
        memory.touched = touchedBytes
        memory.downtimeBytes = downtimeBytes
        memory.bulkBytes = (bulkDone ? bulkDataPages : builder.dataPages) * UInt64(pageSize)
        memory.pagesPerRound = pagesPerRound
        memory.pagesPushed = pushed
        memory.dirtySyncCount = scans
        let requested = requestServer?.pagesSent.value ?? 0
        memory.postcopyRequests = requestServer?.requests.value ?? 0
        memory.pagesRequested = requested
        memory.normal = builder.dataPages + requested
        memory.duplicate = builder.zeroPages
        memory.transferred = builder.dataPages * UInt64(pageSize) + (requestServer?.dataBytes.value ?? 0)
        memory.precopyBytes = (frozen ? dataPagesAtFreeze : builder.dataPages) * UInt64(pageSize)
        memory.postcopyBytes = memory.transferred - min(memory.transferred, memory.precopyBytes + downtimeBytes)
        if final { memory.digest = "\(hashes.digest())" }
        memory.throttle = throttle?.report
        // Not yet at the destination: what the push has left, or the pages dirtied since they were sent.
        memory.remaining = options.mode.isPostcopy && !needed.isEmpty
            ? UInt64(needed.reduce(0) { $0 + $1.count }) * UInt64(pageSize)
            : UInt64(pending.reduce(0) { $0 + $1.count }) * UInt64(pageSize)
        report.memory = memory
    }

    // MARK: - Pages

    /// Sends pages `[from, limit)` of region `index` in batches, a stretch of pages that cannot
    /// hold data as one zero run; returns where it stopped (after one batch or one zero run).
    private func sendPages(of index: Int, from page: Int, limit: Int, mayHoldData: (Int) -> Bool,
                           on link: PeerLink) throws(LinkError) -> Int {
        let region = regions[index]
        if !mayHoldData(page) {
            var end = page + 1
            while end < limit && !mayHoldData(end) && end - page < Int(PageRun.maxCount) { end += 1 }
            if end - page >= builder.batchPages || end == limit {
                try link.send(.pageBatch(PageBatch(regionID: region.id, pageShift: 12, firstPage: UInt64(page),
                                                   runs: PageRunList([.zero(UInt32(end - page))]), payload: .empty)))
                for p in page..<end { hashes.recordZero(page: region.firstGlobalPage + p) }
                return end
            }
        }
        let count = min(builder.batchPages, limit - page)
        try sendBatch(region: index, first: page, count: count, mayHoldData: mayHoldData, on: link)
        return page + count
    }

    /// Builds and sends one `pageBatch` (`beforeSend` sees the frame first).
    private func sendBatch(region index: Int, first: Int, count: Int, mayHoldData: (Int) -> Bool, on link: PeerLink,
                           beforeSend: (Message) -> Void = { _ in }) throws(LinkError) {
        let region = regions[index]
        do {
            try builder.withBatch(regionID: region.id, hostAddress: region.range.start, first: first, count: count,
                                  globalFirst: region.firstGlobalPage + first, mayHoldData: mayHoldData) { batch in
                let message = Message.pageBatch(batch)
                beforeSend(message)
                try link.send(message)
            }
        } catch let error as LinkError {
            throw error
        } catch {
            throw .local(.storageFailure, reason: "reading pages \(first)+\(count) of region \(region.id) of process \(options.pid): \(error)")
        }
    }

    /// Adds the pages of address runs to ``pending``.
    private func addToPending(_ runs: borrowing PageRunBuffer) {
        for i in 0..<runs.count {
            let run = runs[i]
            for (index, region) in regions.enumerated() where region.range.overlaps(run) {
                let start = max(run.start, region.range.start), end = min(run.end, region.range.end)
                let first = Int((start - region.range.start) / UInt64(pageSize))
                let last = Int((end - region.range.start + UInt64(pageSize) - 1) / UInt64(pageSize))
                for page in first..<last { pending[index].insert(page) }
            }
        }
    }

    /// The region and page of a global page number (past the end: the end).
    private func locate(globalPage: Int) -> (Int, Int) {
        for (index, region) in regions.enumerated() where globalPage < region.firstGlobalPage + region.pageCount {
            return (index, max(0, globalPage - region.firstGlobalPage))
        }
        return (regions.count, 0)
    }

    /// Pages of region `index` that may hold data. For private memory: those present or swapped in
    /// the page table (never-touched pages are never sent). For shared memory (memfd, /dev/shm)
    /// every page: its data may live in the page cache without a page-table entry here, so each
    /// page is read and zero detection decides.
    private func residency(of index: Int) throws -> PageSet {
        let region = regions[index]
        let set = PageSet(pageCount: region.pageCount)
        if shared[index] {
            set.insertAll()
            return set
        }
        let reader = try ProcessMemoryReader(pid: options.pid, pageSize: UInt64(region.pageSize))
        let bitmap = PageBitmap(pageCount: region.pageCount)
        try reader.residency(of: region.range, into: bitmap)
        bitmap.forEachRun { first, count in for p in first..<(first + count) { set.insert(p) } }
        return set
    }
}

/// Post-copy push frames sent and not yet acknowledged, oldest first: after a reconnect, the pages
/// of every frame the destination did not apply are pushed again. A fixed ring; the push waits
/// while it is full.
struct PushLedger {
    struct Entry { var frame: UInt64; var region: Int; var first: Int; var count: Int }
    private static let capacity = 1 << 15
    private var entries: [Entry] = []
    private var head = 0

    var isFull: Bool { entries.count - head >= Self.capacity }

    mutating func append(frame: UInt64, region: Int, first: Int, count: Int) {
        if head > 4096 && head * 2 > entries.count {
            entries.removeFirst(head)
            head = 0
        }
        entries.append(Entry(frame: frame, region: region, first: first, count: count))
    }

    mutating func acknowledge(upTo frame: UInt64) {
        while head < entries.count && entries[head].frame <= frame { head += 1 }
    }

    /// The entries after `frame` (they are forgotten).
    mutating func lost(after frame: UInt64) -> [Entry] {
        acknowledge(upTo: frame)
        let rest = Array(entries[head...])
        entries.removeAll()
        head = 0
        return rest
    }
}
