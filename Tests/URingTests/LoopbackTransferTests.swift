import Crypto
import FerryTestSupport
import Foundation
import Glibc
import Synchronization
import SystemPackage
import Testing
@testable import URing

@Suite struct LoopbackTransferTests {
    /// 1 GiB over a loopback TCP connection, sent and received through two rings on two threads;
    /// both ends hash what they saw and the digests must be equal. Prints the throughput.
    @Test func oneGibibyteOverLoopbackArrivesIntact() throws {
        let total = 1 << 30
        let chunk = 8 << 20
        let listener = try Socket.listen(on: SocketAddress(parsing: "127.0.0.1:0"))
        let address = try Socket.localAddress(of: listener.rawValue)

        let senderDigest = Mutex<[UInt8]?>(nil)
        let senderError = Mutex<String?>(nil)
        let senderDone = DispatchSemaphore(value: 0)
        let sender = Thread {
            defer { senderDone.signal() }
            do {
                let connection = try Socket.connect(to: address)
                var ring = try IORing(entries: 8)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
                defer { buffer.deallocate() }
                fillRandom(buffer, seed: 0x5EED)
                var hasher = SHA256()
                for index in 0..<(total / chunk) {
                    buffer.storeBytes(of: UInt64(index), as: UInt64.self)   // every chunk differs
                    hasher.update(bufferPointer: UnsafeRawBufferPointer(buffer))
                    try ring.sendAll(connection.rawValue, UnsafeRawBufferPointer(buffer))
                }
                Socket.shutdownBoth(connection.rawValue)
                let digest = Array(hasher.finalize())
                senderDigest.withLock { $0 = digest }
            } catch {
                let reason = "\(error)"
                senderError.withLock { $0 = reason }
            }
        }

        let start = ContinuousClock.now
        sender.start()
        let connection = try Socket.accept(from: listener.rawValue)
        var ring = try IORing(entries: 8)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var hasher = SHA256()
        var received = 0
        while true {
            let count = try ring.receiveSome(connection.rawValue, into: buffer)
            if count == 0 { break }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            received += count
        }
        let elapsed = ContinuousClock.now - start
        let receivedDigest = Array(hasher.finalize())
        // The sender's digest is set just before its thread ends: wait for the end, not for a time.
        try #require(senderDone.wait(timeout: .now() + 120) == .success, "the sender thread did not finish within 120 s")
        let sent = senderDigest.withLock { $0 }
        #expect(senderError.withLock { $0 } == nil)
        #expect(received == total)
        #expect(sent == receivedDigest)
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let gbits = Double(received) * 8 / seconds / 1e9
        print("URing loopback: \(received >> 20) MiB in \(String(format: "%.2f", seconds)) s = \(String(format: "%.2f", gbits)) Gbit/s (debug build, SHA-256 on both ends)")
    }
}
