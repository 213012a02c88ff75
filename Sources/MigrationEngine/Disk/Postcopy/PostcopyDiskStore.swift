import Foundation
import NBDBridge
import Synchronization

/// The destination's NBD store during disk post-copy: the image file, plus the knowledge of which
/// blocks have arrived. A read or write of a block that has not arrived asks for it (with a window
/// of neighbours: pre-paging) and is held by the NBD connection until it is present.
public final class PostcopyDiskStore: BlockStore, @unchecked Sendable {
    private let base: FileBlockStore
    /// Arrival state shared with the appliers.
    public let presence: BlockPresence
    private let blockSize: UInt64
    private let window: Int
    private let queue = Mutex<[Range<Int>]>([])
    private let wakeup = DispatchSemaphore(value: 0)
    private let requests = Atomic<UInt64>(0)

    /// A store over the image `base` whose blocks of `blockSize` bytes arrive as `presence` says.
    /// A fault asks for the `window` blocks (aligned) around the block it needs.
    public init(base: FileBlockStore, presence: BlockPresence, blockSize: Int, window: Int = 16) {
        self.base = base
        self.presence = presence
        self.blockSize = UInt64(blockSize)
        self.window = max(1, window)
    }

    public var size: UInt64 { base.size }
    public var isReadOnly: Bool { base.isReadOnly }
    public var fileDescriptor: Int32 { base.fileDescriptor }
    public var canPunchHoles: Bool { base.canPunchHoles }
    public var memoryBacked: Bool { base.memoryBacked }
    public func extents(offset: UInt64, length: UInt64, maxCount: Int, into extents: UnsafeMutableBufferPointer<BlockExtent>) -> Int {
        // Allocation is not known until every block has arrived: report data.
        guard presence.arePresent(blocks(offset: offset, length: length)) else {
            guard maxCount > 0, extents.count > 0 else { return 0 }
            extents[0] = BlockExtent(length: min(length, size - offset), isHole: false)
            return 1
        }
        return base.extents(offset: offset, length: length, maxCount: maxCount, into: extents)
    }
    public func prefetch(offset: UInt64, length: UInt64) { _ = isReadable(offset: offset, length: length) }
    public func flush() throws(NBDBridgeError) { try base.flush() }

    /// Fetch requests made so far (QEMU's `postcopy-requests`).
    public var requestCount: UInt64 { requests.load(ordering: .relaxed) }

    public func isReadable(offset: UInt64, length: UInt64) -> Bool {
        let range = blocks(offset: offset, length: length)
        if presence.arePresent(range) { return true }
        // Ask for the missing blocks, widened to an aligned window around them (pre-paging).
        let first = (range.lowerBound / window) * window
        let last = min(((range.upperBound + window - 1) / window) * window, presence.blockCount)
        var runStart = -1
        var runs: [Range<Int>] = []
        for block in first..<last {
            if presence.tryRequest(block) {
                if runStart < 0 { runStart = block }
            } else if runStart >= 0 {
                runs.append(runStart..<block)
                runStart = -1
            }
        }
        if runStart >= 0 { runs.append(runStart..<last) }
        if !runs.isEmpty {
            queue.withLock { $0.append(contentsOf: runs) }
            requests.add(1, ordering: .relaxed)
            wakeup.signal()
        }
        return false
    }

    /// Waits up to `timeout` seconds for block runs to fetch; returns them (empty on timeout).
    public func nextRequests(timeout: Double) -> [Range<Int>] {
        _ = wakeup.wait(timeout: .now() + timeout)
        return queue.withLock { pending in
            let taken = pending
            pending.removeAll(keepingCapacity: true)
            return taken
        }
    }

    private func blocks(offset: UInt64, length: UInt64) -> Range<Int> {
        let first = Int(offset / blockSize)
        let end = Int((offset + max(length, 1) + blockSize - 1) / blockSize)
        return first..<min(max(end, first + 1), presence.blockCount)
    }
}
