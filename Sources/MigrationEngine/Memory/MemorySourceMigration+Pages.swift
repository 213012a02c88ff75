import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Wire

/// The source's page sending: which regions, which pages were ever touched, and the batches of
/// round 0, dirty rounds and hybrid discards.
extension MemorySourceMigration {
    // MARK: - Regions

    func chooseRegions() throws -> [SourceRegion] {
        let map = try ProcessRegions(pid: options.pid)
        let chosen: [AddressRange]
        if options.regions.isEmpty {
            chosen = map.guestMemory(minimumSize: options.minimumRegionSize).map(\.range)
        } else {
            chosen = try map.select(ranges: options.regions).map(\.range)
        }
        guard !chosen.isEmpty else {
            throw SetupError("process \(options.pid) has no writable anonymous or memfd mapping of at least \(options.minimumRegionSize) bytes; name one with --region START-END")
        }
        return SourceRegion.numbered(chosen)
    }

    /// Whether `region` is shared memory (shmem), whose pages may hold data without being mapped here.
    func isShared(_ region: SourceRegion) throws -> Bool {
        try ProcessRegions(pid: options.pid).select(ranges: [region.range]).first?.kind == .shmem
    }

    /// The tracker wants ProcessMemory's region values (kind decides shmem support).
    func trackedRegions(_ regions: [SourceRegion]) throws -> [ProcessMemory.MemoryRegion] {
        let map = try ProcessRegions(pid: options.pid)
        return try map.select(ranges: regions.map(\.range))
    }

    /// Pages of `region` that may hold data. For private memory: those present or swapped in the
    /// page table (never-touched pages are never sent). For shared memory (memfd, /dev/shm) every
    /// page: its data may live in the page cache without a page-table entry here (swapped, or filled
    /// through another mapping), so each page is read and zero detection decides.
    func residency(of region: SourceRegion) throws -> PageSet {
        if try isShared(region) {
            let all = PageSet(pageCount: region.pageCount)
            all.insertAll()
            return all
        }
        let reader = try ProcessMemoryReader(pid: options.pid, pageSize: UInt64(region.pageSize))
        let bitmap = PageBitmap(pageCount: region.pageCount)
        try reader.residency(of: region.range, into: bitmap)
        let set = PageSet(pageCount: region.pageCount)
        bitmap.forEachRun { first, count in for p in first..<(first + count) { set.insert(p) } }
        return set
    }

    // MARK: - Sending

    /// Sends `pages` of a region in batches; a stretch with no page that may hold data goes as one zero run.
    func sendRegion(_ region: SourceRegion, pages: Range<Int>, mayHoldData: (Int) -> Bool,
                            builder: inout PageBatchBuilder, link: PeerLink) throws -> UInt64 {
        var page = pages.lowerBound
        var sent: UInt64 = 0
        while page < pages.upperBound {
            if !mayHoldData(page) {
                var end = page + 1
                while end < pages.upperBound && !mayHoldData(end) && end - page < Int(PageRun.maxCount) { end += 1 }
                if end - page >= builder.batchPages || end == pages.upperBound {
                    try link.sender.send(.pageBatch(PageBatch(regionID: region.id, pageShift: 12, firstPage: UInt64(page),
                                                              runs: PageRunList([.zero(UInt32(end - page))]), payload: .empty)))
                    sent += UInt64(end - page)
                    page = end
                    continue
                }
            }
            let count = min(builder.batchPages, pages.upperBound - page)
            try builder.withBatch(regionID: region.id, hostAddress: region.range.start, first: page, count: count,
                                  mayHoldData: mayHoldData) { batch in
                try link.sender.send(.pageBatch(batch))
            }
            sent += UInt64(count)
            page += count
        }
        return sent
    }

    /// Calls `body(regionIndex, page)` for every page of the address runs.
    func forEachPage(of runs: borrowing PageRunBuffer, regions: [SourceRegion], _ body: (Int, Int) throws -> Void) throws {
        for i in 0..<runs.count {
            let run = runs[i]
            for (index, region) in regions.enumerated() where region.range.overlaps(run) {
                let start = max(run.start, region.range.start), end = min(run.end, region.range.end)
                let first = Int((start - region.range.start) / UInt64(region.pageSize))
                let last = Int((end - region.range.start + UInt64(region.pageSize) - 1) / UInt64(region.pageSize))
                for page in first..<last { try body(index, page) }
            }
        }
    }

    /// Sends the pages of dirty address runs (their current content).
    func sendRuns(_ runs: borrowing PageRunBuffer, regions: [SourceRegion], builder: inout PageBatchBuilder,
                          link: PeerLink) throws -> UInt64 {
        var sent: UInt64 = 0
        for i in 0..<runs.count {
            let run = runs[i]
            for region in regions where region.range.overlaps(run) {
                let start = max(run.start, region.range.start), end = min(run.end, region.range.end)
                let first = Int((start - region.range.start) / UInt64(region.pageSize))
                let last = Int((end - region.range.start + UInt64(region.pageSize) - 1) / UInt64(region.pageSize))
                var page = first
                while page < last {
                    let count = min(builder.batchPages, last - page)
                    try builder.withBatch(regionID: region.id, hostAddress: region.range.start, first: page, count: count,
                                          mayHoldData: { _ in true }) { batch in
                        try link.sender.send(.pageBatch(batch))
                    }
                    sent += UInt64(count)
                    page += count
                }
            }
        }
        return sent
    }

    /// Hybrid: tells the destination which pages it holds stale copies of (`pageDiscard`).
    func sendDiscards(_ runs: borrowing PageRunBuffer, regions: [SourceRegion], link: PeerLink) throws {
        for i in 0..<runs.count {
            let run = runs[i]
            for region in regions where region.range.overlaps(run) {
                let start = max(run.start, region.range.start), end = min(run.end, region.range.end)
                let first = UInt64((start - region.range.start) / UInt64(region.pageSize))
                let last = UInt64((end - region.range.start + UInt64(region.pageSize) - 1) / UInt64(region.pageSize))
                try link.sender.send(.pageDiscard(PageRange(regionID: region.id, pageIndex: first, count: UInt32(last - first))))
            }
        }
    }
}
