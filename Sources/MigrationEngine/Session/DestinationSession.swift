import CFerryShims
import Foundation
import Glibc
import Logging
import NBDBridge
import ProcessMemory
import Synchronization
import URing
import Wire

/// How the destination receives a whole VM.
public struct DestinationOptions: Sendable {
    /// Where to accept the source's connections.
    public var listen: SocketAddress
    /// Where the live status goes (`--metrics`), if anywhere.
    public var status: StatusBoard?
    /// The shared key both agents hold.
    public var key: SharedKey
    /// Where each disk goes and is served (disk id N goes to the N-th target).
    public var disks: [DiskTarget] = []
    /// Where the resumed VM hands over its userfaultfd (Firecracker's UFFD handshake); nil: no fault service here.
    public var uffdSocket: String?
    /// Started when the VM may run here, with FERRY_STATE_FILE, FERRY_LAYOUT_FILE, FERRY_UFFD_SOCKET,
    /// FERRY_NBD_SOCKET (the first disk's) and FERRY_NBD_SOCKETS (all, space-separated) in its environment.
    public var onSwitchover: String?
    /// Start `onSwitchover` as soon as the memory layout is here, with FERRY_PRESTART=1: the VM
    /// hands over its userfaultfd then and waits for one byte on that connection (the go) before it
    /// runs; EOF means it must never run. Takes its start out of the downtime.
    public var prestartVM = false
    /// Also write the received memory as a Firecracker memory file (before the VM starts, in pre-copy).
    public var memOut: String?
    /// The work directory (state, layout, hand-over journal); private (0700). Default: a fresh one,
    /// removed afterwards. Give one (that survives a restart) for the journal to be found again.
    public var workDirectory: String?
    /// Pages requested around a faulting page (pre-paging), the faulting page included.
    public var prepagingWindow: Int = 16
    /// SO_PRIORITY of the urgent lanes' sockets (6, TC_PRIO_INTERACTIVE; 0 leaves it alone).
    public var urgentPriority: Int32 = PeerLink.interactivePriority
    /// A receive that sees nothing for this long (seconds) counts as a dropped link.
    public var receiveTimeout: Double = 30
    /// How long to wait for the source to come back after a dropped link before hand-over (seconds).
    public var linkTimeout: Double = 60
    /// How long to wait for the first connection (seconds; 0 = for ever).
    public var acceptTimeout: Double = 0
    /// How long the started VM may take to hand over its userfaultfd (seconds).
    public var vmStartTimeout: Double = 30
    /// Start a QEMU before switchover and load its device state at switchover (instead of
    /// `onSwitchover` and `uffdSocket`).
    public var qemu: QEMUStartOptions?
    /// The VM's network here, when its traffic is to follow it from the source (a tunnel lane).
    public var network: TunnelOptions?
    /// Runs once the VM runs here and its traffic is tunnelled: the place for a dynamic-DNS update
    /// or a route change, so that new connections come to this host (docs/network.md).
    public var onNetworkMoved: String?

    public init(listen: SocketAddress, key: SharedKey) {
        self.listen = listen
        self.key = key
    }
}

/// One migration of a whole VM from the destination side: ONE listening port, ONE session (its
/// main link and an urgent lane per post-copy stream), the disks and the memory as
/// ``DestinationStream``s. The VM starts only when it is safe: every pre-copy stream has all of
/// its data and its digest equals the source's, every post-copy stream serves with fetch-on-demand.
/// Before telling the source that the VM runs here, a ``HandOverJournal`` is synced to the work
/// directory, so a restarted agent still knows.
public final class DestinationSession: @unchecked Sendable {
    private let options: DestinationOptions
    private let logger: Logger
    private let vmExited: @Sendable () -> Void
    private var state = SessionState()
    private var disks: [UInt32: DiskDestinationStream] = [:]
    private var memory: MemoryDestinationStream?
    private var streams: [any DestinationStream] { disks.keys.sorted().compactMap { disks[$0] } + (memory.map { [$0] } ?? []) }
    /// Shared with the acceptor's threads.
    private let door = Locked<Door>(Door())
    private let linkArrived = NSCondition()
    /// Urgent lanes the acceptor queued for the session thread to attach.
    private let queuedLanes = Atomic<Int>(0)
    private var restoredServers: [NBDServer] = []
    /// The PID of the `--on-switchover` command, to reap.
    public private(set) var startedPID: pid_t?
    /// The pre-started VM's handshake (``DestinationOptions/prestartVM``): its userfaultfd, and the
    /// connection on which it waits for the go.
    private var prestarted: UFFDHandshake?
    /// Its PID (SO_PEERCRED at the handshake), killed if the migration fails before the go.
    private var prestartedPID: pid_t?
    /// The QEMU started here before switchover (`--vmm qemu`), on a thread of its own so that its
    /// start-up never stalls the link.
    private let qemuStart = Locked<QEMUStart>(.notStarted)
    private enum QEMUStart { case notStarted, starting, ready(QEMUDestinationVM), failed(String) }
    /// The started QEMU, once up.
    private var qemu: QEMUDestinationVM? { qemuStart.withLock { if case .ready(let vm) = $0 { return vm }; return nil } }
    /// Its RAM file (in a tmpfs), removed when this agent ends.
    private var ramFile: String?
    /// How long the VM start's steps took (ms), for the report.
    private var startSteps: [String: Double] = [:]
    /// The VM's end of the tunnel here, when its network follows it.
    public private(set) var tunnel: EthernetTunnel?
    /// When the VM began to run here (the tunnel's traffic counts from then).
    private var runningSince: UInt64 = 0
    /// The `--on-network-moved` hook's outcome.
    private let hookOutcome = Locked<String>("")
    /// The acceptor, kept after the migration while a tunnel takes its lanes.
    private var lingeringAcceptor: LinkAcceptor?

    /// What the acceptor's threads need to know and hand over.
    private struct Door {
        var sessionID: SessionID?
        var resumePoints: [ResumePoint] = []
        var handedOver = false
        var journalDigests: [StreamDigest] = []
        var waiting: [PeerLink] = []
        var current: PeerLink?
        var lanes: [(Features, PeerLink)] = []
    }

    /// `vmExited` runs when the resumed VM has gone (its fault service ended).
    public init(options: DestinationOptions, logger: Logger, vmExited: @escaping @Sendable () -> Void = {}) {
        self.options = options
        self.logger = logger
        self.vmExited = vmExited
    }

    /// The NBD servers of the migrated disks (safe from any thread once ``run()`` returned).
    public var nbdServers: [NBDServer] { streams.compactMap { ($0 as? DiskDestinationStream)?.server } + restoredServers }
    /// The fault service, once the VM runs here.
    public var faultService: MemoryFaultService? { memory?.faultService }

