import Glibc
import SystemPackage

/// Sequential helpers for code that has nothing else in flight on the ring (handshakes, simple
/// transfers, tests): each queues one operation, waits for it, and returns its result.
extension IORing {
    /// Tag used by the sequential helpers; event loops should not reuse it.
    public static let sequentialTag: UInt64 = .max - 1

    /// Sends every byte of `buffer`, resuming after short sends (`IORING_OP_SEND`).
    /// Throws `EPIPE`/`ECONNRESET` when the peer is gone.
    public mutating func sendAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, flags: Int32 = 0) throws(Errno) {
        precondition(inFlight == 0, "sequential helpers need an idle ring")
        var sent = 0
        while sent < buffer.count {
            let rest = UnsafeRawBufferPointer(rebasing: buffer[sent...])
            try queue { (ring: inout IORing) throws(IORingError) in
                try ring.prepareSend(fd, from: rest, flags: flags, tag: IORing.sequentialTag)
            }
            let completion = try waitCompletion()
            if completion.result == -EINTR || completion.result == -EAGAIN { continue }
            sent += try completion.get()
        }
    }

    /// Receives what is available, up to `buffer.count` bytes; 0 means the peer closed the stream.
    public mutating func receiveSome(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        precondition(inFlight == 0, "sequential helpers need an idle ring")
        while true {
            try queue { (ring: inout IORing) throws(IORingError) in
                try ring.prepareRecv(fd, into: buffer, tag: IORing.sequentialTag)
            }
            let completion = try waitCompletion()
            if completion.result == -EINTR || completion.result == -EAGAIN { continue }
            return try completion.get()
        }
    }

    /// Fills `buffer` completely. Returns false if the stream ended before the first byte;
    /// throws `ECONNRESET` if it ended part-way.
    public mutating func receiveExactly(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Bool {
        var filled = 0
        while filled < buffer.count {
            let got = try receiveSome(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[filled...]))
            if got == 0 {
                if filled == 0 { return false }
                throw Errno.connectionReset
            }
            filled += got
        }
        return true
    }

    /// Reads `buffer.count` bytes of `fd` at `offset`, resuming after short reads; returns fewer
    /// only at end of file (`IORING_OP_READ`).
    public mutating func readFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws(Errno) -> Int {
        precondition(inFlight == 0, "sequential helpers need an idle ring")
        var done = 0
        while done < buffer.count {
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            try queue { (ring: inout IORing) throws(IORingError) in
                try ring.prepareRead(fd, into: rest, offset: offset + UInt64(done), tag: IORing.sequentialTag)
            }
            let completion = try waitCompletion()
            if completion.result == -EINTR || completion.result == -EAGAIN { continue }
            let count = try completion.get()
            if count == 0 { break }
            done += count
        }
        return done
    }

    /// Writes all of `buffer` to `fd` at `offset`, resuming after short writes (`IORING_OP_WRITE`).
    public mutating func writeFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: UInt64) throws(Errno) {
        precondition(inFlight == 0, "sequential helpers need an idle ring")
        var done = 0
        while done < buffer.count {
            let rest = UnsafeRawBufferPointer(rebasing: buffer[done...])
            try queue { (ring: inout IORing) throws(IORingError) in
                try ring.prepareWrite(fd, from: rest, offset: offset + UInt64(done), tag: IORing.sequentialTag)
            }
            let completion = try waitCompletion()
            if completion.result == -EINTR || completion.result == -EAGAIN { continue }
            let count = try completion.get()
            if count == 0 { throw Errno.noSpace }
            done += count
        }
    }

    private mutating func queue(_ prepare: (inout IORing) throws(IORingError) -> Void) throws(Errno) {
        do {
            try prepare(&self)
        } catch {
            switch error {
            case .system(let errno): throw errno
            case .submissionQueueFull: throw Errno.resourceTemporarilyUnavailable
            }
        }
    }
}
