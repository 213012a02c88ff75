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
    /// Bytes sent as `held` extents: blocks the destination's base image already had.
    public var heldBytes: UInt64 = 0
    /// Blocks sent (data or zero).
    public var blocks: UInt64 = 0
    /// `diskExtents` frames sent.
    public var frames: UInt64 = 0
    public init() {}
}

/// Reads runs of disk blocks and sends them as `diskExtents` frames: blocks that are holes in the
/// store's allocation map and all-zero blocks travel as zero extents, data as one gathered payload
/// per chunk. Extents are always whole blocks (a block partly a hole is read and sent as data), so a
/// post-copy destination can claim and write each block once. One reused buffer, one reused extent
/// list: nothing allocated per chunk.
///
/// It also keeps the hash of every block it sends: a block's last send reads its content at the
/// moment of pause (any later write puts it back in the dirty set), so after the final round the
/// hashes are the image at pause, and the digest costs nothing at switchover.
struct DiskChunkSender: ~Copyable {
    let diskID: UInt32
    let fd: Int32
    let diskSize: UInt64
    let blockSize: Int
    let blocksPerChunk: Int
    /// The hash of each block as last sent.
    let hashes: BlockHashes
    private var ring: Ring
    private let buffer: UnsafeMutableRawBufferPointer
    private let zeroBlock: UnsafeMutableRawBufferPointer
    private let allocation: UnsafeMutableBufferPointer<BlockExtent>
    private let holeBlocks: UnsafeMutableBufferPointer<Bool>
    private var extents: [Extent] = []

    init(diskID: UInt32, fd: Int32, diskSize: UInt64, blockSize: Int, chunkBytes: Int) throws(Errno) {
        self.diskID = diskID
        self.fd = fd
        self.diskSize = diskSize
        self.blockSize = blockSize
        self.blocksPerChunk = max(1, chunkBytes / blockSize)
        self.hashes = BlockHashes(diskSize: diskSize, blockSize: blockSize)
        self.ring = try Ring(entries: 8)
        self.buffer = .allocate(byteCount: blocksPerChunk * blockSize, alignment: 4096)
        self.zeroBlock = .allocate(byteCount: blockSize, alignment: 4096)
        zeroBlock.initializeMemory(as: UInt8.self, repeating: 0)
        self.allocation = .allocate(capacity: 256)
        self.holeBlocks = .allocate(capacity: blocksPerChunk)
        extents.reserveCapacity(blocksPerChunk)
    }

    deinit {
        buffer.deallocate()
        zeroBlock.deallocate()
        allocation.deallocate()
        holeBlocks.deallocate()
    }

    var blockCount: Int { hashes.blockCount }

    /// Sends blocks `blocks` (clipped to the disk) as round `round`, chunk by chunk. When
    /// `store` is given, blocks that are wholly holes are sent as zero runs without reading them.
    /// With `held`, a data block the destination already holds goes as a `held` extent, unless
    /// this session sent it as data or zeros before (the destination may have written it); every
    /// block sent as data or zeros is recorded there.
    /// With `replyTo`, each chunk goes as the urgent `diskReply` to that request instead.
    mutating func send(blocks: Range<Int>, round: UInt32, holesFrom store: (any BlockStore)?, held: HeldHashes? = nil,
                       via sender: inout FrameSender, counters: inout DiskTransferCounters, replyTo: UInt64? = nil,
                       afterChunk: (Int) throws(LinkError) -> Void = { _ throws(LinkError) in }) throws(LinkError) {
        var first = blocks.lowerBound
        let end = min(blocks.upperBound, blockCount)
        while first < end {
            let last = min(first + blocksPerChunk, end)
            try sendChunk(first..<last, round: round, holesFrom: store, held: held, via: &sender, counters: &counters, replyTo: replyTo)
            try afterChunk(last)
            first = last
        }
    }