    /// Receives until the digests are exchanged (or the migration fails). On success the disks are
    /// served and the VM's faults answered after this returns.
    public func run() -> MigrationReport {
        var report = MigrationReport(role: "destination")
        let start = ContinuousClock.now
        var failure: String? = nil
        var wireBytes: UInt64 = 0
        var reconnects = 0
        var workDirectory: PrivateDirectory? = nil
        var uffdListener: UFFDHandshakeListener? = nil
        var acceptor: LinkAcceptor? = nil
        var session = Switch()
        /// The link the last `switchover` came on: a second one on the same link is a violation.
        var switchoverLink: ObjectIdentifier? = nil
        var sourceDigests: [StreamDigest] = []
        var vmStarted = false
        var done = false
        var publishedPhase = state.phase

        do {
            let directory = try options.workDirectory.map { try PrivateDirectory(at: $0) } ?? PrivateDirectory(prefix: "ferry-dest")
            workDirectory = directory
            if let journal = try HandOverJournal.read(from: directory.path) {
                try restore(journal)
                vmStarted = memory != nil   // post-copy: the VM runs and still pulls its memory
            }
            if let path = options.uffdSocket, !door.withLock({ $0.handedOver }) { uffdListener = try UFFDHandshakeListener(path: path) }
            if let network = options.network, tunnel == nil {
                tunnel = try EthernetTunnel.make(side: .destination, options: network, logger: logger)
                tunnel!.start()
                if door.withLock({ $0.handedOver }) { vmRunsHere() }   // restarted after hand-over: the VM runs here already
            }
            let listener: URing.OwnedDescriptor
            do { listener = try Socket.listen(on: options.listen) } catch {
                throw SetupError("cannot listen on \(options.listen): \(error)")
            }
            let door = self.door
            let accepting = LinkAcceptor(listener: listener, key: options.key, receiveTimeout: options.receiveTimeout, logger: logger,
                                         decide: { [hasTunnel = tunnel != nil, hasBase = options.disks.contains { $0.basePath != nil }] (hello: Hello) throws(LinkError) in
                                             try Self.admit(hello, door: door, tunnel: hasTunnel, heldBlocks: hasBase) },
                                         deliver: { [self] link in arrived(link) })
            accepting.start()
            acceptor = accepting
            publishStatus(start: start, setupTimeMs: 0, reconnects: 0, downtimeNs: 0, force: true)
            logger.info("waiting for the source", metadata: ["listen": "\(options.listen)", "uffd_socket": "\(options.uffdSocket ?? "-")",
                                                              "disks": "\(options.disks.count)"])

            session: while !done {
                // The next main link: the first, or the source coming back after a drop.
                let handedOver = door.withLock { $0.handedOver }
                let wait: Double = door.withLock { $0.sessionID == nil } ? options.acceptTimeout
                    : (handedOver && streams.contains { !$0.isComplete }) ? 0 : options.linkTimeout
                guard let link = nextLink(timeout: wait) else {
                    if handedOver {
                        logger.warning("the source did not come back; the VM runs here", metadata: ["waited_s": "\(Int(wait))"])
                        break session
                    }
                    throw SetupError(door.withLock { $0.sessionID == nil } ? "no source connected within \(Int(wait)) s"
                                                                           : "the source did not come back within \(Int(wait)) s")
                }
                if report.setupTimeMs == 0 { report.setupTimeMs = seconds(since: start) * 1000 }
                if link.agreement.mode == .resume { reconnects += 1 }
                link.startKeepalive()
                if link.agreement.mode == .resume, let digests = Optional(door.withLock({ $0.journalDigests })), !digests.isEmpty {
                    // Restarted after hand-over: the VM runs here; what was agreed then is the answer.
                    try? link.send(.complete(Wire.Completion(digests: digests)))
                    if !linger(on: link) { unconfirmedCompletion = Wire.Completion(digests: digests) }
                    report.digestsAgree = true
                    if state.phase == .handshake { state.move(to: .switchover) }
                    state.move(to: .complete)
                    wireBytes += link.bytesSent
                    link.close()
                    done = true
                    break session
                }
                if state.phase == .connecting { state.move(to: .handshake) }
                do throws(LinkError) {
                    while true {
                        let frame = try link.receive(during: vmStarted ? "post-copy" : "migration")
                        if queuedLanes.load(ordering: .relaxed) > 0 { attachLanes() }
                        try checkQEMU()
                        framesSincePublish += 1
                        if state.phase != publishedPhase || options.status?.due() == true {
                            publishStatus(start: start, setupTimeMs: report.setupTimeMs, reconnects: reconnects,
                                          downtimeNs: session.sinceSwitchover, force: state.phase != publishedPhase)
                            publishedPhase = state.phase
                        }
                        if framesSincePublish >= 256 { publishResumePoints() }
                        switch frame.message {
                        case .diskLayout(let layout):
                            try addDisk(layout, afterSwitchover: session.mode != nil, heldAgreed: link.agreement.features.contains(.heldBlocks))
                            try startQEMUWhenReady(directory: directory)
                        case .memoryLayout(let layout):
                            if memory == nil {
                                guard session.mode == nil else {
                                    throw LinkError.local(.protocolViolation, reason: "memoryLayout after switchover: the layouts come first")
                                }
                                try GuestMemoryImage.check(layout)
                                memory = try MemoryDestinationStream(layout: layout, prepagingWindow: options.prepagingWindow,
                                                                     urgentPriority: options.urgentPriority, logger: logger,
                                                                     backingFile: try makeRAMFile(for: layout))
                                memory!.beforeAck = { [unowned self] in publishResumePoints() }
                                try startQEMUWhenReady(directory: directory)
                                if options.prestartVM { try prestartVM(directory: directory, uffdListener: &uffdListener) }
                            } else if memory!.image.layout != layout {
                                throw LinkError.local(.protocolViolation, reason: "a second, different memory layout "
                                                      + "(\(layout.regions.count) regions of \(layout.pageSize)-byte pages after \(memory!.image.layout.regions.count))")
                            }
                        case .diskExtents(let extents):
                            try taking(try disk(extents.diskID), frame.header.type, vmStarted: vmStarted).receive(frame.message, on: link)
                            if state.phase == .handshake { state.move(to: .bulk) }
                        case .pageBatch, .pageDiscard:
                            guard let memory else { throw LinkError.unexpected(frame.header.type, expecting: "memoryLayout first") }
                            if case .pageDiscard = frame.message, vmStarted {
                                throw LinkError.local(.protocolViolation, reason: "pageDiscard after the VM started here: stale pages are dropped before it runs")
                            }
                            try taking(memory, frame.header.type, vmStarted: vmStarted).receive(frame.message, on: link)
                            if state.phase == .handshake { state.move(to: .bulk) }
                        case .roundEnd(let end):
                            try taking(try stream(end.stream, end.streamID), .roundEnd, vmStarted: vmStarted).receive(frame.message, on: link)
                            publishResumePoints()
                        case .switchover(let switchover):
                            // Once per connection: a source offers again only on a new one, after a reconnect.
                            guard switchoverLink != ObjectIdentifier(link) else {
                                throw LinkError.local(.protocolViolation, reason: "a second switchover on one connection")
                            }
                            switchoverLink = ObjectIdentifier(link)
                            if let mode = session.mode, mode != switchover.mode {
                                throw LinkError.local(.protocolViolation, reason: "switchover mode \(switchover.mode.rawValue) after an offer in mode \(mode.rawValue)")
                            }
                            guard !vmStarted else { break }   // a repeated offer after a reconnect: the VM runs already
                            guard switchover.vmStateLength <= Switch.maxStateLength else {
                                throw LinkError.local(.protocolViolation, reason: "VM state of \(switchover.vmStateLength) bytes (at most \(Switch.maxStateLength))")
                            }
                            session = Switch(mode: switchover.mode, at: ferry_monotonic_ns(), stateLength: switchover.vmStateLength)
                            for disk in disks.values { try disk.switchover(postcopy: switchover.mode.contains(.diskPostcopy)) }
                            try memory?.switchover(postcopy: switchover.mode.contains(.memoryPostcopy))
                            if state.phase.isBeforeSwitchover { moveToSwitchover() }
                            logger.info("switchover: the source paused the VM", metadata: [
                                "disk_bytes_to_come": "\(switchover.diskBytesToCome)", "pages_to_come": "\(switchover.memoryPagesToCome)",
                                "state_bytes": "\(switchover.vmStateLength)", "mode": "\(switchover.mode.rawValue)"])
                        case .vmState(let chunk):
                            guard session.mode != nil, !vmStarted else {
                                throw LinkError.unexpected(.vmState, expecting: vmStarted ? "no VM state once the VM runs" : "switchover first")
                            }
                            try session.append(chunk)
                        case .complete(let theirs):
                            for digest in theirs.digests {
                                sourceDigests.removeAll { $0.stream == digest.stream && $0.streamID == digest.streamID }
                                sourceDigests.append(digest)
                            }
                            // The offer's `complete` starts the VM; a later one closes post-copy.
                            let closing = vmStarted
                            if !vmStarted {
                                guard let mode = session.mode else { throw LinkError.unexpected(.complete, expecting: "switchover first") }
                                guard session.stateReceived == session.stateLength else {
                                    throw LinkError.local(.protocolViolation, reason: "complete with \(session.stateLength - session.stateReceived) of \(session.stateLength) bytes of VM state missing")
                                }
                                // The VM starts only when it is safe.
                                for stream in streams {
                                    try stream.checkReady(theirs: theirs.digests.first { $0.stream == stream.streamType && $0.streamID == stream.streamID })
                                }
                                try awaitUrgentLanes(mode: mode)
                                try startVM(mode: mode, session: session, directory: directory, uffdListener: &uffdListener, link: link)
                                session.sinceSwitchover = ferry_monotonic_ns() &- session.at
                                vmStarted = true
                                if state.phase.isBeforeSwitchover { moveToSwitchover() }
                                state.handOver()
                                if streams.contains(where: { !$0.isComplete }) { state.move(to: .postcopy) }
                            }
                            if closing && !streams.allSatisfy(\.isComplete) {
                                // The source pushed everything before this `complete`, but replies to
                                // the last page requests travel on the urgent lane and may still be
                                // on their way: give them a moment rather than a silent stall.
                                let deadline = ContinuousClock.now + .seconds(10)
                                while !streams.allSatisfy(\.isComplete) && ContinuousClock.now < deadline { usleep(1_000) }
                                if !streams.allSatisfy(\.isComplete) {
                                    logger.warning("complete from the source, but not every block and page is here", metadata: [
                                        "incomplete": "\(streams.filter { !$0.isComplete }.map(\.label))"])
                                }
                            }
                            if streams.allSatisfy(\.isComplete) {
                                var differing: [String] = []
                                for stream in streams {
                                    let ours = stream.digest()
                                    if sourceDigests.first(where: { $0.stream == ours.stream && $0.streamID == ours.streamID })?.digest != ours.digest {
                                        differing.append(stream.label)
                                    }
                                }
                                let held = streams.map { $0.digest() }
                                let restored = restoredDigests.filter { old in !held.contains { $0.stream == old.stream && $0.streamID == old.streamID } }
                                let completion = Wire.Completion(digests: held + restored)
                                try link.send(.complete(completion))
                                report.digestsAgree = differing.isEmpty
                                if !differing.isEmpty { failure = "digests differ after hand-over for \(differing.joined(separator: ", "))" }
                                if let memOut = options.memOut, memory?.isComplete == true, session.mode?.contains(.memoryPostcopy) == true {
                                    do { try memory!.image.write(memoryFile: memOut) } catch { logger.error("--mem-out failed", metadata: ["error": "\(error)"]) }
                                }
                                if state.phase != .complete { state.move(to: .complete) }
                                done = true
                                if !linger(on: link) { unconfirmedCompletion = completion }
                                wireBytes += link.bytesSent
                                link.close()
                                break session
                            }
                        case .keepalive, .ack:
                            break
                        default:
                            throw LinkError.unexpected(frame.header.type, expecting: "a disk, memory or session frame")
                        }
                    }
                } catch {
                    wireBytes += link.bytesSent
                    publishResumePoints()
                    if error.isRetryable {
                        link.close()
                        logger.warning("link lost; waiting for the source to resume", metadata: ["error": "\(error)", "vm_started": "\(vmStarted)"])
                        continue session
                    }
                    // Tell the source before closing, so it does not wait for a reconnect that will not come.
                    if case .peer = error {} else {
                        try? link.send(.error(.truncating(code: error.wireCode, reason: "\(error)")))
                    }
                    link.close()
                    throw error
                }
            }
        } catch {
            failure = failure ?? "\(error)"
        }
        if let completion = unconfirmedCompletion { answerLateReconnects(with: completion) }
        for disk in disks.values { disk.endHeldReport() }
        if tunnel != nil && state.owner == .destination {
            lingeringAcceptor = acceptor   // the source reopens the tunnel lane after any drop
        } else {
            acceptor?.stop()
            tunnel?.stop()
        }
        _ = uffdListener.take()
        if state.owner != .destination, prestarted != nil {
            // It must never run here: it is killed (and its command), and its connection closed
            // without the go, which tells a VM that outlived the kill not to run.
            if let pid = prestartedPID { kill(pid, SIGKILL) }
            if let pid = startedPID { kill(pid, SIGKILL); startedPID = nil }
            _ = prestarted.take()
        }
        if state.owner != .destination, options.qemu != nil {
            // It must not run here: the VM runs on at the source. A start still under way ends first.
            let deadline = ContinuousClock.now + .seconds(Int64(options.vmStartTimeout) + 5)
            while qemuStart.withLock({ if case .starting = $0 { return true }; return false }) && ContinuousClock.now < deadline { usleep(10_000) }
            qemu?.kill()
            qemuStart.withLock { $0 = .notStarted }
        }
        if state.owner != .destination, let ramFile { unlink(ramFile) }
        if !state.phase.isTerminal && state.owner != .destination, let failure { state.move(to: .failed(failure)) }
        for stream in streams { stream.fill(&report, final: true) }
        report.disk = report.disks.first
        if let directory = workDirectory {
            if state.owner != .destination {
                directory.remove()
            } else if state.phase == .complete {
                // Settled: the journal is no longer needed. The VM state (it may hold secrets) stays
                // in the private directory while the VM may still be reading it, until shutdown().
                HandOverJournal.remove(from: directory.path)
            }
            keptDirectory = state.owner == .destination ? directory : nil
        }
        report.reconnects = reconnects
        report.wireBytes = wireBytes
        report.totalTimeMs = seconds(since: start) * 1000
        report.downtimeMs = Double(session.sinceSwitchover) / 1e6
        report.downtimeSteps = startSteps
        report.vmLocation = state.owner == .destination ? "destination" : "source"
        report.phase = "\(state.phase)"
        if let tunnel { report.network = networkReport(tunnel) }
        if let failure {
            report.status = "failed"
            report.reason = failure
            logger.error("migration failed", metadata: ["reason": "\(failure)", "vm_location": "\(report.vmLocation)"])
        } else {
            report.status = "completed"
        }
        if let status = options.status {
            showFaultLatencies(on: status)
            status.publish(phase: state.phase, report: report)
        }
        return report
    }

