import Foundation
import Glibc
import Logging
import NBDBridge
import SystemPackage
import URing
import Wire

/// How one disk of a source session moves.
public struct DiskStreamOptions: Sendable {
    /// The disk id in the protocol (1, 2, ... in `--disk` order; the destination writes disk N to its N-th `--disk`).
    public var diskID: UInt32 = 1
    /// Bytes per `diskExtents` frame (rounded down to whole blocks); the bulk copy's frames are also
    /// bounded by the session's slice (4 MiB). 4 MiB rather than 1: on a fast link each frame's fixed
    /// costs (two wake-ups, a seal, a direct write) are a quarter as many, and sealed disk migrations
    /// on loopback went from 0.77-0.88 GB/s to 0.90-1.15 (scripts/bench-seal.sh); on a WAN link a frame
    /// is still a fraction of the socket buffers and of the bytes in flight.
    public var chunkBytes: Int = 4 << 20
    /// Delay the throttle imposes on a write over its budget, in nanoseconds.
    public var throttleDelayNanoseconds: UInt64 = 2_000_000
    /// Disk post-copy: hand the disk over at switchover and push it afterwards; the destination
    /// fetches what its VM needs first over the urgent lane.
    public var postcopy = false

    public init(diskID: UInt32 = 1) { self.diskID = diskID }
}

/// The disk behind a running ``NBDServer`` as one stream of a ``SourceSession`` (Bradford et al.
/// 2007): the whole disk (holes and zero blocks as runs), then rounds of dirty blocks from the
/// server's bitmap while the VM keeps writing through it, then the final blocks while writes are
/// held. With post-copy, nothing moves before switchover: the destination serves at once, fetches
/// the blocks its VM touches first over the urgent lane, and this stream pushes the rest.
///
/// Every block is hashed as it is sent (``DiskChunkSender``), so the digest of the image at the
/// pause costs nothing at switchover. Rounds the destination has not acknowledged are kept and
/// their blocks marked dirty again after a reconnect.
final class DiskSourceStream: SourceStream, @unchecked Sendable {
    let server: NBDServer
    let store: FileBlockStore
    let options: DiskStreamOptions
    private let logger: Logger
    private var chunks: DiskChunkSender
    private let bitmap: DirtyBitmap
    let blockSize: Int

    private var bulkNextBlock = 0
    private var bulkDone = false
    private var roundSet: [Range<Int>]? = nil
    /// Rounds sent and not yet acknowledged (under the link's lock): marked dirty again after a reconnect.
    private var unacknowledged: [(round: Int, runs: [Range<Int>])] = []
    private var completedRoundAtPeer = -1
    /// The highest round whose `roundEnd` was sent (under the link's lock, set before it goes): no
    /// ack may say more was applied.
    private var lastRoundEnd = -1
    /// The `switchover` went (or is going) out: from now on the urgent lane answers fetches.
    private var offered = false
    private var frozen = false
    private var counters = (bulk: DiskTransferCounters(), rounds: DiskTransferCounters(), final: DiskTransferCounters(),
                            push: DiskTransferCounters())
    private var blocksPerRound: [UInt64] = []
    private var throttleStarted: ContinuousClock.Instant?
    private var throttleSeconds: Double = 0
    private var urgentLane: UrgentLaneServer?
    private var pushDone = false
    /// What the destination's base image holds (feature `heldBlocks`, pre-copy only): the bulk copy
    /// leaves those blocks out. Nil when the session did not agree on it, or once its report stalled.
    private var held: HeldHashes?
    /// A report that brings nothing new for this long is given up: the rest goes as data.
    static let heldReportPatience: Double = 10

    init(server: NBDServer, store: FileBlockStore, options: DiskStreamOptions, logger: Logger) throws {
        self.server = server
        self.store = store
        self.options = options
        self.logger = logger
        bitmap = server.dirtyBitmap
        blockSize = Int(bitmap.blockSize)
        chunks = try DiskChunkSender(diskID: options.diskID, fd: store.fileDescriptor, diskSize: store.size,
                                     blockSize: blockSize, chunkBytes: options.chunkBytes)
        // Writes before this point need no tracking: the bulk copy reads the disk as it is now.
        _ = bitmap.snapshotAndClearRuns()
    }

