import Glibc
import SystemPackage

/// Minimal Unix-domain stream sockets for the UFFD handshake (`socket`, `bind`, `listen`, `accept4`, `connect`).
enum UnixSocket {
    static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) throws(ProcessMemoryError) -> R {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else {
            throw ProcessMemoryError("Unix socket path of \(bytes.count) bytes exceeds \(capacity - 1): \(path)", errno: .fileNameTooLong)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    static func listen(path: String) throws(ProcessMemoryError) -> FileDescriptor {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ProcessMemoryError("socket(AF_UNIX) failed", errno: Errno(rawValue: errno)) }
        unlink(path)
        let r = try withAddress(path) { bind(fd, $0, $1) }
        guard r == 0 else {
            let e = Errno(rawValue: errno); close(fd)
            throw ProcessMemoryError("bind of Unix socket \(path) failed", errno: e)
        }
        guard Glibc.listen(fd, 16) == 0 else {
            let e = Errno(rawValue: errno); close(fd)
            throw ProcessMemoryError("listen on Unix socket \(path) failed", errno: e)
        }
        return FileDescriptor(rawValue: fd)
    }

    static func connect(path: String) throws(ProcessMemoryError) -> FileDescriptor {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ProcessMemoryError("socket(AF_UNIX) failed", errno: Errno(rawValue: errno)) }
        let r = try withAddress(path) { Glibc.connect(fd, $0, $1) }
        guard r == 0 else {
            let e = Errno(rawValue: errno); close(fd)
            throw ProcessMemoryError("connect to Unix socket \(path) failed", errno: e)
        }
        return FileDescriptor(rawValue: fd)
    }

    /// Waits until `fd` is readable; false on timeout. The corresponding system call is `poll`.
    static func waitReadable(_ fd: FileDescriptor, timeoutMilliseconds: Int32) throws(ProcessMemoryError) -> Bool {
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, timeoutMilliseconds)
            if r < 0 && errno == EINTR { continue }
            guard r >= 0 else { throw ProcessMemoryError("poll of descriptor \(fd.rawValue) failed", errno: Errno(rawValue: errno)) }
            return r > 0
        }
    }
}
