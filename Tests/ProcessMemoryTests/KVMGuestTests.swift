import FerryTestSupport
import Glibc
import ProcessMemory
import XCTest

/// DirtyTracker on a real KVM virtual machine (ferry-workload --kvm): the guest's vCPU writes guest pages 1..15 of
/// its RAM in a loop; scans of the VMM's guest-RAM mapping must report exactly those pages, with no help from it.
final class KVMGuestTests: XCTestCase {
    /// Scans with `scan` until the pages reported, together, are `expected`; fails at once on a page
    /// outside `expected`. No fixed wait: the guest may be slow to get a CPU on a loaded machine,
    /// so the test waits for its writes (up to 60 s), and every scan must be a subset of them.
    private func scanUntilComplete(_ name: String, round: Int, expected: Set<UInt64>, runs: inout PageRunBuffer,
                                   scan: (inout PageRunBuffer) throws -> Void) throws {
        var seen = Set<UInt64>()
        var scans = 0
        let deadline = monotonicSeconds() + 60
        while seen != expected && monotonicSeconds() < deadline {
            usleep(5_000) // between scans, so the guest runs
            try scan(&runs)
            scans += 1
            let pages = Set(runs.pageAddresses())
            let extra = pages.subtracting(expected)
            XCTAssertTrue(extra.isEmpty, "\(name), round \(round): pages the guest never writes: \(extra.sorted().map { String($0, radix: 16) })")
            if !extra.isEmpty { return }
            seen.formUnion(pages)
        }
        XCTAssertEqual(seen, expected, "\(name), round \(round): after \(scans) scans over 60 s, missing \(expected.subtracting(seen).count) pages")
        print("KVM guest: \(name) round \(round): all \(expected.count) pages in \(scans) scan(s)")
    }

    func testTrackerSeesExactlyTheGuestsWrites() throws {
        try require(device: "/dev/kvm")
        let w = try WorkloadProcess(["--kvm", "--memory", "2M", "--report-interval", "0.2"])
        defer { w.stop() }
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var tracker = try DirtyTracker(pid: w.pid, regions: regions)
        var hash = try HashDirtyTracker(pid: w.pid, regions: regions)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 512, "first scan: the whole 2 MiB of guest RAM")
        try hash.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 512, "hash first scan: the whole 2 MiB of guest RAM")
        let expected = Set((1...15).map { w.regionStart + UInt64($0) * 4096 })
        for round in 0..<4 {
            try scanUntilComplete("kernel tracker", round: round, expected: expected, runs: &runs) { try tracker.scanDirty(into: &$0) }
            try scanUntilComplete("hash tracker", round: round, expected: expected, runs: &runs) { try hash.scanDirty(into: &$0) }
        }
        try tracker.detach()
        // The guest kept running through the injection (KVM_RUN interrupted and retried) and its pages agree.
        let report = try w.waitFor("report", timeout: 60)
        XCTAssertGreaterThan(try XCTUnwrap((report["passes"] as? NSNumber)?.intValue, "report without passes: \(report)"), 0)
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual(verified["ok"] as? Bool, true, "\(verified)")
    }
}
