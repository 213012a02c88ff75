import FerryTestSupport
import Foundation
import Glibc
import Synchronization
import SystemPackage
import XCTest
@testable import NBDBridge

/// The NBD server under too many clients: a connection past ``NBDServer/Options/maxConnections``, or
/// one whose thread cannot be created, is refused with a reason the client shows, and the server
/// serves on; an endpoint other hosts can reach needs an explicit opt-in.
final class ConnectionLimitTests: XCTestCase {
    func testConnectionPastTheLimitIsRefusedWithTheReasonAndASlotFreesUp() throws {
        let f = try ServerFixture(size: 8 << 20, options: .init(maxConnections: 2))
        defer { f.stop() }
        let first = try RawClient(path: f.socketPath)
        let second = try RawClient(path: f.socketPath)
        XCTAssertTrue(first.negotiate())
        XCTAssertTrue(second.negotiate())

        // The third, by the raw client: every option is answered NBD_REP_ERR_POLICY with the reason,
        // and NBD_OPT_ABORT is acknowledged before the server closes.
        let third = try RawClient(path: f.socketPath)
        defer { third.close() }
        XCTAssertTrue(greet(third))
        let message = try XCTUnwrap(refusal(of: third, option: NBDProtocol.optStructuredReply))
        XCTAssertTrue(message.contains("too many connections") && message.contains("the limit is 2"), message)
        XCTAssertEqual(refusal(of: third, option: NBDProtocol.optGo, data: RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))),
                       message)
        third.send(RawClient.be(NBDProtocol.optionMagic) + RawClient.be(NBDProtocol.optAbort) + RawClient.be(UInt32(0)))
        let ack = try XCTUnwrap(third.receive(20))
        XCTAssertEqual(RawClient.read(ack, 12, UInt32.self), NBDProtocol.repAck)
        XCTAssertTrue(third.serverClosed())

        // The fourth, by real clients: QEMU shows the reason, libnbd fails the connection on policy.
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") {
            let qemu = try runTool("/usr/bin/qemu-img", ["info", f.uri])
            XCTAssertNotEqual(qemu.status, 0, "\(qemu)")
            XCTAssertTrue(qemu.stderr.contains("Denied by server") && qemu.stderr.contains("too many connections (2 open, the limit is 2)"),
                          "\(qemu)")
        }
        let python = try PythonNBD.run(#"""
import nbd, sys
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    print("connected")
except nbd.Error as e:
    print("refused:", e)
"""#, uri: f.uri)
        XCTAssertTrue(python.stdout.contains("refused:") && python.stdout.contains("policy"), "\(python)")
        XCTAssertGreaterThanOrEqual(f.server.stats.snapshot.connectionsRefused, 2)
        XCTAssertEqual(f.server.stats.snapshot.connectionsAccepted, 2)

        // The two admitted connections still work.
        for (cookie, client) in [first, second].enumerated() {
            client.send(client.request(NBDProtocol.cmdRead, cookie: UInt64(cookie), offset: 0, length: 4096))
            let reply = try XCTUnwrap(client.receive(16 + 4096))
            XCTAssertEqual(RawClient.read(reply, 4, UInt32.self), 0)
        }

        // One goes: its slot is free for the next client.
        first.close()
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.connectionThreadIDs.count == 1 }, "\(f.server.stats.snapshot)")
        let check = try PythonNBD.run(#"""
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.get_size() == 8 << 20
h.pread(65536, 0)
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(check.stdout.contains("ok"), "\(check)")
        second.close()
    }

    func testFailedThreadCreationRefusesTheConnectionAndTheServerServesOn() throws {
        let failing = ThreadFailure()
        var options = NBDServer.Options(maxConnections: 8)
        options.threadSpawner = { body throws(Errno) in
            if failing.on.load(ordering: .relaxed) { throw Errno.resourceTemporarilyUnavailable }
            try spawnDetachedThread(body)
        }
        let f = try ServerFixture(size: 8 << 20, options: options)
        defer { f.stop() }
        let served = try RawClient(path: f.socketPath)
        defer { served.close() }
        XCTAssertTrue(served.negotiate())

        failing.on.store(true, ordering: .relaxed)
        for _ in 0..<3 {
            let refused = try RawClient(path: f.socketPath)
            XCTAssertTrue(greet(refused))
            let message = try XCTUnwrap(refusal(of: refused, option: NBDProtocol.optGo, data: RawClient.be(UInt32(0)) + RawClient.be(UInt16(0))))
            XCTAssertTrue(message.contains("cannot start a thread") && message.contains("pthread_create"), message)
            refused.close()
        }
        let snapshot = f.server.stats.snapshot
        XCTAssertEqual(snapshot.connectionsRefused, 3)
        XCTAssertEqual(snapshot.connectionsAccepted, 1)
        XCTAssertEqual(snapshot.connectionsOpen, 1)
        XCTAssertEqual(f.server.connectionThreadIDs.count, 1, "a refused connection was left in the server's table")
        XCTAssertEqual(f.server.liveThreads.load(ordering: .relaxed), 2, "the acceptor and one connection thread")

        // The admitted connection is untouched, and once threads can be had again a client gets in.
        served.send(served.request(NBDProtocol.cmdRead, cookie: 7, offset: 0, length: 4096))
        let reply = try XCTUnwrap(served.receive(16 + 4096))
        XCTAssertEqual(RawClient.read(reply, 4, UInt32.self), 0)
        failing.on.store(false, ordering: .relaxed)
        let later = try RawClient(path: f.socketPath)
        XCTAssertTrue(later.negotiate())
        later.close()
        served.close()
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.liveThreads.load(ordering: .relaxed) == 1 },
                      "thread count not back to the acceptor alone: \(f.server.liveThreads.load(ordering: .relaxed))")
    }

    func testFailedAcceptorThreadThrowsInsteadOfCrashing() throws {
        var options = NBDServer.Options()
        options.threadSpawner = { _ throws(Errno) in throw Errno.resourceTemporarilyUnavailable }
        let directory = TemporaryDirectory(prefix: "ferry-nbd")
        let image = try directory.sparseFile("disk.img", size: 1 << 20)
        let server = try NBDServer(store: FileBlockStore(path: image), options: options)
        try server.listen(NBDEndpoint.parse("unix:" + directory.file("a.sock")))
        XCTAssertThrowsError(try server.start()) { error in
            XCTAssertTrue("\(error)".contains("pthread_create"), "\(error)")
        }
        XCTAssertThrowsError(try server.listen(NBDEndpoint.parse("unix:" + directory.file("b.sock"))))
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory.file("a.sock")), "the failed listener was left bound")
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory.file("b.sock")), "the failed listener was left bound")
        let begun = Date()
        server.shutdown(drain: true)
        XCTAssertLessThan(Date().timeIntervalSince(begun), 10, "shutdown waited for threads that never started")
    }

    func testSilentRefusedClientsHoldTheAcceptorUpOnlyBriefly() throws {
        let f = try ServerFixture(size: 8 << 20, options: .init(maxConnections: 1))
        defer { f.stop() }
        let admitted = try RawClient(path: f.socketPath)
        XCTAssertTrue(admitted.negotiate())
        let begun = Date()
        // Clients past the limit that never answer the greeting: the first are waited for until
        // their deadline, then the window's budget is spent and the rest are closed at once.
        let silent = try (0..<8).map { _ in try RawClient(path: f.socketPath) }
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.stats.snapshot.connectionsRefused == 8 }, "\(f.server.stats.snapshot)")
        admitted.close()
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.connectionThreadIDs.isEmpty }, "\(f.server.stats.snapshot)")
        let next = try RawClient(path: f.socketPath)
        defer { next.close() }
        XCTAssertTrue(next.negotiate())
        let took = Date().timeIntervalSince(begun)
        XCTAssertLessThan(took, 2 * Double(RefusalWindow.explainBudgetNanoseconds) / 1e9 + 3,
                          "8 silent refused clients held the accept queue up for \(took) s")
        for client in silent {
            XCTAssertTrue(client.serverClosed(), "a refused client was left open")
            client.close()
        }
    }

    func testRefusalWindowLogsOncePerWindowAndBoundsTheTimeSpent() {
        var window = RefusalWindow()
        let start: UInt64 = 1_000_000_000
        let first = window.begin(now: start)
        XCTAssertTrue(first.log)
        XCTAssertEqual(first.deadline, start + RefusalWindow.perRefusalNanoseconds)
        window.end(took: RefusalWindow.perRefusalNanoseconds)
        let second = window.begin(now: start + 1)
        XCTAssertFalse(second.log)
        window.end(took: RefusalWindow.explainBudgetNanoseconds)
        XCTAssertNil(window.begin(now: start + 2).deadline, "past the budget a refusal is a plain close")
        let next = window.begin(now: start + RefusalWindow.lengthNanoseconds)
        XCTAssertTrue(next.log)
        XCTAssertEqual(next.unloggedBefore, 2)
        XCTAssertNotNil(next.deadline)
    }

    func testEndpointOffTheLoopbackNeedsTheOptIn() throws {
        for text in ["tcp:0.0.0.0:10809", "tcp:10.1.2.3:10809", "10.1.2.3:10809", "tcp::10809", "tcp:[::]:10809",
                     "tcp:[::ffff:10.0.0.1]:10809", "tcp:[2001:db8::1]:10809"] {
            let endpoint = try NBDEndpoint.parse(text)
            XCTAssertFalse(endpoint.isLoopback, text)
            XCTAssertThrowsError(try NBDEndpoint.parse(text, allowRemote: false), text) { error in
                let message = (error as? NBDBridgeError)?.message ?? "\(error)"
                XCTAssertTrue(message.contains(text) && message.contains("no authentication")
                              && message.contains("--nbd-allow-remote"), message)
            }
            XCTAssertNoThrow(try NBDEndpoint.parse(text, allowRemote: true), text)
        }
        for text in ["tcp:127.0.0.1:10809", "tcp:127.5.6.7:0", "127.0.0.1:10809", "tcp:[::1]:10809", "tcp:localhost:10809",
                     "tcp:[::ffff:127.0.0.1]:10809", "unix:/run/ferry/vm.sock", "/run/ferry/vm.sock"] {
            XCTAssertTrue(try NBDEndpoint.parse(text).isLoopback, text)
            XCTAssertNoThrow(try NBDEndpoint.parse(text, allowRemote: false), text)
        }
    }

    /// Reads the greeting and sends the client flags. False when no greeting came.
    private func greet(_ client: RawClient) -> Bool {
        guard let hello = client.receive(18), RawClient.read(hello, 0, UInt64.self) == NBDProtocol.nbdMagic else { return false }
        client.send(RawClient.be(UInt32(3)))
        return true
    }

    /// Sends `option` with `data` and returns the message of the NBD_REP_ERR_POLICY it gets; nil when
    /// the server answered otherwise or closed.
    private func refusal(of client: RawClient, option: UInt32, data: [UInt8] = []) -> String? {
        client.send(RawClient.be(NBDProtocol.optionMagic) + RawClient.be(option) + RawClient.be(UInt32(data.count)) + data)
        guard let header = client.receive(20), RawClient.read(header, 12, UInt32.self) == NBDProtocol.repErrPolicy,
              RawClient.read(header, 8, UInt32.self) == option,
              let message = client.receive(Int(RawClient.read(header, 16, UInt32.self))) else { return nil }
        return String(decoding: message, as: UTF8.self)
    }
}

/// A switch the test flips to make the server's thread creation fail.
private final class ThreadFailure: Sendable {
    let on = Atomic<Bool>(false)
}
