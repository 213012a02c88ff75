import Foundation
import Glibc
import Logging
import NBDBridge
import Synchronization
import SystemPackage
import URing
import Wire

/// Where the destination writes one disk and serves it.
public struct DiskTarget: Sendable {
    /// The image to write (created or emptied).
    public var imagePath: String
    /// Where to serve it over NBD once the VM may use it.
    public var nbdEndpoint: NBDEndpoint
    /// The NBD export name; empty: any name a client asks for.
    public var exportName: String
    /// An image this host already holds of the disk (a shared base image, or the copy a previous
    /// migration left; may be `imagePath` itself, which is then kept): blocks with the same content
    /// are not sent (``DiskBase``). Nil: the image is created or emptied and everything comes.
    public var basePath: String?

    public init(imagePath: String, nbdEndpoint: NBDEndpoint, exportName: String = "", basePath: String? = nil) {
        self.imagePath = imagePath
        self.nbdEndpoint = nbdEndpoint
        self.exportName = exportName
        self.basePath = basePath
    }
}

/// One disk as a stream of a ``DestinationSession``: applies the bulk copy and the dirty-block
/// deltas to its image (hashing each block as it is written), and serves the image over NBD from
/// the moment the VM may use it: after the digests agree (pre-copy), or at switchover through a
/// ``PostcopyDiskStore`` that holds reads and writes of blocks that have not arrived and fetches
/// them over the urgent lane (post-copy).
final class DiskDestinationStream: DestinationStream, @unchecked Sendable {
    let layout: DiskLayout
    let target: DiskTarget
    private let logger: Logger
    /// Runs before each ack is sent: the session publishes its resume points there, so a
    /// reconnecting source is never offered less than what was acknowledged.
    var beforeAck: () -> Void = {}
    private let image: DiskImage
    private var applier: DiskApplier
    /// The session's main link now: a failing urgent lane drops the main link it was opened with,
    /// so the source reconnects and reopens it (never a newer main link: the source closes an old
    /// lane when it reconnects, and that must not cut the new connection).
    private let currentMainLink: @Sendable () -> PeerLink?
    private var completedRound = -1
    private var bulkHighWater: UInt64 = 0
    private var lastAck = ContinuousClock.now
    private var bytesSinceAck: UInt64 = 0
    private var postcopy = false
    private var pushEnded = false
    private let serving = Mutex<(server: NBDServer?, address: SocketAddress?, store: PostcopyDiskStore?, urgent: UrgentLaneClient?)>((nil, nil, nil, nil))
    /// Served before switchover with every request held (``serveHeld()``), for a VMM started early.
    private var held: HeldDiskStore?

    init(layout: DiskLayout, target: DiskTarget, logger: Logger, currentMainLink: @escaping @Sendable () -> PeerLink?) throws(LinkError) {
        self.layout = layout
        self.target = target
        self.logger = logger
        self.currentMainLink = currentMainLink
        let inPlace = target.basePath.map { DiskBase.isSameFile($0, as: target.imagePath) } ?? false
        do {
            image = try DiskImage(path: target.imagePath, layout: layout, keep: inPlace)
            applier = try DiskApplier(image: image, directWrites: true)
        } catch {
            throw .local(.storageFailure, reason: "cannot create the image \(target.imagePath): \(error)")
        }
        if let basePath = target.basePath { image.use(base: try DiskBase(path: basePath, imagePath: target.imagePath, layout: layout)) }
        logger.info("receiving disk", metadata: ["disk": "\(layout.diskID)", "bytes": "\(layout.sizeBytes)",
                                                 "block_size": "\(layout.blockSize)", "image": "\(target.imagePath)",
                                                 "direct_writes": "\(applier.writesDirectly)", "base": "\(target.basePath ?? "none")",
                                                 "base_in_place": "\(inPlace)"])
    }

