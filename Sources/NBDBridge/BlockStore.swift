/// The storage behind an NBD export (nbdkit's "plugin" seam).
///
/// The server moves data with io_uring on ``fileDescriptor`` (reads, writes, `fdatasync`,
/// `fallocate`), from each connection's own ring; the store answers the questions that are not I/O:
/// its size, what it supports, where its holes are, and whether a range can be read yet.
///
/// Post-copy on the destination plugs in here: a store whose blocks are still arriving returns false
/// from ``isReadable(offset:length:)`` for a range that has not arrived; the connection parks that
/// read (without blocking its thread) and asks again every millisecond until it returns true, then
/// reads the range from ``fileDescriptor``. Writes, trims and zeroes of a not-yet-arrived range wait
/// the same way (fetch-before-write), so that data arriving later never overwrites them; the store
/// learns of completed writes from the server's ``DirtyBitmap`` (or ``noteWritten(offset:length:)``).
public protocol BlockStore: AnyObject, Sendable {
    /// Bytes in the export.
    var size: UInt64 { get }
    /// Whether writes, trims and zeroes are refused (EPERM).
    var isReadOnly: Bool { get }
    /// The descriptor io_uring reads, writes, syncs and fallocates.
    var fileDescriptor: Int32 { get }
    /// Whether `fallocate(PUNCH_HOLE)` may be used for TRIM and WRITE_ZEROES without NO_HOLE.
    var canPunchHoles: Bool { get }
    /// Fills `extents` with the allocation of `[offset, offset+length)`: each entry a length and
    /// whether it is a hole (reads as zeroes). Stops after `maxCount` entries. Returns how many.
    func extents(offset: UInt64, length: UInt64, maxCount: Int,
                 into extents: UnsafeMutableBufferPointer<BlockExtent>) -> Int
    /// Whether `[offset, offset+length)` holds its data yet (post-copy stores). Must not block.
    func isReadable(offset: UInt64, length: UInt64) -> Bool
    /// Starts reading `[offset, offset+length)` into cache (NBD_CMD_CACHE). Must not block long.
    func prefetch(offset: UInt64, length: UInt64)
    /// Called when a write, trim or zero of `[offset, offset+length)` has completed.
    func noteWritten(offset: UInt64, length: UInt64)
    /// Flushes everything written to stable storage, blocking (shutdown path).
    func flush() throws(NBDBridgeError)
    /// Reads and writes never wait for a device (memory-backed, e.g. tmpfs): the connection then
    /// does them inline with `pread`/`pwrite` instead of through io_uring, which would hand each one
    /// to a kernel worker thread because such files lack non-blocking buffered I/O.
    var memoryBacked: Bool { get }
}

extension BlockStore {
    public func isReadable(offset: UInt64, length: UInt64) -> Bool { true }
    public func noteWritten(offset: UInt64, length: UInt64) {}
    public var memoryBacked: Bool { false }
}

/// One run of a store's allocation map, as `base:allocation` reports it.
public struct BlockExtent: Sendable, Equatable {
    /// Bytes in the run.
    public var length: UInt64
    /// The run is a hole: it reads as zeroes and occupies no space.
    public var isHole: Bool

    public init(length: UInt64, isHole: Bool) {
        self.length = length
        self.isHole = isHole
    }
}
