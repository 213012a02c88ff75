import Foundation
import Glibc
import Logging
import NBDBridge
import SystemPackage
import URing
import Wire

/// Migrates the disk behind a running ``NBDServer`` to a destination agent while the VM keeps
/// writing through that server (Bradford et al. 2007): the whole disk (holes and zero blocks as
/// runs), then rounds of dirty blocks from the server's bitmap, throttling the writer when it
/// dirties faster than the link drains, then a short pause to send the last blocks.
///
/// The link may drop at any time: the source reconnects with backoff and resumes where the
/// destination says it got to. If the migration fails before switchover, writes are let through
/// again and the VM keeps running here; ``run()`` returns a failed report saying why.
public final class DiskSourceMigration: @unchecked Sendable {
    private let server: NBDServer
    private let store: FileBlockStore
    private let options: DiskSourceOptions
    private let logger: Logger
    private let sessionID = SessionID.random()
    private var phase = PhaseTracker()
    private var progress = ProgressLine()

    // Published by the link's reader thread, read under the link's lock.
    private var completedRoundAtPeer = -1
    private var peerServing = false
    private var peerCompletion: Wire.Completion?

    public init(server: NBDServer, store: FileBlockStore, options: DiskSourceOptions, logger: Logger) {
        self.server = server
        self.store = store
        self.options = options
        self.logger = logger
    }

    /// What the migration has done so far, for the report and the progress line.
    private struct Tally {
        var bulk = DiskTransferCounters()
        var rounds = DiskTransferCounters()
        var final = DiskTransferCounters()
        var blocksPerRound: [UInt64] = []
        var bandwidth: Double = 0
        var dirtyRate: Double = 0
        var throttleStarted: ContinuousClock.Instant?
        var throttleSeconds: Double = 0
        var reconnects = 0
        var wireBytes: UInt64 = 0
        var sent: UInt64 { bulk.dataBytes + bulk.zeroBytes + rounds.dataBytes + rounds.zeroBytes + final.dataBytes + final.zeroBytes }
    }