    /// Publishes a live snapshot on the status board (`--metrics`) when one is due, or now when `force`.
    private func publishStatus(start: ContinuousClock.Instant, setupTimeMs: Double, reconnects: Int, downtimeNs: UInt64,
                               force: Bool = false) {
        guard let status = options.status, force || status.due() else { return }
        showFaultLatencies(on: status)
        var live = MigrationReport(role: "destination")
        live.setupTimeMs = setupTimeMs
        live.totalTimeMs = seconds(since: start) * 1000
        live.reconnects = reconnects
        live.downtimeMs = Double(downtimeNs) / 1e6
        live.phase = "\(state.phase)"
        live.vmLocation = state.owner == .destination ? "destination" : "source"
        for stream in streams { stream.fill(&live, final: false) }
        live.disk = live.disks.first
        if let tunnel { live.network = networkReport(tunnel) }
        status.publish(phase: state.phase, report: live)
    }

    /// The fault service's latency recorders, read by the status endpoint at each scrape (the service outlives
    /// the session: the VM's faults go on after the report).
    private func showFaultLatencies(on status: StatusBoard) {
        guard let faults = memory?.faultService else { return }
        status.addFaultLatency(kind: "missing", faults.missingLatency)
        status.addFaultLatency(kind: "received", faults.receivedLatency)
    }

