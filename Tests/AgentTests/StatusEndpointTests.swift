import FerryTestSupport
import Foundation
import Glibc
import XCTest
import MigrationEngine

/// `--metrics`: both agents serve Prometheus metrics and a query-migrate-shaped status while a whole VM
/// (ferry-workload with its disk) migrates over a slow link. Scraped every 100 ms: the byte counters rise, the
/// phase moves on, /status answers in QEMU's shape, the destination's fault latency is a histogram; bad requests
/// get a clear HTTP error and a silent client does not stop the scrapes.
final class StatusEndpointTests: XCTestCase {
    /// One HTTP request over a new connection; (status code, body). nil when nothing answers.
    static func http(port: UInt16, _ request: String) -> (code: Int, body: String)? {
        guard let fd = connectToLoopback(port: port) else { return nil }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        let text = String(decoding: bytes, as: UTF8.self)
        guard text.hasPrefix("HTTP/1.1 "), let code = Int(text.dropFirst(9).prefix(3)),
              let split = text.range(of: "\r\n\r\n") else { return nil }
        return (code, String(text[split.upperBound...]))
    }

    static func get(port: UInt16, _ path: String) -> (code: Int, body: String)? {
        http(port: port, "GET \(path) HTTP/1.1\r\nHost: localhost\r\n\r\n")
    }

