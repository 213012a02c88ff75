import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Synchronization
import Wire

/// The destination's fault service for the resumed VM (Firecracker's UFFD handler is the model): one
/// thread reads userfaultfd events and answers each fault on a page already here with UFFDIO_COPY
/// (UFFDIO_ZEROPAGE for zero or never-touched pages); a fault on a page not yet here sends an urgent
/// `pageRequest` for it and its neighbours (pre-paging) on the urgent lane and moves on, so only
/// that fault waits: the reply's reader installs the pages, which wakes it.
public final class MemoryFaultService: @unchecked Sendable {
    private final class ServerBox: @unchecked Sendable {
        var server: FaultServer
        init(_ server: consuming FaultServer) { self.server = server }
    }

    private let box: ServerBox
    private let image: GuestMemoryImage
    /// The urgent lane requests go out on; a new lane replaces it after a reconnect.
    private let urgent: Mutex<PeerLink?>
    /// Set when a new lane arrives: every outstanding request is asked again at once on it.
    private let askAgainNow = Atomic<Bool>(false)
    /// Set once the source's push has ended (see ``pushHasEnded()``).
    private let pushEnded = Atomic<Bool>(false)
    private var lastSweep: UInt64 = 0
    private let prepagingWindow: Int
    private let logger: Logger
    /// The VMM's PID (SO_PEERCRED), to notice when it exits.
    public let vmPID: Int32
    private let stopping = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)
    private let onExit: @Sendable () -> Void

    /// Faults on pages already here, and their latency (event read to page installed).
    public let faultsOnReceived = SharedCounter()
    public let receivedLatency = LatencyRecorder()
    /// Faults on pages not here yet, and their latency (event read to the reply's page installed).
    public let faultsOnMissing = SharedCounter()
    public let missingLatency = LatencyRecorder()
    /// Requests sent.
    public let requestsSent = SharedCounter()
    /// Remove events (madvise DONTNEED in the VM) seen.
    public let removeEvents = SharedCounter()
    /// Request send time by request id (slot = id & mask), 0 when answered.
    private let pendingSince: UnsafeMutablePointer<UInt64>
    private static let pendingSlots = 1 << 16
    private var nextRequestID: UInt64 = 1

    /// Serves the VM of `handshake` from `image`; missing pages are requested on `urgent` (nil: every
    /// page must already be here, as in pre-copy). `onExit` runs when the VM has gone.
    public convenience init(handshake: consuming UFFDHandshake, image: GuestMemoryImage, urgent: PeerLink?, prepagingWindow: Int,
                            logger: Logger, onExit: @escaping @Sendable () -> Void) throws {
        let pid = handshake.peerPID
        try self.init(server: FaultServer(handshake: handshake), vmPID: pid, image: image, urgent: urgent,
                      prepagingWindow: prepagingWindow, logger: logger, onExit: onExit)
    }

    /// Serves the VM `vmPID` through `server` (its userfaultfd and mappings): from a handshake, or
    /// taken back from the VM with `pidfd_getfd` by an agent restarted after hand-over.
    public init(server: consuming FaultServer, vmPID: Int32, image: GuestMemoryImage, urgent: PeerLink?, prepagingWindow: Int,
                logger: Logger, onExit: @escaping @Sendable () -> Void) throws {
        self.vmPID = vmPID
        let mappings = server.mappings
        // Each layout region's address in the VM, through the memory-file offsets both sides share.
        var addresses: [UInt64] = []
        for region in image.layout.regions {
            guard let m = mappings.first(where: { region.fileOffset >= $0.offset && region.fileOffset + region.size <= $0.offset + $0.size }) else {
                throw SetupError("the VM's mappings hold no range for region \(region.id) (file offset \(region.fileOffset), \(region.size) bytes): \(mappings)")
            }
            addresses.append(m.baseHostVirtAddr + (region.fileOffset - m.offset))
        }
        let fd = server.uffd.descriptor.rawValue
        box = ServerBox(server)
        self.image = image
        self.urgent = Mutex(urgent)
        self.prepagingWindow = max(1, prepagingWindow)
        self.logger = logger
        self.onExit = onExit
        // Zeroed by the kernel page by page as requests use them (`calloc`), not all at the VM's start.
        guard let slots = calloc(Self.pendingSlots, MemoryLayout<UInt64>.stride) else {
            throw SetupError("cannot reserve \(Self.pendingSlots) request slots")
        }
        pendingSince = slots.assumingMemoryBound(to: UInt64.self)
        image.attachVM(uffd: fd, addresses: addresses)
    }

    /// The VM's guest-memory mappings (from its handshake).
    public var mappings: [GuestMemoryMapping] { box.server.mappings }

    /// Wakes every thread of the VM waiting on a fault in its regions (UFFDIO_WAKE): after a
    /// restart, faults the dead agent had read but not answered are raised again.
    public func wakeAll() {
        for mapping in box.server.mappings {
            try? box.server.uffd.wake(AddressRange(start: mapping.baseHostVirtAddr, length: mapping.size))
        }
    }

    deinit { free(pendingSince) }

    /// Starts the fault thread.
    public func start() {
        let thread = Thread { [self] in
            do { try serve() } catch { logger.error("fault service stopped", metadata: ["error": "\(error)"]) }
            finished.store(true, ordering: .releasing)
            onExit()
        }
        thread.name = "ferry-fault-service"
        thread.start()
    }

    /// Installs every page already here into the VM on a thread of its own (pre-copy: all of them),
    /// so the VM stops depending on this process for its memory within a fraction of a second,
    /// and a dest-agent restarted after hand-over finds a VM that runs on.
    public func populate() {
        let thread = Thread { [self] in
            let start = ferry_monotonic_ns()
            let pages = image.installAll { stopping.load(ordering: .relaxed) }
            populated.store(true, ordering: .releasing)
            logger.info("every page installed in the VM", metadata: [
                "pages": "\(pages)", "ms": "\(String(format: "%.1f", Double(ferry_monotonic_ns() &- start) / 1e6))"])
        }
        thread.name = "ferry-populate"
        thread.start()
    }

    /// Whether ``populate()`` has installed every page.
    public var isPopulated: Bool { populated.load(ordering: .acquiring) }
    private let populated = Atomic<Bool>(false)

    /// Asks the fault thread to stop (it notices within 100 ms).
    public func stop() { stopping.store(true, ordering: .relaxed) }

    /// Whether the fault thread has ended (the VM exited, or ``stop()``).
    public var hasFinished: Bool { finished.load(ordering: .acquiring) }

    /// A new urgent lane (the old one failed and the source reconnected): requests still
    /// unanswered are asked again on it at once.
    public func replaceUrgent(_ lane: PeerLink) {
        urgent.withLock { $0 = lane }
        askAgainNow.store(true, ordering: .releasing)
    }

    /// A reply from the source (urgent lane reader thread): pages in, faults woken, latency taken.
    public func handleReply(requestID: UInt64, batch: PageBatch) throws {
        try image.apply(batch, installZeros: true)
        let slot = pendingSince + Int(requestID & UInt64(Self.pendingSlots - 1))
        let since = ferry_counter_load(slot)
        if since != 0 {
            missingLatency.record(nanoseconds: ferry_monotonic_ns() &- since)
            slot.pointee = 0
        }
    }

    /// The source's push has ended: every page not here by now was lost on the way (the window of
    /// pre-paged pages in a reply on an urgent lane that dropped: the source counts them as sent
    /// and never pushes them), and is asked for again.
    public func pushHasEnded() { pushEnded.store(true, ordering: .releasing) }

    private func serve() throws {
        let pageSize = image.pageSize
        while !stopping.load(ordering: .relaxed) {
            let events = try box.server.nextEvents(timeoutMilliseconds: 100)
            retryOverdueRequests()
            askForMissingPages()
            if events.isEmpty {
                if vmHasExited() {
                    logger.info("the resumed VM has exited", metadata: ["pid": "\(vmPID)"])
                    return
                }
                continue
            }
            for event in events {
                // One fault's failure must not stop the service of every later fault.
                do { try handle(event, pageSize: pageSize) } catch {
                    logger.error("fault not served; will retry", metadata: ["address": "\(String(event.address, radix: 16))", "error": "\(error)"])
                }
            }
        }
    }

    /// Pages asked for and not yet arrived: (page, region, time asked). Bounded; the oldest is
    /// dropped when full (its fault is retried by the sweep of another entry or by the push).
    private var outstanding: [(page: Int, region: Int, askedAt: UInt64)] = []
    private static let retryAfterNanoseconds: UInt64 = 1_000_000_000

    /// Asks again for pages whose request went unanswered for a second (its reply was lost, or the
    /// lane dropped it): a faulting vCPU waits in the kernel and will not fault again by itself.
    private func retryOverdueRequests() {
        let everything = askAgainNow.exchange(false, ordering: .acquiringAndReleasing)
        guard !outstanding.isEmpty else { return }
        let now = ferry_monotonic_ns()
        var kept = 0
        for index in 0..<outstanding.count {
            let entry = outstanding[index]
            if image.received.contains(entry.page) || image.removed.contains(entry.page) { continue }
            if everything || now &- entry.askedAt >= Self.retryAfterNanoseconds {
                image.requested.remove(entry.page)
                logger.warning(everything ? "asking again on the new urgent lane" : "page request unanswered for 1 s; asking again",
                               metadata: ["page": "\(entry.page)"])
                try? request(page: entry.page, region: entry.region, since: entry.askedAt, recording: false)
                outstanding[kept] = (entry.page, entry.region, now)
            } else {
                outstanding[kept] = entry
            }
            kept += 1
        }
        outstanding.removeLast(outstanding.count - kept)
    }

    private func handle(_ event: FaultEvent, pageSize: Int) throws {
                switch event.kind {
                case .pageFault:
                    let t0 = ferry_monotonic_ns()
                    let address = event.address
                    guard let (region, page) = image.locate(vmAddress: address) else {
                        logger.error("fault outside every migrated region; answering with a zero page",
                                     metadata: ["address": "\(String(address, radix: 16))"])
                        try box.server.zero(range: AddressRange(start: address, length: UInt64(pageSize)))
                        return
                    }
                    if image.received.contains(page) || image.removed.contains(page) {
                        if image.zero.contains(page) || image.removed.contains(page) {
                            try box.server.zero(range: AddressRange(start: address, length: UInt64(pageSize)))
                        } else {
                            try box.server.copy(page: UnsafeRawBufferPointer(start: image.pointer(page), count: pageSize), to: address)
                        }
                        faultsOnReceived.add(1)
                        receivedLatency.record(nanoseconds: ferry_monotonic_ns() &- t0)
                    } else {
                        faultsOnMissing.add(1)
                        logger.trace("fault on a missing page", metadata: ["page": "\(page)", "address": "0x\(String(address, radix: 16))"])
                        try request(page: page, region: region, since: t0)
                    }
                case .remove:
                    // Firecracker's handler does the same: later faults in the range get zero pages.
                    removeEvents.add(1)
                    var address = event.address & ~UInt64(pageSize - 1)
                    while address < event.end {
                        if let (_, page) = image.locate(vmAddress: address) { image.removed.insert(page) }
                        address += UInt64(pageSize)
                    }
                default:
                    break
                }
    }

    /// Whether the VMM is gone (no such process, or a zombie nobody has reaped yet).
    private func vmHasExited() -> Bool {
        if kill(vmPID, 0) != 0 && errno == ESRCH { return true }
        guard let stat = try? String(contentsOfFile: "/proc/\(vmPID)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return true }
        return stat[stat.index(close, offsetBy: 2)] == "Z"
    }

    /// Requests `page` and the missing pages after it (pre-paging; the window stops at pages here
    /// or already asked for).
    /// After the push: asks for every page still missing, in windows, once a second until none is.
    private func askForMissingPages() {
        guard pushEnded.load(ordering: .acquiring), image.receivedCount < image.totalPages else { return }
        let now = ferry_monotonic_ns()
        guard now &- lastSweep >= Self.retryAfterNanoseconds else { return }
        lastSweep = now
        var missing = 0
        for region in image.layout.regions.indices {
            let first = image.firstPage[region]
            let end = first + Int(image.layout.regions[region].size) / image.pageSize
            for page in first..<end where !image.received.contains(page) && !image.removed.contains(page) {
                image.requested.remove(page)
                missing += 1
            }
            var page = first
            while page < end {
                if !image.received.contains(page) && !image.removed.contains(page) && !image.requested.contains(page) {
                    try? request(page: page, region: region, since: now, recording: false)
                }
                page += 1
            }
        }
        if missing > 0 {
            logger.warning("pages still missing after the push (lost with a dropped urgent lane); asking for them", metadata: ["pages": "\(missing)"])
        }
    }

    private func request(page: Int, region: Int, since t0: UInt64, recording: Bool = true) throws {
        if image.requested.insert(page) { return }   // one request in flight is enough
        if recording {
            if outstanding.count >= 4096 { outstanding.removeFirst() }
            outstanding.append((page, region, ferry_monotonic_ns()))
        }
        guard let lane = urgent.withLock({ $0 }) else {
            throw SetupError("fault on page \(page) that never arrived, and no urgent lane to request it")
        }
        let regionFirst = image.firstPage[region]
        let regionEnd = regionFirst + Int(image.layout.regions[region].size) / image.pageSize
        // The window starts at the faulting page: the source answers it alone first, then the rest.
        let low = page
        var high = page + 1
        while high < regionEnd && high - low < prepagingWindow && !image.received.contains(high) && !image.requested.insert(high) {
            high += 1
        }
        let id = nextRequestID
        nextRequestID += 1
        pendingSince[Int(id & UInt64(Self.pendingSlots - 1))] = t0
        requestsSent.add(1)
        do {
            try lane.send(.pageRequest(PageRequest(requestID: id, regionID: image.layout.regions[region].id,
                                                            pageIndex: UInt64(low - regionFirst), count: UInt32(high - low))))
        } catch {
            throw SetupError("urgent page request failed: \(error)")
        }
    }

    /// Fills the fault part of a memory report (the latency percentiles sort every sample: only at the end).
    public func summarize(into memory: inout MigrationReport.MemoryReport, percentiles: Bool = true) {
        memory.faultsOnReceived = faultsOnReceived.value
        memory.faultsOnMissing = faultsOnMissing.value
        memory.postcopyRequests = requestsSent.value
        guard percentiles else { return }
        memory.faultLatencyReceived = receivedLatency.summary()
        memory.faultLatencyMissing = missingLatency.summary()
    }
}
