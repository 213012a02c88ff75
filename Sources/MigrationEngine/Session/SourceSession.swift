import CFerryShims
import Foundation
import Glibc
import Logging
import NBDBridge
import Synchronization
import URing
import Wire

/// What a source session needs besides its streams: where to, with which key, and when to give up.
public struct SessionOptions: Sendable {
    /// The dest-agent.
    public var destination: SocketAddress
    /// Where the live status goes (`--metrics`), if anywhere.
    public var status: StatusBoard?
    /// Whether bulk payloads go compressed (zstd), and the record of it.
    public var compression = CompressionPolicy(mode: .auto)
    /// The shared key both agents hold.
    public var key: SharedKey
    /// When to switch over and when to throttle: ONE decision over every stream's remaining bytes.
    public var policy = ConvergencePolicy()
    /// Before hand-over: give the migration up (the VM keeps running here) when the link stays down this long (seconds).
    public var linkTimeout: Double = 60
    /// A receive that sees nothing for this long (seconds) counts as a dropped link.
    public var receiveTimeout: Double = 30
    /// How long the destination may take to start the VM after the final data (seconds).
    public var vmStartTimeout: Double = 60
    /// Bytes one stream sends before the next stream's turn in the bulk copy and the post-copy
    /// push: how disk and memory share the link.
    public var sliceBytes: Int = 4 << 20
    /// The VM's network here, when its traffic is to follow it to the destination (a tunnel lane).
    public var network: TunnelOptions?

    public init(destination: SocketAddress, key: SharedKey) {
        self.destination = destination
        self.key = key
    }
}

/// One migration of a whole VM from the source side: its disks and its memory as streams of ONE
/// session over ONE link (``SourceStream``), with ONE convergence decision over the sum of what
/// remains against ONE bandwidth estimate, ONE pause (the VM first, then every disk), ONE hand-over
/// and ONE report. The session owns the link and everything that is the same for every stream:
/// the handshake, reconnect with backoff and resume from the destination's acknowledged points,
/// keepalives, the drain before the pause, the phases and the question of who owns the VM
/// (``SessionState``).
///
///     connecting → handshake → bulk → round 1 … n → switchover → [post-copy] → complete
///
/// Before the VM is offered, any failure resumes it here. After the offer (the `switchover` frame)
/// only the destination can settle who runs it: the session reconnects for as long as it takes and
/// never resumes a copy that may be stale (docs/wire.md, "Hand-over").
public final class SourceSession: @unchecked Sendable {
    private let options: SessionOptions
    private let vm: VMControl?
    private let streams: [any SourceStream]
    private let disks: [DiskSourceStream]
    private let memory: MemorySourceStream?
    private let logger: Logger
    private let sessionID = SessionID.random()
    private var state = SessionState()
    private var progress = ProgressLine()
    private let cancelled = Atomic<Bool>(false)
    private let openLinks = Mutex<[PeerLink]>([])
    /// The VM's end of the tunnel here, when its network follows it: it outlives the migration
    /// (the agent stops it after `--tunnel-linger`).
    public let tunnel: EthernetTunnel?
    /// When the tunnel began to carry the VM's traffic (the pause).
    public private(set) var tunnelSince: UInt64 = 0

    // Published by the main link's reader thread, read under the link's lock.
    private var resumedAt: UInt64?
    private var peerCompletion: Wire.Completion?
    /// Set (under the link's lock) before the `switchover` goes out: a `resumed` before it is a
    /// protocol violation, not a hand-over.
    private var offerMade = false

    /// A session migrating `disks` (each served by its own NBD server here) and, with `memory`, the
    /// memory of the VM process that `vm` pauses. Fails when a stream cannot be set up (a wrong
    /// PID, a missing permission), before anything is sent.
    public init(options: SessionOptions, vm: VMControl?, disks: [(server: NBDServer, store: FileBlockStore, options: DiskStreamOptions)],
                memory: MemoryStreamOptions?, logger: Logger) throws {
        self.options = options
        self.vm = vm
        self.logger = logger
        self.disks = try disks.map { try DiskSourceStream(server: $0.server, store: $0.store, options: $0.options, logger: logger) }
        self.memory = try memory.map { try MemorySourceStream(options: $0, logger: logger) }
        var all: [any SourceStream] = self.disks
        if let memory = self.memory { all.append(memory) }
        guard !all.isEmpty else { throw SetupError("nothing to migrate: give a disk, a VM's memory, or both") }
        streams = all
        if var network = options.network {
            if network.vmMAC == nil, let qemu = vm?.qemu {
                let macs = try qemu.nicMACs()
                guard macs.count == 1 else {
                    throw SetupError("the VM's QEMU has \(macs.count) NICs (\(macs)): name the one on bridge \(network.bridge) with --vm-mac")
                }
                network.vmMAC = macs[0]
            }
            guard network.vmMAC != nil else { throw SetupError("--vm-bridge needs the VM's MAC: give --vm-mac (or --vmm qemu, whose NIC tells it)") }
            tunnel = try EthernetTunnel.make(side: .source, options: network, logger: logger)
            tunnel!.start()
        } else {
            tunnel = nil
        }
    }