    /// What the switchover brought: the mode, when, the VM state.
    private struct Switch {
        /// The largest VM state a source may announce.
        static let maxStateLength: UInt64 = 1 << 30
        var mode: SwitchoverMode?
        var at: UInt64 = 0
        /// The announced length of the VM state.
        var stateLength: UInt64 = 0
        /// The VM state received so far: it grows with the chunks (in order), so an announced
        /// length costs nothing until its bytes arrive.
        var state: [UInt8] = []
        var stateReceived: UInt64 { UInt64(state.count) }
        var sinceSwitchover: UInt64 = 0
        init() {}
        init(mode: SwitchoverMode, at: UInt64, stateLength: UInt64) { self.mode = mode; self.at = at; self.stateLength = stateLength }

        /// Appends a `vmState` chunk: it must be of the announced blob and follow the bytes received.
        mutating func append(_ chunk: VMStateChunk) throws(LinkError) {
            guard chunk.totalLength == stateLength, chunk.offset == stateReceived,
                  UInt64(chunk.payload.count) <= stateLength - stateReceived else {
                throw .local(.protocolViolation, reason: "vmState chunk \(chunk.offset)+\(chunk.payload.count) of a \(chunk.totalLength)-byte blob; "
                             + "expected the chunk at \(stateReceived) of the announced \(stateLength) bytes")
            }
            if state.isEmpty { state.reserveCapacity(Int(stateLength)) }   // address space only: pages are touched as bytes arrive
            state.append(contentsOf: chunk.payload.bytes)
        }
    }

    private func moveToSwitchover() {
        if state.phase == .handshake { state.move(to: .bulk) }
        if state.phase == .bulk || { if case .round = state.phase { return true }; return false }() { state.move(to: .switchover) }
    }

    // MARK: - Starting the VM

    /// Starts the VM here: serves the pre-copy disks, writes the state and layout files, runs
    /// `--on-switchover` (watched: if it exits before the VM hands over its userfaultfd, that is
    /// seen at once), serves the VM's faults, syncs the journal, and tells the source. A failure
    /// before the journal tells the source `vmStartFailed`, so it resumes its copy.
    private func startVM(mode: SwitchoverMode, session: Switch, directory: PrivateDirectory,
                         uffdListener: inout UFFDHandshakeListener?, link: PeerLink) throws(LinkError) {
        // Where the destination's side of the downtime goes (the report's downtime_steps, the log's steps_ms).
        startSteps["before_start_ms"] = Double(ferry_monotonic_ns() &- session.at) / 1e6
        do {
            for disk in disks.values { try disk.serveForVM() }
            if let memOut = options.memOut, let memory, !mode.contains(.memoryPostcopy) { try memory.image.write(memoryFile: memOut) }
            let statePath = directory.path + "/vm-state.bin"
            guard FileManager.default.createFile(atPath: statePath, contents: Data(session.state), attributes: [.posixPermissions: 0o600]) else {
                throw SetupError("cannot write the VM state to \(statePath)")
            }
            if options.qemu != nil {
                let t0 = ferry_monotonic_ns()
                let qemu = try awaitQEMU(directory: directory)
                guard qemu.isAlive else { throw SetupError("the QEMU started for this migration has exited") }
                let t1 = ferry_monotonic_ns()
                if let memory, mode.contains(.memoryPostcopy) {
                    try memory.attachInjected(pid: qemu.pid, address: qemu.ramAddress, onExit: vmExited)
                }
                let t2 = ferry_monotonic_ns()
                try qemu.loadStateAndRun(statePath: statePath)
                vmRunsHere()
                startSteps["qemu_wait_ms"] = Double(t1 &- t0) / 1e6
                startSteps["uffd_attach_ms"] = Double(t2 &- t1) / 1e6
                startSteps["state_load_and_cont_ms"] = Double(ferry_monotonic_ns() &- t2) / 1e6
            } else {
                let t0 = ferry_monotonic_ns()
                if let handshake = prestarted.take() {
                    // Pre-started: it waits for the go, and its faults wait in the userfaultfd until the service reads them.
                    guard let memory else { throw SetupError("a pre-started VM without memory to serve") }
                    var go: UInt8 = 0x67
                    guard send(handshake.connection.descriptor.rawValue, &go, 1, Int32(MSG_NOSIGNAL)) == 1 else {
                        throw SetupError("the pre-started VM (PID \(handshake.peerPID)) is gone: its go could not be sent (errno \(errno))")
                    }
                    let t1 = ferry_monotonic_ns()
                    try memory.startFaultService(handshake, onExit: vmExited)
                    startSteps["go_ms"] = Double(t1 &- t0) / 1e6
                    startSteps["fault_service_ms"] = Double(ferry_monotonic_ns() &- t1) / 1e6
                    vmRunsHere()
                } else {
                    if let command = options.onSwitchover {
                        startedPID = try ShellCommand.start(command, environment: try vmEnvironment(directory: directory))
                    }
                    let t1 = ferry_monotonic_ns()
                    if let memory, let listener = uffdListener.take() {
                        let handshake = try awaitVM(listener)
                        let t2 = ferry_monotonic_ns()
                        try memory.startFaultService(handshake, onExit: vmExited)
                        startSteps["vm_handshake_ms"] = Double(t2 &- t1) / 1e6
                        startSteps["fault_service_ms"] = Double(ferry_monotonic_ns() &- t2) / 1e6
                    }
                    startSteps["command_start_ms"] = Double(t1 &- t0) / 1e6
                    vmRunsHere()
                }
            }
            let journalStart = ferry_monotonic_ns()
            defer { startSteps["journal_ms"] = Double(ferry_monotonic_ns() &- journalStart) / 1e6 }
            var journal = HandOverJournal(session: "\(link.agreement.sessionID)", digests: [:], disks: [],
                                          memoryPostcopy: mode.contains(.memoryPostcopy))
            for stream in streams where !(mode.contains(.memoryPostcopy) && stream.streamType == .memory)
                && !(mode.contains(.diskPostcopy) && stream.streamType == .disk) {
                journal.digests[stream.label] = "\(stream.digest().digest)"
            }
            if let memory, let service = memory.faultService {
                journal.vmPID = service.vmPID
                journal.pageSize = memory.image.layout.pageSize
                journal.regions = memory.image.layout.regions.map {
                    HandOverJournal.Region(id: $0.id, guestAddress: $0.guestAddress, hostAddress: $0.hostAddress, size: $0.size, fileOffset: $0.fileOffset)
                }
                journal.vmMappings = service.mappings.map {
                    HandOverJournal.Mapping(base: $0.baseHostVirtAddr, size: $0.size, offset: $0.offset, pageSize: $0.pageSize)
                }
            }
            journal.disks = disks.keys.sorted().map { id in
                HandOverJournal.Disk(id: id, image: disks[id]!.target.imagePath, nbd: "\(disks[id]!.target.nbdEndpoint)",
                                     postcopy: mode.contains(.diskPostcopy))
            }
            try journal.write(to: directory.path)
        } catch {
            if let pid = startedPID { kill(pid, SIGKILL) }
            if let pid = prestartedPID { kill(pid, SIGKILL) }   // it may have had its go: it must not run on, unserved
            qemu?.kill()
            qemuStart.withLock { $0 = .notStarted }
            let reason = "the VM did not start here: \(error)"
            try? link.send(.error(.truncating(code: .vmStartFailed, reason: reason)))
            throw .peer(.vmStartFailed, reason: reason)
        }
        door.withLock { $0.handedOver = true }
        networkMoved()
        let since = ferry_monotonic_ns() &- session.at
        try link.send(.resumed(VMResumed(sinceSwitchoverNanoseconds: since)))
        logger.info("the VM runs here", metadata: ["since_switchover_ms": "\(String(format: "%.1f", Double(since) / 1e6))",
                                                   "steps_ms": "\(startSteps.mapValues { (($0 * 10).rounded() / 10) })"])
        // Fault injection for the tests of a dest-agent killed right after hand-over (the window
        // between `resumed` and the closing digests is otherwise microseconds long).
        if let text = ProcessInfo.processInfo.environment["FERRY_TEST_STALL_AFTER_HANDOVER_MS"], let ms = Double(text) {
            logger.warning("test hook: stalling after hand-over", metadata: ["ms": "\(ms)"])
            usleep(UInt32(min(ms, 60_000) * 1000))
        }
    }

