import CFerryShims
import Foundation
import Glibc

/// A QMP failure: the monitor could not be reached, it answered with an error, or it went silent.
public struct QMPError: Error, CustomStringConvertible, Sendable {
    public let description: String
    /// The error class QEMU named (`GenericError`, `CommandNotFound`, ...), for a command's failure.
    public let errorClass: String?

    public init(_ description: String, errorClass: String? = nil) {
        self.description = description
        self.errorClass = errorClass
    }
}

/// A client of QEMU's machine protocol (QMP) over its Unix socket: the greeting and capability
/// negotiation, commands with their replies (events that arrive meanwhile are kept in ``events``),
/// and descriptors passed with a command (SCM_RIGHTS, for `getfd`). The peer's PID comes from the
/// socket itself (SO_PEERCRED), so the QEMU process is known for certain, not guessed.
///
/// Not on any hot path: replies are decoded with `JSONSerialization`. Use it from one thread.
///
/// ```swift
/// let qmp = try QMPClient(path: "/run/vm/qmp.sock")
/// _ = try qmp.execute("stop")
/// let status = try qmp.execute("query-status") as? [String: Any]
/// ```
public final class QMPClient: @unchecked Sendable {
    /// The socket's path, for messages.
    public let path: String
    /// The PID of the QEMU process at the other end (SO_PEERCRED).
    public let peerPID: Int32
    /// QEMU's version from the greeting, e.g. "7.2.22".
    public private(set) var version: String
    /// Events received while waiting for replies, oldest first (each the whole JSON object).
    public private(set) var events: [[String: Any]] = []
    private var fd: Int32
    private var buffer: [UInt8] = []
    private var nextID = 1

    /// Connects to the monitor at `path` (waiting up to `timeout` seconds for the socket to accept),
    /// reads the greeting and leaves capability negotiation mode (`qmp_capabilities`).
    public init(path: String, timeout: Double = 10) throws(QMPError) {
        self.path = path
        let deadline = Self.now() + timeout
        var connected: Int32 = -1
        var lastErrno: Int32 = 0
        while connected < 0 {
            connected = Self.connect(path, errno: &lastErrno)
            if connected >= 0 { break }
            guard Self.now() < deadline else {
                throw QMPError("cannot connect to QMP socket \(path): \(String(cString: strerror(lastErrno))) (waited \(timeout) s)")
            }
            usleep(20_000)
        }
        fd = connected
        let pid = ferry_peer_pid(connected)
        peerPID = pid > 0 ? pid : 0
        version = "?"
        do throws(QMPError) {
            let greeting = try Self.object(try readLine(deadline: Self.now() + timeout), what: "greeting")
            guard let qmp = greeting["QMP"] as? [String: Any] else {
                throw QMPError("\(path) is not a QMP monitor (greeting \(greeting))")
            }
            let v = (qmp["version"] as? [String: Any])?["qemu"] as? [String: Any]
            version = "\(v?["major"] ?? "?").\(v?["minor"] ?? "?").\(v?["micro"] ?? "?")"
            _ = try execute("qmp_capabilities", timeout: timeout)
        } catch {
            Glibc.close(connected)
            fd = -1
            throw error
        }
    }

    deinit { if fd >= 0 { Glibc.close(fd) } }

