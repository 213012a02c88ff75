import Wire

/// One XXH3-64 hash per page of the migrating memory (global page numbers: regions back to back
/// in layout order), and the digest over them: how the destination proves, BEFORE it starts the
/// VM, that its copy equals the source's memory at the pause, at the cost of hashing the final
/// pages only. The source records each page as it sends it (its last send reads the content at
/// the pause: any later write puts the page in the next dirty set); the destination records each
/// page as it applies it. The same scheme as the disk's ``BlockHashes``, which it wraps.
/// Different pages may be recorded from different threads; one page's two writers (the push and an
/// urgent reply of the paused VM) record the same content.
public final class PageHashes: @unchecked Sendable {
    private let table: BlockHashes

    /// Hashes of `pageCount` zero pages of `pageSize` bytes.
    public init(pageCount: Int, pageSize: Int) {
        table = BlockHashes(diskSize: UInt64(pageCount) * UInt64(pageSize), blockSize: pageSize)
    }

    /// Records the contents of global page `page`.
    @inline(__always) public func record(page: Int, contents: UnsafeRawBufferPointer) {
        table.update(block: page, contents: contents)
    }

    /// Records that global page `page` is zero.
    @inline(__always) public func recordZero(page: Int) {
        table.updateZero(block: page)
    }

    /// SHA-256 over every page's hash, in page order.
    public func digest() -> Digest { table.digest() }
}
