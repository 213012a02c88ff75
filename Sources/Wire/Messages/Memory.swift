/// One guest-memory region as the source sees it.
public struct MemoryRegion: Hashable, Sendable {
    /// Identifies the region in page frames.
    public var id: UInt32
    /// Guest-physical start address (0 when migrating a plain process).
    public var guestAddress: UInt64
    /// Start address in the source process's address space.
    public var hostAddress: UInt64
    /// Size in bytes (a multiple of the page size).
    public var size: UInt64
    /// Offset of the region in a Firecracker-style memory file (regions concatenated in guest order).
    public var fileOffset: UInt64

    public init(id: UInt32, guestAddress: UInt64, hostAddress: UInt64, size: UInt64, fileOffset: UInt64) {
        self.id = id; self.guestAddress = guestAddress; self.hostAddress = hostAddress
        self.size = size; self.fileOffset = fileOffset
    }

    static let size = 40
}

/// The memory the source will send: page size and regions (`memoryLayout`).
///
/// Layout (8 bytes + 40 per region): `u32 pageSize, u16 regionCount, u16 reserved,
/// regionCount × (u32 id, u32 reserved, u64 guestAddress, u64 hostAddress, u64 size, u64 fileOffset)`.
public struct GuestMemoryLayout: Hashable, Sendable {
    /// Most regions in one layout.
    public static let maxRegions = 4096

    /// Page size in bytes: a power of two from 4 KiB to 1 GiB.
    public var pageSize: UInt32
    /// The regions, largest first or in guest order as the source chooses.
    public var regions: [MemoryRegion]

    public init(pageSize: UInt32, regions: [MemoryRegion]) {
        self.pageSize = pageSize; self.regions = regions
    }

    static func isValidPageSize(_ p: UInt32) -> Bool { p >= 4096 && p <= 1 << 30 && p & (p - 1) == 0 }

    static func decode(from r: inout ByteReader) throws(WireError) -> GuestMemoryLayout {
        let psAt = r.frameOffset
        let ps = try r.u32("pageSize")
        guard isValidPageSize(ps) else { throw r.invalid("pageSize", ps, at: psAt) }
        let rawCount = try r.u16("regionCount")
        try r.reserved(2, "reserved")
        let count = try r.count(rawCount, elementSize: MemoryRegion.size, max: maxRegions, "regionCount")
        var regions: [MemoryRegion] = []
        regions.reserveCapacity(count)
        for _ in 0..<count {
            let id = try r.u32("region.id")
            try r.reserved(4, "region.reserved")
            let guest = try r.u64("region.guestAddress")
            let host = try r.u64("region.hostAddress")
            let size = try r.u64("region.size")
            let file = try r.u64("region.fileOffset")
            regions.append(MemoryRegion(id: id, guestAddress: guest, hostAddress: host, size: size, fileOffset: file))
        }
        return GuestMemoryLayout(pageSize: ps, regions: regions)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        guard GuestMemoryLayout.isValidPageSize(pageSize) else {
            throw .invalidValue(type: type, field: "pageSize", offset: FrameHeader.size, value: UInt64(pageSize))
        }
        if regions.count > GuestMemoryLayout.maxRegions {
            throw .limitExceeded(type: type, field: "regionCount", value: regions.count, max: GuestMemoryLayout.maxRegions)
        }
        return 8 + MemoryRegion.size * regions.count
    }

    func write(to w: inout ByteWriter) {
        w.u32(pageSize); w.u16(UInt16(regions.count)); w.zeros(2)
        for g in regions {
            w.u32(g.id); w.zeros(4); w.u64(g.guestAddress); w.u64(g.hostAddress); w.u64(g.size); w.u64(g.fileOffset)
        }
    }
}

/// A run of consecutive pages in a page batch: `count` pages that either follow in the payload
/// or are all zero. On the wire a `u32`: bit 31 set = zero run, bits 0-30 = count (≥ 1).
public struct PageRun: Hashable, Sendable {
    /// Largest count one run can hold.
    public static let maxCount: UInt32 = (1 << 31) - 1

    /// Pages in the run (1 ... ``maxCount``).
    public var count: UInt32
    /// True when the pages are zero and nothing follows for them.
    public var isZero: Bool

    /// `count` pages whose contents follow in the payload.
    public static func data(_ count: UInt32) -> PageRun { PageRun(count: count, isZero: false) }
    /// `count` zero pages.
    public static func zero(_ count: UInt32) -> PageRun { PageRun(count: count, isZero: true) }

    public init(count: UInt32, isZero: Bool) { self.count = count; self.isZero = isZero }

    var wireValue: UInt32 { count | (isZero ? 1 << 31 : 0) }
    init(wireValue v: UInt32) { self.init(count: v & PageRun.maxCount, isZero: v & (1 << 31) != 0) }
}

