import CURing
import Glibc
import SystemPackage

/// A socket address (IPv4, IPv6 or Unix-domain) in a `sockaddr_storage`, parsed from the forms
/// Ferry's command lines use: `unix:PATH`, `tcp:HOST:PORT`, `HOST:PORT` and `[V6]:PORT`.
///
/// A plain value: it can be kept in a stable location and handed to ``IORing/prepareConnect(_:to:tag:options:)``.
public struct SocketAddress: Sendable, CustomStringConvertible {
    /// The address, as the kernel reads it.
    public var storage: sockaddr_storage
    /// How many bytes of `storage` are the address.
    public var length: socklen_t

    /// The address family: `AF_INET`, `AF_INET6` or `AF_UNIX`.
    public var family: Int32 { Int32(storage.ss_family) }

    /// A Unix-domain stream address. Throws `ENAMETOOLONG` for a path that does not fit `sun_path`.
    public init(unixPath path: String) throws(Errno) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else { throw Errno.fileNameTooLong }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { raw in
            withUnsafeBytes(of: address) { raw.copyMemory(from: $0) }
        }
        self.storage = storage
        self.length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
    }

    /// An IPv4 or IPv6 address of a numeric or resolvable `host` and a `port`.
    ///
    /// The corresponding C function is `getaddrinfo`.
    public init(host: String, port: UInt16) throws(SocketAddressError) {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV
        var result: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(host, String(port), &hints, &result)
        guard rc == 0, let first = result else {
            let reason = rc == 0 ? "no address" : String(cString: gai_strerror(rc))
            throw .unresolvable(host: host, reason: reason)
        }
        defer { freeaddrinfo(result) }
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { raw in
            raw.copyMemory(from: UnsafeRawBufferPointer(start: first.pointee.ai_addr, count: Int(first.pointee.ai_addrlen)))
        }
        self.storage = storage
        self.length = first.pointee.ai_addrlen
    }

    /// Parses `unix:PATH`, `tcp:HOST:PORT`, `HOST:PORT` or `[V6]:PORT`.
    public init(parsing text: String) throws(SocketAddressError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            do { try self.init(unixPath: path) } catch { throw .malformed(text, reason: "Unix socket path must be 1 to 107 bytes") }
            return
        }
        var rest = Substring(text)
        if rest.hasPrefix("tcp:") { rest = rest.dropFirst(4) }
        guard let colon = rest.lastIndex(of: ":") else {
            throw .malformed(text, reason: "expected unix:PATH, tcp:HOST:PORT or HOST:PORT")
        }
        var host = rest[..<colon]
        let portText = rest[rest.index(after: colon)...]
        guard let port = UInt16(portText) else {
            throw .malformed(text, reason: "port '\(portText)' is not a number from 0 to 65535")
        }
        if host.hasPrefix("["), host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        if host.isEmpty { host = "0.0.0.0" }
        try self.init(host: String(host), port: port)
    }

    /// The Unix-domain path, when this is a Unix address.
    public var unixPath: String? {
        guard family == AF_UNIX else { return nil }
        return withUnsafeBytes(of: storage) { raw in
            let pathBytes = raw.dropFirst(MemoryLayout<sa_family_t>.size).prefix(Int(length) - MemoryLayout<sa_family_t>.size)
            return String(decoding: pathBytes.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// The port of an IP address, or nil for a Unix address.
    public var port: UInt16? {
        withUnsafeBytes(of: storage) { raw in
            switch Int32(storage.ss_family) {
            case AF_INET: return UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self))
            case AF_INET6: return UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self))
            default: return nil
            }
        }
    }

    /// Calls `body` with the address as a `sockaddr` pointer and its length.
    public func withSockaddrPointer<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        try withUnsafeBytes(of: storage) { raw in
            try body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
    }

    /// The numeric host of an IP address ("" for a Unix socket).
    public var host: String {
        if unixPath != nil { return "" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        let rc = withSockaddrPointer { pointer, length in
            getnameinfo(pointer, length, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST)
        }
        return rc == 0 ? String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
    }

    public var description: String {
        if let path = unixPath { return "unix:\(path)" }
        return family == AF_INET6 ? "[\(host)]:\(port ?? 0)" : "\(host):\(port ?? 0)"
    }
}

/// Why a text could not be turned into a ``SocketAddress``.
public enum SocketAddressError: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(String, reason: String)
    case unresolvable(host: String, reason: String)

    public var description: String {
        switch self {
        case .malformed(let text, let reason): return "bad address '\(text)': \(reason)"
        case .unresolvable(let host, let reason): return "cannot resolve host '\(host)': \(reason)"
        }
    }
}