    /// Runs the migration to the end. Never throws: failures are in the report.
    public func run() -> MigrationReport {
        var report = MigrationReport(role: "source")
        let start = ContinuousClock.now
        let bitmap = server.dirtyBitmap
        let blockSize = Int(bitmap.blockSize)
        var tally = Tally()
        var chunks: DiskChunkSender
        do {
            chunks = try DiskChunkSender(diskID: options.diskID, fd: store.fileDescriptor, diskSize: store.size,
                                         blockSize: blockSize, chunkBytes: options.chunkBytes)
        } catch {
            report.reason = "cannot set up the disk reader: \(error)"
            return report
        }

        var link: PeerLink? = nil
        var bulkNextBlock = 0
        var roundSet: [Range<Int>]? = nil
        var roundStart = ContinuousClock.now
        var quiescedAt: ContinuousClock.Instant? = nil
        var downtime: Duration = .zero
        var linkDownSince: ContinuousClock.Instant? = nil
        // Block sets sent in rounds the destination has not acknowledged yet: re-sent after a reconnect.
        var unacknowledged: [(round: Int, runs: [Range<Int>])] = []
        var bulkStart = ContinuousClock.now
        var failure: String? = nil
        var urgentLane: UrgentLaneServer? = nil
        var postcopyCounters = DiskTransferCounters()
        // Once the destination may run the VM (it got `complete` in pre-copy, `switchover` in
        // post-copy), the VM must never resume here unless the destination refuses explicitly.
        var handOverSent = false
        var refusedByPeer = false

        func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

        // Writes before this point need no tracking: the bulk copy reads the disk as it is now.
        _ = bitmap.snapshotAndClearRuns()

        migration: while !phase.current.isTerminal {
            // 1. A link: the first connection, or a reconnect that resumes the session.
            if link == nil {
                do {
                    let resumed = linkDownSince != nil
                    let newLink = try connectWithBackoff(resume: resumed, since: linkDownSince ?? ContinuousClock.now,
                                                         unbounded: handOverSent)
                    link = newLink
                    if newLink.agreement.handedOver { peerServing = true }
                    if resumed {
                        tally.reconnects += 1
                        let bulkHighWater = applyResumePoints(newLink.agreement.peerResumePoints)
                        remarkUnacknowledged(&unacknowledged, bulkHighWater: bulkHighWater, bulkNextBlock: &bulkNextBlock,
                                             blockSize: blockSize, roundSet: &roundSet, bitmap: bitmap)
                        logger.info("link resumed", metadata: ["phase": "\(phase.current)", "bulk_block": "\(bulkNextBlock)",
                                                               "peer_round": "\(completedRoundAtPeer)"])
                    } else {
                        phase.move(to: .handshake)
                        report.setupTimeMs = seconds(ContinuousClock.now - start) * 1000
                        try newLink.sender.send(.diskLayout(DiskLayout(diskID: options.diskID, sizeBytes: store.size,
                                                                        blockSize: UInt32(blockSize), name: store.path)))
                        bulkStart = ContinuousClock.now
                        if options.postcopy {
                            report.reason = "disk post-copy: hand over at once"
                            phase.move(to: .switchover)
                        } else {
                            phase.move(to: .bulk)
                            logger.info("bulk copy started", metadata: ["bytes": "\(store.size)", "block_size": "\(blockSize)"])
                        }
                    }
                    startReader(on: newLink)
                    if options.postcopy && peerServing {
                        // The VM runs there and may be waiting for blocks: a new urgent lane.
                        urgentLane?.stop()
                        do { urgentLane = try openUrgentLane(blockSize: blockSize) } catch {
                            logger.warning("urgent lane not reopened; reconnecting", metadata: ["error": "\(error)"])
                            newLink.close()
                            newLink.waitForReader()
                            link = nil
                            usleep(100_000)
                            continue migration
                        }
                    }
                    linkDownSince = nil
                } catch {
                    failure = "could not reach the destination: \(error)"
                    break migration
                }
            }
            guard let active = link else { break }
            let acknowledgedRound = active.publish { completedRoundAtPeer }
            unacknowledged.removeAll { $0.round <= acknowledgedRound }

            do throws(LinkError) {
                switch phase.current {
                case .bulk:
                    var bulkCounters = tally.bulk
                    defer { tally.bulk = bulkCounters }
                    let diskSize = store.size
                    try chunks.send(blocks: bulkNextBlock..<Int.max, round: 0, holesFrom: store, via: &active.sender,
                                    counters: &bulkCounters) { (next: Int) throws(LinkError) in
                        bulkNextBlock = next
                        let covered = min(diskSize, UInt64(next) * UInt64(blockSize))
                        let bandwidth = Double(covered) / max(0.001, seconds(ContinuousClock.now - bulkStart))
                        self.progress.update(phase: .bulk, sentBytes: covered, totalBytes: diskSize, dirtyRate: 0,
                                             bandwidth: bandwidth, throttled: false, remainingBytes: diskSize - covered)
                    }
                    tally.bulk = bulkCounters
                    tally.bandwidth = Double(tally.wireBytes + active.sender.bytesSent) / max(0.001, seconds(ContinuousClock.now - bulkStart))
                    try active.sender.send(.roundEnd(RoundEnd(stream: .disk, streamID: options.diskID, round: 0,
                                                              itemsSent: tally.bulk.blocks, bytesSent: tally.bulk.dataBytes,
                                                              dirtyRemaining: UInt64(bitmap.dirtyCount))))
                    tally.blocksPerRound.append(tally.bulk.blocks)
                    logger.info("bulk copy sent", metadata: ["data_bytes": "\(tally.bulk.dataBytes)", "zero_bytes": "\(tally.bulk.zeroBytes)"])
                    roundStart = ContinuousClock.now
                    phase.move(to: .round(1))

                case .round(let round):
                    if roundSet == nil {
                        roundSet = bitmap.snapshotAndClearRuns()
                        roundStart = ContinuousClock.now
                    }
                    let before = tally.rounds
                    for run in roundSet! {
                        try chunks.send(blocks: run, round: UInt32(round), holesFrom: nil, via: &active.sender, counters: &tally.rounds)
                    }
                    let sentBlocks = tally.rounds.blocks - before.blocks
                    unacknowledged.append((round, roundSet!))
                    try active.sender.send(.roundEnd(RoundEnd(stream: .disk, streamID: options.diskID, round: UInt32(round),
                                                              itemsSent: sentBlocks, bytesSent: tally.rounds.dataBytes - before.dataBytes,
                                                              dirtyRemaining: UInt64(bitmap.dirtyCount))))
                    roundSet = nil
                    tally.blocksPerRound.append(sentBlocks)
                    let roundSeconds = max(0.01, seconds(ContinuousClock.now - roundStart))
                    let remaining = UInt64(bitmap.dirtyCount) * UInt64(blockSize)
                    tally.dirtyRate = Double(remaining) / roundSeconds
                    tally.bandwidth = Double(tally.wireBytes + active.sender.bytesSent) / max(0.001, seconds(ContinuousClock.now - bulkStart))
                    progress.update(phase: phase.current, sentBytes: tally.sent, totalBytes: store.size, dirtyRate: tally.dirtyRate,
                                    bandwidth: tally.bandwidth, throttled: server.throttle.isEnabled, remainingBytes: remaining, force: true)
                    let decision = options.policy.decide(remainingBytes: remaining, bandwidth: tally.bandwidth, dirtyRate: tally.dirtyRate,
                                                         round: round, elapsed: seconds(ContinuousClock.now - start),
                                                         throttled: server.throttle.isEnabled)
                    logger.debug("round done", metadata: ["round": "\(round)", "blocks": "\(sentBlocks)", "remaining": "\(remaining)",
                                                          "dirty_rate": "\(Int(tally.dirtyRate))", "bandwidth": "\(Int(tally.bandwidth))"])
                    switch decision {
                    case .iterate:
                        phase.move(to: .round(round + 1))
                    case .throttle(let bytesPerSecond):
                        server.throttle.enable(WriteThrottle.Policy(bytesPerSecond: bytesPerSecond,
                                                                    delayNanoseconds: options.throttleDelayNanoseconds))
                        tally.throttleStarted = ContinuousClock.now
                        logger.info("write throttle on", metadata: ["dirty_rate": "\(Int(tally.dirtyRate))",
                                                                    "bandwidth": "\(Int(tally.bandwidth))", "limit": "\(bytesPerSecond)"])
                        phase.move(to: .round(round + 1))
                    case .switchover(let reason):
                        report.expectedDowntimeMs = tally.bandwidth > 0 ? Double(remaining) / tally.bandwidth * 1000 : 0
                        report.reason = reason
                        logger.info("switching over", metadata: ["reason": "\(reason)", "round": "\(round)"])
                        phase.move(to: .switchover)
                    }

                case .switchover:
                    if options.postcopy {
                        if quiescedAt == nil {
                            quiescedAt = ContinuousClock.now
                            guard server.quiesce(timeoutNanoseconds: 10_000_000_000) else {
                                failure = "in-flight writes did not drain within 10 s at switchover"
                                break migration
                            }
                        }
                        if !active.publish({ peerServing }) {
                            handOverSent = true
                            try active.sender.send(.switchover(Switchover(finalRound: 0, mode: [.diskPostcopy], diskBytesToCome: store.size,
                                                                          memoryPagesToCome: 0, vmStateLength: 0)))
                            urgentLane?.stop()
                            urgentLane = try openUrgentLane(blockSize: blockSize)
                            try active.wait(timeout: options.receiveTimeout, during: "switchover") { peerServing }
                        }
                        downtime = ContinuousClock.now - quiescedAt!
                        logger.info("destination serves the disk; pushing the rest", metadata: ["downtime_ms": "\(seconds(downtime) * 1000)"])
                        phase.move(to: .postcopy)
                        continue migration
                    }
                    if quiescedAt == nil {
                        // Let what is queued in socket buffers and on the link arrive first, so it
                        // does not count against the downtime (the VM still runs meanwhile).
                        let lastRound = tally.blocksPerRound.count - 1
                        try? active.wait(timeout: 10, during: "draining before switchover") { completedRoundAtPeer >= lastRound }
                        let drained = active.publish { completedRoundAtPeer }
                        unacknowledged.removeAll { $0.round <= drained }
                        if let seen = active.failureSeen { throw seen }
                        roundSet = nil
                        quiescedAt = ContinuousClock.now
                        guard server.quiesce(timeoutNanoseconds: 10_000_000_000) else {
                            failure = "in-flight writes did not drain within 10 s at switchover"
                            break migration
                        }
                    }
                    if roundSet == nil { roundSet = bitmap.snapshotAndClearRuns() }
                    let finalRound = UInt32(tally.blocksPerRound.count)
                    let finalBytes = roundSet!.reduce(UInt64(0)) { $0 + UInt64($1.count) * UInt64(blockSize) }
                    let serving = active.publish { peerServing }
                    if !serving {
                        try active.sender.send(.switchover(Switchover(finalRound: finalRound, mode: [], diskBytesToCome: finalBytes,
                                                                      memoryPagesToCome: 0, vmStateLength: 0)))
                        let before = tally.final.blocks
                        for run in roundSet! {
                            try chunks.send(blocks: run, round: finalRound, holesFrom: nil, via: &active.sender, counters: &tally.final)
                        }
                        try active.sender.send(.roundEnd(RoundEnd(stream: .disk, streamID: options.diskID, round: finalRound,
                                                                  itemsSent: tally.final.blocks - before, bytesSent: tally.final.dataBytes,
                                                                  dirtyRemaining: 0)))
                        tally.blocksPerRound.append(tally.final.blocks - before)
                        unacknowledged.append((Int(finalRound), roundSet!))
                        // The digest of the image at pause (kept as blocks were sent): the destination
                        // compares it with its own and serves only if they agree.
                        handOverSent = true
                        try active.sender.send(.complete(Wire.Completion(digests: [StreamDigest(stream: .disk, streamID: options.diskID,
                                                                                                digest: chunks.hashes.digest())])))
                        try active.wait(timeout: options.receiveTimeout, during: "switchover") { peerServing }
                    }
                    downtime = ContinuousClock.now - quiescedAt!
                    if let started = tally.throttleStarted {
                        tally.throttleSeconds += seconds(ContinuousClock.now - started)
                        tally.throttleStarted = nil
                    }
                    server.throttle.disable()
                    logger.info("destination serves the disk", metadata: ["downtime_ms": "\(seconds(downtime) * 1000)"])
                    // Authority has moved: from here on the VM must not run here again. The destination
                    // serves only after its digest matched ours.
                    report.digestsAgree = true
                    phase.move(to: .complete)
                    try? active.wait(timeout: 5, during: "digest report") { peerCompletion != nil }

                case .postcopy:
                    // The destination runs the VM; push every block it has not fetched, from where it got to.
                    var pushCounters = postcopyCounters
                    defer { postcopyCounters = pushCounters }
                    try chunks.send(blocks: bulkNextBlock..<Int.max, round: 0, holesFrom: store, via: &active.sender,
                                    counters: &pushCounters) { (next: Int) throws(LinkError) in bulkNextBlock = next }
                    postcopyCounters = pushCounters
                    try active.sender.send(.roundEnd(RoundEnd(stream: .disk, streamID: options.diskID, round: 0,
                                                              itemsSent: pushCounters.blocks, bytesSent: pushCounters.dataBytes, dirtyRemaining: 0)))
                    tally.blocksPerRound.append(pushCounters.blocks)
                    let digest = chunks.hashes.digest()
                    try active.sender.send(.complete(Wire.Completion(digests: [StreamDigest(stream: .disk, streamID: options.diskID, digest: digest)])))
                    try active.wait(timeout: options.receiveTimeout, during: "post-copy digest exchange") { peerCompletion != nil }
                    let theirs = active.publish { peerCompletion }!
                    report.digestsAgree = theirs.digests.first { $0.stream == .disk && $0.streamID == options.diskID }?.digest == digest
                    if !report.digestsAgree { failure = "disk digests differ: source \(digest), destination \(theirs.digests)" }
                    phase.move(to: .complete)

                default:
                    break migration
                }
            } catch {
                // A retryable link failure: reconnect and resume (unless the phase forbids it).
                tally.wireBytes += active.sender.bytesSent
                active.close()
                active.waitForReader()
                link = nil
                if case .peer = error { refusedByPeer = true }
                let retryable = error.isRetryable && !(phase.current == .complete)
                guard retryable else {
                    failure = "\(error)"
                    break migration
                }
                logger.warning("link lost; reconnecting", metadata: ["error": "\(error)", "phase": "\(phase.current)"])
                linkDownSince = linkDownSince ?? ContinuousClock.now
            }
        }

        progress.finish()
        if let link {
            tally.wireBytes += link.sender.bytesSent
            link.close()
            link.waitForReader()
        }
        if let started = tally.throttleStarted { tally.throttleSeconds += seconds(ContinuousClock.now - started) }
        server.throttle.disable()

        if let failure {
            if !peerServing && (!handOverSent || refusedByPeer) {
                server.resume()   // the VM goes on writing here
                report.vmLocation = "source"
                report.reason = "\(failure); the VM keeps running at the source"
            } else if !peerServing {
                report.vmLocation = "paused"
                report.reason = "\(failure); the destination may run the VM, so it stays paused here until an operator decides"
            } else {
                report.vmLocation = "destination"
                report.reason = "\(failure) (after hand-over: the VM runs at the destination)"
            }
            if !phase.current.isTerminal { phase.move(to: .failed(failure)) }
            report.status = "failed"
            logger.error("migration failed", metadata: ["reason": "\(report.reason)"])
        } else {
            report.status = "completed"
            report.vmLocation = "destination"
        }
        report.totalTimeMs = seconds(ContinuousClock.now - start) * 1000
        report.downtimeMs = seconds(downtime) * 1000
        report.mbps = tally.bandwidth * 8 / 1e6
        report.reconnects = tally.reconnects
        report.wireBytes = tally.wireBytes
        var disk = MigrationReport.DiskReport()
        disk.total = store.size
        disk.blockSize = blockSize
        disk.transferred = tally.bulk.dataBytes + tally.rounds.dataBytes + tally.final.dataBytes
        disk.duplicate = tally.bulk.zeroBytes + tally.rounds.zeroBytes + tally.final.zeroBytes
        disk.bulkBytes = tally.bulk.dataBytes
        disk.deltaBytes = tally.rounds.dataBytes
        disk.downtimeBytes = tally.final.dataBytes
        disk.postcopyBytes = postcopyCounters.dataBytes + (urgentLane?.bytesSent ?? 0)
        disk.transferred += disk.postcopyBytes
        disk.duplicate += postcopyCounters.zeroBytes
        urgentLane?.stop()
        disk.rounds = max(0, tally.blocksPerRound.count - 2)
        disk.blocksPerRound = tally.blocksPerRound
        disk.dirtyRate = tally.dirtyRate
        disk.throttleSeconds = tally.throttleSeconds
        disk.throttledWrites = server.throttle.writesDelayed
        disk.throttleDelayMs = Double(server.throttle.totalDelayNanoseconds) / 1e6
        report.disk = disk
        return report
    }

