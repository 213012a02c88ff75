import Foundation

/// A status board's snapshot in the shape of QEMU's `query-migrate` reply (`/status`), so that a tool or an
/// operator that reads QEMU's reads Ferry's: `status`, `total-time`, `setup-time`, `downtime`,
/// `expected-downtime` (ms), `ram` {transferred, remaining, total, duplicate, normal, normal-bytes, mbps,
/// dirty-sync-count, dirty-pages-rate, postcopy-requests, page-size, precopy-bytes, downtime-bytes,
/// postcopy-bytes}, and `disk` {transferred, remaining, total} as QEMU's old block migration had it. Ferry adds
/// `phase`, `role`, `vm-location`, `wire-bytes`, per-disk detail (`disks`), fault counts (`faults`), the write
/// throttle and the tunnel.
enum QueryMigrate {
    static func json(_ snapshot: StatusBoard.Snapshot) -> [UInt8] {
        let r = snapshot.report
        var reply: [String: Any] = [
            "status": snapshot.status.rawValue,
            "phase": snapshot.phase,
            "role": r.role,
            "vm-location": r.vmLocation,
            "total-time": Int(r.totalTimeMs),
            "setup-time": Int(r.setupTimeMs),
            "wire-bytes": r.wireBytes,
            "reconnects": r.reconnects,
        ]
        if r.downtimeMs > 0 { reply["downtime"] = Int(r.downtimeMs) }
        if r.expectedDowntimeMs > 0 { reply["expected-downtime"] = Int(r.expectedDowntimeMs) }
        if !r.reason.isEmpty && (snapshot.status == .completed || snapshot.status == .failed) { reply["error-desc"] = r.reason }
        if let m = r.memory {
            reply["ram"] = [
                "transferred": m.transferred, "remaining": m.remaining, "total": m.total,
                "duplicate": m.duplicate, "normal": m.normal, "normal-bytes": m.normal * UInt64(m.pageSize),
                "mbps": r.mbps, "dirty-sync-count": m.dirtySyncCount, "dirty-pages-rate": Int(m.dirtyPagesRate),
                "postcopy-requests": m.postcopyRequests, "page-size": m.pageSize,
                "precopy-bytes": m.precopyBytes, "downtime-bytes": m.downtimeBytes, "postcopy-bytes": m.postcopyBytes,
                "pages-pushed": m.pagesPushed, "mode": m.mode,
            ] as [String: Any]
            if r.role == "destination" {
                reply["faults"] = ["on-missing": m.faultsOnMissing, "on-received": m.faultsOnReceived]
            }
        }
        if !r.disks.isEmpty {
            let transferred = r.disks.reduce(UInt64(0)) { $0 + $1.transferred }
            let total = r.disks.reduce(UInt64(0)) { $0 + $1.total }
            var disk: [String: Any] = ["transferred": transferred, "total": total,
                                       "dirty-rate": Int(r.disks.reduce(0) { $0 + $1.dirtyRate }),
                                       "throttle-active": snapshot.throttled,
                                       "throttle-seconds": r.disks.reduce(0) { $0 + $1.throttleSeconds }]
            if r.disks.contains(where: { $0.remaining != nil }) {
                disk["remaining"] = r.disks.reduce(UInt64(0)) { $0 + ($1.remaining ?? 0) }
            }
            reply["disk"] = disk
            reply["disks"] = r.disks.map { d -> [String: Any] in
                var one: [String: Any] = ["id": d.diskID, "transferred": d.transferred, "total": d.total,
                                          "duplicate": d.duplicate, "rounds": d.rounds, "postcopy-requests": d.postcopyRequests]
                if let remaining = d.remaining { one["remaining"] = remaining }
                if let active = d.throttleActive { one["throttle-active"] = active }
                return one
            }
        }
        if let n = r.network {
            reply["tunnel"] = ["frames-to-vm": n.tunnel.framesToVM, "bytes-to-vm": n.tunnel.bytesToVM,
                               "frames-from-vm": n.tunnel.framesFromVM, "bytes-from-vm": n.tunnel.bytesFromVM,
                               "dropped": n.tunnel.dropped]
        }
        let data = (try? JSONSerialization.data(withJSONObject: reply, options: [.sortedKeys])) ?? Data("{}".utf8)
        return [UInt8](data) + [UInt8(ascii: "\n")]
    }
}