    /// The session agreed on held blocks: tells the source what this host holds of the disk
    /// (its base, hashed by a thread as the bulk copy goes), or at once that it holds nothing.
    func reportHeld(send: @escaping @Sendable (Message) throws(LinkError) -> Void) throws(LinkError) {
        if let base = image.base {
            base.startReporting(logger: logger, send: send)
        } else {
            let blocks = image.hashes.blockCount
            try send(.diskHeld(DiskHeld(diskID: layout.diskID, firstBlock: UInt64(blocks), count: 0, hashes: .empty)))
        }
    }

    /// Refuses a layout this destination cannot hold, before the image is created or sized: a
    /// size beyond `off_t` (a protocol violation: no file can have it), or more blocks than an
    /// eighth of this host's RAM can track (`outOfSpace`: the per-block hashes, 8 bytes a block,
    /// are allocated and written at once, so a hostile size would otherwise cost their memory).
    static func check(_ layout: DiskLayout) throws(LinkError) {
        guard layout.sizeBytes <= UInt64(Int64.max) else {
            throw .local(.protocolViolation, reason: "disk \(layout.diskID) of \(layout.sizeBytes) bytes: beyond the largest file size (2^63 - 1)")
        }
        let blockSize = UInt64(layout.blockSize)   // the decoder checked it: a power of two, 512 B ... 64 MiB
        let blocks = layout.sizeBytes / blockSize + (layout.sizeBytes % blockSize == 0 ? 0 : 1)
        let budget = HostMemory.physicalBytes / 8
        guard blocks <= budget / 8 else {
            throw .local(.outOfSpace, reason: "disk \(layout.diskID) of \(layout.sizeBytes) bytes has \(blocks) blocks of \(blockSize) bytes; "
                         + "tracking them takes \(blocks * 8) bytes, more than an eighth of this host's \(HostMemory.physicalBytes) bytes of RAM")
        }
    }

    /// Refuses a `diskExtents` whose extents leave the disk or are not in ascending order without
    /// overlap (how every source sends them), before any of them is written. Arranged so that no
    /// sum can overflow whatever the offsets.
    static func check(_ extents: DiskExtents, diskSize: UInt64) throws(LinkError) {
        var end: UInt64 = 0
        for (index, extent) in extents.extents.enumerated() {
            guard extent.offset <= diskSize, UInt64(extent.length) <= diskSize - extent.offset else {
                throw .local(.protocolViolation, reason: "disk \(extents.diskID): extent \(index) at \(extent.offset)+\(extent.length) "
                             + "beyond the disk's \(diskSize) bytes")
            }
            guard extent.offset >= end else {
                throw .local(.protocolViolation, reason: "disk \(extents.diskID): extent \(index) at \(extent.offset)+\(extent.length) "
                             + "overlaps or precedes the previous one (ending at \(end)); extents go in ascending order")
            }
            end = extent.offset + UInt64(extent.length)
        }
    }

    /// Refuses `held` extents this destination did not offer: without a base, in post-copy, or
    /// naming blocks its base did not report as held or that (in place) this session overwrote.
    /// Then records which blocks the frame's other extents overwrite.
    private func checkHeld(_ extents: DiskExtents) throws(LinkError) {
        defer {
            if let base = image.base, base.inPlace {
                for extent in extents.extents where extent.kind != .held { base.diverge(offset: extent.offset, length: UInt64(extent.length)) }
            }
        }
        for extent in extents.extents where extent.kind == .held {
            guard !postcopy, let base = image.base else {
                throw .local(.protocolViolation, reason: "disk \(layout.diskID): a held extent in round \(extents.round)"
                             + (image.base == nil ? ", and this destination has no base image" : " of a post-copy disk"))
            }
            if let refusal = base.refusal(offset: extent.offset, length: UInt64(extent.length)) {
                throw .local(.protocolViolation, reason: "disk \(layout.diskID): \(refusal)")
            }
        }
    }

    var label: String { "disk \(layout.diskID)" }
    var streamType: StreamKind { .disk }
    var streamID: UInt32 { layout.diskID }

