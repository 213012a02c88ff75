import FerryTestSupport
import Foundation
import ProcessMemory
import XCTest

/// The kernel dirty tracker (injected userfaultfd + WP_ASYNC + PAGEMAP_SCAN) and the content-hash fallback,
/// against a real ferry-workload that writes exactly the pages the test names.
final class DirtyTrackerTests: XCTestCase {
    func pageAddresses(_ pages: [Int], in w: WorkloadProcess) -> Set<UInt64> {
        Set(pages.map { w.regionStart + UInt64($0) * 4096 })
    }

    func attachKernelTracker(_ w: WorkloadProcess) throws -> DirtyTracker {
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var failure: ProcessMemoryError?
        do throws(ProcessMemoryError) {
            let tracker = try DirtyTracker(pid: w.pid, regions: regions)
            return tracker
        } catch {
            failure = error
        }
        let error = failure!
        if error.errno == .notSupported || error.errno == .invalidArgument || error.errno == .notPermitted {
            try require(kernelFeature: "userfaultfd WP_ASYNC + PAGEMAP_SCAN dirty tracking of another process",
                        available: false, detail: "\(error)")
        }
        throw error
    }

    func testKernelTrackerReportsExactlyTheWrittenPages() throws {
        let w = try WorkloadProcess(["--memory", "32M", "--fill-pages", "6000"])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        var tracker = try attachKernelTracker(w)
        XCTAssertEqual(tracker.method, "uffd-wp-async+pagemap-scan")
        print("DirtyTracker: granted features \(tracker.grantedFeatures)")
        var runs = PageRunBuffer(capacity: 16)

        // First scan: every page of the region (WP_UNPOPULATED: nothing was protected before it).
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), pages, "first scan returns every page of the region")
        XCTAssertEqual(runs.count, 1)
        print("DirtyTracker: first scan \(runs.pageCount()) pages in \(tracker.lastScanMicroseconds) us")

        // A quiet round: nothing.
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.count, 0)

        // Rounds of known writes, including never-touched pages and neighbours.
        var rng = SplitMix64(seed: 0xD1E7)
        let fixed = [0, 1, 2, 5999, 6000, 6001, pages - 1, 4242]
        for round in 0..<6 {
            let set = round == 0 ? fixed : (0..<(50 + round * 200)).map { _ in rng.below(pages) }
            try w.write(pages: set)
            try tracker.scanDirty(into: &runs)
            XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses(set, in: w), "round \(round)")
            XCTAssertEqual(runs.pageCount(), Set(set).count, "round \(round): no page twice")
            print("DirtyTracker: round \(round): \(Set(set).count) pages in \(runs.count) runs, scan \(tracker.lastScanMicroseconds) us")
        }
        try tracker.detach()

        // Re-attach at once: no EBUSY (the target's copy of the descriptor was closed), and it tracks again.
        var again = try attachKernelTracker(w)
        try again.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), pages, "after re-attach the first scan returns the whole region again")
        try w.write(pages: [10, 20, 30])
        try again.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses([10, 20, 30], in: w))
        try again.detach()

        // The workload kept running correctly throughout (every write verified the page first).
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0)
    }

    /// The pages ferry-workload dirties at its rate, in order: its xorshift generator (seeded from
    /// its pid, WorkloadLoop.swift) drawn once per page written. The test's oracle for which pages a
    /// rate-driven workload wrote.
    func workloadRatePages(pid: Int32, count: Int, totalPages: Int) -> [Int] {
        var rng = UInt64(pid) &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return Int(rng % UInt64(totalPages))
        }
    }

    /// Rate-driven dirtying: the union of the tracker's scans while the workload dirties at 8 MB/s
    /// (then stops) is exactly the set of pages the workload wrote, known from its generator and its
    /// own count of writes. No fixed sleeps: the test follows the workload's reports.
    func testTrackerWhileTheWorkloadDirtiesAtARate() throws {
        let w = try WorkloadProcess(["--memory", "64M", "--dirty-rate", "0", "--report-interval", "0.2"])
        defer { w.stop() }
        let totalPages = Int(w.regionSize / 4096)
        var tracker = try attachKernelTracker(w)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), totalPages)
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 0, "nothing dirties at rate 0")

        var seen = Set<UInt64>(), scans = 0
        try w.command("rate 8M", expect: "rate")
        var written = 0
        let deadline = monotonicSeconds() + 120
        while written < 2000 && monotonicSeconds() < deadline {
            let report = try w.waitFor("report", timeout: 60)
            written = try XCTUnwrap((report["pages_written"] as? NSNumber)?.intValue, "report without pages_written: \(report)")
            try tracker.scanDirty(into: &runs)
            scans += 1
            seen.formUnion(runs.pageAddresses())
        }
        XCTAssertGreaterThanOrEqual(written, 2000, "the workload wrote only \(written) pages in 120 s at 8 MB/s")
        // Once the workload has answered "rate", it writes nothing more (one thread: commands run between ticks).
        try w.command("rate 0", expect: "rate")
        try tracker.scanDirty(into: &runs)
        scans += 1
        seen.formUnion(runs.pageAddresses())
        try tracker.detach()
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0)
        let exit = try w.command("quit", expect: "exit")
        let total = try XCTUnwrap((exit["pages_written"] as? NSNumber)?.intValue, "exit line without pages_written: \(exit)")
        let expected = Set(workloadRatePages(pid: w.pid, count: total, totalPages: totalPages).map { w.regionStart + UInt64($0) * 4096 })
        print("DirtyTracker at a rate: \(total) page writes, \(expected.count) distinct pages, \(seen.count) reported over \(scans) scans")
        XCTAssertEqual(seen.subtracting(expected).count, 0, "pages reported that the workload never wrote")
        XCTAssertEqual(expected.subtracting(seen).count, 0, "pages the workload wrote that no scan reported")
    }

    /// The content-hash tracker compares with what was SENT: a page sent in a state it has left
    /// again by the next scan (changed, sent, changed back) is reported dirty, although its content
    /// at the two scans is the same. With scan-to-scan hashes it would be missed (an ABA).
    func testHashTrackerComparesWithWhatWasSent() throws {
        let w = try WorkloadProcess(["--memory", "4M", "--fill-pages", "64"])
        defer { w.stop() }
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var hash = try HashDirtyTracker(pid: w.pid, regions: regions)
        var runs = PageRunBuffer(capacity: 16)
        try hash.scanDirty(into: &runs)                     // arms: every page
        try hash.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 0, "nothing written between two scans")
        // The sender sent page 5 while it held other bytes (a transient state); it is back now.
        let address = w.regionStart + 5 * 4096
        let transient = [UInt8](repeating: 0x5A, count: 4096)
        transient.withUnsafeBytes { hash.sentHashes.record(address: address, contents: $0) }
        // Page 9 was sent as a zero page while it holds data.
        hash.sentHashes.recordZero(address: w.regionStart + 9 * 4096)
        try hash.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), [address, w.regionStart + 9 * 4096],
                       "pages whose sent bytes differ from their content must be sent again")
        try hash.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 0, "once the scan has taken the content, nothing is dirty")
        try hash.detach()
    }

    /// The content-hash tracker alone (the fallback: it must work exactly where the kernel tracker
    /// does not, so nothing here needs the kernel tracker): each round reports exactly the pages written.
    func testHashTrackerReportsExactlyTheWrittenPages() throws {
        let w = try WorkloadProcess(["--memory", "16M", "--fill-pages", "3000"])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var hash = try HashDirtyTracker(pid: w.pid, regions: regions)
        XCTAssertEqual(hash.method, "content-hash")
        var runs = PageRunBuffer(capacity: 16)
        try hash.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), pages, "hash first scan: every page, as the kernel tracker's")
        try hash.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), 0, "a quiet round")
        var generator = SplitMix64(seed: 0x4A54)
        for round in 0..<5 {
            // Written pages include never-touched ones (3000 and up): those change from zero to data.
            let set = round == 0 ? [0, 1, 2999, 3000, pages - 1] : (0..<(20 + round * 100)).map { _ in generator.below(pages) }
            try w.write(pages: set)
            try hash.scanDirty(into: &runs)
            XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses(set, in: w), "hash, round \(round)")
        }
        try hash.detach()
    }

    /// Where both methods work, they report the same pages.
    func testHashAndKernelTrackersAgree() throws {
        let w = try WorkloadProcess(["--memory", "16M", "--fill-pages", "3000"])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var kernel = try attachKernelTracker(w)
        var hash = try HashDirtyTracker(pid: w.pid, regions: regions)
        var a = PageRunBuffer(capacity: 16), b = PageRunBuffer(capacity: 16)
        try kernel.scanDirty(into: &a)
        try hash.scanDirty(into: &b)
        XCTAssertEqual(a.pageCount(), pages)
        XCTAssertEqual(b.pageCount(), pages)
        var generator = SplitMix64(seed: 0xA9EE)
        for round in 0..<5 {
            let set = (0..<(20 + round * 100)).map { _ in generator.below(pages) }
            try w.write(pages: set)
            try kernel.scanDirty(into: &a)
            try hash.scanDirty(into: &b)
            XCTAssertEqual(Set(a.pageAddresses()), pageAddresses(set, in: w), "kernel, round \(round)")
            XCTAssertEqual(Set(a.pageAddresses()), Set(b.pageAddresses()), "kernel vs hash, round \(round)")
        }
        try kernel.detach()
        try hash.detach()
    }

    /// The combined attach picks the kernel method where it works, and says so.
    func testAttachPicksTheKernelMethodWhenAvailable() throws {
        let w = try WorkloadProcess(["--memory", "16M", "--fill-pages", "100"])
        defer { w.stop() }
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        try attachKernelTracker(w).detach()   // skips where the kernel method is unavailable
        var reason: ProcessMemoryError?
        var any = try AnyDirtyPageTracker.attach(pid: w.pid, regions: regions, fallbackReason: &reason)
        XCTAssertNil(reason)
        XCTAssertEqual(any.method, "uffd-wp-async+pagemap-scan")
        var runs = PageRunBuffer(capacity: 16)
        try any.scanDirty(into: &runs)
        try w.write(pages: [1, 2])
        try any.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses([1, 2], in: w))
        try any.detach()
    }

    /// The combined attach falls back to content hashing when the kernel method is refused (here:
    /// the target already has a tracer, so the injection's PTRACE_SEIZE fails with EPERM), reports
    /// why, and the fallback then tracks exactly. Runs on every kernel: this is the path taken where
    /// kernel tracking is missing.
    func testAttachFallsBackToHashingWhenKernelTrackingIsRefused() throws {
        try require(root: "ptrace of another process")
        let w = try WorkloadProcess(["--memory", "16M", "--fill-pages", "100"])
        defer { w.stop() }
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var reason: ProcessMemoryError?
        var any: AnyDirtyPageTracker
        do {
            // Another tracer holds the target for the length of the attach (if the attach throws,
            // the session's deinit lets the target go).
            let holder = try RemoteSyscallSession(pid: w.pid)
            any = try AnyDirtyPageTracker.attach(pid: w.pid, regions: regions, fallbackReason: &reason)
            try holder.finish()
        }
        let why = try XCTUnwrap(reason, "the attach did not report why it fell back")
        XCTAssertTrue(why.message.contains("PTRACE_SEIZE"), "fallback reason: \(why)")
        XCTAssertEqual(any.method, "content-hash")
        var runs = PageRunBuffer(capacity: 16)
        try any.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), Int(w.regionSize / 4096), "first scan: every page")
        try w.write(pages: [3, 50, 100, 2000])
        try any.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses([3, 50, 100, 2000], in: w))
        try any.detach()
    }

    /// The dirty limit (`throttleWrites`, a synchronous write-protect userfaultfd): moving the regions to it
    /// loses no page written before (they come in the next scan), scans stay exact, a page not yet written
    /// since the last scan waits for the limit's pace while a page already written does not, a lifted limit
    /// lets writes through at once, and the workload's memory stays intact.
    func testDirtyLimitHoldsNewDirtyingOnlyAndTracksExactly() throws {
        let w = try WorkloadProcess(["--memory", "32M"])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        var tracker = try attachKernelTracker(w)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        try w.write(pages: [1, 2, 3])
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses([1, 2, 3], in: w))

        // Written before the limit: carried into the first scan after it.
        try w.write(pages: [10, 11, 500])
        try tracker.throttleWrites(bytesPerSecond: 1000 * 4096)   // 1,000 new dirty pages per second
        XCTAssertNotNil(tracker.dirtyLimit)
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses([10, 11, 500], in: w), "pages written before the move")

        // 300 distinct pages not written since the scan: at 1,000/s they take about 0.3 s (less a 5 ms burst).
        var rng = SplitMix64(seed: 0xD17)
        var fresh: [Int] = []
        var chosen = Set<Int>()
        while fresh.count < 300 { let p = rng.below(pages); if chosen.insert(p).inserted { fresh.append(p) } }
        var t0 = monotonicSeconds()
        try w.write(pages: fresh)
        let held = monotonicSeconds() - t0
        XCTAssertGreaterThan(held, 0.25, "300 new dirty pages at 1,000/s went through in \(held) s")
        // The same pages again: already written since the scan, not held.
        t0 = monotonicSeconds()
        try w.write(pages: fresh)
        let again = monotonicSeconds() - t0
        XCTAssertLessThan(again, held / 4, "rewrites of pages already dirty were held: \(again) s against \(held) s")
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses(fresh, in: w), "exactly the pages written")
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.count, 0, "a quiet round")
        let faults = try XCTUnwrap(tracker.dirtyLimit).faults
        XCTAssertGreaterThanOrEqual(faults, 300, "each new dirty page faulted once")
        print("dirty limit: 300 new dirty pages at 1,000/s in \(held) s, rewritten in \(again) s; \(faults) faults, held \(Double(tracker.dirtyLimit!.heldFor) / 1e6) ms")

        // Lifted: writes go through at once (a fault each, answered without waiting), still tracked exactly.
        try tracker.throttleWrites(bytesPerSecond: 0)
        let many = (0..<2000).map { ($0 * 7) % pages }
        t0 = monotonicSeconds()
        try w.write(pages: many)
        let lifted = monotonicSeconds() - t0
        XCTAssertLessThan(lifted, 1.0, "2,000 pages with the limit lifted took \(lifted) s")
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(Set(runs.pageAddresses()), pageAddresses(many, in: w))
        try tracker.detach()

        // After detach the pages are writable without faults, and every page verifies.
        try w.write(pages: fresh)
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0)
    }

    /// Detach while a writer waits on the limit: the writer is let go at once, even while something still holds
    /// the limit (and so its userfaultfd) open. Unregistering a write-protect range wakes nobody: the tracker
    /// must wake the waiters itself.
    func testDetachLetsAWaitingWriterGo() throws {
        let w = try WorkloadProcess(["--memory", "8M"])
        defer { w.stop() }
        var tracker = try attachKernelTracker(w)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        try tracker.throttleWrites(bytesPerSecond: 10 * 4096)   // 10 new dirty pages per second
        let held = try XCTUnwrap(tracker.dirtyLimit)
        try tracker.scanDirty(into: &runs)
        w.send("write " + (100..<200).map(String.init).joined(separator: " "))   // 100 new pages: 10 s at this pace
        usleep(300_000)
        let t0 = monotonicSeconds()
        try tracker.detach()
        let written = try w.waitFor("written", timeout: 5)
        XCTAssertEqual((written["count"] as? NSNumber)?.intValue, 100)
        XCTAssertLessThan(monotonicSeconds() - t0, 2, "the writer waited on after detach")
        XCTAssertGreaterThan(held.faults, 0)
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0)
    }

    /// Under the dirty limit, a rate-driven writer (8 MB/s held to 2 MB/s of new dirty pages) races the scans:
    /// the union of every scan is exactly the set of pages it wrote (its generator is the oracle).
    func testDirtyLimitUnderARateDrivenWriterLosesNoPage() throws {
        let w = try WorkloadProcess(["--memory", "64M", "--dirty-rate", "0", "--report-interval", "0.2"])
        defer { w.stop() }
        let totalPages = Int(w.regionSize / 4096)
        var tracker = try attachKernelTracker(w)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        var seen = Set<UInt64>()
        try w.command("rate 8M", expect: "rate")
        _ = try w.waitFor("report", timeout: 30)
        try tracker.scanDirty(into: &runs)
        seen.formUnion(runs.pageAddresses())
        try tracker.throttleWrites(bytesPerSecond: 2 << 20)
        var written = 0
        let deadline = monotonicSeconds() + 60
        while written < 1500 && monotonicSeconds() < deadline {
            let report = try w.waitFor("report", timeout: 30)
            written = try XCTUnwrap((report["pages_written"] as? NSNumber)?.intValue)
            try tracker.scanDirty(into: &runs)
            seen.formUnion(runs.pageAddresses())
        }
        try w.command("rate 0", expect: "rate")
        try tracker.scanDirty(into: &runs)
        seen.formUnion(runs.pageAddresses())
        let faults = try XCTUnwrap(tracker.dirtyLimit).faults
        try tracker.detach()
        let exit = try w.command("quit", expect: "exit")
        XCTAssertEqual((exit["corrupt"] as? NSNumber)?.intValue, 0)
        let total = try XCTUnwrap((exit["pages_written"] as? NSNumber)?.intValue)
        let expected = Set(workloadRatePages(pid: w.pid, count: total, totalPages: totalPages).map { w.regionStart + UInt64($0) * 4096 })
        print("dirty limit at a rate: \(total) page writes, \(expected.count) distinct, \(seen.count) reported, \(faults) faults")
        XCTAssertGreaterThan(faults, 0)
        XCTAssertEqual(seen.subtracting(expected).count, 0, "pages reported that the workload never wrote")
        XCTAssertEqual(expected.subtracting(seen).count, 0, "pages the workload wrote that no scan reported")
    }
}

