import NBDBridge
import Synchronization

/// The destination's NBD store for a VMM started before switchover (QEMU waiting in `-incoming`):
/// its NBD client connects at start-up, but no request may touch the image until the disk is
/// handed to the VM. Until ``release(to:)`` every read and write is held (parked by the NBD
/// connection and retried); then they go to the image as it is (pre-copy: the digests agreed) or
/// through a ``PostcopyDiskStore`` that fetches what has not arrived (post-copy).
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
        switch target.load(ordering: .acquiring) {
        case 0: return false
        case 1: return true
        default: return postcopy!.isReadable(offset: offset, length: length)
        }
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