    /// Closes the connection (QEMU keeps running).
    public func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    /// Runs `command` with `arguments` and returns its `return` value (a dictionary, array, or
    /// empty dictionary). `passing` sends a descriptor along with the command (SCM_RIGHTS), as
    /// `getfd` and `add-fd` need. Throws the error QEMU answered, or after `timeout` seconds.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any] = [:], timeout: Double = 30,
                        passing descriptor: Int32? = nil) throws(QMPError) -> Any {
        guard fd >= 0 else { throw QMPError("QMP connection to \(path) is closed") }
        let id = nextID
        nextID += 1
        var message: [String: Any] = ["execute": command, "id": id]
        if !arguments.isEmpty { message["arguments"] = arguments }
        let data: Data
        do { data = try JSONSerialization.data(withJSONObject: message) } catch {
            throw QMPError("cannot encode QMP command \(command): \(error)")
        }
        var bytes = [UInt8](data)
        bytes.append(0x0a)
        try send(bytes, descriptor: descriptor, command: command)
        let deadline = Self.now() + timeout
        while true {
            let reply = try Self.object(try readLine(deadline: deadline), what: "reply to \(command)")
            if reply["event"] != nil { events.append(reply); continue }
            if let replyID = reply["id"] as? Int, replyID != id { continue }   // a late reply to an earlier, timed-out command
            if let error = reply["error"] as? [String: Any] {
                let errorClass = error["class"] as? String
                throw QMPError("QMP \(command) failed: \(error["desc"] as? String ?? "\(error)")", errorClass: errorClass)
            }
            return reply["return"] ?? [String: Any]()
        }
    }

    /// Waits up to `timeout` seconds for an event named `name` (one already received counts) and
    /// returns it, removing it from ``events``.
    public func waitForEvent(_ name: String, timeout: Double) throws(QMPError) -> [String: Any] {
        let deadline = Self.now() + timeout
        while true {
            if let index = events.firstIndex(where: { $0["event"] as? String == name }) {
                return events.remove(at: index)
            }
            let line = try readLine(deadline: deadline)
            let object = try Self.object(line, what: "event")
            if object["event"] != nil { events.append(object) }
        }
    }

    /// Polls `query-migrate` every `interval` seconds until QEMU's migration (outgoing or incoming)
    /// is `completed`; throws its `error-desc` if it `failed` or was `cancelled`, and after
    /// `timeout` seconds (then, with `cancelOnTimeout`, sends `migrate_cancel`).
    public func waitForMigration(timeout: Double, interval: Double = 0.001, cancelOnTimeout: Bool = false) throws(QMPError) {
        let deadline = Self.now() + timeout
        while true {
            let info = (try execute("query-migrate")) as? [String: Any] ?? [:]
            let status = info["status"] as? String ?? "none"
            if status == "completed" { return }
            if status == "failed" || status == "cancelled" {
                throw QMPError("migration \(status)\((info["error-desc"] as? String).map { ": \($0)" } ?? "")")
            }
            guard Self.now() < deadline else {
                if cancelOnTimeout { _ = try? execute("migrate_cancel") }
                throw QMPError("migration not completed within \(Int(timeout)) s (status \(status))")
            }
            usleep(UInt32(interval * 1e6))
        }
    }

    // MARK: - Bytes

    private func send(_ bytes: [UInt8], descriptor: Int32?, command: String) throws(QMPError) {
        var offset = 0
        if let descriptor {
            // The descriptor rides on the first byte(s) of the command, as QEMU expects.
            let n = bytes.withUnsafeBytes { ferry_send_with_fd(fd, $0.baseAddress, UInt64($0.count), descriptor) }
            guard n > 0 else { throw QMPError("sending \(command) with a descriptor to \(path) failed: \(String(cString: strerror(Int32(-n))))") }
            offset = Int(n)
        }
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw QMPError("sending \(command) to \(path) failed: \(String(cString: strerror(errno)))") }
            offset += n
        }
    }

    /// One line (a JSON object) from the monitor, waiting until `deadline` (monotonic seconds).
    private func readLine(deadline: Double) throws(QMPError) -> [UInt8] {
        while true {
            if let newline = buffer.firstIndex(of: 0x0a) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                if line.allSatisfy({ $0 == 0x20 || $0 == 0x0d }) { continue }
                return line
            }
            let left = deadline - Self.now()
            guard left > 0 else { throw QMPError("QMP \(path): no answer in time") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(left * 1000 + 1, 60_000)))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw QMPError("QMP \(path): QEMU closed the connection" + (n < 0 ? " (\(String(cString: strerror(errno))))" : "")) }
            buffer.append(contentsOf: chunk[..<n])
            guard buffer.count < 64 << 20 else { throw QMPError("QMP \(path): a reply over 64 MiB") }
        }
    }

    private static func object(_ line: [UInt8], what: String) throws(QMPError) -> [String: Any] {
        guard let object = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any] else {
            throw QMPError("QMP: malformed \(what): \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
        return object
    }

    private static func connect(_ path: String, errno code: inout Int32) -> Int32 {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { code = errno; return -1 }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { Glibc.close(s); code = ENAMETOOLONG; return -1 }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let r = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else { code = errno; Glibc.close(s); return -1 }
        return s
    }

    /// Monotonic seconds (the one clock for timeouts).
    static func now() -> Double { Double(ferry_monotonic_ns()) / 1e9 }
}
