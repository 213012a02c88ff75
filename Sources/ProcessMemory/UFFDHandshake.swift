import CFerryShims
import Glibc
import SystemPackage

/// A received Firecracker-style UFFD handshake: the guest-memory mappings, the VMM's userfaultfd, the connection
/// (which the VMM may keep open; closing it is harmless) and the VMM's PID from SO_PEERCRED.
public struct UFFDHandshake: ~Copyable {
    public let mappings: [GuestMemoryMapping]
    public let uffd: Userfaultfd
    /// The VMM's connection; closed when the handshake (or this field, once taken) is dropped.
    public let connection: OwnedDescriptor
    public let peerPID: Int32

    /// Sends the handshake as a VMM does: connects to `socketPath`, one `sendmsg` with the JSON array of `mappings`
    /// as payload and `uffd` as SCM_RIGHTS. Returns the connection (keep it open or close it; nothing more is sent).
    /// The corresponding system calls are `connect` and `sendmsg`.
    public static func send(socketPath: String, mappings: [GuestMemoryMapping], uffd: borrowing Userfaultfd) throws(ProcessMemoryError) -> FileDescriptor {
        let conn = try UnixSocket.connect(path: socketPath)
        let json = GuestMemoryMapping.encodeList(mappings)
        let n = json.withUnsafeBytes { ferry_send_with_fd(conn.rawValue, $0.baseAddress, UInt64($0.count), uffd.descriptor.rawValue) }
        guard n == json.count else {
            try? conn.close()
            if n < 0 { throw ProcessMemoryError("sendmsg of the \(json.count)-byte UFFD handshake to \(socketPath) failed", negated: n) }
            throw ProcessMemoryError("sendmsg of the UFFD handshake to \(socketPath) sent \(n) of \(json.count) bytes")
        }
        return conn
    }
}

/// The handler's side of Firecracker's UFFD handshake: a Unix stream listener (`dest-agent --uffd-socket PATH`).
///
/// Each `accept` takes one VMM connection and reads the one message it sends: a JSON array of mappings with the
/// userfaultfd attached as SCM_RIGHTS. The socket file is removed when the listener ends.
public struct UFFDHandshakeListener: ~Copyable {
    public let path: String
    let socket: FileDescriptor

    /// Binds and listens on `path` (an existing file there is replaced). The corresponding system calls are
    /// `socket`, `bind` and `listen`.
    public init(path: String) throws(ProcessMemoryError) {
        socket = try UnixSocket.listen(path: path)
        self.path = path
    }

    deinit {
        try? socket.close()
        unlink(path)
    }

    /// Whether a VMM is waiting to be accepted, after waiting at most `timeoutMilliseconds`.
    /// The corresponding system call is `poll`.
    public func hasPendingConnection(timeoutMilliseconds: Int32) throws(ProcessMemoryError) -> Bool {
        try UnixSocket.waitReadable(socket, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Accepts one VMM and reads its handshake; waits at most `timeoutMilliseconds` for the connection and again
    /// for the message (-1: forever). The corresponding system calls are `accept4` and `recvmsg`.
    public func accept(timeoutMilliseconds: Int32 = -1) throws(ProcessMemoryError) -> UFFDHandshake {
        guard try UnixSocket.waitReadable(socket, timeoutMilliseconds: timeoutMilliseconds) else {
            throw ProcessMemoryError("no VMM connected to \(path) within \(timeoutMilliseconds) ms", errno: .timedOut)
        }
        let c = ferry_accept_cloexec(socket.rawValue)
        guard c >= 0 else { throw ProcessMemoryError("accept on \(path) failed", negated: c) }
        let conn = FileDescriptor(rawValue: c)
        let peer = ferry_peer_pid(c)

        var payload: [UInt8] = []
        var received: Int32 = -1
        var buffer = [UInt8](repeating: 0, count: 65536)
        // One sendmsg carries everything; a stream may still split it, so read until the JSON parses or EOF.
        while true {
            guard try UnixSocket.waitReadable(conn, timeoutMilliseconds: payload.isEmpty ? timeoutMilliseconds : 1000) else {
                if received >= 0 { close(received) }
                try? conn.close()
                throw ProcessMemoryError("UFFD handshake on \(path): no complete message after \(payload.count) bytes", errno: .timedOut)
            }
            var fd: Int32 = -1
            let n = buffer.withUnsafeMutableBytes { ferry_recv_with_fd(c, $0.baseAddress, UInt64($0.count), &fd) }
            if fd >= 0 { if received < 0 { received = fd } else { close(fd) } }
            if n < 0 {
                if received >= 0 { close(received) }
                try? conn.close()
                throw ProcessMemoryError("recvmsg of the UFFD handshake on \(path) failed", negated: n)
            }
            payload.append(contentsOf: buffer[0..<n])
            if let mappings = try? GuestMemoryMapping.decodeList(payload) {
                guard received >= 0 else {
                    try? conn.close()
                    throw ProcessMemoryError("UFFD handshake on \(path) carried \(mappings.count) mappings but no userfaultfd (SCM_RIGHTS)")
                }
                return UFFDHandshake(mappings: mappings, uffd: Userfaultfd(adopting: FileDescriptor(rawValue: received)),
                                     connection: OwnedDescriptor(conn), peerPID: peer)
            }
            if n == 0 {
                if received >= 0 { close(received) }
                try? conn.close()
                do {
                    _ = try GuestMemoryMapping.decodeList(payload)
                } catch { throw error }
                throw ProcessMemoryError("UFFD handshake on \(path) ended after \(payload.count) bytes")
            }
        }
    }
}

/// An owned descriptor that closes itself when dropped (a connection kept open, for instance).
public struct OwnedDescriptor: ~Copyable {
    public let descriptor: FileDescriptor
    public init(_ descriptor: FileDescriptor) { self.descriptor = descriptor }
    deinit { try? descriptor.close() }
}