    /// The value of a sample line `name{labels} value` in Prometheus text (labels exactly as written, "" for none).
    static func sample(_ text: String, _ name: String, _ labels: String = "") -> Double? {
        let prefix = labels.isEmpty ? name + " " : "\(name){\(labels)} "
        for line in text.split(separator: "\n") where line.hasPrefix(prefix) {
            return Double(line.dropFirst(prefix.count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    struct Scrapes {
        var transferred: [Double] = []
        var phases: [String] = []
        var statuses: [String] = []
        var statusReplies = 0
        var ramTotal: UInt64 = 0
    }

    /// Scrapes /metrics and /status of `port` every 100 ms while `running` holds (at most `seconds`).
    static func scrape(port: UInt16, seconds: Double, while running: () -> Bool) -> Scrapes {
        var s = Scrapes()
        let deadline = monotonicSeconds() + seconds
        while monotonicSeconds() < deadline && running() {
            if let m = get(port: port, "/metrics"), m.code == 200 {
                if let t = sample(m.body, "ferry_ram_transferred_bytes_total"), t != s.transferred.last { s.transferred.append(t) }
                for phase in ["connecting", "handshake", "bulk", "round", "switchover", "post-copy", "complete", "failed"]
                where sample(m.body, "ferry_migration_phase", "phase=\"\(phase)\"") == 1 && s.phases.last != phase {
                    s.phases.append(phase)
                }
            }
            if let st = get(port: port, "/status"), st.code == 200,
               let object = try? JSONSerialization.jsonObject(with: Data(st.body.utf8)) as? [String: Any],
               let status = object["status"] as? String {
                s.statusReplies += 1
                if s.statuses.last != status { s.statuses.append(status) }
                if let ram = object["ram"] as? [String: Any], let total = (ram["total"] as? NSNumber)?.uint64Value { s.ramTotal = total }
            }
            usleep(100_000)
        }
        return s
    }

    func testPrecopyScrapesShowBytesRisingAndThePhaseMovingOn() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64, linkBytesPerSecond: 12e6)
        let (sourcePort, destPort) = (try freePort(), try freePort())
        try rig.startDest(["--metrics", "tcp:127.0.0.1:\(destPort)"])
        XCTAssertTrue(waitUntil(timeout: 30) { Self.get(port: destPort, "/status")?.code == 200 }, "dest-agent's /status never answered: \(rig.destLog)")
        XCTAssertEqual(Self.get(port: destPort, "/status").flatMap { try? JSONSerialization.jsonObject(with: Data($0.body.utf8)) as? [String: Any] }?["role"] as? String, "destination")

        // A silent client holds a connection open; the scrapes go on past it.
        let silent = connectToLoopback(port: destPort)
        defer { if let silent { close(silent) } }
        try rig.startSourceAndWorkload(mode: "precopy", ["--metrics", "tcp:127.0.0.1:\(sourcePort)"])
        var sourceDone = false
        let source = Self.scrape(port: sourcePort, seconds: 240) {
            if rig.source?.wait(timeout: 0) != nil { sourceDone = true }
            return !sourceDone
        }
        XCTAssertEqual(rig.waitForSource(timeout: 120), 0, rig.logs)
        let report = rig.waitForReport("source.json")
        XCTAssertEqual(report["status"] as? String, "completed", "\(report)")

        // Bytes rose, scrape after scrape, and the phase went from the bulk copy through rounds to switchover.
        XCTAssertGreaterThanOrEqual(source.transferred.count, 5, "ram transferred seen: \(source.transferred)")
        XCTAssertEqual(source.transferred, source.transferred.sorted(), "a counter went down: \(source.transferred)")
        XCTAssertTrue(source.phases.contains("bulk") && source.phases.contains("round"), "phases seen: \(source.phases)")
        XCTAssertEqual(source.phases.firstIndex(of: "bulk").map { $0 < (source.phases.firstIndex(of: "round") ?? -1) }, true, "\(source.phases)")
        XCTAssertTrue(source.statuses.contains("active"), "statuses seen: \(source.statuses)")
        XCTAssertGreaterThan(source.statusReplies, 5)
        XCTAssertEqual(source.ramTotal, 64 << 20)

        // The destination: it says the migration completed and the VM runs there; its faults are a histogram.
        rig.verifyResumed()
        let status = Self.get(port: destPort, "/status").flatMap { try? JSONSerialization.jsonObject(with: Data($0.body.utf8)) as? [String: Any] }
        XCTAssertEqual(status?["status"] as? String, "completed", "\(String(describing: status))")
        XCTAssertEqual(status?["vm-location"] as? String, "destination")
        XCTAssertEqual(((status?["ram"] as? [String: Any])?["transferred"] as? NSNumber)?.uint64Value,
                       ((report["memory"] as? [String: Any])?["transferred"] as? NSNumber)?.uint64Value, "dest's ram.transferred vs the source's report")
        let metrics = Self.get(port: destPort, "/metrics")?.body ?? ""
        XCTAssertEqual(Self.sample(metrics, "ferry_migration_status", "status=\"completed\""), 1, metrics)
        let faults = Self.sample(metrics, "ferry_postcopy_fault_latency_seconds_count", "kind=\"received\"") ?? 0
        // The resumed workload's first touches fault until the destination has installed every page.
        XCTAssertGreaterThan(faults, 0, "no fault of the resumed workload in the histogram:\n\(metrics)")
        XCTAssertEqual(faults, Self.sample(metrics, "ferry_postcopy_fault_latency_seconds_bucket", "kind=\"received\",le=\"+Inf\""), metrics)
        XCTAssertNotNil(Self.sample(metrics, "ferry_postcopy_fault_latency_seconds_bucket", "kind=\"received\",le=\"0.001\""), metrics)

        // Bad requests: a clear HTTP error each, and the endpoint serves on.
        XCTAssertEqual(Self.http(port: destPort, "POST /metrics HTTP/1.1\r\n\r\n")?.code, 405)
        XCTAssertEqual(Self.get(port: destPort, "/nothing")?.code, 404)
        XCTAssertEqual(Self.http(port: destPort, "\u{1}\u{2}garbage\r\n\r\n")?.code, 400)
        XCTAssertEqual(Self.http(port: destPort, "GET /metrics HTTP/1.1\r\n" + String(repeating: "X-Pad: 0123456789\r\n", count: 600))?.code, 400)
        XCTAssertEqual(Self.get(port: destPort, "/metrics")?.code, 200)
    }

    func testPostcopyStatusMovesThroughPostcopyActiveAndFaultsOnMissingPagesAreCounted() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64, linkBytesPerSecond: 8e6)
        let destPort = try freePort()
        try rig.startDest(["--metrics", "tcp:127.0.0.1:\(destPort)"])
        try rig.startSourceAndWorkload(mode: "postcopy")
        var done = false
        let dest = Self.scrape(port: destPort, seconds: 240) {
            if rig.source?.wait(timeout: 0) != nil { done = true }
            return !done
        }
        XCTAssertEqual(rig.waitForSource(timeout: 120), 0, rig.logs)
        XCTAssertTrue(dest.statuses.contains("postcopy-active"), "statuses seen at the destination: \(dest.statuses)")
        XCTAssertEqual(dest.transferred, dest.transferred.sorted(), "\(dest.transferred)")
        XCTAssertGreaterThanOrEqual(dest.transferred.count, 3, "\(dest.transferred)")
        let metrics = Self.get(port: destPort, "/metrics")?.body ?? ""
        XCTAssertGreaterThan(Self.sample(metrics, "ferry_ram_faults_total", "kind=\"missing\"") ?? 0, 0, metrics)
        XCTAssertGreaterThan(Self.sample(metrics, "ferry_postcopy_fault_latency_seconds_count", "kind=\"missing\"") ?? 0, 0, metrics)
        rig.verifyResumed()
    }
}

/// The terminal's progress line, as `virsh migrate --verbose` draws it.
final class ProgressLineTests: XCTestCase {
    func testTheLineShowsPhaseRoundPercentRatesThrottleAndETA() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        defer { close(fds[0]) }
        var line = ProgressLine(enabled: true, fd: fds[1])
        line.update(phase: .round(3), sentBytes: 96 << 20, totalBytes: 128 << 20, dirtyRate: 4e6, bandwidth: 25e6,
                    throttled: true, remainingBytes: 50_000_000, parts: "disk 1 100%, memory 50%", force: true)
        line.finish()
        close(fds[1])
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = read(fds[0], &buffer, buffer.count)
        let text = String(decoding: buffer[0..<max(0, n)], as: UTF8.self)
        for part in ["round 3", " 75%", "96.0 MiB sent of 128.0 MiB", "(disk 1 100%, memory 50%)", "25.0 MB/s", "dirty 4.0 MB/s",
                     "throttle ON", "ETA 2.0 s"] {
            XCTAssertTrue(text.contains(part), "'\(part)' missing from \(text.debugDescription)")
        }
        XCTAssertTrue(text.hasPrefix("\r\u{1B}[K") && text.hasSuffix("\n"), text.debugDescription)
    }
}