    var label: String { "disk \(options.diskID)" }
    var streamType: StreamKind { .disk }
    var streamID: UInt32 { options.diskID }
    var features: Features { options.postcopy ? [.disk, .zeroRuns, .resume, .diskPostcopy, .urgentLane] : [.disk, .zeroRuns, .resume, .heldBlocks] }
    var isPostcopy: Bool { options.postcopy }
    var hasPrecopy: Bool { !options.postcopy }
    var totalBytes: UInt64 { store.size }
    var sentBytes: UInt64 {
        [counters.bulk, counters.rounds, counters.final, counters.push].reduce(0) { $0 + $1.dataBytes + $1.zeroBytes }
    }

    // MARK: - Before the pause

    func announce(on link: PeerLink) throws(LinkError) {
        if !options.postcopy && link.agreement.features.contains(.heldBlocks) && held == nil {
            held = HeldHashes(diskID: options.diskID, blockCount: chunks.blockCount)
        }
        try link.send(.diskLayout(DiskLayout(diskID: options.diskID, sizeBytes: store.size, blockSize: UInt32(blockSize), name: store.path)))
        logger.info("migrating disk", metadata: ["disk": "\(options.diskID)", "image": "\(store.path)", "bytes": "\(store.size)",
                                                 "block_size": "\(blockSize)", "postcopy": "\(options.postcopy)",
                                                 "held_blocks": "\(held != nil)"])
    }

    /// The reader thread saw a `diskHeld` for this disk (under the link's lock).
    func recordHeld(_ message: DiskHeld) throws(LinkError) {
        guard let held else {
            throw .local(.protocolViolation, reason: "diskHeld for disk \(options.diskID), which does not use held blocks (post-copy, or not agreed)")
        }
        try held.record(message)
    }

    var bulkRemaining: UInt64 { bulkDone || options.postcopy ? 0 : UInt64(chunks.blockCount - bulkNextBlock) * UInt64(blockSize) }

    func sendBulk(budget: Int, on link: PeerLink) throws(LinkError) -> Bool {
        if bulkDone { return true }
        var end = min(chunks.blockCount, bulkNextBlock + max(1, budget / blockSize))
        if let held, bulkNextBlock < chunks.blockCount {
            // Only as far as the destination has said what it holds: wait a little for more, then
            // let the other streams go on; a report that stalls is given up.
            if held.frontier <= bulkNextBlock {
                let next = bulkNextBlock
                do { try link.wait(timeout: 0.05, during: "the destination's held blocks") { held.frontier > next } } catch {
                    guard case .timedOut = error else { throw error }
                }
            }
            if held.frontier > bulkNextBlock {
                end = min(end, held.frontier)
            } else if held.secondsSinceProgress >= Self.heldReportPatience {
                logger.warning("the destination's report of its held blocks stalled; the rest of the disk goes as data",
                               metadata: ["disk": "\(options.diskID)", "reported_blocks": "\(held.frontier)", "blocks": "\(chunks.blockCount)"])
                self.held = nil
            } else {
                return false
            }
        }
        guard try sendWholeDisk(budget: budget, upTo: end, held: held, counters: &counters.bulk,
                                dirtyRemaining: UInt64(bitmap.dirtyCount), on: link) else { return false }
        bulkDone = true
        logger.info("disk bulk copy sent", metadata: ["disk": "\(options.diskID)", "data_bytes": "\(counters.bulk.dataBytes)",
                                                      "zero_bytes": "\(counters.bulk.zeroBytes)", "held_bytes": "\(counters.bulk.heldBytes)"])
        return true
    }

    /// The whole-disk pass both the bulk copy and the post-copy push make: up to `budget` bytes
    /// from the cursor on (or up to block `upTo`; holes as zero runs, blocks in `held` as held
    /// extents), then, at the end of the disk, its `roundEnd` (round 0). Returns whether the end was reached.
    private func sendWholeDisk(budget: Int, upTo limit: Int? = nil, held: HeldHashes? = nil, counters: inout DiskTransferCounters,
                               dirtyRemaining: UInt64, on link: PeerLink) throws(LinkError) -> Bool {
        let end = limit ?? min(chunks.blockCount, bulkNextBlock + max(1, budget / blockSize))
        try link.withSender { (sender: inout FrameSender) throws(LinkError) in
            try chunks.send(blocks: bulkNextBlock..<end, round: 0, holesFrom: store, held: held, via: &sender, counters: &counters) { (next: Int) throws(LinkError) in
                bulkNextBlock = next
            }
        }
        bulkNextBlock = max(bulkNextBlock, end)
        guard bulkNextBlock >= chunks.blockCount else { return false }
        link.publish { lastRoundEnd = max(lastRoundEnd, 0) }
        try link.send(.roundEnd(RoundEnd(stream: .disk, streamID: options.diskID, round: 0, itemsSent: counters.blocks,
                                         bytesSent: counters.dataBytes, dirtyRemaining: dirtyRemaining)))
        blocksPerRound.append(counters.blocks)
        return true
    }

