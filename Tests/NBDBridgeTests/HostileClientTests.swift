import FerryTestSupport
import Foundation
import Glibc
import XCTest
@testable import NBDBridge

/// Clients that break the protocol: the server must close or refuse them, keep serving others, and
/// never touch the image for a request that did not arrive whole.
final class HostileClientTests: XCTestCase {
    /// READ and WRITE up to 64 MiB are served (as nbdkit serves them); 64 MiB + 4 KiB gets EINVAL, the write's
    /// payload is read and dropped, and the connection goes on in step.
    func testRequestsOverTheMaximumAreRefusedAndTheConnectionGoesOn() throws {
        let f = try ServerFixture(size: 160 << 20)
        defer { f.stop() }
        let c = try RawClient(path: f.socketPath)
        defer { c.close() }
        XCTAssertTrue(c.negotiate())
        let over = UInt32((64 << 20) + 4096)
        c.send(c.request(NBDProtocol.cmdRead, cookie: 1, offset: 0, length: over))
        var reply = try XCTUnwrap(c.receive(16))
        XCTAssertEqual(RawClient.read(reply, 4, UInt32.self), NBDErrorCode.einval.rawValue)
        XCTAssertEqual(RawClient.read(reply, 8, UInt64.self), 1)
        c.send(c.request(NBDProtocol.cmdWrite, cookie: 2, offset: 0, length: over) + [UInt8](repeating: 0x77, count: Int(over)))
        reply = try XCTUnwrap(c.receive(16))
        XCTAssertEqual(RawClient.read(reply, 4, UInt32.self), NBDErrorCode.einval.rawValue)
        XCTAssertEqual(RawClient.read(reply, 8, UInt64.self), 2)
        // The largest request, written and read back whole.
        var largest = [UInt8](repeating: 0, count: 64 << 20)
        largest.withUnsafeMutableBytes { bytes in
            let words = bytes.bindMemory(to: UInt64.self)
            for i in words.indices { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 }
        }
        c.send(c.request(NBDProtocol.cmdWrite, cookie: 3, offset: 32 << 20, length: UInt32(largest.count)) + largest)
        reply = try XCTUnwrap(c.receive(16))
        XCTAssertEqual(RawClient.read(reply, 4, UInt32.self), 0)
        XCTAssertEqual(RawClient.read(reply, 8, UInt64.self), 3)
        c.send(c.request(NBDProtocol.cmdRead, cookie: 4, offset: 32 << 20, length: UInt32(largest.count)))
        let back = try XCTUnwrap(c.receive(16 + largest.count))
        XCTAssertEqual(RawClient.read(back, 4, UInt32.self), 0)
        let same = back.withUnsafeBytes { b in largest.withUnsafeBytes { memcmp(b.baseAddress! + 16, $0.baseAddress!, $0.count) == 0 } }
        XCTAssertTrue(same, "the 64 MiB read differs from the 64 MiB write")
        // Nothing of the refused write reached the image.
        c.send(c.request(NBDProtocol.cmdRead, cookie: 5, offset: 0, length: 4096))
        let head = try XCTUnwrap(c.receive(16 + 4096))
        XCTAssertTrue(head[16...].allSatisfy { $0 == 0 }, "the refused write changed the image")
    }

    func testHostileClientsLeaveServerUpAndImageIntact() throws {
        let f = try ServerFixture(size: 16 << 20) { try fillPattern($0, offset: 0, count: 4 << 20, seed: 99) }
        defer { f.stop() }
        let before = try SHA256Hex.of(file: f.imagePath)

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

        // 5. Disconnect in the middle of a write payload: the write must not happen. The server has
        // taken the write's header (its request count moved) before the client goes.
        c = try RawClient(path: f.socketPath)
        XCTAssertTrue(c.negotiate())
        let requestsBefore = f.server.stats.snapshot.requests
        c.send(c.request(NBDProtocol.cmdWrite, cookie: 1, offset: 0, length: 1 << 20) + [UInt8](repeating: 0xee, count: 300_000))
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.stats.snapshot.requests > requestsBefore },
                      "the server never parsed the write header (requests still \(requestsBefore))")
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

        // Every hostile connection is over (the server closed or finished each), so nothing can
        // still be on its way to the image; the server still serves, and the image is what it was.
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.stats.snapshot.connectionsOpen == 0 },
                      "connections still open: \(f.server.stats.snapshot)")
        XCTAssertEqual(try SHA256Hex.of(file: f.imagePath), before, "a hostile client changed the image")
        let check = try PythonNBD.run(#"""
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
