import Glibc
import SystemPackage

/// Turns one accepted connection away with a reason the client can show, on the thread that
/// accepted it: the server is at ``NBDServer/Options/maxConnections``, or the connection's thread
/// could not be created.
///
/// How, and why this way:
/// - No thread is spent on a refused connection (a thread may be exactly what ran out), so the
///   refusal runs on the accepting thread, with non-blocking I/O under a deadline: a silent or slow
///   client costs that thread at most ``RefusalWindow/perRefusalNanoseconds``, and all refusals of a
///   ``RefusalWindow`` together at most its explaining budget. Past the budget a refused connection
///   is closed at once, so a flood of them cannot hold the accept queue up.
/// - NBD lets a server answer any option with an error and a message, and tells a server that does
///   not want a client to error its options until the client gives up (`doc/proto.md`,
///   "Terminating the session"). So after the greeting every option but ABORT gets
///   NBD_REP_ERR_POLICY with the reason. Measured with the clients on this machine: QEMU 7.2
///   (`qemu-img`, a VM's `-blockdev driver=nbd`) fails with "Denied by server for option 7 (go)"
///   and "server reported: REASON"; libnbd 1.14 (nbdinfo, nbdcopy, the Python module) with "server
///   policy prevents NBD_OPT_GO", the reason in its debug output (`LIBNBD_DEBUG=1`).
///   NBD_REP_ERR_SHUTDOWN would have them say the server is shutting down, which it is not;
///   QEMU 7.2 does not know NBD_REP_ERR_TOO_BIG ("Unknown error code"). NBD_OPT_EXPORT_NAME cannot
///   be answered with an error at all: the connection is closed, as the protocol says.
/// - A client that answers the greeting with something that is not NBD, or goes quiet, is closed.
///
/// Cold path: refusals are rare and each builds its few replies in small arrays.
struct ConnectionRefusal {
    /// At most this many options are answered before the connection is closed.
    static let maxOptions = 16
    /// Options with more data than this are not read: the connection is closed.
    static let maxOptionLength: UInt32 = 64 * 1024

    let fd: Int32
    /// Sent to the client as the error message of every option reply.
    let reason: String
    /// `MonotonicClock` nanoseconds after which the connection is closed, explained or not.
    let deadline: UInt64

    /// Greets the client and errors its options until it gives up, the deadline passes or it breaks
    /// the protocol. True when the reason went out in at least one option reply. The caller closes `fd`.
    func run() -> Bool {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else { return false }
        var told = false
        var hello = ByteWriter()
        hello.u64(NBDProtocol.nbdMagic)
        hello.u64(NBDProtocol.optionMagic)
        hello.u16(NBDProtocol.flagFixedNewstyle | NBDProtocol.flagNoZeroes)
        guard send(hello.bytes), let clientFlags = receive(4) else { return false }
        let known = NBDProtocol.clientFixedNewstyle | NBDProtocol.clientNoZeroes
        guard be(UInt32.self, clientFlags, 0) & ~known == 0 else { return false }
        let message = Array(reason.utf8.prefix(NBDProtocol.maxString))

        for _ in 0..<ConnectionRefusal.maxOptions {
            guard let header = receive(16), be(UInt64.self, header, 0) == NBDProtocol.optionMagic else { return told }
            let option = be(UInt32.self, header, 8)
            let length = be(UInt32.self, header, 12)
            guard length <= ConnectionRefusal.maxOptionLength, skip(Int(length)) else { return told }
            switch option {
            case NBDProtocol.optAbort:
                _ = reply(option, NBDProtocol.repAck, [])
                return told
            case NBDProtocol.optExportName:
                return told
            default:
                guard reply(option, NBDProtocol.repErrPolicy, message) else { return told }
                told = true
            }
        }
        return told
    }

    // MARK: non-blocking socket I/O against the deadline

    private func reply(_ option: UInt32, _ type: UInt32, _ payload: [UInt8]) -> Bool {
        var w = ByteWriter()
        w.u64(NBDProtocol.optionReplyMagic); w.u32(option); w.u32(type); w.u32(UInt32(payload.count))
        w.bytes.append(contentsOf: payload)
        return send(w.bytes)
    }