/// The runs of a page batch: a zero-copy view of the wire entries when decoded, or an array when
/// built by a sender (reuse one array across batches to avoid allocating). Equal when the runs are.
public struct PageRunList: RandomAccessCollection, Equatable, @unchecked Sendable {
    enum Storage { case wire(UnsafeRawBufferPointer), array([PageRun]) }
    let storage: Storage

    /// A list over an array of runs (for encoding).
    public init(_ runs: [PageRun]) { storage = .array(runs) }
    init(wire: UnsafeRawBufferPointer) { storage = .wire(wire) }

    public var startIndex: Int { 0 }
    public var endIndex: Int {
        switch storage {
        case .wire(let raw): return raw.count / 4
        case .array(let a): return a.count
        }
    }

    public subscript(i: Int) -> PageRun {
        switch storage {
        case .array(let a): return a[i]
        case .wire(let raw):
            precondition(i >= 0 && i < raw.count / 4, "page run index \(i) out of range")
            return PageRun(wireValue: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)))
        }
    }

    public static func == (lhs: PageRunList, rhs: PageRunList) -> Bool { lhs.elementsEqual(rhs) }
}

/// Pages of one region starting at `firstPage`, as runs of data pages and zero pages, with the data
/// pages' bytes concatenated as a zero-copy payload (`pageBatch`; also the body of `pageReply`).
///
/// Layout (16 bytes + 4 per run + payload): `u32 regionID, u8 pageShift, u8 reserved, u16 runCount,
/// u64 firstPage, runCount × u32 run, payload` where payload = Σ data-run counts << pageShift bytes.
public struct PageBatch: Equatable, Sendable {
    /// Most runs in one frame.
    public static let maxRuns = Int(UInt16.max)

    /// Which region.
    public var regionID: UInt32
    /// log2 of the page size (12 for 4 KiB ... 30 for 1 GiB); repeated here so a frame is self-checking.
    public var pageShift: UInt8
    /// Page index (within the region) of the first page of the first run.
    public var firstPage: UInt64
    /// Consecutive runs from `firstPage`.
    public var runs: PageRunList
    /// The data pages' bytes in order (zero-copy; see ``Payload``), or one zstd frame of them (``encoding``).
    public var payload: Payload
    /// How ``payload`` carries the data pages.
    public var encoding: PayloadEncoding

    public init(regionID: UInt32, pageShift: UInt8, firstPage: UInt64, runs: PageRunList, payload: Payload,
                encoding: PayloadEncoding = .raw) {
        self.regionID = regionID; self.pageShift = pageShift; self.firstPage = firstPage
        self.runs = runs; self.payload = payload; self.encoding = encoding
    }

    /// Total pages covered by the runs (data and zero).
    public var pageCount: UInt64 { runs.reduce(0) { $0 + UInt64($1.count) } }

    /// Bytes of the data pages (what a compressed payload expands to).
    public var dataBytes: UInt64 { runs.reduce(UInt64(0)) { $0 + ($1.isZero ? 0 : UInt64($1.count)) } << UInt64(pageShift) }

    static func decode(from r: inout ByteReader) throws(WireError) -> PageBatch {
        let region = try r.u32("regionID")
        let shiftAt = r.frameOffset
        let shift = try r.u8("pageShift")
        if shift < 12 || shift > 30 { throw r.invalid("pageShift", shift, at: shiftAt) }
        let encodingAt = r.frameOffset
        let rawEncoding = try r.u8("encoding")
        guard let encoding = PayloadEncoding(rawValue: rawEncoding) else { throw r.invalid("encoding", rawEncoding, at: encodingAt) }
        let rawCount = try r.u16("runCount")
        let firstAt = r.frameOffset
        let first = try r.u64("firstPage")
        let count = try r.count(rawCount, elementSize: 4, max: maxRuns, "runCount")
        let tableAt = r.frameOffset
        let table = try r.view(count * 4, "runs")
        var dataPages: UInt64 = 0, allPages: UInt64 = 0
        for i in 0..<count {
            let run = PageRun(wireValue: UInt32(littleEndian: table.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)))
            if run.count == 0 { throw r.invalid("run.count", 0, at: tableAt + i * 4) }
            allPages += UInt64(run.count)  // ≤ 65535 × 2^31: cannot overflow
            if !run.isZero { dataPages += UInt64(run.count) }
        }
        if first.addingReportingOverflow(allPages).overflow { throw r.invalid("firstPage", first, at: firstAt) }
        let payload = r.rest()
        let (expected, overflow) = dataPages.multipliedReportingOverflow(by: UInt64(1) << shift)
        if overflow { throw .payloadLengthMismatch(type: r.type, expected: .max, actual: payload.count) }
        try encoding.check(payload: payload.count, dataBytes: expected, type: r.type, at: encodingAt)
        return PageBatch(regionID: region, pageShift: shift, firstPage: first, runs: PageRunList(wire: table),
                         payload: Payload(payload), encoding: encoding)
    }

    func metadataSize(as type: MessageType, base: Int = 0) throws(WireError) -> Int {
        if pageShift < 12 || pageShift > 30 {
            throw .invalidValue(type: type, field: "pageShift", offset: FrameHeader.size + base + 4, value: UInt64(pageShift))
        }
        if runs.count > PageBatch.maxRuns {
            throw .limitExceeded(type: type, field: "runCount", value: runs.count, max: PageBatch.maxRuns)
        }
        var dataPages: UInt64 = 0, allPages: UInt64 = 0
        for (i, run) in runs.enumerated() {
            if run.count == 0 || run.count > PageRun.maxCount {
                throw .invalidValue(type: type, field: "run.count", offset: FrameHeader.size + base + 16 + 4 * i,
                                    value: UInt64(run.count))
            }
            allPages += UInt64(run.count)
            if !run.isZero { dataPages += UInt64(run.count) }
        }
        if firstPage.addingReportingOverflow(allPages).overflow {
            throw .invalidValue(type: type, field: "firstPage", offset: FrameHeader.size + base + 8, value: firstPage)
        }
        try encoding.check(payload: payload.count, dataBytes: dataPages << UInt64(pageShift), type: type, at: FrameHeader.size + base + 5)
        return 16 + 4 * runs.count
    }

    func write(to w: inout ByteWriter) {
        w.u32(regionID); w.u8(pageShift); w.u8(encoding.rawValue); w.u16(UInt16(runs.count)); w.u64(firstPage)
        for run in runs { w.u32(run.wireValue) }
    }
}

