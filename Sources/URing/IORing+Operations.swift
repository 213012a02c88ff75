import CURing
import Glibc
import SystemPackage

/// The operations Ferry queues on a ring. Each queues one submission tagged with `tag` and
/// allocates nothing; buffers, addresses and timespecs must stay valid until the completion
/// is visited. A full submission queue throws ``IORingError/submissionQueueFull``.
extension IORing {
    /// Reads up to `buffer.count` bytes of `fd` at `offset` (`IORING_OP_READ`; `pread`).
    public mutating func prepareRead(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64,
                                     tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_read(sqe, fd, buffer.baseAddress, UInt32(buffer.count), offset)
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Writes `buffer` to `fd` at `offset` (`IORING_OP_WRITE`; `pwrite`).
    public mutating func prepareWrite(_ fd: Int32, from buffer: UnsafeRawBufferPointer, offset: UInt64,
                                      tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_write(sqe, fd, buffer.baseAddress, UInt32(buffer.count), offset)
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Reads into part of registered buffer `bufferIndex` (`IORING_OP_READ_FIXED`).
    public mutating func prepareReadFixed(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64,
                                          bufferIndex: UInt16, tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_read_fixed(sqe, fd, buffer.baseAddress, UInt32(buffer.count), offset, Int32(bufferIndex))
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Writes from part of registered buffer `bufferIndex` (`IORING_OP_WRITE_FIXED`).
    public mutating func prepareWriteFixed(_ fd: Int32, from buffer: UnsafeRawBufferPointer, offset: UInt64,
                                           bufferIndex: UInt16, tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_write_fixed(sqe, fd, buffer.baseAddress, UInt32(buffer.count), offset, Int32(bufferIndex))
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Receives up to `buffer.count` bytes from a socket (`IORING_OP_RECV`; `recv`).
    public mutating func prepareRecv(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, flags: Int32 = 0,
                                     tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_recv(sqe, fd, buffer.baseAddress, buffer.count, flags)
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Sends `buffer` on a socket (`IORING_OP_SEND`; `send`). `MSG_NOSIGNAL` is always added, so a
    /// vanished peer is `EPIPE`, never a signal. Pass `MSG_MORE` to coalesce with a following send.
    public mutating func prepareSend(_ fd: Int32, from buffer: UnsafeRawBufferPointer, flags: Int32 = 0,
                                     tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_send(sqe, fd, buffer.baseAddress, buffer.count, flags | Int32(MSG_NOSIGNAL))
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Sends the scatter-gather list in `message` (`IORING_OP_SENDMSG`; `sendmsg`), e.g. a frame
    /// header and its payload without copying them together. `MSG_NOSIGNAL` is always added.
    public mutating func prepareSendmsg(_ fd: Int32, message: UnsafePointer<msghdr>, flags: Int32 = 0,
                                        tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_sendmsg(sqe, fd, message, UInt32(bitPattern: flags | Int32(MSG_NOSIGNAL)))
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Writes the vectors in `vectors` to `fd` at `offset` (`IORING_OP_WRITEV`; `pwritev`).
    /// Use offset `UInt64.max` (-1) for the file position, as for a socket.
    public mutating func prepareWritev(_ fd: Int32, vectors: UnsafePointer<iovec>, count: Int, offset: UInt64,
                                       tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_writev(sqe, fd, vectors, UInt32(count), offset)
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Accepts one connection on a listening socket; the result is the new descriptor
    /// (`IORING_OP_ACCEPT`; `accept4` with `SOCK_CLOEXEC`).
    public mutating func prepareAccept(_ fd: Int32, tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_accept(sqe, fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Connects a socket to `address` (`IORING_OP_CONNECT`; `connect`).
    public mutating func prepareConnect(_ fd: Int32, to address: UnsafePointer<SocketAddress>,
                                        tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        address.pointee.withSockaddrPointer { pointer, length in
            io_uring_prep_connect(sqe, fd, pointer, length)
        }
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Completes with `-ETIME` after the time in `timespec` (`IORING_OP_TIMEOUT`), or earlier with 0
    /// once `completions` other operations have completed (0: time only).
    public mutating func prepareTimeout(_ timespec: UnsafeMutablePointer<KernelTimespec>, completions: UInt32 = 0,
                                        tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_timeout(sqe, timespec, completions, 0)
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Bounds the time of the previous submission, which must carry ``SubmissionOptions/linkNext``
    /// (`IORING_OP_LINK_TIMEOUT`): when it fires the previous operation ends with `-ECANCELED`.
    public mutating func prepareLinkTimeout(_ timespec: UnsafeMutablePointer<KernelTimespec>,
                                            tag: UInt64) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_link_timeout(sqe, timespec, 0)
        finish(sqe, tag: tag)
    }

    /// Cancels the operation tagged `target` (`IORING_OP_ASYNC_CANCEL`). The cancelled operation
    /// completes with `-ECANCELED`; this one with 0, `-ENOENT` (not found) or `-EALREADY`.
    public mutating func prepareCancel(tag target: UInt64, tag: UInt64) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_cancel64(sqe, target, 0)
        finish(sqe, tag: tag)
    }

    /// Flushes `fd` to stable storage (`IORING_OP_FSYNC`; `fsync`, or `fdatasync` when `dataOnly`).
    public mutating func prepareFsync(_ fd: Int32, dataOnly: Bool, tag: UInt64,
                                      options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_fsync(sqe, fd, dataOnly ? UInt32(IORING_FSYNC_DATASYNC) : 0)
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// Allocates, punches or zeroes a range of `fd` (`IORING_OP_FALLOCATE`; `fallocate`).
    public mutating func prepareFallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64,
                                          tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_fallocate(sqe, fd, mode, off_t(truncatingIfNeeded: offset), off_t(truncatingIfNeeded: length))
        finish(sqe, tag: tag, flags: options.rawValue)
    }

    /// An operation that does nothing and completes with 0 (`IORING_OP_NOP`): a wake-up or a fence.
    public mutating func prepareNop(tag: UInt64, options: SubmissionOptions = []) throws(IORingError) {
        let sqe = try nextSubmission()
        io_uring_prep_nop(sqe)
        finish(sqe, tag: tag, flags: options.rawValue)
    }
}
