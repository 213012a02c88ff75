import Foundation
import Logging
import NBDBridge
import Wire

/// The source's end of the urgent lane during disk post-copy: answers each `diskFetch` with a
/// `diskReply` read from the (paused, so frozen) image, on a connection of its own so the answer
/// overtakes the bulk push.
final class UrgentLaneServer: @unchecked Sendable {
    private let link: PeerLink
    private let logger: Logger
    /// Set when the `switchover` goes out: a fetch before it is a protocol violation (the disk is
    /// the source's until then, and a block sent early could go stale).
    private let open = Locked<Bool>(false)

    private final class ChunkBox: @unchecked Sendable {
        var chunks: DiskChunkSender
        var counters = DiskTransferCounters()
        init(_ chunks: consuming DiskChunkSender) { self.chunks = chunks }
    }
    private let box: ChunkBox

    init(link: PeerLink, store: FileBlockStore, diskID: UInt32, blockSize: Int, logger: Logger) throws(LinkError) {
        self.link = link
        self.logger = logger
        do {
            box = ChunkBox(try DiskChunkSender(diskID: diskID, fd: store.fileDescriptor, diskSize: store.size,
                                               blockSize: blockSize, chunkBytes: 1 << 20))
        } catch {
            throw .socket(error, during: "urgent lane set-up")
        }
        let (open, diskSize) = (open, store.size)
        link.startReader(name: "ferry-urgent-responder") { [box, link] (frame: DecodedFrame) throws(LinkError) in
            guard case .diskFetch(let fetch) = frame.message else {
                if case .keepalive = frame.message { return }
                throw .unexpected(frame.header.type, expecting: "diskFetch on the urgent lane")
            }
            guard open.withLock({ $0 }) else {
                throw .local(.protocolViolation, reason: "diskFetch of disk \(fetch.diskID) at \(fetch.offset)+\(fetch.length) before switchover")
            }
            guard fetch.diskID == diskID else {
                throw .local(.protocolViolation, reason: "diskFetch of disk \(fetch.diskID) on the urgent lane of disk \(diskID)")
            }
            // Arranged so that nothing overflows, whatever the offset: the range lies in the disk.
            guard fetch.offset <= diskSize, UInt64(fetch.length) <= diskSize - fetch.offset else {
                throw .local(.protocolViolation, reason: "diskFetch at \(fetch.offset)+\(fetch.length) beyond the \(diskSize)-byte disk \(diskID)")
            }
            let first = Int(fetch.offset / UInt64(blockSize))
            let end = Int((fetch.offset + UInt64(fetch.length) - 1) / UInt64(blockSize)) + 1
            try link.withSender { (sender: inout FrameSender) throws(LinkError) in
                try box.chunks.send(blocks: first..<end, round: 0, holesFrom: nil, via: &sender,
                                    counters: &box.counters, replyTo: fetch.requestID)
            }
        }
    }

    /// From now on (the `switchover` is going out) fetches are answered.
    func acceptFetches() { open.withLock { $0 = true } }

    /// Data bytes sent in answers.
    var bytesSent: UInt64 { box.counters.dataBytes }

    /// Closes the lane.
    func stop() { link.close() }
}
