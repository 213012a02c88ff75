import FerryTestSupport
import Foundation
import Glibc
import Synchronization

/// A TCP relay for end-to-end tests: listens on 127.0.0.1 (an ephemeral port), forwards every
/// connection to `targetPort`, can cap the bandwidth of each direction, and can cut every
/// connection at once (a dropped link) while still accepting new ones.
extension E2E {
final class Relay: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let targetPort: UInt16
    private let bytesPerSecond: Double
    private let sockets = Mutex<[Int32]>([])
    private let stopped = Atomic<Bool>(false)
    private let forwarded = Atomic<UInt64>(0)

    /// Bytes relayed towards `targetPort` so far (what the target has been sent, over every connection).
    var bytesToTarget: UInt64 { forwarded.load(ordering: .relaxed) }

    init(targetPort: UInt16, bytesPerSecond: Double = 0) throws {
        self.targetPort = targetPort
        self.bytesPerSecond = bytesPerSecond
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        var one: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, Glibc.listen(listener, 16) == 0 else { throw NSError(domain: "relay", code: Int(errno)) }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        self.port = UInt16(bigEndian: address.sin_port)
        Thread { [self] in acceptLoop() }.start()
    }

    /// A link outage: cuts every connection and, for `seconds`, closes each new one at once (as a
    /// relay killed and restarted `seconds` later), then relays again.
    func outage(seconds: Double) {
        refusingUntil.store(UInt64(monotonicSeconds() * 1e9) + UInt64(seconds * 1e9), ordering: .sequentiallyConsistent)
        cut()
    }
    private let refusingUntil = Atomic<UInt64>(0)

    /// Closes every relayed connection (both sides see a reset or end of stream).
    func cut() {
        let all = sockets.withLock { list -> [Int32] in let copy = list; list.removeAll(); return copy }
        for fd in all { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Stops accepting and cuts everything.
    func stop() {
        stopped.store(true, ordering: .sequentiallyConsistent)
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        cut()
    }

    private func acceptLoop() {
        while !stopped.load(ordering: .sequentiallyConsistent) {
            let client = accept(listener, nil, nil)
            if client < 0 { if errno == EINTR { continue } else { return } }
            if UInt64(monotonicSeconds() * 1e9) < refusingUntil.load(ordering: .sequentiallyConsistent) {
                close(client)
                continue
            }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var target = sockaddr_in()
            target.sin_family = sa_family_t(AF_INET)
            target.sin_addr.s_addr = inet_addr("127.0.0.1")
            target.sin_port = targetPort.bigEndian
            let connected = withUnsafePointer(to: &target) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if connected != 0 { close(client); close(server); continue }
            sockets.withLock { $0.append(contentsOf: [client, server]) }
            let rate = bytesPerSecond
            Thread { [self] in Relay.pump(from: client, to: server, bytesPerSecond: rate, counting: self) }.start()
            Thread { Relay.pump(from: server, to: client, bytesPerSecond: rate, counting: nil) }.start()
        }
    }

    private static func pump(from source: Int32, to destination: Int32, bytesPerSecond: Double, counting relay: Relay?) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        let start = Date()
        var moved = 0.0
        while true {
            let count = buffer.withUnsafeMutableBytes { read(source, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            var written = 0
            while written < count {
                let n = buffer.withUnsafeBytes { send(destination, $0.baseAddress! + written, count - written, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { shutdown(source, Int32(SHUT_RDWR)); return }
                written += n
            }
            moved += Double(count)
            relay?.forwarded.add(UInt64(count), ordering: .relaxed)
            if bytesPerSecond > 0 {
                let due = moved / bytesPerSecond - Date().timeIntervalSince(start)
                if due > 0 { usleep(UInt32(min(due, 1) * 1e6)) }
            }
        }
        shutdown(destination, Int32(SHUT_WR))
    }
}
}