/// An urgent request for pages the destination's VM faulted on (memory post-copy). The source
/// answers with `pageReply` carrying the same request id, ahead of bulk pages.
///
/// Layout (24 bytes): `u64 requestID, u32 regionID, u32 count, u64 pageIndex`.
public struct PageRequest: Hashable, Sendable {
    /// Chosen by the destination; echoed in the reply.
    public var requestID: UInt64
    /// Which region.
    public var regionID: UInt32
    /// Index of the faulting page within the region.
    public var pageIndex: UInt64
    /// Pages wanted from `pageIndex` on (≥ 1; more than 1 for pre-paging neighbours).
    public var count: UInt32

    public init(requestID: UInt64, regionID: UInt32, pageIndex: UInt64, count: UInt32) {
        self.requestID = requestID; self.regionID = regionID; self.pageIndex = pageIndex; self.count = count
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> PageRequest {
        let req = try r.u64("requestID")
        let region = try r.u32("regionID")
        let countAt = r.frameOffset
        let count = try r.u32("count")
        if count == 0 { throw r.invalid("count", count, at: countAt) }
        let idxAt = r.frameOffset
        let index = try r.u64("pageIndex")
        if index.addingReportingOverflow(UInt64(count)).overflow { throw r.invalid("pageIndex", index, at: idxAt) }
        return PageRequest(requestID: req, regionID: region, pageIndex: index, count: count)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if count == 0 { throw .invalidValue(type: type, field: "count", offset: FrameHeader.size + 12, value: 0) }
        if pageIndex.addingReportingOverflow(UInt64(count)).overflow {
            throw .invalidValue(type: type, field: "pageIndex", offset: FrameHeader.size + 16, value: pageIndex)
        }
        return 24
    }

    func write(to w: inout ByteWriter) { w.u64(requestID); w.u32(regionID); w.u32(count); w.u64(pageIndex) }
}

/// Pages of one region (`pageDiscard`): in hybrid migration, the pages dirtied after the last
/// pre-copy round, whose copies at the destination are stale. The destination drops them before it
/// resumes the VM and gets them again by request or push.
///
/// Layout (16 bytes): `u32 regionID, u32 count, u64 pageIndex`.
public struct PageRange: Hashable, Sendable {
    /// Which region.
    public var regionID: UInt32
    /// First page (index within the region).
    public var pageIndex: UInt64
    /// Pages from `pageIndex` on (≥ 1).
    public var count: UInt32

    public init(regionID: UInt32, pageIndex: UInt64, count: UInt32) {
        self.regionID = regionID; self.pageIndex = pageIndex; self.count = count
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> PageRange {
        let region = try r.u32("regionID")
        let countAt = r.frameOffset
        let count = try r.u32("count")
        if count == 0 { throw r.invalid("count", count, at: countAt) }
        let idxAt = r.frameOffset
        let index = try r.u64("pageIndex")
        if index.addingReportingOverflow(UInt64(count)).overflow { throw r.invalid("pageIndex", index, at: idxAt) }
        return PageRange(regionID: region, pageIndex: index, count: count)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if count == 0 { throw .invalidValue(type: type, field: "count", offset: FrameHeader.size + 4, value: 0) }
        if pageIndex.addingReportingOverflow(UInt64(count)).overflow {
            throw .invalidValue(type: type, field: "pageIndex", offset: FrameHeader.size + 8, value: pageIndex)
        }
        return 16
    }

    func write(to w: inout ByteWriter) { w.u32(regionID); w.u32(count); w.u64(pageIndex) }
}
