import CoreMetrics
import Metrics
import Prometheus

/// The Prometheus view of a status board (`/metrics`): swift-metrics objects on swift-prometheus' factory, in a
/// registry of their own, brought up to date from the board's latest snapshot at each scrape, so the migration's
/// own paths never touch them. Names follow QEMU's `query-migrate` fields (`ferry_ram_transferred_bytes_total` is
/// ram.transferred); the destination's fault latency is a histogram, as QEMU 10.1's postcopy-latency-dist.
final class MigrationMetrics {
    let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory
    private var counters: [String: (counter: CoreMetrics.Counter, last: Int64)] = [:]
    private var gauges: [String: CoreMetrics.Gauge] = [:]
    private var histograms: [String: (timer: CoreMetrics.Timer, cursor: Int)] = [:]

    /// Fault-latency buckets, 10 µs to 1 s: a fault served from memory is tens of microseconds, one that waits
    /// for the source one round trip or more.
    static let faultBuckets: [Duration] = [.microseconds(10), .microseconds(25), .microseconds(50), .microseconds(100),
                                           .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
                                           .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
                                           .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1)]

    init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets["ferry_postcopy_fault_latency_seconds"] = Self.faultBuckets
        self.factory = factory
    }

    /// Brings every metric up to `snapshot`, then renders the registry in Prometheus' text format.
    func render(_ snapshot: StatusBoard.Snapshot, faults: [(kind: String, recorder: LatencyRecorder)]) -> [UInt8] {
        let r = snapshot.report
        for status in StatusBoard.Status.allCases where status != .none {
            gauge("ferry_migration_status", ["status": status.rawValue], snapshot.status == status ? 1 : 0)
        }
        let phaseName = snapshot.phase.hasPrefix("round") ? "round" : snapshot.phase.hasPrefix("failed") ? "failed" : snapshot.phase
        for phase in ["connecting", "handshake", "bulk", "round", "switchover", "post-copy", "complete", "failed"] {
            gauge("ferry_migration_phase", ["phase": phase], phaseName == phase ? 1 : 0)
        }
        gauge("ferry_migration_vm_at_destination", [:], r.vmLocation == "destination" ? 1 : 0)
        gauge("ferry_total_time_seconds", [:], r.totalTimeMs / 1000)
        gauge("ferry_setup_time_seconds", [:], r.setupTimeMs / 1000)
        gauge("ferry_downtime_seconds", [:], r.downtimeMs / 1000)
        gauge("ferry_expected_downtime_seconds", [:], r.expectedDowntimeMs / 1000)
        gauge("ferry_mbps", [:], r.mbps)
        count("ferry_wire_bytes_total", [:], r.wireBytes)
        count("ferry_reconnects_total", [:], UInt64(r.reconnects))
        if let m = r.memory {
            count("ferry_ram_transferred_bytes_total", [:], m.transferred)
            gauge("ferry_ram_remaining_bytes", [:], Double(m.remaining))
            gauge("ferry_ram_total_bytes", [:], Double(m.total))
            count("ferry_ram_duplicate_pages_total", [:], m.duplicate)
            count("ferry_ram_normal_pages_total", [:], m.normal)
            gauge("ferry_ram_dirty_pages_rate", [:], m.dirtyPagesRate)
            gauge("ferry_ram_dirty_sync_count", [:], Double(m.dirtySyncCount))
            count("ferry_ram_postcopy_requests_total", [:], m.postcopyRequests)
            count("ferry_ram_precopy_bytes_total", [:], m.precopyBytes)
            count("ferry_ram_downtime_bytes_total", [:], m.downtimeBytes)
            count("ferry_ram_postcopy_bytes_total", [:], m.postcopyBytes)
            count("ferry_ram_pages_pushed_total", [:], m.pagesPushed)
            if r.role == "destination" {
                count("ferry_ram_faults_total", ["kind": "missing"], m.faultsOnMissing)
                count("ferry_ram_faults_total", ["kind": "received"], m.faultsOnReceived)
            }
        }
        for d in r.disks {
            let disk = ["disk": "\(d.diskID)"]
            count("ferry_disk_transferred_bytes_total", disk, d.transferred)
            count("ferry_disk_duplicate_bytes_total", disk, d.duplicate)
            gauge("ferry_disk_total_bytes", disk, Double(d.total))
            if let remaining = d.remaining { gauge("ferry_disk_remaining_bytes", disk, Double(remaining)) }
            gauge("ferry_disk_dirty_rate_bytes", disk, d.dirtyRate)
            if let active = d.throttleActive { gauge("ferry_disk_throttle_active", disk, active ? 1 : 0) }
            gauge("ferry_disk_throttle_seconds", disk, d.throttleSeconds)
            count("ferry_disk_postcopy_requests_total", disk, d.postcopyRequests)
        }
        if let n = r.network {
            count("ferry_tunnel_frames_total", ["direction": "to_vm"], n.tunnel.framesToVM)
            count("ferry_tunnel_frames_total", ["direction": "from_vm"], n.tunnel.framesFromVM)
            count("ferry_tunnel_bytes_total", ["direction": "to_vm"], n.tunnel.bytesToVM)
            count("ferry_tunnel_bytes_total", ["direction": "from_vm"], n.tunnel.bytesFromVM)
            count("ferry_tunnel_dropped_frames_total", [:], n.tunnel.dropped)
        }
        for (kind, recorder) in faults { drain(recorder, kind: kind) }
        return registry.emitToBuffer()
    }

    /// Feeds the samples recorded since the last scrape into the histogram for `kind`.
    private func drain(_ recorder: LatencyRecorder, kind: String) {
        let key = "fault \(kind)"
        var entry = histograms[key] ?? (CoreMetrics.Timer(label: "ferry_postcopy_fault_latency_seconds", dimensions: [("kind", kind)],
                                                      factory: factory), 0)
        entry.cursor = recorder.forEach(from: entry.cursor) { entry.timer.recordNanoseconds($0) }
        histograms[key] = entry
    }

    private func key(_ name: String, _ dimensions: [String: String]) -> String {
        name + dimensions.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
    }

    private func gauge(_ name: String, _ dimensions: [String: String], _ value: Double) {
        let k = key(name, dimensions)
        let g = gauges[k] ?? CoreMetrics.Gauge(label: name, dimensions: dimensions.sorted { $0.key < $1.key }.map { ($0.key, $0.value) },
                                   factory: factory)
        gauges[k] = g
        g.record(value)
    }

    /// A counter that follows a cumulative value (a value that went down, e.g. after a restart, adds nothing).
    private func count(_ name: String, _ dimensions: [String: String], _ value: UInt64) {
        let k = key(name, dimensions)
        var entry = counters[k] ?? (CoreMetrics.Counter(label: name, dimensions: dimensions.sorted { $0.key < $1.key }.map { ($0.key, $0.value) },
                                            factory: factory), 0)
        let now = Int64(clamping: value)
        if now > entry.last { entry.counter.increment(by: now - entry.last); entry.last = now }
        counters[k] = entry
    }
}
