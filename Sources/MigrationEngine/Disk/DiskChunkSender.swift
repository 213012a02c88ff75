import Glibc
import NBDBridge
import SystemPackage
import URing
import Wire

/// Counts of what a disk stream has sent, by kind.
public struct DiskTransferCounters: Sendable, Codable, Equatable {
    /// Bytes sent as data.
    public var dataBytes: UInt64 = 0
    /// Bytes sent as zero runs (holes and all-zero blocks): QEMU's "duplicate".
    public var zeroBytes: UInt64 = 0
    /// Blocks sent (data or zero).
    public var blocks: UInt64 = 0
    /// `diskExtents` frames sent.
    public var frames: UInt64 = 0
    public init() {}
}

/// Reads runs of disk blocks and sends them as `diskExtents` frames: holes (from the store's
/// allocation map) and all-zero blocks travel as zero extents, data as one gathered payload per
/// chunk. One reused buffer, one reused extent list: nothing allocated per chunk.
struct DiskChunkSender: ~Copyable {
    let diskID: UInt32
    let fd: Int32
    let diskSize: UInt64
    let blockSize: Int
    let blocksPerChunk: Int
    private var ring: Ring
    private let buffer: UnsafeMutableRawBufferPointer
    private let zeroBlock: UnsafeMutableRawBufferPointer
    private let allocation: UnsafeMutableBufferPointer<BlockExtent>
    private var extents: [Extent] = []

    init(diskID: UInt32, fd: Int32, diskSize: UInt64, blockSize: Int, chunkBytes: Int) throws(Errno) {
        self.diskID = diskID
        self.fd = fd
        self.diskSize = diskSize
        self.blockSize = blockSize
        self.blocksPerChunk = max(1, chunkBytes / blockSize)
        self.ring = try Ring(entries: 8)
        self.buffer = .allocate(byteCount: blocksPerChunk * blockSize, alignment: 4096)
        self.zeroBlock = .allocate(byteCount: blockSize, alignment: 4096)
        zeroBlock.initializeMemory(as: UInt8.self, repeating: 0)
        self.allocation = .allocate(capacity: 256)
        extents.reserveCapacity(blocksPerChunk)
    }

    deinit {
        buffer.deallocate()
        zeroBlock.deallocate()
        allocation.deallocate()
    }

    var blockCount: Int { Int((diskSize + UInt64(blockSize) - 1) / UInt64(blockSize)) }

    /// Sends blocks `blocks` (clipped to the disk) as round `round`, chunk by chunk. When
    /// `store` is given, its holes are sent as zero runs without reading them.
    /// With `replyTo`, each chunk goes as the urgent `diskReply` to that request instead.
    mutating func send(blocks: Range<Int>, round: UInt32, holesFrom store: (any BlockStore)?,
                       via sender: inout FrameSender, counters: inout DiskTransferCounters, replyTo: UInt64? = nil,
                       afterChunk: (Int) throws(LinkError) -> Void = { _ throws(LinkError) in }) throws(LinkError) {
        var first = blocks.lowerBound
        let end = min(blocks.upperBound, blockCount)
        while first < end {
            let last = min(first + blocksPerChunk, end)
            try sendChunk(first..<last, round: round, holesFrom: store, via: &sender, counters: &counters, replyTo: replyTo)
            try afterChunk(last)
            first = last
        }
    }

    private mutating func sendChunk(_ blocks: Range<Int>, round: UInt32, holesFrom store: (any BlockStore)?,
                                    via sender: inout FrameSender, counters: inout DiskTransferCounters, replyTo: UInt64?) throws(LinkError) {
        let start = UInt64(blocks.lowerBound) * UInt64(blockSize)
        let length = min(UInt64(blocks.count) * UInt64(blockSize), diskSize - start)
        extents.removeAll(keepingCapacity: true)
        var payloadLength = 0

        // The store's allocation map: holes need no read.
        var runs = 0
        if let store {
            runs = store.extents(offset: start, length: length, maxCount: allocation.count, into: allocation)
        }
        if runs == 0 {
            allocation[0] = BlockExtent(length: length, isHole: false)
            runs = 1
        }
        var position = start
        for index in 0..<runs {
            let run = allocation[index]
            let runEnd = min(position + run.length, start + length)
            if run.isHole {
                append(offset: position, length: runEnd - position, kind: .zero)
            } else {
                try readAndSplit(from: position, to: runEnd, payloadLength: &payloadLength)
            }
            position = runEnd
            if position >= start + length { break }
        }
        if position < start + length {   // the map stopped early: read the rest
            try readAndSplit(from: position, to: start + length, payloadLength: &payloadLength)
        }

        let payload = Payload(UnsafeRawBufferPointer(rebasing: buffer[..<payloadLength]))
        let contents = DiskExtents(diskID: diskID, round: round, extents: ExtentList(extents), payload: payload)
        try sender.send(replyTo.map { .diskReply(requestID: $0, extents: contents) } ?? .diskExtents(contents))
        for extent in extents {
            if extent.kind == .data { counters.dataBytes += UInt64(extent.length) } else { counters.zeroBytes += UInt64(extent.length) }
        }
        counters.blocks += UInt64(blocks.count)
        counters.frames += 1
    }

    /// Reads `[from, to)` block by block to the end of the payload so far, dropping all-zero blocks
    /// back out of the payload as zero extents.
    private mutating func readAndSplit(from: UInt64, to: UInt64, payloadLength: inout Int) throws(LinkError) {
        var offset = from
        while offset < to {
            let blockEnd = min((offset / UInt64(blockSize) + 1) * UInt64(blockSize), to)
            let count = Int(blockEnd - offset)
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[payloadLength..<(payloadLength + count)])
            let got: Int
            do { got = try ring.readFully(fd, into: target, offset: offset) } catch {
                throw .socket(error, during: "reading the disk at \(offset)")
            }
            if got < count {   // the image is shorter than its layout: the rest reads as zeros
                UnsafeMutableRawBufferPointer(rebasing: target[got...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
            if memcmp(target.baseAddress!, zeroBlock.baseAddress!, count) == 0 {
                append(offset: offset, length: UInt64(count), kind: .zero)
            } else {
                append(offset: offset, length: UInt64(count), kind: .data)
                payloadLength += count
            }
            offset = blockEnd
        }
    }

    /// Adds an extent, merging it into the previous one when they touch and are of one kind.
    private mutating func append(offset: UInt64, length: UInt64, kind: Extent.Kind) {
        guard length > 0 else { return }
        if let last = extents.last, last.kind == kind, last.offset + UInt64(last.length) == offset,
           UInt64(last.length) + length < UInt64(UInt32.max) {
            extents[extents.count - 1].length += UInt32(length)
        } else {
            extents.append(Extent(offset: offset, length: UInt32(length), kind: kind))
        }
    }
}
