import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Synchronization
import URing
import Wire

/// Migrates the memory of a running process (a KVM VMM or any process) to a dest-agent:
///
/// - pre-copy (Clark et al. 2004): round 0 sends every page the process ever touched (pagemap
///   residency; never-touched pages travel as zero runs, with no content), then rounds of pages the
///   dirty tracker saw written, until ``ConvergencePolicy`` says the rest fits the downtime target;
///   then pause, send the final dirty set and the VM state, and the destination resumes.
/// - post-copy (Hines & Gopalan 2009): pause at once, send the VM state; the destination resumes
///   and pulls the pages its VM faults on over the urgent lane (``PageRequestServer``) while this
///   side pushes the rest, restarting near the latest fault.
/// - hybrid: some pre-copy rounds, then post-copy for the pages dirtied since the last round (the
///   destination is told to discard its stale copies of them).
///
/// Any failure before switchover resumes the process here; after switchover it stays paused.
public final class MemorySourceMigration: @unchecked Sendable {
    let options: MemorySourceOptions
    let logger: Logger
    private let sessionID = SessionID.random()
    var phase = PhaseTracker()
    var progress = ProgressLine()
    private let cancelled = Atomic<Bool>(false)
    private let links = Mutex<[PeerLink]>([])

    // Published by the main link's reader thread, read under the link's lock.
    private var completedRoundAtPeer = -1
    var pacer = PushPacer(targetNanoseconds: 2_000_000)
    private var resumedAt: UInt64?
    private var peerCompletion: Wire.Completion?

