import CFerryShims
import Foundation
import Synchronization
import Glibc
import Logging
import ProcessMemory
import URing
import Wire

/// Receives a migrating process's memory into a ``GuestMemoryImage`` and resumes the VM here:
/// at switchover (pre-copy: after the final dirty set; post-copy and hybrid: at once) it writes the
/// VM-state blob and the layout to files, starts `--on-switchover` with FERRY_STATE_FILE,
/// FERRY_UFFD_SOCKET and FERRY_LAYOUT_FILE in its environment, accepts the VM's Firecracker-style
/// UFFD handshake, and serves its faults (``MemoryFaultService``), pulling missing pages over the
/// urgent lane. The digest of the received copy is compared with the source's at the end; the
/// digest is taken over the local copy, never the running VM, so it adds no downtime.
public final class MemoryDestinationMigration: @unchecked Sendable {
    private let options: MemoryDestinationOptions
    private let logger: Logger
    private let faultServiceSlot = Mutex<MemoryFaultService?>(nil)
    /// The fault service, once the VM runs here; it outlives ``run()``. Set by the migration thread,
    /// read by the urgent-lane reader and the agent's main thread, so it is kept under a lock.
    public var faultService: MemoryFaultService? { faultServiceSlot.withLock { $0 } }
    /// The on-switchover command's PID, to reap.
    public private(set) var startedPID: pid_t?
    private let vmExited: @Sendable () -> Void
    private var image: GuestMemoryImage?

    /// `vmExited` runs (on the fault thread) when the resumed VM has gone.
    public init(options: MemoryDestinationOptions, logger: Logger, vmExited: @escaping @Sendable () -> Void = {}) {
        self.options = options
        self.logger = logger
        self.vmExited = vmExited
    }

    /// What the session has seen.
    private struct Session {
        var mode: SwitchoverMode? = nil
        var finalRound: UInt32 = 0
        var switchoverAt: UInt64 = 0
        var state: [UInt8] = []
        var stateLength: UInt64 = 0
        var stateReceived: UInt64 = 0
        var resumed = false
        var pushComplete = false
        var pushFramesApplied: UInt64 = 0
        /// Switchover to VM running, as this side saw it (its half of the downtime).
        var sinceSwitchover: UInt64 = 0
    }