    /// Opens the urgent lane (a second connection of the session) and starts answering fetches.
    private func openUrgentLane(blockSize: Int) throws(LinkError) -> UrgentLaneServer {
        let lane = try PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID, features: [.urgentLane],
                                        mode: .new, resumePoints: [], receiveTimeout: 86_400)
        lane.setPriority(PeerLink.interactivePriority)
        return try UrgentLaneServer(link: lane, store: store, diskID: options.diskID, blockSize: blockSize, logger: logger)
    }

    /// Connects (or reconnects) with exponential backoff, until ``DiskSourceOptions/linkTimeout``
    /// has passed since `since`.
    /// With `unbounded` (after hand-over) it never gives up: only the destination may settle who
    /// runs the VM (docs/wire.md, "Hand-over"); an operator stops it with SIGTERM.
    private func connectWithBackoff(resume: Bool, since: ContinuousClock.Instant, unbounded: Bool) throws(LinkError) -> PeerLink {
        var delay = 0.05
        var lastError: LinkError? = nil
        let deadline = unbounded ? ContinuousClock.now + .seconds(100 * 365 * 86_400)
                                 : since + .milliseconds(Int(options.linkTimeout * 1000))
        repeat {
            do {
                return try PeerLink.connect(to: options.destination, key: options.key, sessionID: sessionID,
                                            features: options.postcopy ? [.disk, .zeroRuns, .resume, .diskPostcopy, .urgentLane] : [.disk, .zeroRuns, .resume],
                                            mode: resume ? .resume : .new,
                                            resumePoints: [], receiveTimeout: options.receiveTimeout)
            } catch {
                if !error.isRetryable { throw error }
                logger.debug("connect attempt failed", metadata: ["error": "\(error)", "retry_in_s": "\(delay)"])
                lastError = error
            }
            usleep(UInt32(delay * 1e6))
            delay = min(delay * 2, 2)
        } while ContinuousClock.now < deadline
        throw lastError ?? .timedOut(during: "connect", seconds: options.linkTimeout)
    }

    /// Reads where the destination says it got to after a reconnect; returns its bulk high-water mark.
    private func applyResumePoints(_ points: [ResumePoint]) -> UInt64 {
        var bulkHighWater: UInt64 = 0
        for point in points {
            switch point.stream {
            case .disk where point.streamID == options.diskID:
                completedRoundAtPeer = Int(point.sequence) - 1
                bulkHighWater = point.offset
            default:
                break
            }
        }
        return bulkHighWater
    }

    /// After a reconnect, makes sure everything the destination did not acknowledge goes again:
    /// the bulk copy restarts at its high-water mark (or, once past the bulk phase, the rest of the
    /// disk is marked dirty), and every unacknowledged round's blocks are marked dirty so the next
    /// round (or the final one) re-reads and re-sends them. Re-sending is safe: the destination
    /// applies blocks as absolute writes, and a re-read is never older than what was sent.
    private func remarkUnacknowledged(_ unacknowledged: inout [(round: Int, runs: [Range<Int>])], bulkHighWater: UInt64,
                                      bulkNextBlock: inout Int, blockSize: Int, roundSet: inout [Range<Int>]?,
                                      bitmap: DirtyBitmap) {
        let completed = completedRoundAtPeer
        unacknowledged.removeAll { $0.round <= completed }
        if completed < 0 {
            if phase.current == .bulk || phase.current == .postcopy {
                bulkNextBlock = min(bulkNextBlock, Int(bulkHighWater / UInt64(blockSize)))
            } else if bulkHighWater < store.size {
                bitmap.markDirty(offset: bulkHighWater, length: store.size - bulkHighWater)
            }
        }
        for (_, runs) in unacknowledged {
            for run in runs {
                bitmap.markDirty(offset: UInt64(run.lowerBound) * UInt64(blockSize), length: UInt64(run.count) * UInt64(blockSize))
            }
        }
        unacknowledged.removeAll()
        if let set = roundSet {   // a round cut short: its blocks go again
            for run in set {
                bitmap.markDirty(offset: UInt64(run.lowerBound) * UInt64(blockSize), length: UInt64(run.count) * UInt64(blockSize))
            }
            roundSet = nil
        }
    }

    private func startReader(on link: PeerLink) {
        link.startReader(name: "ferry-source-reader") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .ack(let ack):
                link.publish {
                    if ack.stream == .disk { completedRoundAtPeer = Int(ack.sequence) - 1 }
                }
            case .resumed:
                link.publish { peerServing = true }
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
