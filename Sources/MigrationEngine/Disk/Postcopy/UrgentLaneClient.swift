import Foundation
import Logging
import Synchronization
import SystemPackage
import Wire

/// The destination's end of the urgent lane during disk post-copy: a thread sends a `diskFetch`
/// for every block run the NBD server is waiting for, and the lane's reader applies each
/// `diskReply` as it arrives — on their own connection, so they never queue behind bulk data.
/// If the lane fails, the requests in flight are forgotten (blocks still missing are asked for
/// again) and the session's main link is dropped, so the source reconnects and opens a new lane.
final class UrgentLaneClient: @unchecked Sendable {
    private let link: PeerLink
    private let onFailure: @Sendable () -> Void
    private let finished = DispatchSemaphore(value: 0)
    private let store: PostcopyDiskStore
    private let image: DiskImage
    private let logger: Logger
    private let stopped = Atomic<Bool>(false)
    private let sent = Atomic<UInt64>(0)
    private let received = Atomic<UInt64>(0)

    private final class ApplierBox: @unchecked Sendable {
        var applier: DiskApplier
        init(_ applier: consuming DiskApplier) { self.applier = applier }
    }

    /// `onFailure` runs when the lane fails (the session drops its main link, so the source reconnects and opens a new lane).
    init(link: PeerLink, image: DiskImage, store: PostcopyDiskStore, onFailure: @escaping @Sendable () -> Void, logger: Logger) throws(LinkError) {
        self.link = link
        self.onFailure = onFailure
        self.store = store
        self.image = image
        self.logger = logger
        let box: ApplierBox
        do { box = ApplierBox(try DiskApplier(image: image)) } catch { throw .socket(error, during: "urgent lane set-up") }
        link.startReader(name: "ferry-urgent-reader") { [self] (frame: DecodedFrame) throws(LinkError) in
            guard case .diskReply(_, let extents) = frame.message else {
                if case .keepalive = frame.message { return }
                throw .unexpected(frame.header.type, expecting: "diskReply on the urgent lane")
            }
            if extents.extents.contains(where: { $0.kind == .held }) {
                throw .local(.protocolViolation, reason: "a held extent in a diskReply: held blocks come only in the pre-copy bulk copy")
            }
            do throws(Errno) { try box.applier.apply(extents) } catch { throw .socket(error, during: "applying a fetched block") }
            received.add(UInt64(extents.payload.count), ordering: .relaxed)
        }
        Thread { [self] in fetchLoop() }.start()
    }

    /// Fetch requests sent (QEMU's `postcopy-requests`).
    var requestsSent: UInt64 { sent.load(ordering: .relaxed) }
    /// Data bytes that arrived on the urgent lane.
    var bytesReceived: UInt64 { received.load(ordering: .relaxed) }

    /// Ends the fetch thread (waiting for it, so it cannot take requests meant for a new lane)
    /// and closes the lane.
    func stop() {
        stopped.store(true, ordering: .releasing)
        link.close()
        _ = finished.wait(timeout: .now() + 2)
    }

    private func fetchLoop() {
        defer { finished.signal() }
        var requestID: UInt64 = 0
        let blockSize = image.blockSize
        while !stopped.load(ordering: .acquiring) {
            if let failure = link.failureSeen {
                laneFailed(failure)
                return
            }
            for run in store.nextRequests(timeout: 0.2) {
                requestID += 1
                let offset = UInt64(run.lowerBound) * blockSize
                let length = min(UInt64(run.count) * blockSize, image.layout.sizeBytes - offset)
                do {
                    try link.send(.diskFetch(DiskFetch(requestID: requestID, diskID: image.layout.diskID,
                                                              offset: offset, length: UInt32(length))))
                    sent.add(1, ordering: .relaxed)
                } catch {
                    laneFailed(error)
                    return
                }
            }
        }
    }

    private func laneFailed(_ error: LinkError) {
        guard !stopped.load(ordering: .acquiring) else { return }
        logger.warning("urgent lane lost; asking the source to reconnect", metadata: ["error": "\(error)"])
        store.presence.forgetRequests()
        onFailure()
    }
}
