import FerryTestSupport
import Foundation
import Glibc
import Synchronization

/// A TCP relay for end-to-end tests: listens on 127.0.0.1 (an ephemeral port), forwards every
/// connection to `targetPort`, can cap the bandwidth of each direction, and can cut every
/// connection at once (a dropped link) while still accepting new ones.
///
/// It is also a man in the middle: it follows Ferry's frames in both directions (their 12-byte
/// headers travel in the clear) and can flip one bit inside the n-th frame of a type or inject
/// bytes right after it (``tamper``), and it can count every place where given byte strings
/// appear in what it relayed (``watch(for:)``), as a capture would show them.
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

    /// One act of a man in the middle: on the `occurrence`-th frame (1-based, counted over every
    /// connection) of message type `type` going `toTarget` or back, flip one bit in the middle of
    /// its body, or inject `bytes` right after it. It happens once.
    struct Tamper: Sendable {
        enum Action: Sendable { case flipBit, inject([UInt8]) }
        var toTarget: Bool
        var type: UInt8
        var occurrence: Int
        var action: Action
    }
    /// What the relay does to the frames; set before the connections it should affect start.
    var tamper: Tamper? {
        get { tamperState.withLock { $0.plan } }
        set { tamperState.withLock { $0 = (newValue, 0, false) } }
    }
    /// Whether ``tamper`` has happened.
    var tampered: Bool { tamperState.withLock { $0.done } }
    private let tamperState = Mutex<(plan: Tamper?, seen: Int, done: Bool)>((nil, 0, false))

    /// Byte strings to look for in everything relayed, both ways (see ``sightings``).
    func watch(for markers: [[UInt8]]) { watched.withLock { $0 = (markers, [Int](repeating: 0, count: markers.count)) } }
    /// How often each watched string appeared in the relayed bytes (across chunk boundaries).
    var sightings: [Int] { watched.withLock { $0.counts } }
    private let watched = Mutex<(markers: [[UInt8]], counts: [Int])>(([], []))

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
            guard let server = connectToLoopback(port: targetPort) else { close(client); continue }
            sockets.withLock { $0.append(contentsOf: [client, server]) }
            let rate = bytesPerSecond
            Thread { [self] in Relay.pump(from: client, to: server, bytesPerSecond: rate, counting: self, relay: self, toTarget: true) }.start()
            Thread { [self] in Relay.pump(from: server, to: client, bytesPerSecond: rate, counting: nil, relay: self, toTarget: false) }.start()
        }
    }

    /// Where one direction of one connection is in Ferry's framing.
    private struct FrameCursor {
        var header = [UInt8](repeating: 0, count: 12)
        var headerFill = 0
        var bodyLeft = 0
        var bodyLength = 0
        var flipAt: Int? = nil        // body offset of the bit to flip in the current frame
        var injectAfter: [UInt8]? = nil
    }

    /// Follows the frames in `chunk`, flipping a bit where the plan says; returns the offsets in
    /// `chunk` after which bytes are to be injected.
    private func follow(_ chunk: UnsafeMutableRawBufferPointer, cursor: inout FrameCursor, toTarget: Bool) -> [(Int, [UInt8])] {
        var injections: [(Int, [UInt8])] = []
        var i = 0
        while i < chunk.count {
            if cursor.bodyLeft == 0 && cursor.headerFill < 12 {
                cursor.header[cursor.headerFill] = chunk[i]
                cursor.headerFill += 1
                i += 1
                if cursor.headerFill == 12 {
                    cursor.bodyLength = Int(cursor.header[0]) | Int(cursor.header[1]) << 8 | Int(cursor.header[2]) << 16 | Int(cursor.header[3]) << 24
                    cursor.bodyLeft = cursor.bodyLength
                    let type = cursor.header[5]
                    tamperState.withLock { state in
                        guard let plan = state.plan, !state.done, plan.toTarget == toTarget, plan.type == type else { return }
                        state.seen += 1
                        guard state.seen == plan.occurrence else { return }
                        state.done = true
                        switch plan.action {
                        case .flipBit: cursor.flipAt = cursor.bodyLength / 2
                        case .inject(let bytes): cursor.injectAfter = bytes
                        }
                    }
                    if cursor.bodyLeft == 0 { cursor.headerFill = 0; if let bytes = cursor.injectAfter { injections.append((i, bytes)); cursor.injectAfter = nil } }
                }
                continue
            }
            let n = min(cursor.bodyLeft, chunk.count - i)
            let done = cursor.bodyLength - cursor.bodyLeft
            if let at = cursor.flipAt, at >= done, at < done + n {
                chunk[i + at - done] ^= 0x10
                cursor.flipAt = nil
            }
            cursor.bodyLeft -= n
            i += n
            if cursor.bodyLeft == 0 {
                cursor.headerFill = 0
                if let bytes = cursor.injectAfter { injections.append((i, bytes)); cursor.injectAfter = nil }
            }
        }
        return injections
    }

    /// Counts watched strings in `chunk`, `tail` being the end of the previous chunk.
    private func look(at chunk: UnsafeRawBufferPointer, tail: inout [UInt8]) {
        let markers = watched.withLock { $0.markers }
        guard !markers.isEmpty else { return }
        let longest = markers.map(\.count).max() ?? 0
        var window = tail
        window.append(contentsOf: chunk)
        var counts = [Int](repeating: 0, count: markers.count)
        window.withUnsafeBytes { haystack in
            for (index, marker) in markers.enumerated() {
                marker.withUnsafeBytes { needle in
                    var offset = 0
                    while offset + needle.count <= haystack.count,
                          let found = Relay.find(needle, in: UnsafeRawBufferPointer(rebasing: haystack[offset...])) {
                        let at = offset + found
                        // A sighting wholly inside the old tail was counted with the previous chunk.
                        if at + needle.count > tail.count { counts[index] += 1 }
                        offset = at + 1
                    }
                }
            }
        }
        if counts.contains(where: { $0 > 0 }) {
            watched.withLock { state in for i in counts.indices where i < state.counts.count { state.counts[i] += counts[i] } }
        }
        tail = Array(window.suffix(max(longest - 1, 0)))
    }

    /// The offset of the first `needle` in `haystack` (memchr for its first byte, then memcmp).
    static func find(_ needle: UnsafeRawBufferPointer, in haystack: UnsafeRawBufferPointer) -> Int? {
        guard needle.count > 0, haystack.count >= needle.count else { return nil }
        var offset = 0
        let first = Int32(needle[0])
        while offset + needle.count <= haystack.count {
            guard let hit = memchr(haystack.baseAddress! + offset, first, haystack.count - offset - needle.count + 1) else { return nil }
            let at = haystack.baseAddress!.distance(to: UnsafeRawPointer(hit))
            if memcmp(haystack.baseAddress! + at, needle.baseAddress!, needle.count) == 0 { return at }
            offset = at + 1
        }
        return nil
    }

    private static func pump(from source: Int32, to destination: Int32, bytesPerSecond: Double, counting: Relay?,
                             relay: Relay, toTarget: Bool) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        let start = Date()
        var moved = 0.0
        var cursor = FrameCursor()
        var tail: [UInt8] = []
        func sendAll(_ bytes: UnsafeRawBufferPointer) -> Bool {
            var written = 0
            while written < bytes.count {
                let n = send(destination, bytes.baseAddress! + written, bytes.count - written, Int32(MSG_NOSIGNAL))
                if n <= 0 { return false }
                written += n
            }
            return true
        }
        while true {
            let count = buffer.withUnsafeMutableBytes { read(source, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            let injections = buffer.withUnsafeMutableBytes { relay.follow(UnsafeMutableRawBufferPointer(rebasing: $0[..<count]), cursor: &cursor, toTarget: toTarget) }
            buffer.withUnsafeBytes { relay.look(at: UnsafeRawBufferPointer(rebasing: $0[..<count]), tail: &tail) }
            var from = 0
            var ok = true
            for (at, bytes) in injections where ok {
                ok = buffer.withUnsafeBytes { sendAll(UnsafeRawBufferPointer(rebasing: $0[from..<at])) } && bytes.withUnsafeBytes { sendAll($0) }
                from = at
            }
            if ok { ok = buffer.withUnsafeBytes { sendAll(UnsafeRawBufferPointer(rebasing: $0[from..<count])) } }
            if !ok { shutdown(source, Int32(SHUT_RDWR)); return }
            moved += Double(count)
            counting?.forwarded.add(UInt64(count), ordering: .relaxed)
            if bytesPerSecond > 0 {
                let due = moved / bytesPerSecond - Date().timeIntervalSince(start)
                if due > 0 { usleep(UInt32(min(due, 1) * 1e6)) }
            }
        }
        shutdown(destination, Int32(SHUT_WR))
    }
}
}