    public init(options: MemorySourceOptions, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    deinit { pacer.deallocate() }

    /// Stops the migration from another thread (SIGTERM): the links close and ``run()`` fails,
    /// resuming the process if it has not switched over.
    public func cancel() {
        cancelled.store(true, ordering: .relaxed)
        links.withLock { for link in $0 { link.close() } }
    }

    /// What was sent, for the report.
    private struct Tally {
        var precopyBytes: UInt64 = 0
        var downtimeBytes: UInt64 = 0
        var postcopyBytes: UInt64 = 0
        var pagesPerRound: [UInt64] = []
        var pagesPushed: UInt64 = 0
        var dirtyRate: Double = 0
        var bandwidth: Double = 0
        var scans = 0
        var touched: UInt64 = 0
    }

    /// Runs the migration to the end. Never throws: failures are in the report.
    public func run() -> MigrationReport {
        var report = MigrationReport(role: "source")
        var memory = MigrationReport.MemoryReport()
        memory.mode = options.mode.rawValue
        let start = ContinuousClock.now
        let pauser = ProcessPause(pid: options.pid, pauseCommand: options.pauseCommand, resumeCommand: options.resumeCommand)
        var paused = false
        var switchedOver = false
        var tally = Tally()
        var tracker: AnyDirtyPageTracker? = nil
        var sentHashes: SentPageHashes? = nil
        var failure: String? = nil
        var mainLink: PeerLink? = nil
        var urgentLink: PeerLink? = nil
        var vmNeverStartedThere = false

        func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

        do {
            // 1. The regions, the layout, the tracker.
            let regions = try chooseRegions()
            let pageSize = 4096
            memory.total = regions.reduce(0) { $0 + $1.range.length }
            let layout = GuestMemoryLayout(pageSize: UInt32(pageSize), regions: regions.map(\.wire))
            logger.info("migrating memory", metadata: [
                "pid": "\(options.pid)", "mode": "\(options.mode.rawValue)", "regions": "\(regions.map { "\($0.range)" })",
                "bytes": "\(memory.total)"])
            if options.mode != .postcopy {
                var fallback: ProcessMemoryError? = nil
                var attached: AnyDirtyPageTracker
                if options.contentHashTracking {
                    attached = .hash(try HashDirtyTracker(pid: options.pid, regions: try trackedRegions(regions)))
                } else {
                    attached = try AnyDirtyPageTracker.attach(pid: options.pid, regions: try trackedRegions(regions), fallbackReason: &fallback)
                }
                memory.trackingMethod = attached.method
                if let fallback {
                    logger.warning("kernel dirty tracking unavailable; using content hashing", metadata: ["reason": "\(fallback)"])
                }
                logger.info("dirty tracking", metadata: ["method": "\(attached.method)"])
                // The first scan arms tracking (it reports every page): writes from now on are seen.
                var discard = PageRunBuffer(capacity: 1024)
                try attached.scanDirty(into: &discard)
                tally.scans += 1
                sentHashes = attached.sentHashes
                tracker = consume attached
            } else {
                memory.trackingMethod = "none (post-copy)"
            }
            var builder = try PageBatchBuilder(pid: options.pid, batchPages: options.batchPages, pageSize: pageSize)
            builder.sentHashes = sentHashes

            // 2. The link (and the urgent lane for post-copy).
            phase.move(to: .handshake)
            var features: Features = [.memory, .zeroRuns]
            if options.mode.isPostcopy { features.formUnion([.postcopy, .urgentLane]) }
            let link = try PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID, features: features,
                                            mode: .new, resumePoints: [], receiveTimeout: options.receiveTimeout)
            mainLink = link
            links.withLock { $0.append(link) }
            if options.mode.isPostcopy {
                guard link.agreement.features.contains(.urgentLane) else {
                    throw SetupError("the destination does not offer the urgent lane post-copy needs")
                }
                let urgent = try PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID,
                                                  features: [.urgentLane], mode: .new, resumePoints: [],
                                                  receiveTimeout: 3600)
                if options.urgentPriority > 0 && !urgent.setPriority(options.urgentPriority) {
                    logger.warning("cannot set SO_PRIORITY on the urgent lane", metadata: ["errno": "\(errno)"])
                }
                urgentLink = urgent
                links.withLock { $0.append(urgent) }
            }
            if cancelled.load(ordering: .relaxed) { throw SetupError("cancelled") }
            report.setupTimeMs = seconds(ContinuousClock.now - start) * 1000
            startReader(on: link)
            try link.sender.send(.memoryLayout(layout))

            // 3. Pre-copy: round 0 and dirty rounds.
            var pending = PageRunBuffer(capacity: 4096)
            if options.mode != .postcopy {
                phase.move(to: .bulk)
                let bulkStart = ContinuousClock.now
                let sentBefore = link.sender.bytesSent
                var roundPages: UInt64 = 0
                for region in regions {
                    let resident = try residency(of: region)
                    tally.touched += UInt64(resident.count) * UInt64(pageSize)
                    roundPages += try sendRegion(region, pages: 0..<region.pageCount, mayHoldData: { resident.contains($0) },
                                                 builder: &builder, link: link)
                }
                memory.touched = tally.touched
                try link.sender.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: 0, itemsSent: roundPages,
                                                        bytesSent: link.sender.bytesSent - sentBefore, dirtyRemaining: 0)))
                tally.pagesPerRound.append(roundPages)
                tally.bandwidth = Double(link.sender.bytesSent) / max(0.001, seconds(ContinuousClock.now - bulkStart))
                logger.info("round 0 sent", metadata: ["touched_bytes": "\(tally.touched)", "pages": "\(roundPages)",
                                                       "mb_per_s": "\(Int(tally.bandwidth / 1e6))"])
                var roundStart = ContinuousClock.now
                try tracker!.scanDirty(into: &pending)
                tally.scans += 1
                // Dirty rate: what the last scan found over the time since the scan before it.
                var previousScan = bulkStart, lastScan = ContinuousClock.now
                var round = 1
                rounds: while true {
                    let remaining = UInt64(pending.pageCount(pageSize: UInt64(pageSize)) * pageSize)
                    tally.dirtyRate = Double(remaining) / max(0.01, seconds(lastScan - previousScan))
                    let decision: ConvergencePolicy.Decision
                    if options.mode == .hybrid && round > options.precopyRounds {
                        decision = .switchover(reason: "hybrid: \(options.precopyRounds) pre-copy rounds done")
                    } else {
                        decision = options.policy.decide(remainingBytes: remaining, bandwidth: tally.bandwidth, dirtyRate: tally.dirtyRate,
                                                         round: round - 1, elapsed: seconds(ContinuousClock.now - start), throttled: true)
                    }
                    progress.update(phase: phase.current, sentBytes: link.sender.bytesSent, totalBytes: memory.total,
                                    dirtyRate: tally.dirtyRate, bandwidth: tally.bandwidth, throttled: false, remainingBytes: remaining, force: true)
                    if case .switchover(let reason) = decision {
                        report.reason = reason
                        report.expectedDowntimeMs = tally.bandwidth > 0 ? Double(remaining) / tally.bandwidth * 1000 : 0
                        logger.info("switching over", metadata: ["reason": "\(reason)", "round": "\(round - 1)",
                                                                 "remaining_bytes": "\(remaining)"])
                        break rounds
                    }
                    if cancelled.load(ordering: .relaxed) { throw SetupError("cancelled") }
                    if let failure = link.failureSeen { throw failure }
                    phase.move(to: .round(round))
                    roundStart = ContinuousClock.now
                    let sentBefore = link.sender.bytesSent
                    let pages = try sendRuns(pending, regions: regions, builder: &builder, link: link)
                    try link.sender.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: UInt32(round), itemsSent: pages,
                                                            bytesSent: link.sender.bytesSent - sentBefore, dirtyRemaining: 0)))
                    tally.pagesPerRound.append(pages)
                    let sendSeconds = max(0.001, seconds(ContinuousClock.now - roundStart))
                    tally.bandwidth = max(tally.bandwidth * 0.5, Double(link.sender.bytesSent - sentBefore) / sendSeconds)
                    try tracker!.scanDirty(into: &pending)
                    tally.scans += 1
                    previousScan = lastScan
                    lastScan = ContinuousClock.now
                    logger.debug("round sent", metadata: ["round": "\(round)", "pages": "\(pages)"])
                    round += 1
                }
                tally.precopyBytes = builder.dataPages * UInt64(pageSize)
                // Let what is queued in socket buffers arrive while the process still runs.
                let lastRound = tally.pagesPerRound.count - 1
                try? link.wait(timeout: 10, during: "draining before switchover") { completedRoundAtPeer >= lastRound }
                if let failure = link.failureSeen { throw failure }
            }

            // 4. Pause.
            if cancelled.load(ordering: .relaxed) { throw SetupError("cancelled") }
            let pausedAt = ferry_monotonic_ns()
            try pauser.pause()
            paused = true
            phase.move(to: .switchover)
            logger.info("process paused", metadata: ["pid": "\(options.pid)"])
            if var attached = tracker.take() {
                var final = PageRunBuffer(capacity: 1024)
                try attached.scanDirty(into: &final)
                tally.scans += 1
                for i in 0..<final.count { pending.append(final[i]) }
                // The tracker's hash table goes with it: nothing may record into it any more.
                builder.sentHashes = nil
                try attached.detach()
            }
            let state = try vmState()
            memory.vmStateBytes = UInt64(state.count)
            let finalRound = UInt32(tally.pagesPerRound.count)
            let finalPages = UInt64(pending.pageCount(pageSize: UInt64(pageSize)))

            // Post-copy: what the push stream must still send, per region.
            var needed: [PageSet] = []
            var requestServer: PageRequestServer? = nil
            if options.mode.isPostcopy {
                needed = regions.map { PageSet(pageCount: $0.pageCount) }
                if options.mode == .postcopy {
                    for set in needed { set.insertAll() }
                } else {
                    try forEachPage(of: pending, regions: regions) { index, page in needed[index].insert(page) }
                }
                let server = try PageRequestServer(pid: options.pid, regions: regions, logger: logger)
                server.start(on: urgentLink!)
                requestServer = server
            }
            let toCome = options.mode.isPostcopy ? UInt64(needed.reduce(0) { $0 + $1.count }) : finalPages
            if options.mode == .hybrid {
                // Before switchover, so the destination has dropped its stale copies of the pages
                // dirtied since the last round before it can resume the VM.
                try sendDiscards(pending, regions: regions, link: link)
            }
            try link.sender.send(.switchover(Switchover(finalRound: finalRound, mode: options.mode.isPostcopy ? .memoryPostcopy : [],
                                                        diskBytesToCome: 0, memoryPagesToCome: toCome, vmStateLength: UInt64(state.count))))
            switchedOver = true
            let beforeFinal = builder.dataPages
            if options.mode == .precopy {
                let pages = try sendRuns(pending, regions: regions, builder: &builder, link: link)
                tally.pagesPerRound.append(pages)
            }
            try sendState(state, link: link)
            if options.mode == .precopy {
                try link.sender.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: finalRound, itemsSent: finalPages,
                                                        bytesSent: 0, dirtyRemaining: 0)))
                tally.downtimeBytes = (builder.dataPages - beforeFinal) * UInt64(pageSize)
            } else {
                // 5. Post-copy: push what is left, near the latest fault first.
                phase.move(to: .postcopy)
                let pushed = try push(needed: needed, regions: regions, server: requestServer!, pauser: pauser,
                                      builder: &builder, link: link)
                tally.pagesPushed = pushed
                tally.pagesPerRound.append(pushed)
                try link.sender.send(.roundEnd(RoundEnd(stream: .memory, streamID: 0, round: finalRound, itemsSent: pushed,
                                                        bytesSent: 0, dirtyRemaining: 0)))
                tally.postcopyBytes = (builder.dataPages - beforeFinal) * UInt64(pageSize) + requestServer!.dataBytes.value
                memory.postcopyRequests = requestServer!.requests.value
                memory.pagesRequested = requestServer!.pagesSent.value
            }

            // 6. The destination runs the VM: downtime, then the digests.
            try link.wait(timeout: options.receiveTimeout + 60, during: "waiting for the destination to resume") { resumedAt != nil }
            let resumedNs = link.publish { resumedAt! }
            report.downtimeMs = Double(resumedNs &- pausedAt) / 1e6
            logger.info("destination resumed the process", metadata: ["downtime_ms": "\(String(format: "%.1f", report.downtimeMs))"])
            phase.move(to: .complete)
            let digestStart = ContinuousClock.now
            let digestHex = try MemoryDigest.of(pid: options.pid, regions: regions.map(\.range), pageSize: UInt64(pageSize),
                                                readWhole: try regions.map { try isShared($0) })
            memory.digest = digestHex
            memory.digestTimeMs = seconds(ContinuousClock.now - digestStart) * 1000
            let digest = Digest.fromHex(digestHex)
            try link.sender.send(.complete(Wire.Completion(digests: [StreamDigest(stream: .memory, streamID: 0, digest: digest)])))
            try link.wait(timeout: options.receiveTimeout + 120, during: "digest exchange") { peerCompletion != nil }
            let theirs = link.publish { peerCompletion! }
            report.digestsAgree = theirs.digests.first { $0.stream == .memory && $0.streamID == 0 }?.digest == digest
            if !report.digestsAgree {
                failure = "memory digests differ: source \(digestHex), destination \(theirs.digests.map { "\($0.digest)" })"
            }
            memory.normal = builder.dataPages + (requestServer?.pagesSent.value ?? 0)
            memory.duplicate = builder.zeroPages
            memory.transferred = builder.dataPages * UInt64(pageSize) + (requestServer?.dataBytes.value ?? 0)
        } catch {
            failure = "\(error)"
            // The reader may have seen the destination's error frame while this thread failed a send.
            for candidate in [error as? LinkError, mainLink?.failureSeen] {
                if let candidate, case .peer(let code, _) = candidate, code == .vmStartFailed {
                    vmNeverStartedThere = mainLink.map { link in link.publish { resumedAt == nil } } ?? false
                }
            }
        }
        if let attached = tracker.take() { try? attached.detach() }

        let wire = (mainLink?.sender.bytesSent ?? 0) + (urgentLink?.sender.bytesSent ?? 0)
        mainLink?.close()
        urgentLink?.close()
        progress.finish()
        memory.precopyBytes = tally.precopyBytes
        memory.downtimeBytes = tally.downtimeBytes
        memory.postcopyBytes = tally.postcopyBytes
        memory.pagesPerRound = tally.pagesPerRound
        memory.pagesPushed = tally.pagesPushed
        memory.dirtyRate = tally.dirtyRate
        memory.dirtySyncCount = tally.scans
        report.memory = memory
        report.wireBytes = wire
        report.mbps = tally.bandwidth > 0 ? tally.bandwidth * 8 / 1e6
                                          : Double(wire) * 8 / 1e6 / max(0.001, seconds(ContinuousClock.now - start))
        report.totalTimeMs = seconds(ContinuousClock.now - start) * 1000
        if let failure {
            report.status = "failed"
            report.reason = failure
            if switchedOver && vmNeverStartedThere {
                // The destination says its VM never ran: the paused copy here is the only one.
                switchedOver = false
            }
            if !switchedOver {
                if paused || options.resumeCommand != nil {
                    do { try pauser.resume() } catch { logger.error("could not resume the process", metadata: ["error": "\(error)"]) }
                } else {
                    kill(options.pid, SIGCONT)
                }
                report.vmLocation = "source"
                logger.error("migration failed before switchover; the process runs here again", metadata: ["reason": "\(failure)"])
            } else {
                let runsThere = mainLink.map { link in link.publish { resumedAt != nil } } ?? false
                report.vmLocation = runsThere ? "destination" : "paused"
                logger.error("migration failed after switchover; the process stays paused here", metadata: ["reason": "\(failure)"])
            }
            if !phase.current.isTerminal { phase.move(to: .failed(failure)) }
        } else {
            report.status = "completed"
            report.vmLocation = "destination"
        }
        return report
    }

    // MARK: - Reader

    private func startReader(on link: PeerLink) {
        link.startReader(name: "ferry-memory-source-reader") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .ack(let ack):
                if ack.stream == .memory && ack.streamID == 0 {
                    link.publish { completedRoundAtPeer = max(completedRoundAtPeer, Int(ack.sequence) - 1) }
                } else if ack.stream == .memory && ack.streamID == PushPacer.ackStreamID {
                    link.publish { pacer.acknowledged(upTo: ack.offset) }
                }
            case .resumed:
                let now = ferry_monotonic_ns()
                link.publish { resumedAt = now }
            case .complete(let completion):
                link.publish { peerCompletion = completion }
            case .keepalive:
                break
            default:
                throw .unexpected(frame.header.type, expecting: "ack, resumed, complete or keepalive")
            }
        }
    }
}

