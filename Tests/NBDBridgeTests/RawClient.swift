import FerryTestSupport
import Foundation
import Glibc
@testable import NBDBridge

/// A raw Unix-socket client that speaks (or breaks) the protocol byte by byte.
struct RawClient {
    let fd: Int32

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw NBDBridgeError(.init(rawValue: errno), "connect \(path)") }
        var timeout = timeval(tv_sec: 60, tv_usec: 0)   // generous: a loaded CI machine is slow
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    func close() { _ = Glibc.close(fd) }

    func send(_ bytes: [UInt8]) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            sent += n
        }
    }

    /// Exactly `count` bytes, or nil when the server closed (or 60 s passed).
    func receive(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n <= 0 { return nil }
            got += n
        }
        return bytes
    }

    /// True when the server closes the connection (end of stream) within 60 s.
    func serverClosed() -> Bool {
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, 0)
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }

    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
    static func read<T: FixedWidthInteger>(_ bytes: [UInt8], _ at: Int, _: T.Type) -> T {
        bytes[at..<at + MemoryLayout<T>.size].reduce(0) { $0 << 8 | T($1) }
    }

    /// Greeting, client flags, NBD_OPT_GO for the default export; true when in transmission.
    func negotiate() -> Bool {
        guard let hello = receive(18), RawClient.read(hello, 0, UInt64.self) == NBDProtocol.nbdMagic else { return false }
        send(RawClient.be(UInt32(3)))
        var go = RawClient.be(NBDProtocol.optionMagic) + RawClient.be(NBDProtocol.optGo) + RawClient.be(UInt32(6))
        go += RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))
        send(go)
        while let header = receive(20) {
            let type = RawClient.read(header, 12, UInt32.self)
            let length = Int(RawClient.read(header, 16, UInt32.self))
            guard receive(length) != nil else { return false }
            if type == NBDProtocol.repAck { return true }
            if type & (1 << 31) != 0 { return false }
        }
        return false
    }

    func request(_ command: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32) -> [UInt8] {
        RawClient.be(NBDProtocol.requestMagic) + RawClient.be(flags) + RawClient.be(command) + RawClient.be(cookie)
            + RawClient.be(offset) + RawClient.be(length)
    }
}

