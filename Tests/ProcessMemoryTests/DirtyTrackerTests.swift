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
            try requireEnvironment(false, "kernel dirty tracking unavailable here: \(error)")
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
        var rng = SystemRandomNumberGenerator()
        let fixed = [0, 1, 2, 5999, 6000, 6001, pages - 1, 4242]
        for round in 0..<6 {
            let set = round == 0 ? fixed : (0..<(50 + round * 200)).map { _ in Int.random(in: 0..<pages, using: &rng) }
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

    func testTrackerWhileTheWorkloadDirtiesAtARate() throws {
        // Rate-driven dirtying: the tracker must see a count consistent with the workload's own count.
        let w = try WorkloadProcess(["--memory", "64M", "--dirty-rate", "8M", "--report-interval", "0.2"])
        defer { w.stop() }
        var tracker = try attachKernelTracker(w)
        var runs = PageRunBuffer(capacity: 16)
        try tracker.scanDirty(into: &runs)
        XCTAssertEqual(runs.pageCount(), Int(w.regionSize / 4096))
        var total = 0
        for _ in 0..<5 {
            usleep(200_000)
            try tracker.scanDirty(into: &runs)
            total += runs.pageCount()
        }
        // 8 MiB/s for ~1 s = ~2048 page writes over 16384 pages: most distinct; expect a clear signal.
        XCTAssertGreaterThan(total, 500)
        XCTAssertLessThan(total, 6000)
        try tracker.detach()
        let verified = try w.command("verify", expect: "verified")
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0)
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

    func testHashFallbackFindsTheSameDirtyPages() throws {
        let w = try WorkloadProcess(["--memory", "16M", "--fill-pages", "3000"])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        let regions = try ProcessRegions(pid: w.pid).select(ranges: [w.region])
        var kernel = try attachKernelTracker(w)
        var hash = try HashDirtyTracker(pid: w.pid, regions: regions)
        XCTAssertEqual(hash.method, "content-hash")
        var a = PageRunBuffer(capacity: 16), b = PageRunBuffer(capacity: 16)
        try kernel.scanDirty(into: &a)
        try hash.scanDirty(into: &b)
        XCTAssertEqual(a.pageCount(), pages)
        XCTAssertEqual(b.pageCount(), pages, "hash first scan: every page, as the kernel tracker")
        for round in 0..<5 {
            let set = (0..<(20 + round * 100)).map { _ in Int.random(in: 0..<pages) }
            try w.write(pages: set)
            try kernel.scanDirty(into: &a)
            try hash.scanDirty(into: &b)
            XCTAssertEqual(Set(b.pageAddresses()), pageAddresses(set, in: w), "hash, round \(round)")
            XCTAssertEqual(Set(a.pageAddresses()), Set(b.pageAddresses()), "kernel vs hash, round \(round)")
        }
        try kernel.detach()
        try hash.detach()

        // The combined attach picks the kernel method here and says so.
        var reason: ProcessMemoryError?
        var any = try AnyDirtyPageTracker.attach(pid: w.pid, regions: regions, fallbackReason: &reason)
        XCTAssertNil(reason)
        XCTAssertEqual(any.method, "uffd-wp-async+pagemap-scan")
        try any.scanDirty(into: &a)
        try w.write(pages: [1, 2])
        try any.scanDirty(into: &a)
        XCTAssertEqual(Set(a.pageAddresses()), pageAddresses([1, 2], in: w))
        try any.detach()
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
        for round in 0..<3 {
            let set = (0..<(30 + round * 50)).map { _ in Int.random(in: 0..<2048) }
            try w.write(pages: set)
            try tracker.scanDirty(into: &runs)
            XCTAssertEqual(Set(runs.pageAddresses()), Set(set.map { w.regionStart + UInt64($0) * 4096 }), "shmem round \(round)")
        }
        try tracker.detach()
    }
}