    /// The NBD server of the migrated disk, once serving (safe from any thread).
    var server: NBDServer? { serving.withLock { $0.server } }
    /// Where it serves, once serving.
    var servingAddress: SocketAddress? { serving.withLock { $0.address } }

    func receive(_ message: Message, on link: PeerLink) throws(LinkError) {
        switch message {
        case .diskExtents(let extents):
            try Self.check(extents, diskSize: layout.sizeBytes)
            try checkHeld(extents)
            do { try applier.apply(extents) } catch {
                throw .local(.storageFailure, reason: "writing the image \(target.imagePath): \(error)")
            }
            if extents.round == 0, let last = extents.extents.last {
                bulkHighWater = max(bulkHighWater, last.offset + UInt64(last.length))
            }
            // A periodic ack: progress for the source, and where a resume starts.
            bytesSinceAck += UInt64(extents.payload.count)
            let now = ContinuousClock.now
            if now - lastAck > .milliseconds(500) || bytesSinceAck >= 64 << 20 {
                lastAck = now
                bytesSinceAck = 0
                beforeAck()
                try link.send(.ack(Ack(stream: .disk, streamID: layout.diskID, sequence: UInt64(completedRound + 1), offset: bulkHighWater)))
            }
        case .roundEnd(let end):
            if postcopy && end.round == 0 {
                pushEnded = true
            } else {
                completedRound = max(completedRound, Int(end.round))
            }
            beforeAck()
            try link.send(.ack(Ack(stream: .disk, streamID: layout.diskID, sequence: UInt64(completedRound + 1), offset: bulkHighWater)))
        default:
            throw .unexpected(message.type, expecting: "a disk frame")
        }
    }

    var resumePoints: [ResumePoint] {
        [ResumePoint(stream: .disk, streamID: layout.diskID, sequence: UInt64(completedRound + 1), offset: bulkHighWater)]
    }

    /// Post-copy: serve at once (once: a repeated switchover finds it serving); missing blocks come
    /// over the urgent lane, which the source opens next.
    func switchover(postcopy: Bool) throws(LinkError) {
        guard postcopy, !self.postcopy else { return }
        try drainWrites()
        self.postcopy = true
        image.claimsEnabled.store(true, ordering: .releasing)
        if let held {
            let store = PostcopyDiskStore(base: held.base, presence: image.presence, blockSize: Int(layout.blockSize))
            serving.withLock { $0.store = store }
            held.release(to: store)
            server?.resume()
            return
        }
        try startServing(postcopy: true)
    }

    /// Serves the image now, for a VMM that connects while starting (QEMU with `-incoming`), but
    /// holds every write (and, in post-copy, every read of a block not here) until the disk is handed to the VM (``switchover(postcopy:)`` in
    /// post-copy, ``serveForVM()`` in pre-copy).
    func serveHeld() throws(LinkError) {
        guard server == nil else { return }
        do {
            let file = try FileBlockStore(path: image.path)
            let store = HeldDiskStore(base: file)
            try startServing(store: store)
            server?.quiesce(timeoutNanoseconds: 0)   // no write until the disk is the VM's
            held = store
        } catch let error as LinkError { throw error } catch {
            throw .local(.vmStartFailed, reason: "cannot open disk \(layout.diskID) at \(image.path): \(error)")
        }
    }

    func checkReady(theirs: StreamDigest?) throws(LinkError) {
        if postcopy {
            guard server != nil else { throw .local(.vmStartFailed, reason: "disk \(layout.diskID) is not served") }
            return
        }
        guard let theirs else { throw .local(.protocolViolation, reason: "no digest for pre-copy disk \(layout.diskID)") }
        let ours = image.hashes.digest()
        guard theirs.digest == ours else {
            throw .local(.digestMismatch, reason: "disk \(layout.diskID): destination \(ours) differs from the source's \(theirs.digest)")
        }
    }

