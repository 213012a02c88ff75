import Foundation
import Glibc
import XCTest
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
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
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

    /// Exactly `count` bytes, or nil when the server closed (or 5 s passed).
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

    /// True when the server closes the connection (end of stream) within 5 s.
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

/// Clients that break the protocol: the server must close or refuse them, keep serving others, and
/// never touch the image for a request that did not arrive whole.
final class HostileClientTests: XCTestCase {
    func testHostileClientsLeaveServerUpAndImageIntact() throws {
        let f = try ServerFixture(size: 16 << 20) { try Tools.fillPattern($0, offset: 0, count: 4 << 20, seed: 99) }
        defer { f.stop() }
        let before = try Tools.sha256(f.imagePath)

        // 1. Unknown client flag bits.
        var c = try RawClient(path: f.socketPath)
        _ = c.receive(18)
        c.send(RawClient.be(UInt32(0xffff_ffff)))
        XCTAssertTrue(c.serverClosed(), "unknown client flags must close")
        c.close()

        // 2. Garbage instead of a handshake.
        c = try RawClient(path: f.socketPath)
        _ = c.receive(18)
        c.send((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) })
        XCTAssertTrue(c.serverClosed(), "garbage handshake must close")
        c.close()

        // 3. An option claiming 4 GiB of data: closed without reading (or allocating) it.
        c = try RawClient(path: f.socketPath)
        _ = c.receive(18)
        c.send(RawClient.be(UInt32(3)) + RawClient.be(NBDProtocol.optionMagic) + RawClient.be(NBDProtocol.optGo)
               + RawClient.be(UInt32(0xffff_ffff)))
        XCTAssertTrue(c.serverClosed(), "absurd option length must close")
        c.close()

        // 4. A 100 KiB option: refused with NBD_REP_ERR_TOO_BIG, and the session goes on.
        c = try RawClient(path: f.socketPath)
        _ = c.receive(18)
        c.send(RawClient.be(UInt32(3)) + RawClient.be(NBDProtocol.optionMagic) + RawClient.be(UInt32(77))
               + RawClient.be(UInt32(100 * 1024)) + [UInt8](repeating: 0x41, count: 100 * 1024))
        let tooBig = try XCTUnwrap(c.receive(20))
        XCTAssertEqual(RawClient.read(tooBig, 12, UInt32.self), NBDProtocol.repErrTooBig)
        _ = c.receive(Int(RawClient.read(tooBig, 16, UInt32.self)))
        c.send(RawClient.be(NBDProtocol.optionMagic) + RawClient.be(UInt32(77)) + RawClient.be(UInt32(0)))
        let unsupported = try XCTUnwrap(c.receive(20))
        XCTAssertEqual(RawClient.read(unsupported, 12, UInt32.self), NBDProtocol.repErrUnsup)
        c.close()

        // 5. Disconnect in the middle of a write payload: the write must not happen.
        c = try RawClient(path: f.socketPath)
        XCTAssertTrue(c.negotiate())
        c.send(c.request(NBDProtocol.cmdWrite, cookie: 1, offset: 0, length: 1 << 20) + [UInt8](repeating: 0xee, count: 300_000))
        usleep(100_000)
        c.close()

        // 6. Unknown command: EINVAL, connection stays usable.
        c = try RawClient(path: f.socketPath)
        XCTAssertTrue(c.negotiate())
        c.send(c.request(0x55, cookie: 0xabcd, offset: 0, length: 4096))
        let reply = try XCTUnwrap(c.receive(16))
        XCTAssertEqual(RawClient.read(reply, 0, UInt32.self), NBDProtocol.simpleReplyMagic)
        XCTAssertEqual(RawClient.read(reply, 4, UInt32.self), NBDErrorCode.einval.rawValue)
        XCTAssertEqual(RawClient.read(reply, 8, UInt64.self), 0xabcd)
        c.send(c.request(NBDProtocol.cmdRead, cookie: 2, offset: 0, length: 512))
        let readReply = try XCTUnwrap(c.receive(16 + 512))
        XCTAssertEqual(RawClient.read(readReply, 4, UInt32.self), 0)

        // 7. A write header claiming 4 GiB - 1 bytes: refused and the connection closed, nothing written.
        c.send(c.request(NBDProtocol.cmdWrite, cookie: 3, offset: 0, length: 0xffff_ffff) + [UInt8](repeating: 0xdd, count: 65536))
        let refused = try XCTUnwrap(c.receive(16))
        XCTAssertNotEqual(RawClient.read(refused, 4, UInt32.self), 0)
        XCTAssertTrue(c.serverClosed(), "a 4 GiB write must close the connection")
        c.close()

        // 8. Bad request magic: closed.
        c = try RawClient(path: f.socketPath)
        XCTAssertTrue(c.negotiate())
        c.send([UInt8](repeating: 0x42, count: 28))
        XCTAssertTrue(c.serverClosed(), "bad request magic must close")
        c.close()

        // 9. Connect and vanish during the greeting.
        for _ in 0..<20 { let v = try RawClient(path: f.socketPath); v.close() }

        // The server still serves, and the image is exactly what it was.
        usleep(100_000)
        XCTAssertEqual(try Tools.sha256(f.imagePath), before, "a hostile client changed the image")
        let check = try Tools.python(#"""
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.get_size() == 16 << 20
h.pread(1 << 20, 0)
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(check.stdout.contains("ok"))
        XCTAssertGreaterThanOrEqual(f.server.stats.snapshot.protocolViolations, 2)
        XCTAssertEqual(f.server.dirtyBitmap.dirtyCount, 0, "no write completed, so nothing may be dirty")
    }
}