    /// The environment of `onSwitchover`'s command (docs in ``DestinationOptions/onSwitchover``);
    /// writes the layout file. The state file is written at switchover, before the VM may run.
    private func vmEnvironment(directory: PrivateDirectory) throws -> [String: String] {
        var environment = ["FERRY_STATE_FILE": directory.path + "/vm-state.bin", "FERRY_UFFD_SOCKET": options.uffdSocket ?? "",
                           "FERRY_WORK_DIR": directory.path]
        if let memory {
            let layoutPath = directory.path + "/layout.json"
            guard FileManager.default.createFile(atPath: layoutPath, contents: Data(GuestMemoryMapping.encodeList(memory.mappings))) else {
                throw SetupError("cannot write the layout to \(layoutPath)")
            }
            environment["FERRY_LAYOUT_FILE"] = layoutPath
        }
        // A Unix socket's path (what QEMU's `server.path=` and libnbd's `unix:` take), else HOST:PORT;
        // before the disks are served (a pre-started VM), where they will be.
        let sockets = disks.keys.sorted().compactMap { disks[$0] }.map { disk in
            let address = disk.servingAddress ?? disk.target.nbdEndpoint.address
            return address.unixPath ?? "\(address)"
        }
        environment["FERRY_NBD_SOCKET"] = sockets.first ?? ""
        environment["FERRY_NBD_SOCKETS"] = sockets.joined(separator: " ")
        return environment
    }

    /// `prestartVM`: starts `onSwitchover`'s command now, with FERRY_PRESTART=1, and takes its UFFD
    /// handshake; the VM then waits for the go that ``startVM`` sends at switchover. If the
    /// migration fails before, the VM is killed and its connection closed (it must never run).
    private func prestartVM(directory: PrivateDirectory, uffdListener: inout UFFDHandshakeListener?) throws(LinkError) {
        guard let command = options.onSwitchover, let listener = uffdListener.take() else { return }
        var vmPID: Int32 = 0
        let t0 = ferry_monotonic_ns()
        do {
            var environment = try vmEnvironment(directory: directory)
            environment["FERRY_PRESTART"] = "1"
            startedPID = try ShellCommand.start(command, environment: environment)
            let handshake = try awaitVM(listener)
            vmPID = handshake.peerPID
            prestartedPID = vmPID
            prestarted = consume handshake
        } catch {
            if let pid = startedPID { kill(pid, SIGKILL); startedPID = nil }
            throw .local(.vmStartFailed, reason: "the pre-started VM did not hand over its memory: \(error)")
        }
        logger.info("VM pre-started; it waits for the switchover", metadata: [
            "pid": "\(vmPID)", "ms": "\(String(format: "%.1f", Double(ferry_monotonic_ns() &- t0) / 1e6))"])
    }

    /// Waits for the started VM's UFFD handshake, watching the `--on-switchover` process: if it
    /// fails first (a non-zero status or a signal), the VM did not start, and that is said at once,
    /// not after the timeout. A command that exits 0 (it started the VM in the background) is
    /// waited for until the timeout.
    private func awaitVM(_ listener: borrowing UFFDHandshakeListener) throws -> UFFDHandshake {
        let deadline = ContinuousClock.now + .milliseconds(Int(options.vmStartTimeout * 1000))
        while ContinuousClock.now < deadline {
            if try listener.hasPendingConnection(timeoutMilliseconds: 100) {
                return try listener.accept(timeoutMilliseconds: 5000)
            }
            if let pid = startedPID {
                var status: Int32 = 0
                if waitpid(pid, &status, WNOHANG) == pid {
                    startedPID = nil
                    let exited = status & 0x7f == 0
                    if !exited || (status >> 8) & 0xff != 0 {
                        throw SetupError("--on-switchover failed (" + (exited ? "exit status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)")
                                         + ") before the VM handed over its memory")
                    }
                }
            }
        }
        throw SetupError("no VM handed over its userfaultfd on \(options.uffdSocket ?? "") within \(Int(options.vmStartTimeout)) s")
    }

    // MARK: - QEMU

