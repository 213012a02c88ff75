import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Synchronization
import Wire

/// The migrating memory as a stream of a ``DestinationSession``: pages go into a
/// ``GuestMemoryImage`` (hashed as they are applied, so the digest check before the VM starts
/// costs nothing); once the VM runs, a ``MemoryFaultService`` serves its userfaultfd faults from
/// the image and, in post-copy, asks for missing pages over the urgent lane.
final class MemoryDestinationStream: DestinationStream, @unchecked Sendable {
    let image: GuestMemoryImage
    private let logger: Logger
    /// Runs before each ack is sent: the session publishes its resume points there, so a
    /// reconnecting source is never offered less than what was acknowledged.
    var beforeAck: () -> Void = {}
    private let prepagingWindow: Int
    private let urgentPriority: Int32
    private var completedRound = -1
    private var bulkHighWater = 0
    private var postcopy = false
    private var pushEnded = false
    /// Push frames applied, in all connections (the source's pacer and its resume count on it).
    private var pushFramesApplied: UInt64 = 0
    private let lanes = Mutex<(current: PeerLink?, service: MemoryFaultService?)>((nil, nil))
    private var lastKeepalive = ContinuousClock.now

    /// `backingFile`: keep the memory in this new file, the RAM file of a VMM started here (QEMU).
    init(layout: GuestMemoryLayout, prepagingWindow: Int, urgentPriority: Int32, logger: Logger, backingFile: String? = nil) throws(LinkError) {
        do { image = try GuestMemoryImage(layout: layout, backingFile: backingFile) } catch {
            throw .local(.storageFailure, reason: "cannot hold the migrating memory: \(error)")
        }
        self.prepagingWindow = prepagingWindow
        self.urgentPriority = urgentPriority
        self.logger = logger
        logger.info("receiving memory", metadata: ["bytes": "\(UInt64(image.totalPages) * UInt64(image.pageSize))",
                                                   "regions": "\(layout.regions.count)"])
    }

    var label: String { "memory" }
    var streamType: StreamKind { .memory }
    var streamID: UInt32 { 0 }
    /// The fault service, once the VM runs here.
    var faultService: MemoryFaultService? { lanes.withLock { $0.service } }

    func receive(_ message: Message, on link: PeerLink) throws(LinkError) {
        switch message {
        case .pageBatch(let batch):
            do { try image.apply(batch) } catch let error as LinkError { throw error } catch {
                throw .local(.storageFailure, reason: "applying pages: \(error)")
            }
            if completedRound < 0, let index = image.regionIndex(batch.regionID) {
                bulkHighWater = max(bulkHighWater, image.firstPage[index] + Int(batch.firstPage + batch.pageCount))
            }
            if postcopy {
                // Post-copy push: every frame is acknowledged, for the source's pacer and its resume.
                pushFramesApplied += 1
                beforeAck()
                try link.send(.ack(Ack(stream: .memory, streamID: PushPacer.ackStreamID, sequence: 0, offset: pushFramesApplied)))
            }
        case .pageDiscard(let range):
            do { try image.discard(range) } catch let error as LinkError { throw error } catch {
                throw .local(.protocolViolation, reason: "\(error)")
            }
        case .roundEnd(let end):
            if postcopy {   // after a post-copy switchover the only round is the push
                pushEnded = true
                faultService?.pushHasEnded()
                logger.info(image.receivedCount == image.totalPages ? "every page has arrived" : "the push has ended",
                            metadata: ["pushed": "\(end.itemsSent)", "missing": "\(image.totalPages - image.receivedCount)"])
            } else {
                completedRound = max(completedRound, Int(end.round))
            }
            beforeAck()
            try link.send(.ack(Ack(stream: .memory, streamID: 0, sequence: UInt64(completedRound + 1), offset: UInt64(bulkHighWater))))
        default:
            throw .unexpected(message.type, expecting: "a memory frame")
        }
    }

    /// Set when this agent restarted after hand-over and took the VM back: it holds no page, so its
    /// push resume point says so (sequence 1) and the source pushes every page again.
    private var restarted = false

    var resumePoints: [ResumePoint] {
        [ResumePoint(stream: .memory, streamID: 0, sequence: UInt64(completedRound + 1), offset: UInt64(bulkHighWater)),
         ResumePoint(stream: .memory, streamID: PushPacer.ackStreamID, sequence: restarted && pushFramesApplied == 0 ? 1 : 0,
                     offset: pushFramesApplied)]
    }

    /// Restarted after hand-over in post-copy: serves the VM `pid` again through its userfaultfd,
    /// copied back out of the VM with `pidfd_getfd`, and wakes the faults the dead agent had read
    /// but not answered. Missing pages are requested again as they fault; the source pushes them all.
    func adoptVM(pid: Int32, mappings: [GuestMemoryMapping], onExit: @escaping @Sendable () -> Void) throws {
        restarted = true
        postcopy = true
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else {
            throw SetupError("the VM (PID \(pid)) is gone")
        }
        var found: Int32? = nil
        for entry in entries {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(entry)"),
               target == "anon_inode:[userfaultfd]" {
                found = Int32(entry)
                break
            }
        }
        guard let fd = found else { throw SetupError("the VM (PID \(pid)) holds no userfaultfd any more") }
        let service = try startService(FaultServer(uffd: Userfaultfd(adopting: try RemoteDescriptor.copy(fd, from: pid)), mappings: mappings),
                                       vmPID: pid, onExit: onExit)
        service.wakeAll()
        logger.warning("took the VM's userfaultfd back", metadata: ["pid": "\(pid)", "descriptor_in_vm": "\(fd)"])
    }

    func switchover(postcopy: Bool) throws(LinkError) { self.postcopy = postcopy }