    func collectDirty() throws -> UInt64 {
        let taken = bitmap.snapshotAndClearRuns()
        roundSet = (roundSet ?? []) + taken
        return roundSet!.reduce(UInt64(0)) { $0 + UInt64($1.count) * UInt64(blockSize) }
    }

    func sendRound(_ round: Int, on link: PeerLink) throws(LinkError) {
        let runs = roundSet ?? []
        var target = frozen ? counters.final : counters.rounds
        let before = target
        try link.withSender { (sender: inout FrameSender) throws(LinkError) in
            for run in runs {
                // Held blocks may be left out here too: a block the VM wrote back as it was, or, after a
                // resume, the rest of a bulk copy the destination did not get.
                try chunks.send(blocks: run, round: UInt32(round), holesFrom: nil, held: held, via: &sender, counters: &target)
            }
        }
        if frozen { counters.final = target } else { counters.rounds = target }
        link.publish {
            unacknowledged.append((round, runs))
            lastRoundEnd = max(lastRoundEnd, round)
        }
        roundSet = nil
        try link.send(.roundEnd(RoundEnd(stream: .disk, streamID: options.diskID, round: UInt32(round),
                                         itemsSent: target.blocks - before.blocks, bytesSent: target.dataBytes - before.dataBytes,
                                         dirtyRemaining: frozen ? 0 : UInt64(bitmap.dirtyCount))))
        blocksPerRound.append(target.blocks - before.blocks)
    }

    var roundsAcknowledged: Bool { unacknowledged.isEmpty }

    /// Throttles the VM's writes to `bytesPerSecond` (Bradford et al.: a writer faster than the link).
    func throttle(bytesPerSecond: UInt64) {
        server.throttle.enable(WriteThrottle.Policy(bytesPerSecond: bytesPerSecond, delayNanoseconds: options.throttleDelayNanoseconds))
        if throttleStarted == nil { throttleStarted = ContinuousClock.now }
    }

    var isThrottled: Bool { server.throttle.isEnabled }

    // MARK: - The pause

    func freeze() throws {
        guard !frozen else { return }
        guard server.quiesce(timeoutNanoseconds: 10_000_000_000) else {
            throw SetupError("in-flight writes to disk \(options.diskID) did not drain within 10 s at switchover")
        }
        frozen = true
        endThrottle()
    }

    func thaw() {
        guard frozen else { return }
        server.resume()   // the VM goes on writing here
        frozen = false
    }

    var toCome: UInt64 {
        options.postcopy ? store.size : (roundSet ?? []).reduce(UInt64(0)) { $0 + UInt64($1.count) * UInt64(blockSize) }
    }

    func beforeSwitchover(on link: PeerLink) throws(LinkError) {
        offered = true
        urgentLane?.acceptFetches()
    }

    func sendFinal(round: Int, on link: PeerLink) throws(LinkError) {
        guard !options.postcopy else { return }
        _ = try? collectDirty()
        try sendRound(round, on: link)
    }

    func digest() -> StreamDigest { StreamDigest(stream: .disk, streamID: options.diskID, digest: chunks.hashes.digest()) }

    // MARK: - Post-copy

    func serveUrgent(on lane: PeerLink) throws(LinkError) {
        urgentLane?.stop()
        lane.setPriority(PeerLink.interactivePriority)
        urgentLane = try UrgentLaneServer(link: lane, store: store, diskID: options.diskID, blockSize: blockSize, logger: logger)
        if offered { urgentLane?.acceptFetches() }
    }

    func push(budget: Int, on link: PeerLink) throws(LinkError) -> Bool {
        guard !pushDone else { return true }
        guard try sendWholeDisk(budget: budget, counters: &counters.push, dirtyRemaining: 0, on: link) else { return false }
        pushDone = true
        return true
    }

    // MARK: - Acknowledgements and resume

    func acknowledged(_ ack: Ack) throws(LinkError) {
        try check(sequence: ack.sequence, offset: ack.offset, in: "ack")
        completedRoundAtPeer = max(completedRoundAtPeer, Int(ack.sequence) - 1)
        let completed = completedRoundAtPeer
        unacknowledged.removeAll { $0.round <= completed }
    }

