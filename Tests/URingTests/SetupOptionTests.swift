import FerryTestSupport
import Foundation
import Glibc
import Synchronization
import SystemPackage
import Testing
@testable import URing

/// `IORing.SetupOptions`: single issuer and deferred task work (`IORING_SETUP_SINGLE_ISSUER`,
/// `IORING_SETUP_DEFER_TASKRUN`), and that the plain ring keeps its old behaviour.
@Suite struct SetupOptionTests {
    /// Skips (FerryTestSupport's one behaviour: a printed reason, then a skip, or a failure under
    /// `FERRY_REQUIRE_ALL=1`) unless the kernel granted `options`.
    private func requireGranted(_ ring: borrowing URing.IORing, _ options: URing.IORing.SetupOptions) throws {
        try require(kernelFeature: "io_uring setup options 0x\(String(options.rawValue, radix: 16))",
                    available: ring.options.isSuperset(of: options),
                    detail: "granted 0x\(String(ring.options.rawValue, radix: 16))")
    }

    @Test func defaultRingAsksForNothingExtra() throws {
        let ring = try IORing(entries: 4)
        #expect(ring.options.isEmpty)
    }

    @Test func deferTaskRunImpliesSingleIssuer() throws {
        let ring = try IORing(entries: 4, options: .deferTaskRun)
        try requireGranted(ring, .deferTaskRun)
        #expect(ring.options == [.deferTaskRun, .singleIssuer])
    }

    /// With deferred task work a `recv` whose data has arrived is not completed until the owner
    /// enters the kernel; `drainCompletions` must do that itself (no `submitAndWait` here).
    @Test func drainRunsDeferredWork() throws {
        var pair: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0, "socketpair: errno \(errno)")
        defer { close(pair[0]); close(pair[1]) }
        var ring = try IORing(entries: 8, options: .deferTaskRun)
        try requireGranted(ring, .deferTaskRun)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        try ring.prepareRecv(pair[0], into: buffer, tag: 7)
        try ring.submit()
        #expect(ring.drainCompletions { _ in } == 0, "nothing was sent yet")
        let message: [UInt8] = Array("deferred".utf8)
        #expect(write(pair[1], message, message.count) == message.count)
        // The data is in the socket: the completion exists only as deferred task work, which only a
        // drain (entering the kernel with GETEVENTS) can run. Drain until it appears (generous deadline).
        var result: Int32? = nil
        var drains = 0
        waitUntil(timeout: 30, interval: 0.001) {
            drains += 1
            ring.drainCompletions { if $0.tag == 7 { result = $0.result } }
            return result != nil
        }
        #expect(result == Int32(message.count), "recv result \(String(describing: result)) after \(drains) drains")
        #expect(Array(buffer[0..<message.count]) == message)
        #expect(ring.inFlight == 0)
    }

    @Test func waitCompletionRunsDeferredWork() throws {
        var pair: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0, "socketpair: errno \(errno)")
        defer { close(pair[0]); close(pair[1]) }
        var ring = try IORing(entries: 8, options: .deferTaskRun)
        try requireGranted(ring, .deferTaskRun)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        var timespec = KernelTimespec(nanoseconds: 20_000_000)
        try ring.prepareTimeout(&timespec, tag: 1)
        try ring.prepareRecv(pair[0], into: buffer, tag: 2)
        #expect(write(pair[1], "x", 1) == 1)
        var seen: [UInt64: Int32] = [:]
        while seen.count < 2 {
            let completion = try ring.waitCompletion()
            seen[completion.tag] = completion.result
        }
        #expect(seen[1] == -ETIME)
        #expect(seen[2] == 1)
    }

    /// The kernel holds a single-issuer ring to its creating thread: another thread's submission
    /// fails with EEXIST, while a default ring works from any thread.
    @Test func singleIssuerRefusesOtherThreads() throws {
        final class Box: @unchecked Sendable {
            var ring: URing.IORing
            init(_ ring: consuming URing.IORing) { self.ring = ring }
        }
        let single = Box(try IORing(entries: 4, options: .singleIssuer))
        try requireGranted(single.ring, .singleIssuer)
        let plain = Box(try IORing(entries: 4))
        final class Codes: Sendable { let byRing = Mutex<[String: Int32]>([:]) }
        let results = Codes()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            for (name, box) in [("single", single), ("plain", plain)] {
                var code: Int32 = 0
                do {
                    try box.ring.prepareNop(tag: 1)
                    try box.ring.submitAndWait(1)
                    box.ring.drainCompletions { _ in }
                } catch let error as Errno {
                    code = error.rawValue
                } catch {
                    code = -1
                }
                results.byRing.withLock { $0[name] = code }
            }
            done.signal()
        }
        thread.start()
        try #require(done.wait(timeout: .now() + 60) == .success, "the other thread did not finish its submissions within 60 s")
        let codes = results.byRing.withLock { $0 }
        #expect(codes["single"] == EEXIST, "single-issuer ring from another thread: \(codes)")
        #expect(codes["plain"] == 0, "default ring from another thread: \(codes)")
    }
}
