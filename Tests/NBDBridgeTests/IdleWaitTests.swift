import FerryTestSupport
import Foundation
import Glibc
import XCTest
@testable import NBDBridge

/// How a connection waits for its client when nothing is in flight: a bounded poll, then a blocking
/// `recv`. These tests check that an idle connection costs no CPU, that shutdown still wakes it,
/// and that requests queued behind a full slot table are all answered when replies go out inline.
final class IdleWaitTests: XCTestCase {
    private func readReply(_ c: RawClient, length: Int) -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let header = c.receive(16), RawClient.read(header, 0, UInt32.self) == NBDProtocol.simpleReplyMagic else { return nil }
        let error = RawClient.read(header, 4, UInt32.self)
        let data = error == 0 && length > 0 ? c.receive(length) ?? [] : []
        return (error, RawClient.read(header, 8, UInt64.self), data)
    }

    func testIdleConnectionSleepsAndShutdownWakesIt() throws {
        for inMemory in [true, false] {
            let f = try ServerFixture(size: 8 << 20, inMemory: inMemory)
            let c = try RawClient(path: f.socketPath)
            XCTAssertTrue(c.negotiate())
            c.send(c.request(NBDProtocol.cmdRead, cookie: 1, offset: 4096, length: 4096))
            let reply = try XCTUnwrap(readReply(c, length: 4096))
            XCTAssertEqual(reply.error, 0)
            XCTAssertEqual(reply.cookie, 1)
            // The connection now waits for a request that does not come: it must sleep, not poll.
            // Measured on the connection's own thread (its CPU clock), so no other thread of this
            // process, and no test running beside this one, can move the figure.
            XCTAssertTrue(waitUntil(timeout: 30) { f.server.connectionThreadIDs.count == 1 },
                          "connection threads: \(f.server.connectionThreadIDs)")
            let thread = ThreadCPU(tid: try XCTUnwrap(f.server.connectionThreadIDs.first))
            XCTAssertTrue(waitUntil(timeout: 30) { thread.state == "S" },
                          "the idle connection thread \(thread.tid) never went to sleep (state \(String(describing: thread.state)))")
            let before = try XCTUnwrap(thread.nanoseconds, "thread \(thread.tid) is gone")
            usleep(400_000)   // the measuring window, not a synchronisation
            let used = Double(try XCTUnwrap(thread.nanoseconds, "thread \(thread.tid) is gone") - before) / 1e6
            print("idle connection (tmpfs \(inMemory)): thread \(thread.tid) used \(used) ms of CPU in 400 ms")
            XCTAssertLessThan(used, 20, "an idle connection (tmpfs \(inMemory)) used \(used) ms of CPU in 400 ms")
            let start = Date()
            f.server.shutdown(drain: true)
            XCTAssertLessThan(Date().timeIntervalSince(start), 30, "shutdown must wake a connection sleeping in recv")
            XCTAssertTrue(c.serverClosed(), "the server must close the idle connection on shutdown")
            XCTAssertEqual(f.server.stats.snapshot.connectionsOpen, 0)
            c.close()
            f.stop()
        }
    }

    /// Two slots, fifty requests sent at once: parsing stops when both slots are busy, the replies
    /// go out inline and free them, and the connection must go back to the bytes it already holds
    /// rather than wait for more input (or close). Checked with polling on and off, tmpfs and file.
    func testRequestsBeyondTheSlotTableAreAllAnswered() throws {
        for (inMemory, spin) in [(true, UInt64(30_000)), (true, 0), (false, 30_000), (false, 0)] {
            let options = NBDServer.Options(requestSlots: 2, idleSpinNanoseconds: spin)
            let f = try ServerFixture(size: 8 << 20, options: options, inMemory: inMemory) {
                try fillPattern($0, offset: 0, count: 1 << 20, seed: 7)
            }
            let image = try Data(contentsOf: URL(fileURLWithPath: f.imagePath))
            let c = try RawClient(path: f.socketPath)
            XCTAssertTrue(c.negotiate())
            var burst: [UInt8] = []
            for i in 0..<50 { burst += c.request(NBDProtocol.cmdRead, cookie: UInt64(i), offset: UInt64(i) * 8192, length: 4096) }
            c.send(burst)
            var seen = Set<UInt64>()
            for _ in 0..<50 {
                guard let reply = readReply(c, length: 4096) else { break }
                XCTAssertEqual(reply.error, 0)
                let offset = Int(reply.cookie) * 8192
                XCTAssertEqual(reply.data, Array(image[offset..<offset + 4096]), "read \(reply.cookie) returned other bytes")
                seen.insert(reply.cookie)
            }
            XCTAssertEqual(seen, Set(0..<50), "tmpfs \(inMemory), spin \(spin): only \(seen.count) of 50 answered")

            // A write whose payload arrives in two pieces: the second once the server has parsed
            // the write's header (its request count moved), so the payload really is split.
            let payload = [UInt8](repeating: 0x5a, count: 65536)
            let requestsBefore = f.server.stats.snapshot.requests
            c.send(c.request(NBDProtocol.cmdWrite, cookie: 99, offset: 1 << 20, length: 65536) + payload[..<1000])
            XCTAssertTrue(waitUntil(timeout: 60) { f.server.stats.snapshot.requests > requestsBefore },
                          "the server never parsed the write header")
            c.send(Array(payload[1000...]))
            let written = try XCTUnwrap(readReply(c, length: 0))
            XCTAssertEqual(written.error, 0)
            XCTAssertEqual(written.cookie, 99)
            c.send(c.request(NBDProtocol.cmdRead, cookie: 100, offset: 1 << 20, length: 65536))
            XCTAssertEqual(readReply(c, length: 65536)?.data, payload)
            c.close()
            f.stop()
        }
    }

    func testIdleSpinOverOneMillisecondIsRefused() throws {
        let directory = TemporaryDirectory(prefix: "ferry-nbd")
        let path = try directory.sparseFile("disk.img", size: 1 << 20)
        let store = try FileBlockStore(path: path)
        XCTAssertThrowsError(try NBDServer(store: store, options: .init(idleSpinNanoseconds: 2_000_000))) { error in
            XCTAssertTrue("\(error)".contains("2000000"), "\(error)")
        }
        XCTAssertNoThrow(try NBDServer(store: store, options: .init(idleSpinNanoseconds: 1_000_000)))
    }
}