    /// Stops the migration from another thread (SIGTERM): the links close and ``run()`` fails,
    /// resuming the VM here unless it has been offered to the destination.
    public func cancel() {
        cancelled.store(true, ordering: .relaxed)
        openLinks.withLock { for link in $0 { link.close() } }
    }

    private var status: StatusBoard? { options.status }
    private var hasPrecopy: Bool { streams.contains { $0.hasPrecopy } }
    private var hasPostcopy: Bool { streams.contains { $0.isPostcopy } }

    /// Runs the migration to the end. Never throws: failures are in the report.
    public func run() -> MigrationReport {
        var report = MigrationReport(role: "source")
        let start = ContinuousClock.now
        var link: PeerLink? = nil
        var linkDownSince: ContinuousClock.Instant? = nil
        var wireBytes: UInt64 = 0
        /// The final count of bytes on the wire (set once every link is closed).
        var wireBytesNow: UInt64 = 0
        var reconnects = 0
        var failure: String? = nil
        var vmPaused = false
        var pausedAt: UInt64 = 0
        var vmState: [UInt8] = []
        var offerSent = false
        /// The urgent lanes of the current link are open (opened before the pause: their handshakes
        /// cost round trips that must not count as downtime).
        var lanesOpen = false
        var resendCompletion = false
        var finalRound = 0
        var bulkStart = ContinuousClock.now
        var lastCollect = ContinuousClock.now
        var bandwidth: Double = 0
        var dirtyRate: Double = 0
        var dirtyRates: [String: Double] = [:]
        /// What the last round left (the next decision compares against it: rounds go on while they shrink the set).
        var previousRemaining: UInt64?

        func seconds(since instant: ContinuousClock.Instant) -> Double {
            let d = ContinuousClock.now - instant
            return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        }
        func sentSoFar() -> UInt64 { wireBytes + (link?.bytesSent ?? 0) }
        /// Bytes that crossed the link so far: the current connection's as its TCP peer acknowledged them (what
        /// waits in the send buffer has not crossed: on a slow link that is seconds of data, and a rate counted
        /// from bytes sent misjudged a 6.25 MB/s link as 11.5 MB/s at switchover).
        func crossedSoFar() -> UInt64 {
            guard let link else { return wireBytes }
            let acknowledged = link.bytesAcknowledged
            return wireBytes + (acknowledged > 0 ? min(acknowledged, link.bytesSent) : link.bytesSent)
        }
        /// What the report says now: the common part the session measures (time, the link's throughput, each
        /// stream's dirty rate at the last round), then each stream's part. `final` false: a live snapshot.
        func fillReport(_ report: inout MigrationReport, final: Bool) {
            report.vmLocation = state.owner.location
            report.phase = "\(state.phase)"
            report.totalTimeMs = seconds(since: start) * 1000
            report.mbps = bandwidth * 8 / 1e6
            report.reconnects = reconnects
            report.wireBytes = final ? wireBytesNow : sentSoFar()
            for stream in streams { stream.fill(&report, final: final) }
            for index in report.disks.indices { report.disks[index].dirtyRate = dirtyRates["disk \(report.disks[index].diskID)"] ?? 0 }
            if report.memory != nil {
                report.memory!.dirtyRate = dirtyRates["memory"] ?? 0
                report.memory!.dirtyPagesRate = report.memory!.dirtyRate / Double(report.memory!.pageSize)
                report.memory!.mbps = report.mbps
                report.memory!.vmStateBytes = UInt64(vmState.count)
            }
            report.disk = report.disks.first
            report.network = networkReport()
            report.compression = compressionReport()
        }
        /// Publishes a live snapshot on the status board (`--metrics`) when one is due, or now when `force`.
        func publishStatus(force: Bool = false) {
            guard let status, force || status.due() else { return }
            var live = report
            fillReport(&live, final: false)
            status.publish(phase: state.phase, report: live, throttled: writersThrottled)
        }

        var publishedPhase = state.phase
        migration: while !state.phase.isTerminal {
            publishStatus(force: state.phase != publishedPhase)
            publishedPhase = state.phase
            do {
                if cancelled.load(ordering: .relaxed) { throw SetupError("cancelled") }
                // 1. A link: the first connection, or a reconnect that resumes the session.
                if link == nil {
                    let resumed = linkDownSince != nil
                    let newLink: PeerLink
                    do {
                        newLink = try connectWithBackoff(resume: resumed, since: linkDownSince ?? .now,
                                                         unbounded: state.owner != .source)
                    } catch {
                        if state.owner == .offered { state.leaveUnsettled() }
                        failure = "could not reach the destination: \(error)"
                        break migration
                    }
                    link = newLink
                    newLink.compress(with: options.compression)
                    openLinks.withLock { $0.append(newLink) }
                    if resumed {
                        reconnects += 1
                        let points = newLink.agreement.peerResumePoints
                        for stream in streams {
                            try stream.resume(from: points.first { $0.stream == stream.streamType && $0.streamID == stream.streamID },
                                              phase: state.phase)
                        }
                        if let memory, let push = points.first(where: { $0.stream == .memory && $0.streamID == PushPacer.ackStreamID }) {
                            try memory.resumePush(applied: push.offset, restarted: push.sequence == 1)
                        }
                        if newLink.agreement.handedOver {
                            if resumedAt == nil { resumedAt = ferry_monotonic_ns() }
                            state.handOver()
                            // The closing digests may have been lost with the old link: they go again.
                            resendCompletion = true
                        } else if state.owner == .offered {
                            // The destination has not started the VM: the offer goes again, whole.
                            offerSent = false
                        }
                        logger.info("link resumed", metadata: ["phase": "\(state.phase)", "owner": "\(state.owner)"])
                    } else {
                        state.move(to: .handshake)
                        report.setupTimeMs = seconds(since: start) * 1000
                        for stream in streams { try stream.announce(on: newLink) }
                        startTunnelLane()
                        bulkStart = .now
                        lastCollect = bulkStart
                        state.move(to: hasPrecopy ? .bulk : .switchover)
                        if hasPrecopy {
                            logger.info("bulk copy started", metadata: ["bytes": "\(streams.filter(\.hasPrecopy).reduce(UInt64(0)) { $0 + $1.totalBytes })",
                                                                        "streams": "\(streams.map(\.label))"])
                        }
                        if !hasPrecopy { report.reason = "post-copy: hand over at once" }
                    }
                    startReader(on: newLink)
                    newLink.startKeepalive()
                    lanesOpen = false
                    if state.owner != .source && hasPostcopy {
                        try openUrgentLanes()   // the VM may run there and wait for data: new lanes
                        lanesOpen = true
                    }
                    linkDownSince = nil
                }
                guard let active = link else { break migration }

                switch state.phase {
                case .bulk:
                    // Disk and memory share the link in proportion to what each has left, so that
                    // their bulk copies end together: memory sent early would only go stale while
                    // a large disk is still copied (and be sent again in the rounds).
                    let largest = streams.map(\.bulkRemaining).max() ?? 0
                    var allDone = true
                    for stream in streams where stream.hasPrecopy {
                        let share = largest == 0 ? 1 : Double(stream.bulkRemaining) / Double(largest)
                        let budget = max(256 << 10, Int(Double(options.sliceBytes) * share))
                        if try !stream.sendBulk(budget: budget, on: active) { allDone = false }
                    }
                    bandwidth = Double(crossedSoFar()) / max(0.001, seconds(since: bulkStart))
                    options.compression.linkRate(bytesPerSecond: bandwidth)
                    showProgress(bandwidth: bandwidth, dirtyRate: 0, remaining: nil)
                    if allDone {
                        // Round 1's dirty set is what was written since tracking began with the bulk copy:
                        // its rate is over that time (the bulk's end would make a few milliseconds of it and
                        // a rate hundreds of times too high, which the throttle then acted on).
                        state.move(to: .round(1))
                    }

                case .round(let round):
                    // Let the rounds in flight arrive before collecting, VM running: the set then holds
                    // what the VM dirtied meanwhile, which a pause right after the decision would
                    // otherwise find unpredicted (a 53 KB decision once became a 2 MB final set, 85 ms
                    // more downtime), and each round's set is what one round's transfer and round trip
                    // let the VM dirty. Draining only near the target made the first drained round
                    // carry the queue of the large one before it (2.0 MB after 2.6: read as a stall).
                    if bandwidth > 0 {
                        try? active.wait(timeout: 10, during: "letting the last round arrive") {
                            streams.allSatisfy { $0.roundsAcknowledged }
                        }
                        if let seen = active.failureSeen { throw seen }
                    }
                    // ONE decision over the sum of what remains in every stream.
                    var remaining: UInt64 = 0
                    var memoryRemaining: UInt64 = 0
                    let interval = max(0.01, seconds(since: lastCollect))
                    for stream in streams where stream.hasPrecopy {
                        let dirty = try stream.collectDirty()
                        remaining += dirty
                        if stream.streamType == .memory { memoryRemaining = dirty }
                        dirtyRates[stream.label] = Double(dirty) / interval
                    }
                    dirtyRate = Double(remaining) / interval
                    lastCollect = .now
                    bandwidth = Double(crossedSoFar()) / max(0.001, seconds(since: bulkStart))
                    options.compression.linkRate(bytesPerSecond: bandwidth)
                    showProgress(bandwidth: bandwidth, dirtyRate: dirtyRate, remaining: remaining, force: true)
                    // Nothing to throttle counts as throttled already: the decision then never asks for it.
                    let memoryThrottles = memory?.canThrottle ?? false
                    let throttled = (disks.isEmpty && !memoryThrottles) || disks.contains { $0.isThrottled } || (memory?.isThrottled ?? false)
                    if let memory, memory.isThrottled {
                        // Its limit is set again from what this round dirtied (the CPU limit follows the rate).
                        memory.adjustThrottle(dirtied: memoryRemaining, in: interval)
                    }
                    var decision: ConvergencePolicy.Decision
                    if let memory, memory.options.mode == .hybrid, round > memory.options.precopyRounds {
                        // Hybrid memory has had its rounds: what it still has goes after switchover.
                        // What goes during the pause is the pre-copy disks' rest, so they decide.
                        let diskRemaining = remaining - memoryRemaining
                        let diskRate = max(0, dirtyRate - Double(memoryRemaining) / interval)
                        decision = disks.contains(where: \.hasPrecopy)
                            ? options.policy.decide(remainingBytes: diskRemaining, bandwidth: bandwidth, dirtyRate: diskRate,
                                                    round: round - 1, elapsed: seconds(since: start),
                                                    throttled: disks.contains { $0.isThrottled })
                            : .switchover(reason: "")
                        if case .switchover(let why) = decision {
                            decision = .switchover(reason: "hybrid: \(memory.options.precopyRounds) pre-copy rounds done" + (why.isEmpty ? "" : "; disks: \(why)"))
                        }
                    } else {
                        decision = options.policy.decide(remainingBytes: remaining, bandwidth: bandwidth, dirtyRate: dirtyRate,
                                                         round: round - 1, elapsed: seconds(since: start),
                                                         throttled: throttled,
                                                         previousRemainingBytes: previousRemaining ?? .max,
                                                         roundTrip: active.agreement.roundTrip)
                    }
                    previousRemaining = remaining
                    switch decision {
                    case .switchover(let reason):
                        report.reason = reason
                        report.expectedDowntimeMs = bandwidth > 0 ? (Double(remaining) / bandwidth + options.policy.pauseOverhead) * 1000 : 0
                        logger.info("switching over", metadata: ["reason": "\(reason)", "round": "\(round - 1)", "remaining_bytes": "\(remaining)",
                                                             "collected_over_ms": "\(Int(interval * 1000))"])
                        state.move(to: .switchover)
                        continue migration
                    case .throttle(let bytesPerSecond):
                        // The limit is for everything the VM dirties. With a memory throttle, memory gets
                        // its share of the dirtying (at least 5 % of the link), else only the disk writes
                        // can be held, and they get what the memory's dirtying leaves (at least 5 %);
                        // the disks share theirs.
                        let memoryRate = dirtyRates["memory"] ?? 0
                        var memoryLimit = memoryRate
                        if let memory, memoryThrottles {
                            memoryLimit = max(bandwidth * 0.05, Double(bytesPerSecond) * memoryRate / max(1, dirtyRate))
                            memory.throttle(to: UInt64(memoryLimit), dirtyRate: memoryRate, round: round - 1)
                            if !memory.isThrottled { memoryLimit = memoryRate }   // it could not be engaged
                        }
                        let diskShare = max(bandwidth * 0.05, Double(bytesPerSecond) - memoryLimit) / Double(max(1, disks.count))
                        for disk in disks { disk.throttle(bytesPerSecond: UInt64(diskShare)) }
                        logger.info("write throttle on", metadata: ["dirty_rate": "\(Int(dirtyRate))", "bandwidth": "\(Int(bandwidth))",
                                                                    "limit": "\(bytesPerSecond)"])
                    case .iterate:
                        break
                    }
                    for stream in streams where stream.hasPrecopy { try stream.sendRound(round, on: active) }
                    logger.info("round done", metadata: ["round": "\(round)", "sent_bytes": "\(remaining)", "collected_over_ms": "\(Int(interval * 1000))",
                                                         "dirty_rate": "\(Int(dirtyRate))", "bandwidth": "\(Int(bandwidth))"])
                    finalRound = round + 1
                    state.move(to: .round(round + 1))

                case .switchover:
                    if !vmPaused {
                        // Let what is queued in socket buffers and on the link arrive while the VM
                        // still runs, so it does not count against the downtime.
                        try? active.wait(timeout: 10, during: "draining before switchover") {
                            streams.allSatisfy { $0.roundsAcknowledged }
                        }
                        if let seen = active.failureSeen { throw seen }
                        if hasPostcopy && !lanesOpen {
                            try openUrgentLanes()
                            lanesOpen = true
                        }
                        // ONE pause: the VM first, then every disk.
                        pausedAt = ferry_monotonic_ns()
                        if let tunnel {
                            tunnel.takeOver()   // from now what arrives for the VM goes to the destination: none is left in the paused VM's queue
                            tunnelSince = pausedAt
                        }
                        memory?.liftThrottle()   // the VMM stops its vCPUs and saves its state at full speed
                        try vm?.pause()
                        vmPaused = true
                        let stoppedAt = ferry_monotonic_ns()
                        // The state before the last scan: whatever the VMM writes while saving it is caught.
                        vmState = try vm?.state() ?? []
                        let savedAt = ferry_monotonic_ns()
                        for stream in streams { try stream.freeze() }
                        let frozenAt = ferry_monotonic_ns()
                        report.downtimeSteps["pause_ms"] = Double(stoppedAt &- pausedAt) / 1e6
                        report.downtimeSteps["state_ms"] = Double(savedAt &- stoppedAt) / 1e6
                        report.downtimeSteps["final_scan_ms"] = Double(frozenAt &- savedAt) / 1e6
                        logger.info("VM paused", metadata: ["pid": "\(vm?.pid ?? 0)", "state_bytes": "\(vmState.count)",
                                                            "steps_ms": "\(report.downtimeSteps.mapValues { (($0 * 10).rounded() / 10) })"])
                    }
                    if !offerSent {
                        let offerAt = ferry_monotonic_ns()
                        if hasPostcopy && !lanesOpen {
                            try openUrgentLanes()
                            lanesOpen = true
                        }
                        try offer(on: active, round: max(finalRound, 1), state: vmState)
                        offerSent = true
                        report.downtimeSteps["offer_sent_ms"] = Double(ferry_monotonic_ns() &- offerAt) / 1e6
                    }
                    try active.wait(timeout: options.receiveTimeout + options.vmStartTimeout, during: "waiting for the destination to start the VM") {
                        resumedAt != nil
                    }
                    if state.owner != .destination { state.handOver() }
                    report.downtimeMs = Double(active.publish { resumedAt! } &- pausedAt) / 1e6
                    report.downtimeSteps["until_resumed_ms"] = report.downtimeMs - report.downtimeSteps.values.reduce(0, +)
                    logger.info("the VM runs at the destination", metadata: ["downtime_ms": "\(String(format: "%.1f", report.downtimeMs))"])
                    if hasPostcopy {
                        state.move(to: .postcopy)
                    } else {
                        if resendCompletion {
                            try active.send(.complete(Wire.Completion(digests: streams.map { $0.digest() })))
                        }
                        try finish(on: active, report: &report)
                    }

                case .postcopy:
                    var allDone = true
                    for stream in streams where stream.isPostcopy {
                        if try !stream.push(budget: options.sliceBytes, on: active) { allDone = false }
                    }
                    showProgress(bandwidth: bandwidth, dirtyRate: 0, remaining: nil)
                    if allDone {
                        try active.send(.complete(Wire.Completion(digests: streams.filter(\.isPostcopy).map { $0.digest() })))
                        try finish(on: active, report: &report)
                    }

                default:
                    break migration
                }
            } catch var error as LinkError {
                if let link {
                    // This side's verdict (an impossible resume point): the destination is told
                    // why, as the reader tells it about frames (it already did if it failed).
                    if case .local(let code, let reason) = error, link.failureSeen == nil {
                        try? link.send(.error(.truncating(code: code, reason: reason)))
                    }
                    wireBytes += link.bytesSent
                    link.close()
                    link.waitForReader()
                    // A send that failed because the destination closed after an `error` frame, or
                    // because the reader refused a frame: what the reader saw is what counts, not the EPIPE.
                    if let seen = link.failureSeen, case .peer = seen {
                        error = seen
                    } else if let seen = link.failureSeen, !seen.isRetryable {
                        error = seen
                    }
                }
                link = nil
                // The destination's closing digests arrived before the link went: nothing is left to do.
                if state.owner == .destination, let theirs = peerCompletion, !streams.contains(where: { $0.isPostcopy }) || state.phase == .postcopy {
                    if compare(theirs, report: &report) { state.move(to: .complete); break migration }
                }
                let notStarted = resumedAt == nil && state.owner == .offered
                if case .peer(let code, _) = error, notStarted, code != .timeout, code != .busy {
                    // The destination refused the offer explicitly before running the VM (its digest
                    // differs, the VM did not start): the paused copy here is the only one.
                    state.takeBack()
                    failure = "\(error)"
                    break migration
                }
                guard error.isRetryable, !cancelled.load(ordering: .relaxed), !state.phase.isTerminal else {
                    failure = "\(error)"
                    break migration
                }
                logger.warning("link lost; reconnecting", metadata: ["error": "\(error)", "phase": "\(state.phase)", "owner": "\(state.owner)"])
                linkDownSince = linkDownSince ?? .now
            } catch {
                // A local failure (a hook, the VM): while the VM is still this side's, the
                // destination is told, so it gives up now instead of waiting for a reconnect (and
                // drops a VM it pre-started).
                if let link, state.owner == .source, link.failureSeen == nil {
                    try? link.send(.error(.truncating(code: .aborted, reason: "the source gave up: \(error)")))
                }
                failure = "\(error)"
                break migration
            }
        }

        progress.finish()
        // The destination answers reconnects with its `complete` until this side says goodbye
        // (it cannot tell a link dropped before its digests arrived here from a finished source).
        var saidGoodbye = false
        if let link, state.phase == .complete, link.failureSeen == nil {
            saidGoodbye = (try? link.send(.ack(Ack.goodbye))) != nil
        }
        if state.phase == .complete && !saidGoodbye { sayGoodbyeOnANewLink() }
        if let link {
            wireBytes += link.bytesSent
            link.close()
            link.waitForReader()
        }
        for stream in streams { stream.stop() }

        if let failure {
            switch state.owner {
            case .source:
                if vmPaused {
                    do { try vm?.resume() } catch { logger.error("could not resume the VM here", metadata: ["error": "\(error)"]) }
                } else if let vm, vm.usesSignals {
                    kill(vm.pid, SIGCONT)   // harmless when it was never stopped
                }
                for stream in streams { stream.thaw() }
                if let tunnel {
                    tunnel.handBack()   // the VM's MAC is its own port's again
                    tunnel.stop()
                }
                report.reason = "\(failure); the VM keeps running at the source"
            case .offered, .unsettled:
                state.leaveUnsettled()
                report.reason = "\(failure); the destination may run the VM, so it stays paused here until an operator decides"
            case .destination:
                report.reason = "\(failure) (after hand-over: the VM runs at the destination)"
            }
            if !state.phase.isTerminal { state.move(to: .failed(failure)) }
            report.status = "failed"
            logger.error("migration failed", metadata: ["reason": "\(report.reason)", "vm_location": "\(state.owner.location)"])
        } else {
            report.status = "completed"
        }
        wireBytesNow = wireBytes
        fillReport(&report, final: true)
        if report.status == "completed" { report.memory?.remaining = 0 }
        status?.publish(phase: state.phase, report: report)
        return report
    }

