import ArgumentParser
import Foundation
import Glibc
import URing

/// Streams bytes over one loopback TCP connection through two io_uring rings (one per thread, as
/// the migration link does) and prints the receiver's throughput, as `iperf3` does for its run.
struct URingLoopback: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uring-loopback",
        abstract: "TCP throughput over loopback through URing (compare: iperf3 -c 127.0.0.1).",
        discussion: "Example: ferry-bench uring-loopback --seconds 5 --chunk-kib 1024 --json"
    )

    @Option(help: "How long to stream, in seconds.")
    var seconds: Double = 5

    @Option(name: .customLong("chunk-kib"), help: "Bytes per send and per receive, in KiB.")
    var chunkKiB: Int = 1024

    @Flag(help: "Print one JSON object instead of a sentence.")
    var json = false

    func run() throws {
        let chunk = chunkKiB << 10
        let listener = try Socket.listen(on: SocketAddress(parsing: "127.0.0.1:0"))
        let address = try Socket.localAddress(of: listener.rawValue)
        let duration = seconds
        let sender = Thread {
            guard let connection = try? Socket.connect(to: address), var ring = try? IORing(entries: 8) else { return }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0xA5)
            let deadline = ContinuousClock.now + .milliseconds(Int(duration * 1000))
            while ContinuousClock.now < deadline {
                do { try ring.sendAll(connection.rawValue, UnsafeRawBufferPointer(buffer)) } catch { break }
            }
            Socket.shutdownBoth(connection.rawValue)
        }
        sender.start()
        let connection = try Socket.accept(from: listener.rawValue)
        var ring = try IORing(entries: 8)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var received = 0
        let start = ContinuousClock.now
        while true {
            let count = try ring.receiveSome(connection.rawValue, into: buffer)
            if count == 0 { break }
            received += count
        }
        let elapsed = ContinuousClock.now - start
        let secondsTaken = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let bitsPerSecond = Double(received) * 8 / secondsTaken
        if json {
            print("{\"bytes\": \(received), \"seconds\": \(secondsTaken), \"bits_per_second\": \(bitsPerSecond)}")
        } else {
            print(String(format: "URing loopback: %.2f GiB in %.2f s = %.2f Gbit/s", Double(received) / Double(1 << 30), secondsTaken, bitsPerSecond / 1e9))
        }
    }
}