    /// `--vmm qemu`: the RAM file for `layout` in the tmpfs RAM directory (nil otherwise).
    private func makeRAMFile(for layout: GuestMemoryLayout) throws(LinkError) -> String? {
        guard let qemu = options.qemu else { return nil }
        guard layout.regions.count == 1 else {
            throw .local(.vmStartFailed, reason: "the source's QEMU has \(layout.regions.count) RAM backends; --vmm qemu here takes one")
        }
        guard ferry_filesystem_type(qemu.ramDirectory) == 0x0102_1994 else {
            throw .local(.vmStartFailed, reason: "--ram-dir \(qemu.ramDirectory) is not a tmpfs (QEMU's RAM must be shared memory)")
        }
        let path = "\(qemu.ramDirectory)/ferry-ram-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        ramFile = path
        return path
    }

    /// `--vmm qemu`: starts QEMU as soon as the memory and every disk are announced, so that its
    /// start-up overlaps the migration and is not downtime.
    private func startQEMUWhenReady(directory: PrivateDirectory) throws(LinkError) {
        guard options.qemu != nil, memory != nil, disks.count == options.disks.count,
              qemuStart.withLock({ if case .notStarted = $0 { return true }; return false }) else { return }
        do { try startQEMU(directory: directory) } catch let error as LinkError { throw error } catch {
            throw .local(.vmStartFailed, reason: "cannot start QEMU here: \(error)")
        }
    }

    /// Fails the migration (before hand-over: the VM runs on at the source) if the early QEMU did not start.
    private func checkQEMU() throws(LinkError) {
        guard options.qemu != nil, let reason = qemuStart.withLock({ state -> String? in if case .failed(let reason) = state { return reason }; return nil }) else { return }
        throw .local(.vmStartFailed, reason: "cannot start QEMU here: \(reason)")
    }

    /// The started QEMU, waiting for a start under way (started now if it never was).
    private func awaitQEMU(directory: PrivateDirectory) throws -> QEMUDestinationVM {
        if qemuStart.withLock({ if case .notStarted = $0 { return true }; return false }) { try startQEMU(directory: directory) }
        while true {
            switch qemuStart.withLock({ $0 }) {
            case .ready(let vm): return vm
            case .failed(let reason): throw SetupError("cannot start QEMU here: \(reason)")
            case .notStarted: throw SetupError("QEMU was not started")
            case .starting: usleep(2_000)   // bounded by its own start timeout
            }
        }
    }

    private func startQEMU(directory: PrivateDirectory) throws {
        guard let start = options.qemu, let memory, let ramFile else { throw SetupError("--vmm qemu needs the VM's memory") }
        for disk in disks.values { try disk.serveHeld() }
        let qmpPath = directory.path + "/qmp.sock"
        unlink(qmpPath)
        let sockets = disks.keys.sorted().compactMap { disks[$0]?.servingAddress.map { $0.unixPath ?? "\($0)" } }
        let size = UInt64(memory.image.totalPages) * UInt64(memory.image.pageSize)
        let environment = ["FERRY_RAM_FILE": ramFile, "FERRY_RAM_SIZE": "\(size)", "FERRY_QMP_SOCKET": qmpPath,
                           "FERRY_NBD_SOCKET": sockets.first ?? "", "FERRY_NBD_SOCKETS": sockets.joined(separator: " "),
                           "FERRY_WORK_DIR": directory.path]
        qemuStart.withLock { $0 = .starting }
        let (timeout, logger, state) = (options.vmStartTimeout, logger, qemuStart)
        let thread = Thread {
            do {
                let vm = try QEMUDestinationVM(command: start.command, environment: environment, qmpPath: qmpPath, ramFile: ramFile,
                                               ramSize: size, timeout: timeout, logger: logger)
                // QEMU and this agent both hold it mapped now: the name goes, so that no way this
                // agent or QEMU ends (a kill, a crash) leaves the guest's RAM behind in the tmpfs.
                unlink(ramFile)
                state.withLock { $0 = .ready(vm) }
            } catch {
                logger.error("QEMU did not start", metadata: ["error": "\(error)"])
                state.withLock { $0 = .failed("\(error)") }
            }
        }
        thread.name = "ferry-qemu-start"
        thread.start()
    }

    // MARK: - Streams

    private func addDisk(_ layout: DiskLayout, afterSwitchover: Bool, heldAgreed: Bool) throws(LinkError) {
        if let existing = disks[layout.diskID] {
            guard existing.layout == layout else {
                throw .local(.protocolViolation, reason: "disk \(layout.diskID) announced twice, differently (\(existing.layout.sizeBytes) bytes in "
                             + "\(existing.layout.blockSize)-byte blocks, then \(layout.sizeBytes) in \(layout.blockSize))")
            }
            return
        }
        guard !afterSwitchover else { throw .local(.protocolViolation, reason: "diskLayout of disk \(layout.diskID) after switchover: the layouts come first") }
        guard layout.diskID >= 1, Int(layout.diskID) <= options.disks.count else {
            throw .local(.layoutMismatch, reason: "the source migrates disk \(layout.diskID); this destination has \(options.disks.count) --disk target(s)")
        }
        try DiskDestinationStream.check(layout)
        let door = self.door
        let stream = try DiskDestinationStream(layout: layout, target: options.disks[Int(layout.diskID) - 1], logger: logger,
                                               currentMainLink: { door.withLock { $0.current } })
        stream.beforeAck = { [unowned self] in publishResumePoints() }
        disks[layout.diskID] = stream
        if heldAgreed {
            // Sent on whichever main link is current: a report cut by a link drop goes on over the next.
            try stream.reportHeld { (message: Message) throws(LinkError) in
                guard let link = door.withLock({ $0.current }) else { throw .closed(during: "reporting the base image (no link)") }
                try link.send(message)
            }
        }
    }

    private func disk(_ id: UInt32) throws(LinkError) -> DiskDestinationStream {
        guard let disk = disks[id] else { throw .unexpected(.diskExtents, expecting: "diskLayout of disk \(id) first") }
        return disk
    }

    /// `stream`, if it may take a `type` frame now: once the VM runs here, only a post-copy stream
    /// does (its push); a pre-copy stream's data would change what the VM already uses.
    private func taking(_ stream: any DestinationStream, _ type: MessageType, vmStarted: Bool) throws(LinkError) -> any DestinationStream {
        guard !vmStarted || stream.isPostcopy else {
            throw .local(.protocolViolation, reason: "\(type) for \(stream.label), a pre-copy stream, after the VM started here")
        }
        return stream
    }

    private func stream(_ type: StreamKind, _ id: UInt32) throws(LinkError) -> any DestinationStream {
        if type == .disk { return try disk(id) }
        if type == .memory, let memory { return memory }
        throw .local(.protocolViolation, reason: "roundEnd for unknown stream \(type) \(id)")
    }

    // MARK: - Links