    /// Serves the pre-copy image (the digests agreed): the VM is about to start.
    func serveForVM() throws(LinkError) {
        try drainWrites()
        if let held, !held.isReleased {
            held.release(to: nil)
            server?.resume()
        }
        guard server == nil else { return }
        try startServing(postcopy: false)
        // Off the downtime path: the VM reads through the page cache, and its own FLUSH requests sync what it needs.
        do { try applier.flush() } catch { logger.warning("flushing the image failed", metadata: ["error": "\(error)"]) }
    }

    /// Waits for the image writes in flight: before the image is served to the VM or shared with post-copy's appliers.
    private func drainWrites() throws(LinkError) {
        do { try applier.drain() } catch {
            throw .local(.storageFailure, reason: "writing the image \(target.imagePath): \(error)")
        }
    }

    func digest() -> StreamDigest { StreamDigest(stream: .disk, streamID: layout.diskID, digest: image.hashes.digest()) }

    var isPostcopy: Bool { postcopy }

    var isComplete: Bool {
        if postcopy { return pushEnded && image.presence.presentCount >= image.hashes.blockCount }
        return true
    }

    func attachUrgent(_ lane: PeerLink) throws(LinkError) {
        lane.setPriority(PeerLink.interactivePriority)
        let store = serving.withLock { $0.store }
        guard let store else { throw .local(.protocolViolation, reason: "an urgent lane for disk \(layout.diskID), which is not in post-copy") }
        serving.withLock { $0.urgent?.stop() }
        store.presence.forgetRequests()
        let main = currentMainLink()
        let client = try UrgentLaneClient(link: lane, image: image, store: store, onFailure: { main?.close() }, logger: logger)
        serving.withLock { $0.urgent = client }
    }

    private func startServing(postcopy: Bool) throws(LinkError) {
        let file: FileBlockStore
        do { file = try FileBlockStore(path: image.path) } catch {
            throw .local(.vmStartFailed, reason: "cannot open disk \(layout.diskID) at \(image.path): \(error)")
        }
        let postcopyStore = postcopy ? PostcopyDiskStore(base: file, presence: image.presence, blockSize: Int(layout.blockSize)) : nil
        try startServing(store: postcopyStore ?? file, postcopyStore: postcopyStore)
    }

    private func startServing(store: any BlockStore, postcopyStore: PostcopyDiskStore? = nil) throws(LinkError) {
        do {
            let server = try NBDServer(store: store, options: NBDServer.Options(exportName: target.exportName, dirtyBlockSize: UInt64(layout.blockSize)))
            let address = try server.listen(target.nbdEndpoint)
            try server.start()
            serving.withLock { $0 = (server, address, postcopyStore, nil) }
            logger.info("serving the migrated disk", metadata: ["disk": "\(layout.diskID)", "nbd": "\(target.nbdEndpoint)",
                                                                "postcopy": "\(postcopyStore != nil)", "held": "\(store is HeldDiskStore)"])
        } catch {
            throw .local(.vmStartFailed, reason: "cannot serve disk \(layout.diskID) over NBD at \(target.nbdEndpoint): \(error)")
        }
    }

    func fill(_ report: inout MigrationReport, final: Bool) {
        var disk = MigrationReport.DiskReport()
        disk.diskID = layout.diskID
        disk.total = layout.sizeBytes
        disk.blockSize = Int(layout.blockSize)
        disk.transferred = image.dataBytes.load(ordering: .relaxed)
        disk.duplicate = image.zeroBytes.load(ordering: .relaxed)
        disk.held = image.heldBytes.load(ordering: .relaxed)
        if final { disk.digest = "\(image.hashes.digest())" }
        if let urgent = serving.withLock({ $0.urgent }) {
            disk.postcopyRequests = urgent.requestsSent
            disk.postcopyBytes = urgent.bytesReceived
        }
        report.disks.append(disk)
    }

    func stop() {
        serving.withLock { $0.urgent?.stop() }
        endHeldReport()
    }

    /// Stops reporting the base image (the session ended).
    func endHeldReport() { image.base?.stop() }

    /// Stops serving the disk (drained), at the agent's exit.
    func shutdown() {
        stop()
        server?.shutdown(drain: true)
    }
}