    /// Receives until the digests are compared. The fault service keeps serving the VM afterwards.
    public func run() -> MigrationReport {
        var report = MigrationReport(role: "destination")
        var memory = MigrationReport.MemoryReport()
        let start = ContinuousClock.now
        var failure: String? = nil
        var session = Session()
        var links: [PeerLink] = []
        func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

        do {
            var uffdListener: UFFDHandshakeListener? = nil
            if let path = options.uffdSocket { uffdListener = try UFFDHandshakeListener(path: path) }
            let workDirectory = try makeWorkDirectory()
            let listener: URing.OwnedDescriptor
            do { listener = try Socket.listen(on: options.listen) } catch {
                throw SetupError("cannot listen on \(options.listen): \(error)")
            }
            logger.info("waiting for the source", metadata: ["listen": "\(options.listen)", "uffd_socket": "\(options.uffdSocket ?? "-")"])
            guard let fd = Socket.accept(from: listener.rawValue, timeout: options.acceptTimeout)?.take() else {
                throw SetupError("no source connected within \(Int(options.acceptTimeout)) s")
            }
            let link = try PeerLink.accept(fd: fd, key: options.key, receiveTimeout: options.receiveTimeout) { (hello: Hello) throws(LinkError) in
                guard hello.mode == .new else { throw .peer(.unknownSession, reason: "memory migration does not resume sessions yet") }
                return SessionHandshake.Admission(features: [.memory, .zeroRuns, .postcopy, .urgentLane])
            }
            links.append(link)
            report.setupTimeMs = seconds(ContinuousClock.now - start) * 1000
            var urgent: PeerLink? = nil
            if link.agreement.features.contains(.urgentLane) {
                guard let ufd = Socket.accept(from: listener.rawValue, timeout: 10)?.take() else { throw SetupError("the source did not open the urgent lane within 10 s") }
                if options.urgentPriority > 0 { try? Socket.setOption(ufd, SOL_SOCKET, SO_PRIORITY, options.urgentPriority) }
                let session = link.agreement.sessionID
                let lane = try PeerLink.accept(fd: ufd, key: options.key, receiveTimeout: 3600) { (hello: Hello) throws(LinkError) in
                    guard hello.sessionID == session, hello.features == [.urgentLane] else {
                        throw .peer(.busy, reason: "expected the urgent lane of session \(session)")
                    }
                    return SessionHandshake.Admission(features: [.urgentLane])
                }
                links.append(lane)
                urgent = lane
                logger.info("urgent lane open")
            }

            var lastAck = ContinuousClock.now
            receive: while true {
                let frame = try link.receive(during: session.resumed ? "post-copy" : "migration")
                switch frame.message {
                case .memoryLayout(let layout):
                    guard image == nil else { throw LinkError.unexpected(.memoryLayout, expecting: "one layout") }
                    image = try GuestMemoryImage(layout: layout)
                    memory.total = layout.regions.reduce(0) { $0 + $1.size }
                    memory.pageSize = Int(layout.pageSize)
                    logger.info("receiving memory", metadata: ["bytes": "\(memory.total)", "regions": "\(layout.regions.count)"])
                    if let urgent { startUrgentReader(urgent) }
                case .pageBatch(let batch):
                    guard let image else { throw LinkError.unexpected(.pageBatch, expecting: "memoryLayout first") }
                    try image.apply(batch)
                    if session.mode?.contains(.memoryPostcopy) == true {
                        // Post-copy push: every frame is acknowledged, for the source's pacer.
                        session.pushFramesApplied += 1
                        try link.sender.send(.ack(Ack(stream: .memory, streamID: PushPacer.ackStreamID, sequence: 0,
                                                      offset: session.pushFramesApplied)))
                    }
                    let now = ContinuousClock.now
                    if now - lastAck > .milliseconds(500) {
                        lastAck = now
                        try link.sender.send(.keepalive(Keepalive(timestampNanoseconds: ferry_monotonic_ns(), isEcho: false)))
                    }
                case .pageDiscard(let range):
                    guard let image else { throw LinkError.unexpected(.pageDiscard, expecting: "memoryLayout first") }
                    try image.discard(range)
                case .roundEnd(let end):
                    try link.sender.send(.ack(Ack(stream: .memory, streamID: 0, sequence: UInt64(end.round) + 1, offset: 0)))
                    memory.pagesPerRound.append(end.itemsSent)
                    if let mode = session.mode, end.round >= session.finalRound {
                        if mode.contains(.memoryPostcopy) {
                            session.pushComplete = true
                            logger.info("every page has arrived", metadata: ["pushed": "\(end.itemsSent)"])
                        } else if !session.resumed {
                            try resumeVM(&session, workDirectory: workDirectory, listener: &uffdListener, urgent: nil, link: link)
                        }
                    }
                case .switchover(let switchover):
                    session.mode = switchover.mode
                    session.finalRound = switchover.finalRound
                    session.switchoverAt = ferry_monotonic_ns()
                    session.stateLength = switchover.vmStateLength
                    session.state = [UInt8](repeating: 0, count: Int(switchover.vmStateLength))
                    memory.mode = switchover.mode.contains(.memoryPostcopy) ? "postcopy" : "precopy"
                    logger.info("switchover: source paused", metadata: ["pages_to_come": "\(switchover.memoryPagesToCome)",
                                                                       "state_bytes": "\(switchover.vmStateLength)"])
                case .vmState(let chunk):
                    guard chunk.totalLength == session.stateLength, chunk.offset + UInt64(chunk.payload.count) <= session.stateLength else {
                        throw LinkError.peer(.protocolViolation, reason: "vmState chunk \(chunk.offset)+\(chunk.payload.count) outside the announced \(session.stateLength) bytes")
                    }
                    session.state.withUnsafeMutableBytes { out in
                        (out.baseAddress! + Int(chunk.offset)).copyMemory(from: chunk.payload.bytes.baseAddress!, byteCount: chunk.payload.count)
                    }
                    session.stateReceived += UInt64(chunk.payload.count)
                case .complete(let theirs):
                    guard let image else { throw LinkError.unexpected(.complete, expecting: "memory first") }
                    guard image.receivedCount == image.totalPages else {
                        throw LinkError.peer(.protocolViolation, reason: "complete with \(image.totalPages - image.receivedCount) of \(image.totalPages) pages missing")
                    }
                    let digestStart = ContinuousClock.now
                    let ours = image.digest()
                    memory.digestTimeMs = seconds(ContinuousClock.now - digestStart) * 1000
                    memory.digest = ours
                    let digest = Digest.fromHex(ours)
                    try link.sender.send(.complete(Wire.Completion(digests: [StreamDigest(stream: .memory, streamID: 0, digest: digest)])))
                    report.digestsAgree = theirs.digests.first { $0.stream == .memory && $0.streamID == 0 }?.digest == digest
                    if !report.digestsAgree {
                        failure = "memory digests differ: destination \(ours), source \(theirs.digests.map { "\($0.digest)" })"
                    }
                    if let path = options.memOut { try image.write(memoryFile: path) }
                    break receive
                case .keepalive, .ack:
                    break
                default:
                    throw LinkError.unexpected(frame.header.type, expecting: "a memory frame")
                }
                // Post-copy resumes as soon as the VM state is here.
                if let mode = session.mode, mode.contains(.memoryPostcopy), !session.resumed, session.stateReceived == session.stateLength {
                    try resumeVM(&session, workDirectory: workDirectory, listener: &uffdListener, urgent: urgent, link: link)
                }
            }
            memory.vmStateBytes = session.stateLength
            report.downtimeMs = Double(session.sinceSwitchover) / 1e6
            if let image {
                memory.normal = image.dataPagesApplied.value
                memory.duplicate = image.zeroPagesApplied.value
                memory.transferred = image.dataPagesApplied.value * UInt64(image.pageSize)
            }
            // The VM keeps its handshake connection; the listener is no longer needed.
            _ = uffdListener.take()
        } catch {
            failure = "\(error)"
        }
        report.wireBytes = links.reduce(0) { $0 + $1.sender.bytesSent }
        for link in links { link.close() }
        faultService?.summarize(into: &memory)
        report.memory = memory
        report.totalTimeMs = seconds(ContinuousClock.now - start) * 1000
        if let failure {
            report.status = "failed"
            report.reason = failure
            logger.error("memory migration failed", metadata: ["reason": "\(failure)"])
        } else {
            report.status = "completed"
        }
        return report
    }