/// Shared memory (a memfd mapped MAP_SHARED, as QEMU's memory-backend-file/memfd): chosen by default, tracked with
/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM.
final class SharedMemoryTrackerTests: XCTestCase {
    func testMemfdRegionIsChosenAndTrackedExactly() throws {
        let w = try WorkloadProcess(["--memory", "8M", "--memfd", "--fill-pages", "100"])
        defer { w.stop() }
        let all = try ProcessRegions(pid: w.pid)
        let chosen = all.guestMemory().first { $0.range == w.region }
        XCTAssertEqual(chosen?.kind, .shmem, "memfd mapping chosen as guest memory: \(all.guestMemory())")
        XCTAssertTrue(chosen?.path.hasPrefix("/memfd:ferry-guest") ?? false)
        let regions = try all.select(ranges: [w.region])
        var tracker = try DirtyTracker(pid: w.pid, regions: regions)
        XCTAssertTrue(tracker.grantedFeatures.contains(.wpHugetlbfsShmem))
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        var rng = SplitMix64(seed: 0x5E3)
        for round in 0..<3 {
            let set = (0..<(30 + round * 50)).map { _ in rng.below(2048) }
            try w.write(pages: set)
            try tracker.scanDirty(into: &runs)
            XCTAssertEqual(Set(runs.pageAddresses()), Set(set.map { w.regionStart + UInt64($0) * 4096 }), "shmem round \(round)")
        }
        try tracker.detach()
    }

}