    /// The report's compression part (nil when it was off).
    private func compressionReport() -> MigrationReport.CompressionReport? {
        let policy = options.compression
        guard policy.mode != .off else { return nil }
        func part(_ kind: CompressionPolicy.Kind) -> MigrationReport.CompressionReport.Part? {
            let c = policy.counters(kind)
            guard c.framesCompressed + c.framesRaw > 0 else { return nil }
            return .init(dataBytes: c.dataBytes, payloadBytes: c.payloadBytes,
                         ratio: c.dataBytes == 0 ? 1 : Double(c.payloadBytes) / Double(c.dataBytes),
                         framesCompressed: c.framesCompressed, framesRaw: c.framesRaw,
                         compressSeconds: Double(c.compressNanoseconds) / 1e9, estimatedRatio: policy.estimate(kind).ratio,
                         estimatedSpeed: policy.estimate(kind).speed)
        }
        return .init(mode: policy.mode.rawValue, memory: part(.memory), disk: part(.disk))
    }

    /// The report's network part now (nil without a tunnel).
    public func networkReport() -> MigrationReport.NetworkReport? {
        guard let tunnel else { return nil }
        return tunnel.report(seconds: tunnelSince == 0 ? 0 : Double(ferry_monotonic_ns() &- tunnelSince) / 1e9)
    }

