import Glibc
import SystemPackage
import CFerryShims

/// A block store backed by a regular file (or block device): data moves through the server's
/// io_uring rings; holes come from `lseek(SEEK_DATA/SEEK_HOLE)`; TRIM and zeroing use
/// `fallocate(PUNCH_HOLE|KEEP_SIZE)` / `fallocate(ZERO_RANGE)`; CACHE is `posix_fadvise(WILLNEED)`.
public final class FileBlockStore: BlockStore {
    public let size: UInt64
    public let isReadOnly: Bool
    public let fileDescriptor: Int32
    public let canPunchHoles: Bool
    /// The path the store was opened from.
    public let path: String
    private let seekHoles: Bool
    /// The file lives in memory (tmpfs): I/O is done inline (see ``BlockStore/memoryBacked``).
    public let memoryBacked: Bool

    /// Opens `path` (`open` with `O_RDWR` or `O_RDONLY`, `O_CLOEXEC`). The export size is the file's size.
    public init(path: String, readOnly: Bool = false) throws(NBDBridgeError) {
        let fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        if fd < 0 { throw NBDBridgeError(Errno(rawValue: errno), "cannot open disk image \(path)") }
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = errno; Glibc.close(fd)
            throw NBDBridgeError(Errno(rawValue: e), "cannot stat disk image \(path)")
        }
        var size = UInt64(st.st_size)
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = lseek(fd, 0, SEEK_END)
            size = end > 0 ? UInt64(end) : 0
        }
        self.size = size
        self.isReadOnly = readOnly
        self.fileDescriptor = fd
        self.path = path
        self.canPunchHoles = (st.st_mode & S_IFMT) == S_IFREG
        // SEEK_DATA works on ext4, xfs, btrfs, tmpfs; EINVAL elsewhere: then everything is data.
        self.seekHoles = ferry_nbd_lseek(fd, 0, ferry_nbd_seek_data) != -Int64(EINVAL)
        self.memoryBacked = ferry_nbd_is_memory_backed(fd) != 0
    }

    deinit { Glibc.close(fileDescriptor) }

    public func extents(offset: UInt64, length: UInt64, maxCount: Int,
                        into extents: UnsafeMutableBufferPointer<BlockExtent>) -> Int {
        let end = min(offset + length, size)
        var position = offset
        var count = 0
        let limit = min(maxCount, extents.count)
        func add(_ to: UInt64, hole: Bool) {
            let runEnd = min(to, end)
            if count > 0 && extents[count - 1].isHole == hole {
                extents[count - 1].length += runEnd - position
            } else {
                extents[count] = BlockExtent(length: runEnd - position, isHole: hole)
                count += 1
            }
            position = runEnd
        }
        guard seekHoles else {
            if position < end, limit > 0 { add(end, hole: false) }
            return count
        }
        while position < end && count < limit {
            let data = ferry_nbd_lseek(fileDescriptor, Int64(position), ferry_nbd_seek_data)
            if data < 0 {
                if data == -Int64(ENXIO) { add(end, hole: true) } else { add(end, hole: false) }
                break
            }
            if UInt64(data) > position {
                add(UInt64(data), hole: true)
                continue
            }
            let hole = ferry_nbd_lseek(fileDescriptor, Int64(position), ferry_nbd_seek_hole)
            add(hole < 0 ? end : max(UInt64(hole), position + 1), hole: false)
        }
        return count
    }

    public func prefetch(offset: UInt64, length: UInt64) {
        _ = posix_fadvise(fileDescriptor, off_t(offset), off_t(length), ferry_nbd_fadv_willneed)
    }

    public func flush() throws(NBDBridgeError) {
        if isReadOnly { return }
        if fdatasync(fileDescriptor) != 0 {
            throw NBDBridgeError(Errno(rawValue: errno), "fdatasync of \(path) (\(size) bytes) failed")
        }
    }
}
