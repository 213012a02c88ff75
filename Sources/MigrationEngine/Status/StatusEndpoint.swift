import Glibc
import Logging
import Synchronization
import URing

/// The agents' `--metrics tcp:HOST:PORT` endpoint: a small HTTP/1.1 server on one thread of its own, answering
///
///     GET /metrics   Prometheus' text format (MigrationMetrics)
///     GET /status    the migration now, in QEMU's query-migrate shape (QueryMigrate), as JSON
///
/// one request per connection (`Connection: close`), requests served one at a time: a scraper's load is a few
/// requests a second. A request must arrive whole within 2 s and in at most 8 KiB; anything else gets 400, 404 or
/// 405 and the connection is closed. It never touches the migration: it reads the status board's last snapshot.
public final class StatusEndpoint: Sendable {
    /// The listening socket; closed by the serving thread once stopped.
    private let listener: Int32
    private let board: StatusBoard
    private let logger: Logger
    private let stopped = Atomic<Bool>(false)
    /// The address it listens on (with the port the kernel chose for port 0).
    public let address: String

    public init(listen: SocketAddress, board: StatusBoard, logger: Logger) throws {
        do { listener = try Socket.listen(on: listen, backlog: 16).take() } catch {
            throw SetupError("cannot listen for --metrics on \(listen): \(error)")
        }
        self.board = board
        self.logger = logger
        address = (try? Socket.localAddress(of: listener)).map { "\($0)" } ?? "\(listen)"
    }

    /// `--metrics ADDRESS` of either agent: a status board for `role` ("source" or "destination") served at
    /// `address` (tcp:HOST:PORT, HOST:PORT or unix:PATH) from now on.
    public static func serve(_ address: String, role: String, logger: Logger) throws -> StatusBoard {
        let listen: SocketAddress
        do { listen = try SocketAddress(parsing: address) } catch { throw SetupError("--metrics \(address): \(error)") }
        let board = StatusBoard(role: role)
        try StatusEndpoint(listen: listen, board: board, logger: logger).start()
        return board
    }

    /// Starts serving on a thread of its own.
    public func start() throws {
        let failed = DetachedThread.spawn(name: "ferry-metrics") { [self] in serve() }
        if let failed { throw SetupError("cannot start the --metrics thread: \(failed)") }
        logger.info("metrics and status served", metadata: ["address": "\(address)", "paths": "/metrics /status"])
    }

    /// Stops accepting (the thread sees it within 200 ms).
    public func stop() { stopped.store(true, ordering: .relaxed) }

    private func serve() {
        let metrics = MigrationMetrics()
        var request = [UInt8](repeating: 0, count: 8192)
        while !stopped.load(ordering: .relaxed) {
            guard let connection = Socket.accept(from: listener, timeout: 0.2) else { continue }
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(connection.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(connection.rawValue, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let reply = answer(connection.rawValue, buffer: &request, metrics: metrics)
            reply.withUnsafeBytes { bytes in
                var sent = 0
                while sent < bytes.count {
                    let n = send(connection.rawValue, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
                    if n <= 0 { break }
                    sent += n
                }
            }
            shutdown(connection.rawValue, Int32(SHUT_WR))
        }
        close(listener)
    }

    /// Reads one request (up to the blank line) and builds the whole response.
    private func answer(_ fd: Int32, buffer: inout [UInt8], metrics: MigrationMetrics) -> [UInt8] {
        var length = 0
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline {
            if length == buffer.count { return Self.response(400, "text/plain", Array("request too long\n".utf8)) }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + length, $0.count - length, 0) }
            if n <= 0 { return Self.response(400, "text/plain", Array("incomplete request\n".utf8)) }
            length += n
            if Self.headerEnd(buffer, length) { break }
        }
        guard Self.headerEnd(buffer, length) else { return Self.response(400, "text/plain", Array("incomplete request\n".utf8)) }
        let line = buffer[0..<length].split(separator: UInt8(ascii: "\r"), maxSplits: 1).first ?? []
        let words = line.split(separator: UInt8(ascii: " "))
        guard words.count == 3, words[2].starts(with: Array("HTTP/1.".utf8)) else {
            return Self.response(400, "text/plain", Array("malformed request line\n".utf8))
        }
        guard words[0].elementsEqual("GET".utf8) || words[0].elementsEqual("HEAD".utf8) else {
            return Self.response(405, "text/plain", Array("only GET\n".utf8))
        }
        let head = words[0].elementsEqual("HEAD".utf8)
        var path = String(decoding: words[1], as: UTF8.self)
        if let query = path.firstIndex(of: "?") { path = String(path[..<query]) }
        let snapshot = board.snapshot()
        switch path {
        case "/metrics":
            let body = metrics.render(snapshot, faults: board.faultLatencyRecorders())
            return Self.response(200, "text/plain; version=0.0.4; charset=utf-8", body, head: head)
        case "/status":
            return Self.response(200, "application/json", QueryMigrate.json(snapshot), head: head)
        case "/":
            return Self.response(200, "text/plain", Array("ferry \(snapshot.report.role) agent: /metrics (Prometheus), /status (query-migrate)\n".utf8), head: head)
        default:
            return Self.response(404, "text/plain", Array("no such path: /metrics or /status\n".utf8), head: head)
        }
    }

    private static func headerEnd(_ buffer: [UInt8], _ length: Int) -> Bool {
        guard length >= 4 else { return false }
        for i in 0...(length - 4) where buffer[i] == 13 && buffer[i + 1] == 10 && buffer[i + 2] == 13 && buffer[i + 3] == 10 { return true }
        return false
    }

    private static func response(_ code: Int, _ type: String, _ body: [UInt8], head: Bool = false) -> [UInt8] {
        let reason = [200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"][code] ?? "Error"
        let header = "HTTP/1.1 \(code) \(reason)\r\nContent-Type: \(type)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
        return Array(header.utf8) + (head ? [] : body)
    }
}