    private mutating func sendChunk(_ blocks: Range<Int>, round: UInt32, holesFrom store: (any BlockStore)?, held: HeldHashes?,
                                    via sender: inout FrameSender, counters: inout DiskTransferCounters, replyTo: UInt64?) throws(LinkError) {
        let start = UInt64(blocks.lowerBound) * UInt64(blockSize)
        let length = min(UInt64(blocks.count) * UInt64(blockSize), diskSize - start)
        markHoleBlocks(blocks, start: start, length: length, store: store)
        extents.removeAll(keepingCapacity: true)
        var payloadLength = 0
        var index = 0
        while index < blocks.count {
            if holeBlocks[index] {
                let block = blocks.lowerBound + index
                append(offset: UInt64(block) * UInt64(blockSize), length: UInt64(hashes.length(ofBlock: block)), kind: .zero)
                hashes.updateZero(block: block)
                held?.markSent(block)
                index += 1
                continue
            }
            // One read for the whole run of data blocks, then a zero check block by block.
            var runEnd = index + 1
            while runEnd < blocks.count && !holeBlocks[runEnd] { runEnd += 1 }
            try readAndSplit(blocks.lowerBound + index ..< blocks.lowerBound + runEnd, held: held, payloadLength: &payloadLength)
            index = runEnd
        }

        let payload = Payload(UnsafeRawBufferPointer(rebasing: buffer[..<payloadLength]))
        let contents = DiskExtents(diskID: diskID, round: round, extents: ExtentList(extents), payload: payload)
        try sender.send(replyTo.map { .diskReply(requestID: $0, extents: contents) } ?? .diskExtents(contents))
        for extent in extents {
            switch extent.kind {
            case .data: counters.dataBytes += UInt64(extent.length)
            case .zero: counters.zeroBytes += UInt64(extent.length)
            case .held: counters.heldBytes += UInt64(extent.length)
            }
        }
        counters.blocks += UInt64(blocks.count)
        counters.frames += 1
    }

    /// Sets `holeBlocks[i]` for each block of the chunk that lies wholly inside a hole of the
    /// store's allocation map (all false without a store).
    private func markHoleBlocks(_ blocks: Range<Int>, start: UInt64, length: UInt64, store: (any BlockStore)?) {
        for index in 0..<blocks.count { holeBlocks[index] = false }
        guard let store else { return }
        let runs = store.extents(offset: start, length: length, maxCount: allocation.count, into: allocation)
        var position = start
        for run in 0..<runs {
            let runEnd = min(position + allocation[run].length, start + length)
            if allocation[run].isHole {
                // Blocks wholly inside [position, runEnd).
                let firstBlock = Int((position + UInt64(blockSize) - 1) / UInt64(blockSize))
                var block = firstBlock
                while block < blocks.upperBound {
                    let blockStart = UInt64(block) * UInt64(blockSize)
                    if blockStart + UInt64(hashes.length(ofBlock: block)) > runEnd { break }
                    if block >= blocks.lowerBound { holeBlocks[block - blocks.lowerBound] = true }
                    block += 1
                }
            }
            position = runEnd
            if position >= start + length { break }
        }
    }

    /// Reads whole blocks `blocks` to the end of the payload so far in one read, then drops
    /// all-zero blocks back out of the payload as zero extents, and blocks the destination holds
    /// as `held` extents, hashing each block.
    private mutating func readAndSplit(_ blocks: Range<Int>, held: HeldHashes?, payloadLength: inout Int) throws(LinkError) {
        let offset = UInt64(blocks.lowerBound) * UInt64(blockSize)
        let count = Int(min(UInt64(blocks.count) * UInt64(blockSize), diskSize - offset))
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[payloadLength..<(payloadLength + count)])
        let got: Int
        do { got = try ring.readFully(fd, into: target, offset: offset) } catch {
            throw .storage(error, during: "reading the disk at \(offset)+\(count)")
        }
        if got < count {   // the image is shorter than its layout: the rest reads as zeros
            UnsafeMutableRawBufferPointer(rebasing: target[got...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        var keep = payloadLength           // where the next kept (non-zero) block goes
        var from = payloadLength
        for block in blocks {
            let length = hashes.length(ofBlock: block)
            let contents = UnsafeRawBufferPointer(rebasing: buffer[from..<(from + length)])
            if memcmp(contents.baseAddress!, zeroBlock.baseAddress!, length) == 0 {
                append(offset: UInt64(block) * UInt64(blockSize), length: UInt64(length), kind: .zero)
                hashes.updateZero(block: block)
                held?.markSent(block)
            } else if let held, held.holds(block: block, contents: contents) {
                hashes.update(block: block, contents: contents)
                append(offset: UInt64(block) * UInt64(blockSize), length: UInt64(length), kind: .held)
            } else {
                held?.markSent(block)
                hashes.update(block: block, contents: contents)
                if keep != from { memmove(buffer.baseAddress! + keep, buffer.baseAddress! + from, length) }
                append(offset: UInt64(block) * UInt64(blockSize), length: UInt64(length), kind: .data)
                keep += length
            }
            from += length
        }
        payloadLength = keep
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
