import Glibc
import ProcessMemory
import XCTest

/// DirtyTracker on a real KVM virtual machine (ferry-workload --kvm): the guest's vCPU writes guest pages 1..15 of
/// its RAM in a loop; scans of the VMM's guest-RAM mapping must report exactly those pages, with no help from it.
final class KVMGuestTests: XCTestCase {
    func testTrackerSeesExactlyTheGuestsWrites() throws {
        try requireEnvironment(access("/dev/kvm", R_OK | W_OK) == 0, "/dev/kvm is not accessible (errno \(errno))")
        let w = try WorkloadProcess(["--kvm", "--memory", "2M", "--report-interval", "0.2"])
        defer { w.stop() }
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var tracker = try DirtyTracker(pid: w.pid, regions: regions)
        var hash = try HashDirtyTracker(pid: w.pid, regions: regions)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 512, "first scan: the whole 2 MiB of guest RAM")
        try hash.scanDirty(into: &runs)
        let expected = Set((1...15).map { w.regionStart + UInt64($0) * 4096 })
        for round in 0..<4 {
            usleep(50_000)
            try tracker.scanDirty(into: &runs)
            XCTAssertEqual(Set(runs.pageAddresses()), expected, "kernel tracker, round \(round)")
            print("KVM guest: round \(round): \(runs.pageCount()) dirty pages in \(runs.count) run(s), scan \(tracker.lastScanMicroseconds) us")
            try hash.scanDirty(into: &runs)
            XCTAssertEqual(Set(runs.pageAddresses()), expected, "hash tracker, round \(round)")
        }
        try tracker.detach()
        // The guest kept running through the injection (KVM_RUN interrupted and retried) and its pages agree.
        let report = try w.waitFor("report", timeout: 5)
        XCTAssertGreaterThan((report["passes"] as? NSNumber)?.intValue ?? 0, 0)
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual(verified["ok"] as? Bool, true, "\(verified)")
    }
}