    /// Opens the tunnel lane (once), and keeps it open after drops for as long as the tunnel lives.
    private func startTunnelLane() {
        guard let tunnel, !tunnelLaneStarted else { return }
        tunnelLaneStarted = true
        let (destination, key, sessionID) = (options.destination, options.key, sessionID)
        tunnel.keepLaneOpen {
            try PeerLink.connect(to: destination, key: key, sessionID: sessionID, features: [.tunnelLane],
                                 mode: .new, resumePoints: [], receiveTimeout: 30)
        }
    }
    private var tunnelLaneStarted = false

    /// The offer, in one go: the urgent lanes of post-copy streams, hybrid discards, `switchover`,
    /// the final data of pre-copy streams, the VM state, and `complete` with the digests the
    /// destination must find equal before it starts the VM.
    private func offer(on link: PeerLink, round: Int, state vmState: [UInt8]) throws {
        for stream in streams { try stream.beforeSwitchover(on: link) }   // opens the urgent lanes to requests
        var mode: SwitchoverMode = []
        if memory?.isPostcopy == true { mode.insert(.memoryPostcopy) }
        if disks.contains(where: \.isPostcopy) { mode.insert(.diskPostcopy) }
        let diskBytes = disks.reduce(UInt64(0)) { $0 + $1.toCome }
        link.publish { offerMade = true }
        try link.send(.switchover(Switchover(finalRound: UInt32(round), mode: mode, diskBytesToCome: diskBytes,
                                             memoryPagesToCome: memory?.toCome ?? 0, vmStateLength: UInt64(vmState.count))))
        state.offer()
        for stream in streams where stream.hasPrecopy { try stream.sendFinal(round: round, on: link) }
        try sendState(vmState, on: link)
        try link.send(.complete(Wire.Completion(digests: streams.filter { !$0.isPostcopy }.map { $0.digest() })))
    }

