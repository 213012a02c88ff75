import Foundation
import Glibc
import XCTest
@testable import NBDBridge

/// How a connection waits for its client when nothing is in flight: a bounded poll, then a blocking
/// `recv`. These tests check that an idle connection costs no CPU, that shutdown still wakes it,
/// and that requests queued behind a full slot table are all answered when replies go out inline.
final class IdleWaitTests: XCTestCase {
    /// User plus system CPU time of this whole process (`getrusage(RUSAGE_SELF)`), in milliseconds.
    private func processCPUMilliseconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        let user = Double(usage.ru_utime.tv_sec) * 1000 + Double(usage.ru_utime.tv_usec) / 1000
        let system = Double(usage.ru_stime.tv_sec) * 1000 + Double(usage.ru_stime.tv_usec) / 1000
        return user + system
    }

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
            usleep(20_000)
            let before = processCPUMilliseconds()
            usleep(400_000)
            let used = processCPUMilliseconds() - before
            XCTAssertLessThan(used, 80, "an idle connection (tmpfs \(inMemory)) used \(used) ms of CPU in 400 ms")
            let start = Date()
            f.server.shutdown(drain: true)
            XCTAssertLessThan(Date().timeIntervalSince(start), 5, "shutdown must wake a connection sleeping in recv")
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
                try Tools.fillPattern($0, offset: 0, count: 1 << 20, seed: 7)
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

            // A write whose payload arrives in two pieces 50 ms apart.
            let payload = [UInt8](repeating: 0x5a, count: 65536)
            c.send(c.request(NBDProtocol.cmdWrite, cookie: 99, offset: 1 << 20, length: 65536) + payload[..<1000])
            usleep(50_000)
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
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-nbd-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("disk.img").path
        FileManager.default.createFile(atPath: path, contents: nil)
        XCTAssertEqual(truncate(path, 1 << 20), 0)
        let store = try FileBlockStore(path: path)
        XCTAssertThrowsError(try NBDServer(store: store, options: .init(idleSpinNanoseconds: 2_000_000))) { error in
            XCTAssertTrue("\(error)".contains("2000000"), "\(error)")
        }
        XCTAssertNoThrow(try NBDServer(store: store, options: .init(idleSpinNanoseconds: 1_000_000)))
    }
}
