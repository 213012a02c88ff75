import Foundation
import Glibc
import Logging
import Synchronization
import NBDBridge
import SystemPackage
import URing
import Wire

/// How the destination receives a disk.
public struct DiskDestinationOptions: Sendable {
    /// Where to accept the source's connections.
    public var listen: SocketAddress
    /// The shared key both agents hold.
    public var key: SharedKey
    /// The image to write (created or emptied).
    public var imagePath: String
    /// Where to serve the disk over NBD after switchover.
    public var nbdEndpoint: NBDEndpoint
    /// A receive that sees nothing for this long (seconds) counts as a dropped link.
    public var receiveTimeout: Double = 30
    /// How long to wait for the source to come back after a dropped link (seconds).
    public var linkTimeout: Double = 60
    /// How long to wait for the first connection (seconds; 0 = for ever).
    public var acceptTimeout: Double = 0

    public init(listen: SocketAddress, key: SharedKey, imagePath: String, nbdEndpoint: NBDEndpoint) {
        self.listen = listen
        self.key = key
        self.imagePath = imagePath
        self.nbdEndpoint = nbdEndpoint
    }
}

/// Receives a migrating disk, applies bulk data and dirty-block deltas to its image, and at
/// switchover starts serving that image over NBD to the resumed VM. Survives link drops: a source
/// that reconnects with the same session resumes from what this side reports it has applied.
public final class DiskDestinationMigration: @unchecked Sendable {
    private let options: DiskDestinationOptions
    private let logger: Logger
    private let serving = Mutex<(server: NBDServer?, address: SocketAddress?)>((nil, nil))
    /// The NBD server that serves the migrated disk, once switched over (safe from any thread).
    public var server: NBDServer? { serving.withLock { $0.server } }
    /// The socket address the NBD server listens on, once switched over.
    public var servingAddress: SocketAddress? { serving.withLock { $0.address } }