    /// The last exchange: the destination's digests of every stream, compared with ours.
    private func finish(on link: PeerLink, report: inout MigrationReport) throws {
        try link.wait(timeout: options.receiveTimeout + 60, during: "digest exchange") { peerCompletion != nil }
        let theirs = link.publish { peerCompletion! }
        guard compare(theirs, report: &report) else {
            state.move(to: .complete)
            throw SetupError("digests differ after hand-over (see the report)")
        }
        state.move(to: .complete)
    }

    /// Whether the destination's digests equal ours for every stream (the report says which differ).
    private func compare(_ theirs: Wire.Completion, report: inout MigrationReport) -> Bool {
        var differing: [String] = []
        for stream in streams {
            let ours = stream.digest()
            if theirs.digests.first(where: { $0.stream == ours.stream && $0.streamID == ours.streamID })?.digest != ours.digest {
                differing.append(stream.label)
            }
        }
        report.digestsAgree = differing.isEmpty
        if !differing.isEmpty { report.reason = "digests differ for \(differing.joined(separator: ", ")) after hand-over" }
        return differing.isEmpty
    }

    /// Opens a fresh urgent lane for each post-copy stream (a second connection of the session,
    /// named by its stream in the hello's features) and lets the stream answer on it.
    private func openUrgentLanes() throws(LinkError) {
        for stream in streams where stream.isPostcopy {
            let kind: Features = stream.streamType == .disk ? .disk : .memory
            // The lane's one resume point names its stream, so the destination knows whose it is.
            let lane = try PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID, features: [.urgentLane, kind],
                                            mode: .new, resumePoints: [ResumePoint(stream: stream.streamType, streamID: stream.streamID, sequence: 0, offset: 0)],
                                            receiveTimeout: 86_400)
            openLinks.withLock { $0.append(lane) }
            lane.startKeepalive(every: 10)
            try stream.serveUrgent(on: lane)
        }
    }

    private func sendState(_ blob: [UInt8], on link: PeerLink) throws {
        guard !blob.isEmpty else { return }
        let chunk = 1 << 20
        try blob.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            var offset = 0
            while offset < raw.count {
                let n = min(chunk, raw.count - offset)
                try link.send(.vmState(VMStateChunk(totalLength: UInt64(raw.count), offset: UInt64(offset),
                                                    payload: Payload(UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + n)])))))
                offset += n
            }
        }
    }

    /// The link dropped after the destination's digests arrived: one short reconnect, only to say
    /// goodbye, so the destination stops waiting for this side at once (best effort).
    private func sayGoodbyeOnANewLink() {
        guard let link = try? PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID, features: [.resume],
                                               mode: .resume, resumePoints: [], receiveTimeout: 2) else { return }
        try? link.send(.ack(Ack.goodbye))
        link.close()
    }

    /// Connects (or reconnects) with exponential backoff until ``SessionOptions/linkTimeout`` has
    /// passed since `since`. With `unbounded` (the VM was offered) it never gives up: only the
    /// destination may settle who runs the VM; an operator stops it with SIGTERM.
    private func connectWithBackoff(resume: Bool, since: ContinuousClock.Instant, unbounded: Bool) throws(LinkError) -> PeerLink {
        var delay = 0.05
        var lastError: LinkError? = nil
        let deadline = since + .milliseconds(Int(options.linkTimeout * 1000))
        var features: Features = [.resume]
        for stream in streams { features.formUnion(stream.features) }
        if options.compression.mode != .off { features.insert(.compression) }
        features.remove(.urgentLane)   // only an urgent lane's own hello names it
        repeat {
            if cancelled.load(ordering: .relaxed) { throw lastError ?? .local(.aborted, reason: "cancelled") }
            do {
                return try PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID, features: features,
                                            mode: resume ? .resume : .new, resumePoints: [], receiveTimeout: options.receiveTimeout)
            } catch {
                if !error.isRetryable { throw error }
                logger.debug("connect attempt failed", metadata: ["error": "\(error)", "retry_in_s": "\(delay)"])
                lastError = error
            }
            usleep(UInt32(delay * 1e6))
            delay = min(delay * 2, 2)
        } while unbounded || ContinuousClock.now < deadline
        throw lastError ?? .timedOut(during: "connect", seconds: options.linkTimeout)
    }

    private func startReader(on link: PeerLink) {
        link.startReader(name: "ferry-source-reader") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .ack(let ack):
                guard let stream = streams.first(where: { $0.streamType == ack.stream && ($0.streamID == ack.streamID || ack.stream == .memory) }) else {
                    if ack.stream == .control { return }
                    throw .local(.protocolViolation, reason: "ack for unknown stream \(ack.stream) \(ack.streamID)")
                }
                let refused: LinkError? = link.publish {
                    do throws(LinkError) { try stream.acknowledged(ack) } catch { return error }
                    return nil
                }
                if let refused { throw refused }
            case .resumed:
                let now = ferry_monotonic_ns()
                let offered = link.publish { () -> Bool in
                    if offerMade && resumedAt == nil { resumedAt = now }
                    return offerMade
                }
                guard offered else { throw .local(.protocolViolation, reason: "resumed before the VM was offered (no switchover was sent)") }
            case .complete(let completion):
                var named = Set<String>()
                for digest in completion.digests where !named.insert("\(digest.stream) \(digest.streamID)").inserted {
                    throw .local(.protocolViolation, reason: "complete names \(digest.stream) \(digest.streamID) twice")
                }
                let handedOver = link.publish { () -> Bool in
                    if resumedAt != nil { peerCompletion = completion }
                    return resumedAt != nil
                }
                guard handedOver else { throw .local(.protocolViolation, reason: "complete before resumed: the destination's digests come once the VM runs there") }
            case .diskHeld(let held):
                guard let disk = disks.first(where: { $0.streamID == held.diskID }) else {
                    throw .local(.protocolViolation, reason: "diskHeld for unknown disk \(held.diskID)")
                }
                let refused: LinkError? = link.publish {
                    do throws(LinkError) { try disk.recordHeld(held) } catch { return error }
                    return nil
                }
                if let refused { throw refused }
            case .keepalive:
                break
            default:
                throw .unexpected(frame.header.type, expecting: "ack, diskHeld, resumed, complete or keepalive")
            }
        }
    }

    /// Whether a write throttle holds the VM's writers now (a disk's or the memory's).
    private var writersThrottled: Bool { disks.contains { $0.isThrottled } || (memory?.isThrottled ?? false) }

    private func showProgress(bandwidth: Double, dirtyRate: Double, remaining: UInt64?, force: Bool = false) {
        let total = streams.reduce(UInt64(0)) { $0 + $1.totalBytes }
        let sent = streams.reduce(UInt64(0)) { $0 + $1.sentBytes }
        let parts = streams.map { "\($0.label) \(Int(Double($0.sentBytes) * 100 / Double(max(1, $0.totalBytes))))%" }.joined(separator: ", ")
        progress.update(phase: state.phase, sentBytes: sent, totalBytes: total, dirtyRate: dirtyRate, bandwidth: bandwidth,
                        throttled: writersThrottled, remainingBytes: remaining ?? (total > sent ? total - sent : 0),
                        parts: parts, force: force)
    }
}