    /// Decides whether to take a hello: a new session when none is held, the held one resumed,
    /// or an urgent or tunnel lane of the held one. Runs on the acceptor's handshake threads.
    private static func admit(_ hello: Hello, door: Locked<Door>, tunnel: Bool, heldBlocks: Bool) throws(LinkError) -> SessionHandshake.Admission {
        var (held, points, handedOver) = door.withLock { ($0.sessionID, $0.resumePoints, $0.handedOver) }
        if hello.features.contains(.tunnelLane) {
            // Opened right after the main link's handshake, which may not have reached the session yet.
            for _ in 0..<100 where held == nil {
                usleep(20_000)
                held = door.withLock { $0.sessionID }
            }
            guard tunnel else { throw .peer(.featureMismatch, reason: "this destination has no tunnel for the VM's network (dest-agent --vm-bridge)") }
            guard let held, hello.sessionID == held else { throw .peer(.unknownSession, reason: "a tunnel lane for no session held here") }
            return .init(features: [.tunnelLane])
        }
        if hello.features.contains(.urgentLane) {
            // The source opens a lane right after its main link's handshake, which may not have
            // reached the session yet (it is delivered once the handshake returns): wait a little.
            for _ in 0..<100 where held == nil {
                usleep(20_000)
                held = door.withLock { $0.sessionID }
            }
            guard let held, hello.sessionID == held else { throw .peer(.unknownSession, reason: "an urgent lane for no session held here") }
            return .init(features: hello.features.intersection([.urgentLane, .disk, .memory]))
        }
        var features: Features = [.disk, .memory, .zeroRuns, .resume, .diskPostcopy, .postcopy, .urgentLane, .compression]
        if heldBlocks { features.insert(.heldBlocks) }   // offered only with a base image: the source then awaits the report
        switch (hello.mode, held) {
        case (.new, nil):
            return .init(features: features)
        case (.resume, let held?) where held == hello.sessionID:
            return .init(features: features, resumePoints: points, handedOver: handedOver)
        case (.resume, _):
            throw .peer(.unknownSession, reason: "this destination holds no session \(hello.sessionID)")
        case (.new, _?):
            throw .peer(.busy, reason: "this destination is already receiving a migration")
        }
    }

    /// An authenticated link from the acceptor: an urgent lane goes to its stream; a main link
    /// claims or resumes the session and replaces the current one (which is closed, so the
    /// session's loop moves on to it).
    private func arrived(_ link: PeerLink) {
        if link.agreement.features.contains(.tunnelLane) {
            if let tunnel { tunnel.attach(link) } else { link.close() }
            return
        }
        if link.agreement.features.contains(.urgentLane) {
            linkArrived.lock()
            door.withLock { $0.lanes.append((link.agreement.features, link)) }
            queuedLanes.add(1, ordering: .relaxed)
            linkArrived.broadcast()
            linkArrived.unlock()
            return
        }
        let accepted: Bool = door.withLock { door in
            if door.sessionID == nil { door.sessionID = link.agreement.sessionID }
            guard door.sessionID == link.agreement.sessionID else { return false }
            door.current?.close()
            door.waiting.append(link)
            return true
        }
        if !accepted {
            try? link.send(.error(.truncating(code: .busy, reason: "this destination is already receiving a migration")))
            link.close()
            return
        }
        linkArrived.lock()
        linkArrived.broadcast()
        linkArrived.unlock()
    }

    /// The next main link, attaching urgent lanes that arrived meanwhile; nil after `timeout`
    /// seconds (0: wait for ever).
    private func nextLink(timeout: Double) -> PeerLink? {
        let deadline = ContinuousClock.now + .milliseconds(Int(min(timeout, 1e8) * 1000))
        while timeout == 0 || ContinuousClock.now < deadline {
            attachLanes()
            if let link = door.withLock({ door -> PeerLink? in
                guard !door.waiting.isEmpty else { return nil }
                let link = door.waiting.removeFirst()
                door.current = link
                return link
            }) { return link }
            linkArrived.lock()
            _ = linkArrived.wait(until: Date(timeIntervalSinceNow: 0.1))
            linkArrived.unlock()
        }
        return nil
    }

    /// Hands urgent lanes that arrived to their streams (they may arrive before the switchover
    /// that makes a stream post-copy: those wait).
    private func attachLanes() {
        let lanes = door.withLock { door -> [(Features, PeerLink)] in
            let lanes = door.lanes
            door.lanes.removeAll()
            queuedLanes.store(0, ordering: .relaxed)
            return lanes
        }
        var keep: [(Features, PeerLink)] = []
        for (features, lane) in lanes {
            // The lane's hello names its stream in its one resume point.
            let point = lane.agreement.peerResumePoints.first
            let target: (any DestinationStream)? = features.contains(.memory) ? memory : point.flatMap { disks[$0.streamID] }
            do {
                guard let target else { keep.append((features, lane)); continue }
                try target.attachUrgent(lane)
                attachedLanes.insert(target.label)
                logger.info("urgent lane open", metadata: ["stream": "\(target.label)"])
            } catch {
                keep.append((features, lane))
            }
        }
        if !keep.isEmpty {
            door.withLock { $0.lanes.append(contentsOf: keep) }
            queuedLanes.add(keep.count, ordering: .relaxed)
        }
    }

