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
