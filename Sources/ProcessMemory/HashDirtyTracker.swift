/// Dirty-page tracking by content: hash every resident page each round and report those whose hash changed.
///
/// The fallback when `DirtyTracker`'s kernel method is unavailable. Costs a full read of the resident memory per
/// round (process_vm_readv) instead of a page-table walk. Pages that are not resident (never touched, per
/// /proc/PID/pagemap) are not read: they hash as the zero page. Same first-scan semantic as `DirtyTracker`:
/// see below. A write that leaves a page's bytes unchanged is not reported
/// (harmless for migration: the destination already has those bytes).
///
/// First scan: every page of the regions, exactly as `DirtyTracker`'s first PAGEMAP_SCAN reports (with
/// WP_UNPOPULATED no page starts write-protected); the caller skips never-touched pages with
/// `ProcessMemoryReader.residency`.
public struct HashDirtyTracker: ~Copyable, DirtyPageTracker {
    public let pid: Int32
    public let regions: [MemoryRegion]
    public let pageSize: UInt64
    public var method: String { "content-hash" }
    let reader: ProcessMemoryReader
    /// One hash per page of all regions, concatenated in region order.
    let hashes: UnsafeMutablePointer<UInt64>
    let totalPages: Int
    let residency: PageBitmap
    let chunk: UnsafeMutableRawBufferPointer
    var scanned = false
    static let zeroHash: UInt64 = {
        let zero = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 64)
        zero.initializeMemory(as: UInt8.self, repeating: 0)
        defer { zero.deallocate() }
        return PageHash.hash(UnsafeRawBufferPointer(zero))
    }()

    public init(pid: Int32, regions: [MemoryRegion], pageSize: UInt64 = 4096) throws(ProcessMemoryError) {
        guard !regions.isEmpty else { throw ProcessMemoryError("no regions to track in process \(pid)") }
        let r = try ProcessMemoryReader(pid: pid, pageSize: pageSize)
        self.pid = pid
        self.regions = regions
        self.pageSize = pageSize
        reader = r
        let pages = regions.reduce(0) { $0 + $1.range.pageCount(pageSize: pageSize) }
        totalPages = pages
        hashes = .allocate(capacity: max(pages, 1))
        hashes.initialize(repeating: 0, count: max(pages, 1))
        residency = PageBitmap(pageCount: regions.map { $0.range.pageCount(pageSize: pageSize) }.max() ?? 0)
        chunk = .allocate(byteCount: 1 << 20, alignment: 4096)
    }

    deinit {
        hashes.deallocate()
        chunk.deallocate()
    }

    /// Where the sender records the hash of each page it sends. The next scan compares a page's
    /// content with what was SENT, not with what the previous scan saw: a page that changes after a
    /// scan, is sent in its changed state and changes back before the next scan is then found dirty
    /// (with scan-to-scan hashes it would be missed and the destination would keep the transient bytes).
    /// Valid as long as the tracker lives.
    public var sentHashes: SentPageHashes {
        var bases: [(range: AddressRange, base: Int)] = []
        var base = 0
        for region in regions {
            bases.append((region.range, base))
            base += region.range.pageCount(pageSize: pageSize)
        }
        return SentPageHashes(hashes: hashes, regions: bases, pageSize: pageSize, zeroHash: Self.zeroHash)
    }

    /// Replaces `runs` with the pages whose content changed since the previous scan (first scan: every page).
    /// Reads with `process_vm_readv`, residency from `/proc/PID/pagemap`.
    public mutating func scanDirty(into runs: inout PageRunBuffer) throws(ProcessMemoryError) {
        runs.removeAll()
        let first = !scanned
        var base = 0 // index of the region's first page in `hashes`
        let zeroHash = Self.zeroHash
        let pagesPerChunk = chunk.count / Int(pageSize)
        for region in regions {
            let pages = region.range.pageCount(pageSize: pageSize)
            try reader.residency(of: region.range, into: residency)
            var p = 0
            while p < pages {
                if !residency[p] {
                    // Not resident: reads as zeros. Dirty only if it held other bytes before (e.g. MADV_DONTNEED).
                    if !first && hashes[base + p] != zeroHash {
                        runs.append(AddressRange(start: region.range.start + UInt64(p) * pageSize, length: pageSize))
                    }
                    hashes[base + p] = zeroHash
                    p += 1
                    continue
                }
                var n = 1
                while p + n < pages && n < pagesPerChunk && residency[p + n] { n += 1 }
                let start = region.range.start + UInt64(p) * pageSize
                let got = try reader.read(from: start, into: UnsafeMutableRawBufferPointer(rebasing: chunk[0..<(n * Int(pageSize))]))
                let full = got / Int(pageSize)
                for i in 0..<full {
                    let h = PageHash.hash(UnsafeRawBufferPointer(rebasing: chunk[(i * Int(pageSize))..<((i + 1) * Int(pageSize))]))
                    if first || h != hashes[base + p + i] {
                        runs.append(AddressRange(start: start + UInt64(i) * pageSize, length: pageSize))
                    }
                    hashes[base + p + i] = h
                }
                if full == 0 { throw ProcessMemoryError("process_vm_readv of \(hex(start)) in process \(pid) read nothing (unmapped?)", errno: .badAddress) }
                p += full
            }
            base += pages
        }
        if first {
            runs.removeAll()
            for region in regions { runs.append(region.range) }
        }
        scanned = true
    }

    /// Nothing to release in the kernel; frees the hash table.
    public consuming func detach() throws(ProcessMemoryError) {}
}

/// A handle on a ``HashDirtyTracker``'s per-page hashes through which the sender records the hash
/// of each page it sends (see ``HashDirtyTracker/sentHashes``). Used from the sending thread only.
public struct SentPageHashes: @unchecked Sendable {
    let hashes: UnsafeMutablePointer<UInt64>
    let regions: [(range: AddressRange, base: Int)]
    let pageSize: UInt64
    let zeroHash: UInt64

    private func index(of address: UInt64) -> Int? {
        for region in regions where region.range.contains(address) {
            return region.base + Int((address - region.range.start) / pageSize)
        }
        return nil
    }

    /// Records that the page at `address` was sent with `contents`.
    public func record(address: UInt64, contents: UnsafeRawBufferPointer) {
        if let index = index(of: address) { hashes[index] = PageHash.hash(contents) }
    }

    /// Records that the page at `address` was sent as a zero page.
    public func recordZero(address: UInt64) {
        if let index = index(of: address) { hashes[index] = zeroHash }
    }
}