    /// Starts the VM (``startVM``); if that fails, tells the source with `error(vmStartFailed)`
    /// before anything ran here, so the source may resume its paused copy (docs/wire.md).
    private func resumeVM(_ session: inout Session, workDirectory: String, listener: inout UFFDHandshakeListener?,
                          urgent: PeerLink?, link: PeerLink) throws {
        do {
            try startVM(&session, workDirectory: workDirectory, listener: &listener, urgent: urgent, link: link)
        } catch {
            if let pid = startedPID { kill(pid, SIGKILL) }
            try? link.sender.send(.error(.truncating(code: .vmStartFailed, reason: "the VM did not start here: \(error)")))
            throw error
        }
    }

    /// Writes the state and layout files, starts the VM, serves its faults, tells the source.
    private func startVM(_ session: inout Session, workDirectory: String, listener: inout UFFDHandshakeListener?,
                         urgent: PeerLink?, link: PeerLink) throws {
        guard let image else { throw LinkError.unexpected(.switchover, expecting: "memoryLayout first") }
        session.resumed = true
        let statePath = workDirectory + "/vm-state.bin"
        let layoutPath = workDirectory + "/layout.json"
        guard FileManager.default.createFile(atPath: statePath, contents: Data(session.state)) else {
            throw SetupError("cannot write the VM state to \(statePath)")
        }
        let mappings = image.layout.regions.map {
            GuestMemoryMapping(baseHostVirtAddr: $0.hostAddress, size: $0.size, offset: $0.fileOffset, pageSize: UInt64(image.pageSize))
        }
        guard FileManager.default.createFile(atPath: layoutPath, contents: Data(GuestMemoryMapping.encodeList(mappings))) else {
            throw SetupError("cannot write the layout to \(layoutPath)")
        }
        if let command = options.onSwitchover {
            startedPID = try ShellCommand.start(command, environment: [
                "FERRY_STATE_FILE": statePath, "FERRY_LAYOUT_FILE": layoutPath, "FERRY_UFFD_SOCKET": options.uffdSocket ?? ""])
        }
        if let listener = listener.take() {
            let handshake = try listener.accept(timeoutMilliseconds: Int32(options.handshakeTimeout * 1000))
            let service = try MemoryFaultService(handshake: handshake, image: image, urgent: urgent,
                                                 prepagingWindow: options.prepagingWindow, logger: logger, onExit: vmExited)
            service.start()
            faultServiceSlot.withLock { $0 = service }
        }
        let since = ferry_monotonic_ns() &- session.switchoverAt
        session.sinceSwitchover = since
        try link.sender.send(.resumed(VMResumed(sinceSwitchoverNanoseconds: since)))
        logger.info("VM resumed here", metadata: ["since_switchover_ms": "\(String(format: "%.1f", Double(since) / 1e6))",
                                                  "pages_here": "\(image.receivedCount) of \(image.totalPages)"])
    }

    private func startUrgentReader(_ urgent: PeerLink) {
        urgent.startReader(name: "ferry-page-replies") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .pageReply(let id, let batch):
                do {
                    if let service = faultService { try service.handleReply(requestID: id, batch: batch) } else { try image?.apply(batch, installZeros: true) }
                } catch let error as LinkError { throw error } catch {
                    throw .peer(.storageFailure, reason: "\(error)")
                }
            case .keepalive, .ack:
                break
            default:
                throw .unexpected(frame.header.type, expecting: "pageReply on the urgent lane")
            }
        }
    }

    private func makeWorkDirectory() throws -> String {
        if let dir = options.workDirectory {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            return dir
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-dest-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }


    /// Fills the fault figures into a report (call again when the VM has run on).
    public func refresh(_ report: inout MigrationReport) {
        guard let service = faultService, report.memory != nil else { return }
        service.summarize(into: &report.memory!)
    }
}
