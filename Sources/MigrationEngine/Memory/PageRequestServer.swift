import Foundation
import Logging
import ProcessMemory
import Synchronization
import Wire

/// The source's side of the urgent lane (QEMU's postcopy-preempt channel): a thread of its own
/// reads `pageRequest` frames from the destination's faults and answers each at once with a
/// `pageReply` read from the paused process, so an answer never waits behind bulk pages. It also
/// leaves the latest fault position for the push stream, which restarts near it (pre-paging by
/// locality, as CRIU's lazy-pages daemon and Hines & Gopalan's active push do).
public final class PageRequestServer: @unchecked Sendable {
    private var builder: PageBatchBuilder
    private let regions: [SourceRegion]
    /// Pages already delivered in replies, per region: the push stream skips them.
    let delivered: [PageSet]
    /// The latest fault: region index << 40 | page, or UInt64.max for none yet.
    let latestFault = Atomic<UInt64>(UInt64.max)
    let requests = SharedCounter()
    let pagesSent = SharedCounter()
    let dataBytes = SharedCounter()
    private let logger: Logger
    /// Set when the `switchover` goes out: a request before it is a protocol violation (the
    /// process still runs here, and a page sent early would be skipped by the push though it may change).
    private let open = Locked<Bool>(false)

    /// From now on (the `switchover` is going out) requests are answered.
    func acceptRequests() { open.withLock { $0 = true } }

    /// Stops serving (closes the lane).
    public func stop() { lane?.close() }

    public init(pid: Int32, regions: [SourceRegion], hashes: PageHashes, logger: Logger) throws {
        builder = try PageBatchBuilder(pid: pid, batchPages: 256)
        builder.pageHashes = hashes
        self.regions = regions
        delivered = regions.map { PageSet(pageCount: $0.pageCount) }
        self.logger = logger
    }

    /// The lane being served, if any.
    private var lane: PeerLink?

    /// Starts answering requests arriving on `link` (the urgent lane). A new lane after a reconnect
    /// replaces the old one, whose reader is stopped first (one reader at a time uses the builder).
    public func start(on link: PeerLink) {
        if let old = lane {
            old.close()
            old.waitForReader()
        }
        lane = link
        link.startReader(name: "ferry-page-requests") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .pageRequest(let request):
                try answer(request, on: link)
            case .keepalive, .ack:
                break
            default:
                throw .unexpected(frame.header.type, expecting: "pageRequest on the urgent lane")
            }
        }
    }

    private func answer(_ request: PageRequest, on link: PeerLink) throws(LinkError) {
        guard open.withLock({ $0 }) else {
            throw .local(.protocolViolation, reason: "pageRequest for page \(request.pageIndex) of region \(request.regionID) before switchover")
        }
        guard let index = regions.firstIndex(where: { $0.id == request.regionID }) else {
            throw .local(.protocolViolation, reason: "pageRequest for unknown region \(request.regionID)")
        }
        let region = regions[index]
        guard request.pageIndex < UInt64(region.pageCount) else {
            throw .local(.protocolViolation, reason: "pageRequest for page \(request.pageIndex) beyond region \(region.id) of \(region.pageCount) pages")
        }
        requests.add(1)
        latestFault.store(UInt64(index) << 40 | request.pageIndex, ordering: .releasing)
        let first = Int(request.pageIndex)
        let count = min(Int(request.count), region.pageCount - first, builder.batchPages)
        do {
            // The faulting page alone first (one page to serialize on a slow link), then its neighbours.
            try reply(request.requestID, region: region, first: first, count: 1, on: link)
            if count > 1 { try reply(request.requestID, region: region, first: first + 1, count: count - 1, on: link) }
        } catch let error as LinkError {
            throw error
        } catch {
            throw .local(.storageFailure, reason: "reading pages \(first)+\(count) of region \(region.id): \(error)")
        }
        for p in first..<(first + count) { delivered[index].insert(p) }
        pagesSent.add(UInt64(count))
    }

    private func reply(_ id: UInt64, region: SourceRegion, first: Int, count: Int, on link: PeerLink) throws {
        try builder.withBatch(regionID: region.id, hostAddress: region.range.start, first: first, count: count,
                              globalFirst: region.firstGlobalPage + first, mayHoldData: { _ in true }) { batch in
            try link.send(.pageReply(requestID: id, batch: batch))
            dataBytes.add(UInt64(batch.payload.count))
        }
    }
}