    func checkReady(theirs: StreamDigest?) throws(LinkError) {
        if postcopy { return }
        guard image.receivedCount == image.totalPages else {
            throw .local(.protocolViolation, reason: "memory: \(image.totalPages - image.receivedCount) of \(image.totalPages) pages missing at hand-over")
        }
        guard let theirs else { throw .local(.protocolViolation, reason: "no digest for pre-copy memory") }
        let ours = image.digest()
        guard theirs.digest == ours else {
            throw .local(.digestMismatch, reason: "memory: destination \(ours) differs from the source's \(theirs.digest)")
        }
    }

    func digest() -> StreamDigest { StreamDigest(stream: .memory, streamID: 0, digest: image.digest()) }

    var isPostcopy: Bool { postcopy }

    var isComplete: Bool { !postcopy || (pushEnded && image.receivedCount == image.totalPages) }

    /// The urgent lane: its reader installs each reply's pages (waking the faults that wait for them).
    func attachUrgent(_ lane: PeerLink) throws(LinkError) {
        if urgentPriority > 0 { lane.setPriority(urgentPriority) }
        let old = lanes.withLock { state -> PeerLink? in
            let old = state.current
            state.current = lane
            return old
        }
        old?.close()
        lane.startReader(name: "ferry-page-replies") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .pageReply(let id, let batch):
                do {
                    if let service = faultService { try service.handleReply(requestID: id, batch: batch) } else { try image.apply(batch, installZeros: true) }
                } catch let error as LinkError { throw error } catch {
                    throw .local(.storageFailure, reason: "\(error)")
                }
            case .keepalive, .ack:
                break
            default:
                throw .unexpected(frame.header.type, expecting: "pageReply on the urgent lane")
            }
        }
        lane.startKeepalive(every: 10)
        faultService?.replaceUrgent(lane)
    }

    /// Serves the faults of the VM that handed over its userfaultfd in `handshake`.
    func startFaultService(_ handshake: consuming UFFDHandshake, onExit: @escaping @Sendable () -> Void) throws {
        let lane = lanes.withLock { $0.current }
        let service = try MemoryFaultService(handshake: handshake, image: image, urgent: lane, prepagingWindow: prepagingWindow,
                                             logger: logger, onExit: onExit)
        service.start()
        lanes.withLock { $0.service = service }
        if pushEnded { service.pushHasEnded() }
        service.populate()   // every page already here goes into the VM now, not on its first fault
    }

    /// Serves the faults of a VMM that knows nothing of Ferry (QEMU waiting for its state), whose RAM
    /// is this image's file mapped at `address` in process `pid`: a userfaultfd is injected into it
    /// (ptrace), registered in missing mode over that mapping, every page not here is punched out
    /// of the file, and the fault service starts. From then on every page the VM reads is the
    /// migrated one or faults. Call before the VMM loads its state (that load reads guest RAM too).
    func attachInjected(pid: Int32, address: UInt64, onExit: @escaping @Sendable () -> Void) throws {
        guard image.isFileBacked else { throw SetupError("an injected fault service needs the memory in the VM's RAM file") }
        let uffd = try Userfaultfd.inject(into: pid, keepInTarget: true)   // a restarted agent adopts it
        try uffd.handshake(requesting: [.missingShmem, .eventRemove], required: [.missingShmem])
        let size = UInt64(image.totalPages) * UInt64(image.pageSize)
        try uffd.register(AddressRange(start: address, length: size), mode: .missing)
        // After registering: a page punched now faults on its next touch.
        let punched = image.punchMissing()
        let mappings = [GuestMemoryMapping(baseHostVirtAddr: address, size: size, offset: 0, pageSize: UInt64(image.pageSize))]
        let service = try startService(FaultServer(uffd: uffd, mappings: mappings), vmPID: pid, onExit: onExit)
        service.populate()
        logger.info("serving the VM's faults through an injected userfaultfd", metadata: [
            "pid": "\(pid)", "address": "0x\(String(address, radix: 16))", "pages_missing": "\(punched)"])
    }

    /// Starts the fault service of the VM `vmPID` on `server`, answering missing pages over the current urgent lane.
    private func startService(_ server: consuming FaultServer, vmPID: Int32, onExit: @escaping @Sendable () -> Void) throws -> MemoryFaultService {
        let service = try MemoryFaultService(server: server, vmPID: vmPID, image: image, urgent: lanes.withLock { $0.current },
                                             prepagingWindow: prepagingWindow, logger: logger, onExit: onExit)
        service.start()
        lanes.withLock { $0.service = service }
        if pushEnded { service.pushHasEnded() }
        return service
    }

    /// The Firecracker mapping list of the regions (the layout file the VM maps).
    var mappings: [GuestMemoryMapping] {
        image.layout.regions.map {
            GuestMemoryMapping(baseHostVirtAddr: $0.hostAddress, size: $0.size, offset: $0.fileOffset, pageSize: UInt64(image.pageSize))
        }
    }

    func fill(_ report: inout MigrationReport, final: Bool) {
        var memory = MigrationReport.MemoryReport()
        memory.mode = postcopy ? "postcopy" : "precopy"
        memory.total = UInt64(image.totalPages) * UInt64(image.pageSize)
        memory.pageSize = image.pageSize
        memory.normal = image.dataPagesApplied.value
        memory.duplicate = image.zeroPagesApplied.value
        memory.transferred = image.dataPagesApplied.value * UInt64(image.pageSize)
        if final { memory.digest = "\(image.digest())" }
        faultService?.summarize(into: &memory, percentiles: final)
        report.memory = memory
    }

    func stop() {
        faultService?.stop()
        lanes.withLock { $0.current?.close() }
    }
}