    public init(options: DiskDestinationOptions, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// What this side has applied: the resume point it reports on reconnect.
    private struct Progress {
        var sessionID: SessionID?
        var completedRound = -1
        var bulkHighWater: UInt64 = 0
        var finalRound: UInt32? = nil
        var serving = false
        var postcopy = false
        var diskID: UInt32 = 1
    }

    /// Receives until the digests are exchanged (or the migration fails). On success the disk is
    /// being served over NBD (see ``server``) and stays served after this returns.
    public func run() -> MigrationReport {
        var report = MigrationReport(role: "destination")
        let start = ContinuousClock.now
        var progress = Progress()
        var image: DiskImage? = nil
        var applier: DiskApplier? = nil
        var urgent: UrgentLaneClient? = nil
        var postcopyStore: PostcopyDiskStore? = nil
        var wireBytes: UInt64 = 0
        var reconnects = 0
        let listener: OwnedDescriptor
        do {
            listener = try Socket.listen(on: options.listen)
        } catch {
            report.reason = "cannot listen on \(options.listen): \(error)"
            return report
        }
        logger.info("waiting for the source", metadata: ["listen": "\(options.listen)"])

        var failure: String? = nil
        var done = false
        var lastAck = ContinuousClock.now
        var ackedBytes: UInt64 = 0
        var switchoverAt: ContinuousClock.Instant? = nil
        session: while !done {
            // Accept the next connection: the first one, or the source coming back after a drop.
            let waitSeconds = progress.sessionID == nil ? options.acceptTimeout : options.linkTimeout
            guard let fd = Socket.accept(from: listener.rawValue, timeout: waitSeconds)?.take() else {
                failure = progress.sessionID == nil ? "no source connected within \(Int(waitSeconds)) s"
                                                    : "the source did not come back within \(Int(waitSeconds)) s"
                break session
            }
            let link: PeerLink
            do {
                let snapshot = progress
                link = try PeerLink.accept(fd: fd, key: options.key, receiveTimeout: options.receiveTimeout) { (hello: Hello) throws(LinkError) in
                    try self.admit(hello, progress: snapshot)
                }
            } catch {
                logger.warning("refused a connection", metadata: ["error": "\(error)"])
                continue session
            }
            if progress.sessionID != nil { reconnects += 1 }
            if progress.postcopy, let image, let store = postcopyStore {
                // The VM runs here and may be waiting for blocks: the source reopens the urgent lane.
                urgent?.stop()
                guard let lane = acceptUrgentLane(listener.rawValue, sessionID: link.agreement.sessionID) else {
                    link.close()
                    continue session
                }
                store.presence.forgetRequests()
                do { urgent = try UrgentLaneClient(link: lane, image: image, store: store, mainLink: link, logger: logger) } catch {
                    link.close()
                    continue session
                }
            }
            progress.sessionID = link.agreement.sessionID
            if report.setupTimeMs == 0 { report.setupTimeMs = Double((ContinuousClock.now - start).components.attoseconds) / 1e15 + Double((ContinuousClock.now - start).components.seconds) * 1000 }

            do throws(LinkError) {
                while true {
                    let frame = try link.receive(during: progress.serving ? "digest exchange" : "migration")
                    switch frame.message {
                    case .diskLayout(let layout):
                        if image == nil || image!.layout != layout {
                            do {
                                let created = try DiskImage(path: options.imagePath, layout: layout)
                                image = created
                                applier = try DiskApplier(image: created)
                            } catch {
                                try? link.sender.send(.error(.truncating(code: .storageFailure, reason: "cannot create \(options.imagePath): \(error)")))
                                failure = "cannot create the image \(options.imagePath): \(error)"
                                break session
                            }
                            progress.diskID = layout.diskID
                            logger.info("receiving disk", metadata: ["bytes": "\(layout.sizeBytes)", "block_size": "\(layout.blockSize)"])
                        }
                    case .diskExtents(let extents):
                        guard image != nil, applier != nil else { throw LinkError.unexpected(.diskExtents, expecting: "diskLayout first") }
                        do { try applier!.apply(extents) } catch {
                            try? link.sender.send(.error(.truncating(code: .storageFailure, reason: "writing the image: \(error)")))
                            failure = "writing the image failed: \(error)"
                            break session
                        }
                        if extents.round == 0, let last = extents.extents.last {
                            progress.bulkHighWater = max(progress.bulkHighWater, last.offset + UInt64(last.length))
                        }
                        // A periodic ack: progress for the source, and proof of life on a long bulk copy.
                        let now = ContinuousClock.now
                        ackedBytes += UInt64(extents.payload.count)
                        if now - lastAck > .milliseconds(500) || ackedBytes >= 64 << 20 {
                            lastAck = now
                            ackedBytes = 0
                            try link.sender.send(.ack(Ack(stream: .disk, streamID: extents.diskID,
                                                          sequence: UInt64(progress.completedRound + 1), offset: progress.bulkHighWater)))
                        }
                    case .roundEnd(let end):
                        progress.completedRound = max(progress.completedRound, Int(end.round))
                        try link.sender.send(.ack(Ack(stream: .disk, streamID: end.streamID, sequence: UInt64(end.round) + 1,
                                                      offset: progress.bulkHighWater)))
                    case .switchover(let switchover):
                        progress.finalRound = switchover.finalRound
                        switchoverAt = ContinuousClock.now
                        logger.info("switchover: source paused", metadata: ["final_bytes": "\(switchover.diskBytesToCome)",
                                                                              "postcopy": "\(switchover.mode.contains(.diskPostcopy))"])
                        if switchover.mode.contains(.diskPostcopy), !progress.serving, let image {
                            // Post-copy: serve at once (once: a repeated switchover finds it serving);
                            // missing blocks come over the urgent lane.
                            image.claimsEnabled.store(true, ordering: .releasing)
                            postcopyStore = try startServing(image, postcopy: PostcopyDiskStore.self)
                            progress.serving = true
                            progress.postcopy = true
                            guard let lane = acceptUrgentLane(listener.rawValue, sessionID: link.agreement.sessionID) else {
                                throw LinkError.timedOut(during: "urgent lane set-up", seconds: 10)   // the source reconnects and reopens it
                            }
                            urgent = try UrgentLaneClient(link: lane, image: image, store: postcopyStore!, mainLink: link, logger: logger)
                            try link.sender.send(.resumed(VMResumed(sinceSwitchoverNanoseconds: 0)))
                        }
                    case .complete(let theirs):
                        guard let image else { throw LinkError.unexpected(.complete, expecting: "a disk first") }
                        let diskID = image.layout.diskID
                        if progress.postcopy && image.presence.presentCount < image.hashes.blockCount {
                            let reason = "complete with \(image.hashes.blockCount - image.presence.presentCount) blocks still missing"
                            try? link.sender.send(.error(.truncating(code: .protocolViolation, reason: reason)))
                            failure = reason
                            break session
                        }
                        // The image's digest is kept current as blocks are written, so this costs nothing.
                        let ours = image.hashes.digest()
                        report.digestsAgree = theirs.digests.first { $0.stream == .disk && $0.streamID == diskID }?.digest == ours
                        guard report.digestsAgree else {
                            try? link.sender.send(.error(.truncating(code: .digestMismatch, reason: "destination \(ours) differs from the source's")))
                            failure = "disk digests differ: destination \(ours), source \(theirs.digests)" + (progress.serving ? "" : "; not serving it")
                            break session
                        }
                        if !progress.serving {
                            // Pre-copy: the image equals the source's at pause; hand over.
                            try startServing(image, postcopy: nil)
                            progress.serving = true
                            let since = ContinuousClock.now - (switchoverAt ?? ContinuousClock.now)
                            try link.sender.send(.resumed(VMResumed(sinceSwitchoverNanoseconds:
                                UInt64(since.components.seconds) * 1_000_000_000 + UInt64(since.components.attoseconds / 1_000_000_000))))
                            // Off the downtime path: the VM reads through the page cache, and its own
                            // FLUSH requests sync what it needs.
                            do { try applier!.flush() } catch { logger.warning("flushing the image failed", metadata: ["error": "\(error)"]) }
                        }
                        try link.sender.send(.complete(Wire.Completion(digests: [StreamDigest(stream: .disk, streamID: diskID, digest: ours)])))
                        done = true
                        wireBytes += link.sender.bytesSent
                        link.close()
                        break session
                    case .keepalive:
                        break
                    default:
                        throw LinkError.unexpected(frame.header.type, expecting: "a disk frame")
                    }
                }
            } catch {
                wireBytes += link.sender.bytesSent
                if error.isRetryable {
                    link.close()
                    logger.warning("link lost; waiting for the source to resume", metadata: ["error": "\(error)", "serving": "\(progress.serving)"])
                    continue session
                }
                // Tell the source before closing, so it does not wait for a reconnect that will not come.
                if case .peer = error {} else {
                    try? link.sender.send(.error(.truncating(code: error.wireCode, reason: "\(error)")))
                }
                link.close()
                failure = "\(error)"
                break session
            }
        }

        if let image {
            var disk = MigrationReport.DiskReport()
            disk.total = image.layout.sizeBytes
            disk.blockSize = Int(image.layout.blockSize)
            disk.transferred = image.dataBytes.load(ordering: .relaxed)
            disk.duplicate = image.zeroBytes.load(ordering: .relaxed)
            if let urgent {
                disk.postcopyRequests = urgent.requestsSent
                disk.postcopyBytes = urgent.bytesReceived
                urgent.stop()
            }
            report.disk = disk
        }
        report.reconnects = reconnects
        report.wireBytes = wireBytes
        report.totalTimeMs = Double((ContinuousClock.now - start).components.seconds) * 1000
            + Double((ContinuousClock.now - start).components.attoseconds) / 1e15
        if let failure {
            report.status = "failed"
            report.reason = failure
            logger.error("migration failed", metadata: ["reason": "\(failure)", "serving": "\(progress.serving)"])
        } else {
            report.status = "completed"
        }
        return report
    }

    /// Decides whether to take a hello: a new session when none is held, or the held one resumed.
    private func admit(_ hello: Hello, progress: Progress) throws(LinkError) -> SessionHandshake.Admission {
        let features: Features = [.disk, .zeroRuns, .resume, .diskPostcopy, .urgentLane]
        switch (hello.mode, progress.sessionID) {
        case (.new, nil):
            return .init(features: features)
        case (.resume, let held?) where held == hello.sessionID:
            let points = [ResumePoint(stream: .disk, streamID: progress.diskID, sequence: UInt64(progress.completedRound + 1),
                                      offset: progress.bulkHighWater)]
            return .init(features: features, resumePoints: points, handedOver: progress.serving)
        case (.resume, _):
            throw .peer(.unknownSession, reason: "this destination holds no session \(hello.sessionID)")
        case (.new, _?):
            throw .peer(.busy, reason: "this destination is already receiving a migration")
        }
    }

    /// Serves the image over NBD: as it is (pre-copy), or through a ``PostcopyDiskStore`` that holds
    /// reads and writes of blocks that have not arrived (post-copy), which it returns.
    @discardableResult
    private func startServing(_ image: DiskImage, postcopy: PostcopyDiskStore.Type?) throws(LinkError) -> PostcopyDiskStore? {
        do {
            let file = try FileBlockStore(path: image.path)
            let postcopyStore = postcopy.map { _ in PostcopyDiskStore(base: file, presence: image.presence, blockSize: Int(image.layout.blockSize)) }
            let store: any BlockStore = postcopyStore ?? file
            let server = try NBDServer(store: store, options: NBDServer.Options(exportName: "", dirtyBlockSize: UInt64(image.layout.blockSize)))
            let address = try server.listen(options.nbdEndpoint)
            server.start()
            serving.withLock { $0 = (server, address) }
            logger.info("serving the migrated disk", metadata: ["nbd": "\(options.nbdEndpoint)", "postcopy": "\(postcopy != nil)"])
            return postcopyStore
        } catch {
            throw .local(.vmStartFailed, reason: "cannot serve the image over NBD: \(error)")
        }
    }

    /// Accepts the source's urgent-lane connection of session `sessionID` (docs/wire.md, "Urgent lane").
    private func acceptUrgentLane(_ listener: Int32, sessionID: SessionID) -> PeerLink? {
        guard let fd = Socket.accept(from: listener, timeout: 10)?.take() else { return nil }
        try? Socket.setOption(fd, SOL_SOCKET, SO_PRIORITY, PeerLink.interactivePriority)
        // No idle timeout worth the name: a VM may go minutes without a missing block.
        return try? PeerLink.accept(fd: fd, key: options.key, receiveTimeout: 86_400) { (hello: Hello) throws(LinkError) in
            guard hello.sessionID == sessionID, hello.features == [.urgentLane] else {
                throw .peer(.protocolViolation, reason: "expected the urgent lane of session \(sessionID)")
            }
            return .init(features: [.urgentLane])
        }
    }

}
