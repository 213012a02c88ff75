import CURing
import Glibc
import SystemPackage

/// Blocking set-up calls for sockets: listen, connect, accept and socket options.
/// These are not on any hot path; data moves through an ``IORing``.
public enum Socket {
    /// A listening stream socket bound to `address`. A stale Unix socket file is removed first;
    /// TCP sockets get `SO_REUSEADDR`. Port 0 picks a free port: read it back with ``localAddress(of:)``.
    ///
    /// The corresponding C functions are `socket`, `bind` and `listen`.
    public static func listen(on address: SocketAddress, backlog: Int32 = 128) throws(Errno) -> OwnedDescriptor {
        let fd = try open(family: address.family)
        if let path = address.unixPath {
            var status = stat()
            if lstat(path, &status) == 0, (status.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
        } else {
            try setOption(fd.rawValue, SOL_SOCKET, SO_REUSEADDR, 1)
        }
        let rc = address.withSockaddrPointer { bind(fd.rawValue, $0, $1) }
        if rc != 0 { throw Errno(rawValue: errno) }
        if Glibc.listen(fd.rawValue, backlog) != 0 { throw Errno(rawValue: errno) }
        return fd
    }

    /// A stream socket connected to `address`, blocking until connected or until `timeout` seconds
    /// have passed (`ETIMEDOUT`; a host that drops packets would otherwise hold a connect for about
    /// two minutes of SYN retries). TCP sockets get `TCP_NODELAY`.
    ///
    /// The corresponding C functions are `socket`, `connect` (non-blocking) and `poll`.
    public static func connect(to address: SocketAddress, timeout: Double = 10) throws(Errno) -> OwnedDescriptor {
        let fd = try open(family: address.family)
        let flags = fcntl(fd.rawValue, F_GETFL)
        _ = fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
        let rc = address.withSockaddrPointer { Glibc.connect(fd.rawValue, $0, $1) }
        if rc != 0 {
            guard errno == EINPROGRESS || errno == EINTR else { throw Errno(rawValue: errno) }
            var waiter = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
            let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
            while true {
                let left = deadline - ContinuousClock.now
                let millis = Int32(max(0, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
                let ready = poll(&waiter, 1, millis)
                if ready < 0 && errno == EINTR { continue }
                if ready < 0 { throw Errno(rawValue: errno) }
                if ready == 0 { throw Errno.timedOut }
                break
            }
            var failure: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd.rawValue, SOL_SOCKET, SO_ERROR, &failure, &length)
            if failure != 0 { throw Errno(rawValue: failure) }
        }
        _ = fcntl(fd.rawValue, F_SETFL, flags)
        if address.family != AF_UNIX { try setNoDelay(fd.rawValue) }
        return fd
    }

    /// Accepts one connection, blocking. TCP connections get `TCP_NODELAY`.
    ///
    /// The corresponding C function is `accept`.
    public static func accept(from listener: Int32) throws(Errno) -> OwnedDescriptor {
        while true {
            let fd = Glibc.accept(listener, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                if (try? localAddress(of: fd))?.family != AF_UNIX { try? setNoDelay(fd) }
                return OwnedDescriptor(fd)
            }
            if errno == EINTR { continue }
            throw Errno(rawValue: errno)
        }
    }

    /// Waits up to `timeout` seconds (0: for ever) for a connection on `listener` and accepts it,
    /// riding over transient errors (an aborted connection, a signal). Returns nil when the time
    /// runs out or the listener fails. Stream buffers are sized for a WAN (4 MiB each way).
    ///
    /// The corresponding C functions are `poll` and `accept`.
    public static func accept(from listener: Int32, timeout: Double) -> OwnedDescriptor? {
        var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        let deadline = ContinuousClock.now + .milliseconds(Int(min(timeout, 1e9) * 1000))
        while true {
            var millis: Int32 = -1
            if timeout > 0 {
                let left = deadline - ContinuousClock.now
                millis = Int32(clamping: max(0, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
            }
            let ready = poll(&poller, 1, millis)
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { return nil }
            do {
                let connection = try accept(from: listener)
                try? setBufferSizes(connection.rawValue, send: 4 << 20, receive: 4 << 20)
                return connection
            } catch {
                if error == .connectionAbort || error == .resourceTemporarilyUnavailable || error == .interrupted { continue }
                return nil
            }
        }
    }

    /// The address of a connected socket's peer.
    ///
    /// The corresponding C function is `getpeername`.
    public static func peerAddress(of fd: Int32) throws(Errno) -> SocketAddress {
        try address(of: fd, getpeername)
    }

    /// The address a socket is bound to (with the port the kernel chose for port 0).
    ///
    /// The corresponding C function is `getsockname`.
    public static func localAddress(of fd: Int32) throws(Errno) -> SocketAddress {
        try address(of: fd, getsockname)
    }

    private static func address(of fd: Int32, _ call: (Int32, UnsafeMutablePointer<sockaddr>?, UnsafeMutablePointer<socklen_t>?) -> Int32) throws(Errno) -> SocketAddress {
        var address = try SocketAddress(unixPath: "/")
        address.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutableBytes(of: &address.storage) { raw in
            call(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &address.length)
        }
        if rc != 0 { throw Errno(rawValue: errno) }
        return address
    }

    /// Sends small segments at once instead of waiting to coalesce them (`TCP_NODELAY`).
    public static func setNoDelay(_ fd: Int32) throws(Errno) {
        try setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1)
    }

    /// Sets the kernel's send and receive buffer sizes (`SO_SNDBUF`, `SO_RCVBUF`).
    public static func setBufferSizes(_ fd: Int32, send: Int32, receive: Int32) throws(Errno) {
        try setOption(fd, SOL_SOCKET, SO_SNDBUF, send)
        try setOption(fd, SOL_SOCKET, SO_RCVBUF, receive)
    }

    /// Shuts down both directions of a connection, waking any pending receive with end of stream.
    ///
    /// The corresponding C function is `shutdown`.
    public static func shutdownBoth(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// Sets an integer socket option (`setsockopt`).
    public static func setOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32) throws(Errno) {
        var value = value
        if setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            throw Errno(rawValue: errno)
        }
    }

    private static func open(family: Int32) throws(Errno) -> OwnedDescriptor {
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw Errno(rawValue: errno) }
        return OwnedDescriptor(fd)
    }
}
