import Glibc
import SystemPackage
import URing

/// Where an NBD server listens: a Unix-domain socket (`unix:/path`) or TCP (`tcp:HOST:PORT`).
public struct NBDEndpoint: Sendable, CustomStringConvertible {
    /// The socket address to bind.
    public let address: SocketAddress

    public init(address: SocketAddress) { self.address = address }

    /// Parses `unix:/path`, `tcp:HOST:PORT`, `HOST:PORT` or a bare absolute path (a Unix socket).
    public static func parse(_ text: String) throws(NBDBridgeError) -> NBDEndpoint {
        let spelled = text.hasPrefix("/") ? "unix:" + text : text
        do {
            return NBDEndpoint(address: try SocketAddress(parsing: spelled))
        } catch {
            throw NBDBridgeError(.invalidArgument, "bad NBD endpoint '\(text)': \(error)")
        }
    }

    /// Parses like ``parse(_:)``, then refuses an endpoint other hosts can reach unless
    /// `allowRemote` (``checkExposure(allowRemote:)``). For command lines: `--nbd`, `--nbd-allow-remote`.
    public static func parse(_ text: String, allowRemote: Bool) throws(NBDBridgeError) -> NBDEndpoint {
        let endpoint = try parse(text)
        try endpoint.checkExposure(allowRemote: allowRemote, spelled: text)
        return endpoint
    }

    /// Whether only this host can connect: a Unix socket, or TCP on 127.0.0.0/8 or ::1 (or
    /// ::ffff:127.x.y.z), which is what `localhost` resolves to. 0.0.0.0 and :: are every interface.
    public var isLoopback: Bool {
        withUnsafeBytes(of: address.storage) { raw in
            switch address.family {
            case AF_UNIX:
                return true
            case AF_INET:   // sockaddr_in: family, port, then sin_addr in network order
                return raw[4] == 127
            case AF_INET6:  // sockaddr_in6: family, port, flowinfo, then the 16 bytes of sin6_addr
                let a = raw[8..<24]
                let loopback = a.dropLast().allSatisfy { $0 == 0 } && a.last == 1
                let mapped = a.prefix(10).allSatisfy { $0 == 0 } && a.dropFirst(10).prefix(2).allSatisfy { $0 == 0xff }
                    && a.dropFirst(12).first == 127
                return loopback || mapped
            default:
                return false
            }
        }
    }

    /// Throws unless the endpoint ``isLoopback`` or `allowRemote`: NBD as served here has no
    /// authentication (and no TLS), so whoever reaches a TCP port can read and write the whole disk.
    /// `spelled` is the endpoint as the user wrote it, for the message.
    public func checkExposure(allowRemote: Bool, spelled: String? = nil) throws(NBDBridgeError) {
        if isLoopback || allowRemote { return }
        throw NBDBridgeError(.permissionDenied, "NBD endpoint '\(spelled ?? description)' (\(self)) can be reached from other hosts, "
            + "and NBD has no authentication: anyone who can reach the port can read and write the disk. "
            + "Serve on unix:PATH or tcp:127.0.0.1:PORT, or give --nbd-allow-remote to serve it there anyway on a trusted network")
    }

    public var description: String { address.description }
}

/// One bound, listening socket of a server, and the address it really got (port 0 resolved).
final class NBDListener: Sendable {
    let fd: Int32
    let boundAddress: SocketAddress
    let unixPath: String?

    /// Binds and listens (`socket`, `bind`, `listen`).
    init(endpoint: NBDEndpoint) throws(NBDBridgeError) {
        do {
            let owned = try Socket.listen(on: endpoint.address, backlog: 128)
            let fd = owned.take()
            self.fd = fd
            self.boundAddress = (try? Socket.localAddress(of: fd)) ?? endpoint.address
            self.unixPath = endpoint.address.unixPath
        } catch {
            throw NBDBridgeError(error, "cannot listen on \(endpoint)")
        }
    }

    /// Wakes a thread blocked in `accept` on this socket (`shutdown`), then closes it.
    func close() {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    func release() {
        _ = Glibc.close(fd)
        if let path = unixPath { unlink(path) }
    }
}
