import CFerryShims
import ProcessMemory
import Wire

/// The source's page hot path: reads a window of up to `batchPages` pages of the migrating process
/// with one `process_vm_readv` (only the pages that may hold data), drops zero pages from the payload
/// and describes the window as runs of data pages and zero pages: one `pageBatch` frame, sent
/// zero-copy from the read buffer. Everything is preallocated; nothing is allocated per page or
/// per frame once the run array has reached its capacity.
public struct PageBatchBuilder: ~Copyable {
    let reader: ProcessMemoryReader
    let pageSize: Int
    let pageShift: UInt8
    /// Most pages in one batch.
    public let batchPages: Int
    private let buffer: UnsafeMutableRawBufferPointer
    private let addressRuns: UnsafeMutablePointer<AddressRange>
    private var runs: [PageRun]
    /// Pages sent with content so far.
    /// With the content-hash tracker: where the hash of each page sent is recorded, so its next
    /// scan compares with what was sent (see `HashDirtyTracker.sentHashes`).
    public var sentHashes: SentPageHashes? = nil
    /// Where the hash of every page sent is recorded for the digest (``PageHashes``), by global page.
    public var pageHashes: PageHashes? = nil
    public private(set) var dataPages: UInt64 = 0
    /// Pages sent as zero runs so far.
    public private(set) var zeroPages: UInt64 = 0

    /// A builder reading process `pid`.
    public init(pid: Int32, batchPages: Int = 256, pageSize: Int = 4096) throws(ProcessMemoryError) {
        reader = try ProcessMemoryReader(pid: pid, pageSize: UInt64(pageSize), maxIovecs: 1024)
        self.pageSize = pageSize
        self.pageShift = UInt8(pageSize.trailingZeroBitCount)
        self.batchPages = batchPages
        buffer = .allocate(byteCount: batchPages * pageSize, alignment: 4096)
        addressRuns = .allocate(capacity: batchPages)
        runs = []
        runs.reserveCapacity(batchPages)
    }

    deinit {
        buffer.deallocate()
        addressRuns.deallocate()
    }

    /// Builds the batch for pages `[first, first + count)` (count ≤ ``batchPages``) of the region at
    /// `hostAddress` (global page number `globalFirst`, for ``pageHashes``), and hands it to `body` (its payload points into this builder's buffer and is
    /// valid only during the call). Pages for which `mayHoldData` is false are zero runs, not read:
    /// pages the process never touched. Returns the data pages in the batch.
    @discardableResult
    public mutating func withBatch(regionID: UInt32, hostAddress: UInt64, first: Int, count: Int, globalFirst: Int,
                                   mayHoldData: (Int) -> Bool,
                                   _ body: (PageBatch) throws -> Void) throws -> Int {
        precondition(count > 0 && count <= batchPages, "batch of \(count) pages, at most \(batchPages)")
        // 1. One vectored read of the pages that may hold data, packed in order.
        var runCount = 0
        var page = first
        let end = first + count
        while page < end {
            if !mayHoldData(page) { page += 1; continue }
            let start = page
            while page < end && mayHoldData(page) { page += 1 }
            addressRuns[runCount] = AddressRange(start: hostAddress + UInt64(start * pageSize),
                                                 end: hostAddress + UInt64(page * pageSize))
            runCount += 1
        }
        if runCount > 0 {
            _ = try reader.read(runs: UnsafeBufferPointer(start: addressRuns, count: runCount), into: buffer)
        }
        // 2. Classify each page, compacting data pages to the front of the buffer.
        runs.removeAll(keepingCapacity: true)
        var readOffset = 0, writeOffset = 0
        let base = buffer.baseAddress!
        for p in first..<end {
            var isData = false
            if mayHoldData(p) {
                let at = base + readOffset
                readOffset += pageSize
                if ferry_is_zero(at, UInt64(pageSize)) == 0 {
                    isData = true
                    sentHashes?.record(address: hostAddress + UInt64(p * pageSize), contents: UnsafeRawBufferPointer(start: at, count: pageSize))
                    pageHashes?.record(page: globalFirst + p - first, contents: UnsafeRawBufferPointer(start: at, count: pageSize))
                    if writeOffset != readOffset - pageSize { (base + writeOffset).copyMemory(from: at, byteCount: pageSize) }
                    writeOffset += pageSize
                }
            }
            if !isData {
                sentHashes?.recordZero(address: hostAddress + UInt64(p * pageSize))
                pageHashes?.recordZero(page: globalFirst + p - first)
            }
            if let last = runs.last, last.isZero == !isData, last.count < PageRun.maxCount {
                runs[runs.count - 1].count += 1
            } else {
                runs.append(isData ? .data(1) : .zero(1))
            }
        }
        let data = writeOffset / pageSize
        dataPages += UInt64(data)
        zeroPages += UInt64(count - data)
        let batch = PageBatch(regionID: regionID, pageShift: pageShift, firstPage: UInt64(first),
                              runs: PageRunList(runs), payload: Payload(UnsafeRawBufferPointer(start: base, count: writeOffset)))
        try body(batch)
        return data
    }
}
