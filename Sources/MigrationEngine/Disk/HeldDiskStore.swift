import NBDBridge
import Synchronization

/// The destination's NBD store for a VMM started before switchover (QEMU waiting in `-incoming`):
/// its NBD client connects at start-up and may read while the VMM sets up its devices (QEMU reads
/// sector 0 to guess a disk's geometry, synchronously, before its monitor even answers), but the
/// guest runs only after hand-over. So until ``release(to:)`` reads see the image as it is, and
/// writes are held by the server's write gate (the session quiesces it; QEMU writes nothing while
/// its disks are inactive anyway). Afterwards requests go to the image (pre-copy: the digests
/// agreed) or through a ``PostcopyDiskStore`` that fetches what has not arrived (post-copy).
final class HeldDiskStore: BlockStore, @unchecked Sendable {
    /// The image file.
    let base: FileBlockStore
    /// 0: held, 1: the image as it is, 2: through `postcopy`.
    private let target = Atomic<Int>(0)
    private var postcopy: PostcopyDiskStore?

    init(base: FileBlockStore) { self.base = base }

    /// Lets requests through from now on: to `postcopy` if given, else straight to the image.
    func release(to postcopy: PostcopyDiskStore?) {
        self.postcopy = postcopy
        target.store(postcopy == nil ? 1 : 2, ordering: .releasing)
    }

    var isReleased: Bool { target.load(ordering: .acquiring) != 0 }

    var size: UInt64 { base.size }
    var isReadOnly: Bool { base.isReadOnly }
    var fileDescriptor: Int32 { base.fileDescriptor }
    var canPunchHoles: Bool { base.canPunchHoles }
    var memoryBacked: Bool { base.memoryBacked }

    func isReadable(offset: UInt64, length: UInt64) -> Bool {
        target.load(ordering: .acquiring) == 2 ? postcopy!.isReadable(offset: offset, length: length) : true
    }

    func extents(offset: UInt64, length: UInt64, maxCount: Int, into extents: UnsafeMutableBufferPointer<BlockExtent>) -> Int {
        switch target.load(ordering: .acquiring) {
        case 2: return postcopy!.extents(offset: offset, length: length, maxCount: maxCount, into: extents)
        case 1: return base.extents(offset: offset, length: length, maxCount: maxCount, into: extents)
        default:
            // Nothing is known yet: report data, never a hole that is not one.
            guard maxCount > 0, extents.count > 0 else { return 0 }
            extents[0] = BlockExtent(length: min(length, size - offset), isHole: false)
            return 1
        }
    }

    func prefetch(offset: UInt64, length: UInt64) {
        if target.load(ordering: .acquiring) == 2 { postcopy!.prefetch(offset: offset, length: length) }
    }

    func noteWritten(offset: UInt64, length: UInt64) {
        if target.load(ordering: .acquiring) == 2 { postcopy!.noteWritten(offset: offset, length: length) }
    }

    func flush() throws(NBDBridgeError) { try base.flush() }
}