    /// After the closing `complete`: reads (and drops) what the source still sends until it closes,
    /// at most 10 s, so that it reads our `complete` before the connection goes away under it.
    /// Returns true when the source has this side's `complete` for sure: it said goodbye, or it
    /// stayed connected and silent for the whole 10 s (it is there, and had the digests long since).
    /// False: the link dropped first, and the digests may have been lost with it.
    @discardableResult
    private func linger(on link: PeerLink) -> Bool {
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            let left = deadline - ContinuousClock.now
            link.setReceiveTimeout(max(0.05, Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18))
            do {
                if case .ack(let ack) = try link.receive(during: "closing").message, ack == Ack.goodbye { return true }
            } catch {
                if case .timedOut = error { return true }
                return false
            }
        }
        return true
    }

    /// After the last `complete` went out on a link that then dropped before the source said
    /// goodbye: the source may not have it, and it reconnects for it (within its backoff of at most
    /// 2 s). Answers such reconnects with `complete` again for up to 10 s (the link timeout, if shorter).
    private func answerLateReconnects(with completion: Wire.Completion) {
        let deadline = ContinuousClock.now + .milliseconds(Int(min(options.linkTimeout, 10) * 1000))
        while ContinuousClock.now < deadline {
            let left = deadline - ContinuousClock.now
            guard let late = nextLink(timeout: Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18) else { return }
            logger.info("the source came back after the end; its digests go again")
            let bye = (try? late.send(.complete(completion))) != nil && linger(on: late)
            late.close()
            if bye { return }
        }
    }

    /// The `complete` this side sent last, when the source has not said it got it.
    private var unconfirmedCompletion: Wire.Completion?

    /// Frames handled since the resume points were last published.
    private var framesSincePublish = 0

    /// Publishes where every stream got to, for the handshake of a source that reconnects: before
    /// every ack (so a point is never behind what was acknowledged), every 256 frames, at every
    /// round end and when a link fails.
    private func publishResumePoints() {
        framesSincePublish = 0
        let points = streams.flatMap(\.resumePoints)
        door.withLock { $0.resumePoints = points }
    }

    /// Digests verified at hand-over by an agent that restarted since, for streams it no longer holds.
    private var restoredDigests: [StreamDigest] = []

    /// Streams that have an urgent lane.
    private var attachedLanes: Set<String> = []

    /// Before the VM starts in post-copy: waits (up to 10 s) until each post-copy stream has its
    /// urgent lane, which the source opened just before its switchover, so the first fault finds it.
    private func awaitUrgentLanes(mode: SwitchoverMode) throws(LinkError) {
        var needed: [String] = []
        if mode.contains(.memoryPostcopy), let memory { needed.append(memory.label) }
        if mode.contains(.diskPostcopy) { needed += disks.values.map(\.label) }
        let deadline = ContinuousClock.now + .seconds(10)
        while !needed.allSatisfy({ attachedLanes.contains($0) }) {
            guard ContinuousClock.now < deadline else {
                throw .timedOut(during: "urgent lane set-up", seconds: 10)   // the source reconnects and reopens them
            }
            attachLanes()
            usleep(5_000)
        }
    }

    /// Restarted after hand-over: serve the disks again and answer the source from the journal.
    private func restore(_ journal: HandOverJournal) throws {
        guard let bytes = Hex.bytes(journal.session), let id = SessionID(bytes) else {
            throw SetupError("the hand-over journal names no valid session")
        }
        var digests: [StreamDigest] = []
        for (label, hex) in journal.digests {
            guard let bytes = Hex.bytes(hex), let digest = Digest(bytes) else { continue }
            if label == "memory" {
                digests.append(StreamDigest(stream: .memory, streamID: 0, digest: digest))
            } else if let id = UInt32(label.split(separator: " ").last ?? "") {
                digests.append(StreamDigest(stream: .disk, streamID: id, digest: digest))
            }
        }
        for disk in journal.disks {
            guard disk.postcopy != true else {
                // Blocks still missing would read as zeros: better no disk than a wrong one.
                logger.error("disk \(disk.id) was handed over in post-copy and may miss blocks: not served after the restart (recovering a post-copy disk is not supported)")
                continue
            }
            let store = try FileBlockStore(path: disk.image)
            let server = try NBDServer(store: store, options: NBDServer.Options(exportName: ""))
            _ = try server.listen(NBDEndpoint.parse(disk.nbd))
            try server.start()
            restoredServers.append(server)
        }
        var pulling = false
        if journal.memoryPostcopy, let pid = journal.vmPID, let pageSize = journal.pageSize, let regions = journal.regions,
           let mappings = journal.vmMappings {
            // The VM still pulls its memory: take its userfaultfd back and go on with post-copy.
            let layout = GuestMemoryLayout(pageSize: pageSize, regions: regions.map {
                MemoryRegion(id: $0.id, guestAddress: $0.guestAddress, hostAddress: $0.hostAddress, size: $0.size, fileOffset: $0.fileOffset)
            })
            let stream = try MemoryDestinationStream(layout: layout, prepagingWindow: options.prepagingWindow,
                                                     urgentPriority: options.urgentPriority, logger: logger)
            try stream.adoptVM(pid: pid, mappings: mappings.map {
                GuestMemoryMapping(baseHostVirtAddr: $0.base, size: $0.size, offset: $0.offset, pageSize: $0.pageSize)
            }, onExit: vmExited)
            memory = stream
            pulling = true
            digests.removeAll { $0.stream == .memory }
        }
        restoredDigests = digests
        door.withLock {
            $0.sessionID = id
            $0.handedOver = true
            $0.journalDigests = pulling ? [] : digests
            $0.resumePoints = memory?.resumePoints ?? []
        }
        state.move(to: .handshake); state.handOver()
        if pulling {
            state.move(to: .switchover)
            state.move(to: .postcopy)
        }
        logger.warning("restarted after hand-over: the VM runs here (from the journal)", metadata: [
            "session": "\(journal.session)", "disks": "\(journal.disks.count)",
            "memory_postcopy": "\(journal.memoryPostcopy)"])

    }

    /// Fills the fault figures into a report (call again when the VM has run on).
    public func refresh(_ report: inout MigrationReport) {
        if let tunnel { report.network = networkReport(tunnel) }
        guard let service = faultService, report.memory != nil else { return }
        service.summarize(into: &report.memory!)
    }

    /// The work directory while the VM runs here (removed, or emptied of the VM state, at shutdown).
    private var keptDirectory: PrivateDirectory?

    /// Stops serving: the NBD servers (drained) and the fault service; the VM state blob is removed
    /// (with the work directory, if this agent made it).
    public func shutdown() {
        lingeringAcceptor?.stop()
        tunnel?.stop()
        for server in nbdServers { server.shutdown(drain: true) }
        if let ramFile { unlink(ramFile) }   // gone already once QEMU started; a running QEMU keeps its mapping
        memory?.stop()
        if let directory = keptDirectory {
            unlink(directory.path + "/vm-state.bin")
            // A QEMU started here keeps its monitor socket in the directory: the operator's handle on the VM.
            if !FileManager.default.fileExists(atPath: HandOverJournal.path(in: directory.path)) && qemu?.isAlive != true { directory.remove() }
        }
    }

    // MARK: - Network

    private func networkReport(_ tunnel: EthernetTunnel) -> MigrationReport.NetworkReport {
        tunnel.report(seconds: runningSince == 0 ? 0 : Double(ferry_monotonic_ns() &- runningSince) / 1e9, hook: hookOutcome.withLock { $0 })
    }

    /// The VM has just started here (before the journal, so its first moments overlap the sync):
    /// what the tunnel held for it goes in, and its NICs announce themselves (QEMU).
    private func vmRunsHere() {
        guard let tunnel else { return }
        runningSince = ferry_monotonic_ns()
        tunnel.vmRunning()
        if let qemu {
            do { try qemu.announce() } catch { logger.warning("announce-self failed", metadata: ["error": "\(error)"]) }
        }
    }

    /// The VM is handed over: `--on-network-moved` runs, on a thread of its own (never in the
    /// downtime), once the VM's address is known (given, or seen in its frames within 10 s: a
    /// post-copy VM may take seconds to send its first frame).
    private func networkMoved() {
        guard let tunnel, let command = options.onNetworkMoved else { return }
        let (logger, outcome, listen) = (logger, hookOutcome, options.listen)
        let oldHost = door.withLock { $0.current?.peerHost } ?? ""
        let newHost = door.withLock { $0.current?.localHost } ?? listen.host
        let thread = Thread {
            for _ in 0..<1000 where tunnel.vmAddresses.isEmpty { usleep(10_000) }
            let environment = ["FERRY_VM_MAC": tunnel.vmMAC.map { "\($0)" } ?? "", "FERRY_VM_ADDRESSES": tunnel.vmAddresses.joined(separator: " "),
                               "FERRY_NEW_HOST": newHost, "FERRY_OLD_HOST": oldHost, "FERRY_VM_BRIDGE": tunnel.tapBridge]
            do {
                _ = try ShellCommand.run(command, environment: environment, timeout: 60)
                outcome.withLock { $0 = "ok" }
                logger.info("--on-network-moved ran", metadata: ["vm_addresses": "\(tunnel.vmAddresses)", "new_host": "\(newHost)"])
            } catch {
                outcome.withLock { $0 = "failed: \(error)" }
                logger.error("--on-network-moved failed", metadata: ["error": "\(error)"])
            }
        }
        thread.name = "ferry-network-hook"
        thread.start()
    }

    private func seconds(since instant: ContinuousClock.Instant) -> Double {
        let d = ContinuousClock.now - instant
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }
}
