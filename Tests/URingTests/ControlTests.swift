import FerryTestSupport
import Glibc
import SystemPackage
import Testing
@testable import URing

@Suite struct ControlTests {
    @Test func timeoutFiresAfterItsTime() throws {
        var ring = try IORing(entries: 4)
        var timespec = KernelTimespec(nanoseconds: 50_000_000)
        let start = ContinuousClock.now
        try ring.prepareTimeout(&timespec, tag: 1)
        let completion = try ring.waitCompletion()
        let elapsed = ContinuousClock.now - start
        #expect(completion.tag == 1)
        #expect(completion.result == -ETIME)
        // The kernel's timer may fire late (a loaded machine) but never early.
        #expect(elapsed >= .milliseconds(50), "fired after \(elapsed), before its 50 ms")
        #expect(elapsed < .seconds(60), "fired only after \(elapsed)")
    }

    /// A receive on a socket that never gets data is cancelled; it ends with ECANCELED and the
    /// cancel itself with 0.
    @Test func pendingReceiveIsCancelled() throws {
        var pair: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0, "socketpair: errno \(errno)")
        defer { close(pair[0]); close(pair[1]) }
        var ring = try IORing(entries: 4)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        try ring.prepareRecv(pair[0], into: buffer, tag: 10)
        try ring.submit()
        try ring.prepareCancel(tag: 10, tag: 11)
        var results: [UInt64: Int32] = [:]
        while results.count < 2 {
            try ring.submitAndWait(1)
            ring.drainCompletions { results[$0.tag] = $0.result }
        }
        #expect(results[10] == -ECANCELED)
        #expect(results[11] == 0)
        #expect(ring.inFlight == 0)
    }

    /// Filling the submission queue past its size throws submissionQueueFull instead of crashing,
    /// and the ring recovers once completions are reaped.
    @Test func fullRingAppliesBackPressure() throws {
        var pair: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0, "socketpair: errno \(errno)")
        defer { close(pair[0]); close(pair[1]) }
        var ring = try IORing(entries: 8)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        // Receives that never complete keep their slots in the kernel; keep queueing until refused.
        var accepted = 0
        var refused = false
        for tag in 0..<10_000 {
            do {
                try ring.prepareRecv(pair[0], into: buffer, tag: UInt64(tag))
                accepted += 1
            } catch .submissionQueueFull {
                refused = true
                break
            } catch {
                Issue.record("unexpected \(error)")
                break
            }
        }
        // Submissions beyond the SQ size are handed to the kernel automatically; the refusal comes
        // when as many receives are in flight as the completion queue can hold.
        #expect(refused)
        #expect(accepted == Int(ring.completionQueueEntries))
        #expect(accepted > Int(ring.submissionQueueEntries))
        // Unblock everything: the peer closes, every receive completes with 0 (end of stream).
        shutdown(pair[1], Int32(SHUT_RDWR))
        var completed = 0
        while ring.inFlight > 0 {
            try ring.submitAndWait(1)
            completed += ring.drainCompletions { _ in }
        }
        #expect(completed == accepted)
        try ring.prepareNop(tag: 99)
        #expect(try ring.waitCompletion().tag == 99)
    }
}