    /// Everything the destination did not acknowledge goes again: the bulk copy (or post-copy push)
    /// restarts at its high-water mark (or, once past the bulk copy, the rest of the disk is marked
    /// dirty), and every unacknowledged round's blocks are marked dirty. Re-sending is safe: the
    /// destination applies blocks as absolute writes, and a re-read is never older than what was sent.
    func resume(from point: ResumePoint?, phase: MigrationPhase) throws(LinkError) {
        if let point { try check(sequence: point.sequence, offset: point.offset, in: "resume point") }
        let highWater = point?.offset ?? 0
        completedRoundAtPeer = max(completedRoundAtPeer, Int(point?.sequence ?? 0) - 1)
        let completed = completedRoundAtPeer
        unacknowledged.removeAll { $0.round <= completed }
        if completed < 0 {
            if !bulkDone || options.postcopy {
                bulkNextBlock = min(bulkNextBlock, Int(highWater / UInt64(blockSize)))
                if options.postcopy && pushDone && bulkNextBlock < chunks.blockCount {
                    pushDone = false
                    blocksPerRound.removeLast()
                }
            } else if highWater < store.size {
                bitmap.markDirty(offset: highWater, length: store.size - highWater)
            }
        }
        for (_, runs) in unacknowledged { markDirty(runs) }
        unacknowledged.removeAll()
        if let set = roundSet {   // a round cut short: its blocks go again
            markDirty(set)
            roundSet = nil
        }
    }

    /// An ack or resume point says rounds up to `sequence - 1` and the bulk copy up to byte `offset`
    /// were applied: neither may go past what was sent.
    private func check(sequence: UInt64, offset: UInt64, in what: String) throws(LinkError) {
        guard sequence <= UInt64(lastRoundEnd + 1) else {
            throw .local(.protocolViolation, reason: "\(what) for disk \(options.diskID) says round \(sequence &- 1) was applied; "
                         + (lastRoundEnd < 0 ? "no roundEnd was sent yet" : "the last roundEnd sent was round \(lastRoundEnd)"))
        }
        guard offset <= store.size else {
            throw .local(.protocolViolation, reason: "\(what) for disk \(options.diskID) says its bulk copy was applied up to byte \(offset) "
                         + "of a \(store.size)-byte disk")
        }
    }

    private func markDirty(_ runs: [Range<Int>]) {
        for run in runs {
            bitmap.markDirty(offset: UInt64(run.lowerBound) * UInt64(blockSize), length: UInt64(run.count) * UInt64(blockSize))
        }
    }

    private func endThrottle() {
        if let started = throttleStarted {
            let elapsed = ContinuousClock.now - started
            throttleSeconds += Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            throttleStarted = nil
        }
        server.throttle.disable()
    }

    func stop() {
        urgentLane?.stop()
        endThrottle()
    }

    func fill(_ report: inout MigrationReport, final: Bool) {
        var disk = MigrationReport.DiskReport()
        disk.diskID = options.diskID
        disk.total = store.size
        disk.blockSize = blockSize
        disk.bulkBytes = counters.bulk.dataBytes
        disk.deltaBytes = counters.rounds.dataBytes
        disk.downtimeBytes = counters.final.dataBytes
        disk.postcopyBytes = counters.push.dataBytes + (urgentLane?.bytesSent ?? 0)
        disk.transferred = counters.bulk.dataBytes + counters.rounds.dataBytes + counters.final.dataBytes + disk.postcopyBytes
        disk.duplicate = counters.bulk.zeroBytes + counters.rounds.zeroBytes + counters.final.zeroBytes + counters.push.zeroBytes
        disk.held = counters.bulk.heldBytes + counters.rounds.heldBytes + counters.final.heldBytes
        disk.rounds = max(0, blocksPerRound.count - 2)
        disk.blocksPerRound = blocksPerRound
        disk.throttleSeconds = throttleSeconds
        disk.throttledWrites = server.throttle.writesDelayed
        disk.throttleDelayMs = Double(server.throttle.totalDelayNanoseconds) / 1e6
        if final {
            disk.digest = "\(chunks.hashes.digest())"
        } else {
            disk.remaining = bulkRemaining + UInt64(bitmap.dirtyCount) * UInt64(blockSize)
            disk.throttleActive = isThrottled
        }
        report.disks.append(disk)
    }
}