    /// Sends all of `bytes` (`send` with MSG_DONTWAIT, `poll` while the socket is full). False on an
    /// error or at the deadline.
    private func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes {
                Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if n > 0 { sent += n; continue }
            if n < 0 && errno == EINTR { continue }
            guard n < 0, errno == EAGAIN || errno == EWOULDBLOCK, wait(for: Int16(POLLOUT)) else { return false }
        }
        return true
    }

    /// Exactly `count` bytes (at most 16 here), or nil on end of stream, an error or the deadline.
    private func receive(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        let got = bytes.withUnsafeMutableBytes { fill($0) }
        return got ? bytes : nil
    }

    /// Reads and drops `count` bytes of option data through a 4 KiB scratch buffer.
    private func skip(_ count: Int) -> Bool {
        withUnsafeTemporaryAllocation(byteCount: 4096, alignment: 16) { scratch in
            var left = count
            while left > 0 {
                let chunk = min(left, scratch.count)
                guard fill(UnsafeMutableRawBufferPointer(rebasing: scratch[..<chunk])) else { return false }
                left -= chunk
            }
            return true
        }
    }

    /// Fills `buffer` from the socket (`recv`, `poll` while nothing is there).
    private func fill(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
        var got = 0
        while got < buffer.count {
            let n = Glibc.recv(fd, buffer.baseAddress! + got, buffer.count - got, Int32(MSG_DONTWAIT))
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            guard n < 0, errno == EAGAIN || errno == EWOULDBLOCK, wait(for: Int16(POLLIN)) else { return false }
        }
        return true
    }

    /// Waits for `events` on the socket until the deadline (`poll`). False when the time is up.
    private func wait(for events: Int16) -> Bool {
        while true {
            let now = MonotonicClock.nanoseconds()
            guard now < deadline else { return false }
            var poller = pollfd(fd: fd, events: events, revents: 0)
            let millis = Int32(clamping: (deadline - now + 999_999) / 1_000_000)
            let ready = poll(&poller, 1, millis)
            if ready > 0 { return true }
            if ready < 0 && errno != EINTR { return false }
        }
    }

    private func be<T: FixedWidthInteger>(_: T.Type, _ bytes: [UInt8], _ at: Int) -> T {
        bytes[at..<at + MemoryLayout<T>.size].reduce(0) { $0 << 8 | T($1) }
    }
}

/// The refusals of one 10-second window: how much of the accepting threads' time went to explaining
/// them (at most ``explainBudgetNanoseconds``, each at most ``perRefusalNanoseconds``), and how many
/// were refused since the last log line (one warning per window speaks for all of them).
struct RefusalWindow {
    static let lengthNanoseconds: UInt64 = 10_000_000_000
    /// A tenth of the window: a flood of refused clients costs an accepting thread at most that.
    static let explainBudgetNanoseconds: UInt64 = 1_000_000_000
    /// A client that answers at once needs microseconds on this host and a few round trips over a
    /// network; one that has not finished by then is cut off.
    static let perRefusalNanoseconds: UInt64 = 500_000_000

    private var start: UInt64 = 0
    private var spent: UInt64 = 0
    private var unlogged = 0

    /// What to do with a refusal beginning at `now`.
    struct Plan {
        /// When to stop explaining; nil: close at once (the window's budget is spent).
        var deadline: UInt64?
        /// Whether to log this refusal (the first of its window).
        var log: Bool
        /// Refusals since the last log line, not logged one by one.
        var unloggedBefore: Int
    }

    /// Begins a refusal at `now` (`MonotonicClock` nanoseconds).
    mutating func begin(now: UInt64) -> Plan {
        var log = false
        var unloggedBefore = 0
        if start == 0 || now &- start >= RefusalWindow.lengthNanoseconds {
            start = now
            spent = 0
            log = true
            unloggedBefore = unlogged
            unlogged = 0
        } else {
            unlogged += 1
        }
        let left = RefusalWindow.explainBudgetNanoseconds - min(spent, RefusalWindow.explainBudgetNanoseconds)
        let deadline = left == 0 ? nil : now + min(left, RefusalWindow.perRefusalNanoseconds)
        return Plan(deadline: deadline, log: log, unloggedBefore: unloggedBefore)
    }

    /// Ends a refusal that took `nanoseconds` of an accepting thread.
    mutating func end(took nanoseconds: UInt64) { spent += nanoseconds }
}
