import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// ferry-delay-relay, the emulated WAN's delay: every byte arrives intact and in order in both directions, no
/// sooner than the delay after it was sent, half-closes pass through, a target that refuses closes the client,
/// and bad arguments are refused with a reason. (What it adds beyond the delay is a benchmark's figure:
/// scripts/bench-relay.sh.)
final class DelayRelayTests: XCTestCase {
    static var relay: String { WholeVMRig.tool("ferry-delay-relay") }

    /// An echo server on 127.0.0.1 (a thread per connection; echoes until end of stream, then closes).
    final class EchoServer: @unchecked Sendable {
        let port: UInt16
        private let fd: Int32

        init() throws {
            port = try freePort()
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = port.bigEndian
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard bound == 0, listen(fd, 16) == 0 else { throw SupportError("echo server: bind/listen failed: errno \(errno)") }
            let listener = fd
            Thread.detachNewThread {
                while true {
                    let c = accept(listener, nil, nil)
                    if c < 0 { return }
                    Thread.detachNewThread {
                        var buffer = [UInt8](repeating: 0, count: 65536)
                        while true {
                            let n = recv(c, &buffer, buffer.count, 0)
                            if n <= 0 { break }
                            var sent = 0
                            while sent < n {
                                let m = buffer.withUnsafeBytes { send(c, $0.baseAddress! + sent, n - sent, Int32(MSG_NOSIGNAL)) }
                                if m <= 0 { break }
                                sent += m
                            }
                        }
                        close(c)
                    }
                }
            }
        }

        func stop() { shutdown(fd, Int32(SHUT_RDWR)); close(fd) }
    }

    func startRelay(to target: UInt16, delayMs: Double) throws -> (ChildProcess, UInt16) {
        let port = try freePort()
        let child = try ChildProcess(Self.relay, ["127.0.0.1", "\(port)", "127.0.0.1", "\(target)", "\(delayMs)"],
                                     stdout: .discard, stderr: .pipe)
        XCTAssertTrue(waitUntil(timeout: 10) { connectToLoopback(port: port).map { close($0); return true } ?? false }, "the relay never listened")
        return (child, port)
    }

    func testEachRoundTripTakesTwiceTheDelayAndEveryByteArrivesInOrder() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let (relay, port) = try startRelay(to: echo.port, delayMs: 15)
        defer { relay.kill(SIGKILL); _ = relay.wait(timeout: 5) }
        let fd = try XCTUnwrap(connectToLoopback(port: port))
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        // Round trips: never shorter than 2 x 15 ms.
        var message = [UInt8](repeating: 0x5A, count: 64)
        for i in 0..<10 {
            message[0] = UInt8(i)
            let t0 = monotonicSeconds()
            XCTAssertEqual(send(fd, message, message.count, 0), 64)
            var got = [UInt8](repeating: 0, count: 64)
            var n = 0
            while n < 64 {
                let m = got.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + n, 64 - n, 0) }
                guard m > 0 else { return XCTFail("the echo through the relay stopped after \(n) bytes") }
                n += m
            }
            let rtt = (monotonicSeconds() - t0) * 1000
            XCTAssertEqual(got, message)
            XCTAssertGreaterThanOrEqual(rtt, 30, "round trip \(i) took \(rtt) ms, less than twice the 15 ms delay")
        }
        // 24 MiB each way at once: echoed intact and in order.
        let total = 24 << 20
        var data = [UInt8](repeating: 0, count: total)
        data.withUnsafeMutableBytes { bytes in
            let words = bytes.bindMemory(to: UInt64.self)
            for i in words.indices { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 ^ 0x1234 }
        }
        let payload = data
        Thread.detachNewThread {
            var sent = 0
            while sent < total {
                let m = payload.withUnsafeBytes { send(fd, $0.baseAddress! + sent, min(1 << 20, total - sent), Int32(MSG_NOSIGNAL)) }
                if m <= 0 { return }
                sent += m
            }
            shutdown(fd, Int32(SHUT_WR))   // the half-close travels through the relay to the echo server
        }
        var back = [UInt8](repeating: 0, count: total)
        var received = 0
        while true {
            let m = back.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + received, total - received + (received == total ? 1 : 0), 0) }
            if m <= 0 { break }
            received += m
            if received > total { break }
        }
        XCTAssertEqual(received, total, "bytes echoed through the relay")
        XCTAssertTrue(back == data, "the echoed bytes differ from those sent")
    }

    func testARefusingTargetClosesTheClientAndBadArgumentsAreRefused() throws {
        let nobody = try freePort()
        let (relay, port) = try startRelay(to: nobody, delayMs: 1)
        defer { relay.kill(SIGKILL); _ = relay.wait(timeout: 5) }
        let fd = try XCTUnwrap(connectToLoopback(port: port))
        defer { close(fd) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        XCTAssertEqual(recv(fd, &byte, 1, 0), 0, "the client of a refusing target must see the end of stream")
        XCTAssertTrue(relay.isRunning, "the relay must serve on")

        for bad in [["127.0.0.1", "1", "127.0.0.1", "2"], ["127.0.0.1", "1", "127.0.0.1", "2", "soon"], ["127.0.0.1", "1", "127.0.0.1", "2", "-5"]] {
            let r = try runTool(Self.relay, bad, timeout: 10)
            XCTAssertEqual(r.status, 2, "\(bad): \(r)")
            XCTAssertFalse(r.stderr.isEmpty, "\(bad): no reason given")
        }
    }
}
