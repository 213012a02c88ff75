/// A disk the source will send: its id, size, block size and name (`diskLayout`).
///
/// Layout (20 bytes + name): `u32 diskID, u32 blockSize, u64 sizeBytes, u16 nameLength,
/// u16 reserved, nameLength bytes of UTF-8`.
public struct DiskLayout: Hashable, Sendable {
    /// Longest name in UTF-8 bytes.
    public static let maxNameLength = 1024

    /// Identifies the disk in every later disk frame.
    public var diskID: UInt32
    /// Size of the disk in bytes.
    public var sizeBytes: UInt64
    /// Granularity of dirty tracking and extents: a power of two from 512 B to 64 MiB.
    public var blockSize: UInt32
    /// A human-readable name (export name, file name).
    public var name: String

    public init(diskID: UInt32, sizeBytes: UInt64, blockSize: UInt32, name: String) {
        self.diskID = diskID; self.sizeBytes = sizeBytes; self.blockSize = blockSize; self.name = name
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> DiskLayout {
        let id = try r.u32("diskID")
        let bsAt = r.frameOffset
        let bs = try r.u32("blockSize")
        guard bs >= 512, bs <= 64 << 20, bs & (bs - 1) == 0 else { throw r.invalid("blockSize", bs, at: bsAt) }
        let size = try r.u64("sizeBytes")
        let nameLength = try r.u16("nameLength")
        try r.reserved(2, "reserved")
        let name = try r.string(length: nameLength, max: maxNameLength, "name")
        return DiskLayout(diskID: id, sizeBytes: size, blockSize: bs, name: name)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        let n = name.utf8.count
        if n > DiskLayout.maxNameLength {
            throw .limitExceeded(type: type, field: "name", value: n, max: DiskLayout.maxNameLength)
        }
        if blockSize < 512 || blockSize > 64 << 20 || blockSize & (blockSize - 1) != 0 {
            throw .invalidValue(type: type, field: "blockSize", offset: FrameHeader.size + 4, value: UInt64(blockSize))
        }
        return 20 + n
    }

    func write(to w: inout ByteWriter) {
        w.u32(diskID); w.u32(blockSize); w.u64(sizeBytes); w.u16(UInt16(name.utf8.count)); w.zeros(2)
        w.utf8(name)
    }
}

/// One extent of a disk: `length` bytes at `offset`, either carried as data or known to be zero.
public struct Extent: Hashable, Sendable {
    /// Whether an extent's bytes travel in the payload or are zero (a hole or a zero block).
    public enum Kind: UInt8, Sendable, CaseIterable {
        /// `length` bytes follow in the frame's payload.
        case data = 0
        /// The range reads as zeros; nothing follows (the receiver punches a hole or writes zeros).
        case zero = 1
        /// Whole blocks whose content the destination already holds in its base image (it reported
        /// their SHA-256 in `diskHeld`); nothing follows. Only in the bulk copy (round 0) of a session
        /// that agreed on ``Features/heldBlocks``.
        case held = 2
    }

    /// Byte offset on the disk.
    public var offset: UInt64
    /// Length in bytes (1 ... 4 GiB - 1).
    public var length: UInt32
    /// Data or zero.
    public var kind: Kind

    public init(offset: UInt64, length: UInt32, kind: Kind = .data) {
        self.offset = offset; self.length = length; self.kind = kind
    }

    static let size = 16
}

/// The extents of a `diskExtents` frame: a zero-copy view of the wire entries when decoded,
/// or an array when built by a sender. Both compare equal when their elements do.
public struct ExtentList: RandomAccessCollection, Equatable, @unchecked Sendable {
    enum Storage { case wire(UnsafeRawBufferPointer), array([Extent]) }
    let storage: Storage

    /// A list over an array of extents (for encoding).
    public init(_ extents: [Extent]) { storage = .array(extents) }
    init(wire: UnsafeRawBufferPointer) { storage = .wire(wire) }

    public var startIndex: Int { 0 }
    public var endIndex: Int {
        switch storage {
        case .wire(let raw): return raw.count / Extent.size
        case .array(let a): return a.count
        }
    }

    public subscript(i: Int) -> Extent {
        switch storage {
        case .array(let a): return a[i]
        case .wire(let raw):
            precondition(i >= 0 && i < raw.count / Extent.size, "extent index \(i) out of range")
            let at = i * Extent.size
            return Extent(offset: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt64.self)),
                          length: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: at + 8, as: UInt32.self)),
                          kind: Extent.Kind(rawValue: raw.load(fromByteOffset: at + 12, as: UInt8.self)) ?? .data)
        }
    }

    public static func == (lhs: ExtentList, rhs: ExtentList) -> Bool { lhs.elementsEqual(rhs) }
}

/// Disk contents: a list of data and zero extents of one disk, and the data extents' bytes
/// concatenated in order as a zero-copy payload (`diskExtents`; also the body of `diskReply`).
///
/// Used for the bulk copy (`round` 0), for each round of dirty-block deltas (`round` ≥ 1), and for
/// holes and zero blocks (zero extents carry no bytes). Layout (16 bytes + 16 per extent + payload):
/// `u32 diskID, u32 round, u16 extentCount, u16 reserved, u32 reserved,
///  extentCount × (u64 offset, u32 length, u8 kind, u8 reserved, u16 reserved), payload`.
public struct DiskExtents: Equatable, Sendable {
    /// Most extents in one frame.
    public static let maxExtents = Int(UInt16.max)

    /// Which disk.
    public var diskID: UInt32
    /// 0 for the bulk copy, N for the N-th round of dirty blocks.
    public var round: UInt32
    /// The extents, in payload order.
    public var extents: ExtentList
    /// The data extents' bytes, concatenated (zero-copy; see ``Payload``), or one zstd frame of them (``encoding``).
    public var payload: Payload
    /// How ``payload`` carries the data extents.
    public var encoding: PayloadEncoding

    public init(diskID: UInt32, round: UInt32, extents: ExtentList, payload: Payload, encoding: PayloadEncoding = .raw) {
        self.diskID = diskID; self.round = round; self.extents = extents; self.payload = payload; self.encoding = encoding
    }

    /// Bytes of the data extents (what a compressed payload expands to).
    public var dataBytes: UInt64 { extents.reduce(UInt64(0)) { $0 + ($1.kind == .data ? UInt64($1.length) : 0) } }

    static func decode(from r: inout ByteReader) throws(WireError) -> DiskExtents {
        let id = try r.u32("diskID")
        let round = try r.u32("round")
        let rawCount = try r.u16("extentCount")
        let encodingAt = r.frameOffset
        let rawEncoding = try r.u8("encoding")
        guard let encoding = PayloadEncoding(rawValue: rawEncoding) else { throw r.invalid("encoding", rawEncoding, at: encodingAt) }
        try r.reserved(5, "reserved")
        let count = try r.count(rawCount, elementSize: Extent.size, max: maxExtents, "extentCount")
        let tableAt = r.frameOffset
        let table = try r.view(count * Extent.size, "extents")
        var dataBytes: UInt64 = 0
        for i in 0..<count {
            let at = i * Extent.size
            let off = UInt64(littleEndian: table.loadUnaligned(fromByteOffset: at, as: UInt64.self))
            let len = UInt32(littleEndian: table.loadUnaligned(fromByteOffset: at + 8, as: UInt32.self))
            let kind = table.load(fromByteOffset: at + 12, as: UInt8.self)
            if len == 0 { throw r.invalid("extent.length", len, at: tableAt + at + 8) }
            if off.addingReportingOverflow(UInt64(len)).overflow {
                throw r.invalid("extent.offset", off, at: tableAt + at)
            }
            switch Extent.Kind(rawValue: kind) {
            case .data: dataBytes += UInt64(len)  // ≤ 65535 × 2^32: cannot overflow
            case .zero, .held: break
            case nil: throw r.invalid("extent.kind", kind, at: tableAt + at + 12)
            }
            if table.load(fromByteOffset: at + 13, as: UInt8.self) != 0
                || table.loadUnaligned(fromByteOffset: at + 14, as: UInt16.self) != 0 {
                throw .reservedNonZero(type: r.type, field: "extent.reserved", offset: tableAt + at + 13)
            }
        }
        let payload = r.rest()
        try encoding.check(payload: payload.count, dataBytes: dataBytes, type: r.type, at: encodingAt)
        return DiskExtents(diskID: id, round: round, extents: ExtentList(wire: table), payload: Payload(payload), encoding: encoding)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if extents.count > DiskExtents.maxExtents {
            throw .limitExceeded(type: type, field: "extentCount", value: extents.count, max: DiskExtents.maxExtents)
        }
        var dataBytes: UInt64 = 0
        for (i, e) in extents.enumerated() {
            let at = FrameHeader.size + 16 + i * Extent.size
            if e.length == 0 { throw .invalidValue(type: type, field: "extent.length", offset: at + 8, value: 0) }
            if e.offset.addingReportingOverflow(UInt64(e.length)).overflow {
                throw .invalidValue(type: type, field: "extent.offset", offset: at, value: e.offset)
            }
            if e.kind == .data { dataBytes += UInt64(e.length) }
        }
        try encoding.check(payload: payload.count, dataBytes: dataBytes, type: type, at: FrameHeader.size + 10)
        return 16 + Extent.size * extents.count
    }

    func write(to w: inout ByteWriter) {
        w.u32(diskID); w.u32(round); w.u16(UInt16(extents.count)); w.u8(encoding.rawValue); w.zeros(5)
        for e in extents { w.u64(e.offset); w.u32(e.length); w.u8(e.kind.rawValue); w.zeros(3) }
    }
}

/// What the destination already holds of one disk (`diskHeld`, destination → source, feature
/// ``Features/heldBlocks``): the SHA-256 of blocks `firstBlock ..< firstBlock + count` of its base
/// image, 32 bytes each, all zeros for a block it does not hold (a zero block, or past the base's
/// end). A destination reports its blocks in ascending order; blocks it skips between two frames
/// are not held. A frame with `firstBlock` at the disk's block count and no hash ends the report.
///
/// Layout (16 bytes + 32 per block): `u32 diskID, u32 count, u64 firstBlock`, then the hashes as
/// the payload.
public struct DiskHeld: Equatable, Sendable {
    /// Most blocks in one frame (128 KiB of hashes).
    public static let maxBlocks = 4096
    /// Bytes of one block's hash (SHA-256).
    public static let hashSize = 32

    /// Which disk.
    public var diskID: UInt32
    /// The first block reported.
    public var firstBlock: UInt64
    /// Blocks reported.
    public var count: Int
    /// `count` SHA-256 hashes (zero-copy; see ``Payload``).
    public var hashes: Payload

    public init(diskID: UInt32, firstBlock: UInt64, count: Int, hashes: Payload) {
        self.diskID = diskID; self.firstBlock = firstBlock; self.count = count; self.hashes = hashes
    }

    /// The hash of the `index`-th block of the frame (block `firstBlock + index`).
    public func hash(_ index: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: hashes.bytes[(index * Self.hashSize)..<((index + 1) * Self.hashSize)])
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> DiskHeld {
        let id = try r.u32("diskID")
        let countAt = r.frameOffset
        let count = try r.u32("count")
        if count > UInt32(maxBlocks) { throw r.invalid("count", count, at: countAt) }
        let firstAt = r.frameOffset
        let first = try r.u64("firstBlock")
        if first.addingReportingOverflow(UInt64(count)).overflow { throw r.invalid("firstBlock", first, at: firstAt) }
        let hashesAt = r.frameOffset
        let hashes = r.rest()
        guard hashes.count == Int(count) * hashSize else {
            if hashes.count < Int(count) * hashSize {
                throw .truncated(type: r.type, field: "hashes", offset: hashesAt, needed: Int(count) * hashSize, available: hashes.count)
            }
            throw .trailingBytes(type: r.type, offset: hashesAt + Int(count) * hashSize, count: hashes.count - Int(count) * hashSize)
        }
        return DiskHeld(diskID: id, firstBlock: first, count: Int(count), hashes: Payload(hashes))
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if count < 0 || count > Self.maxBlocks { throw .limitExceeded(type: type, field: "count", value: count, max: Self.maxBlocks) }
        if firstBlock.addingReportingOverflow(UInt64(count)).overflow {
            throw .invalidValue(type: type, field: "firstBlock", offset: FrameHeader.size + 8, value: firstBlock)
        }
        if hashes.count != count * Self.hashSize {
            throw .invalidValue(type: type, field: "hashes", offset: FrameHeader.size + 16, value: UInt64(hashes.count))
        }
        return 16
    }

    func write(to w: inout ByteWriter) { w.u32(diskID); w.u32(UInt32(count)); w.u64(firstBlock) }
}

/// An urgent request for a disk range the destination needs now (disk post-copy: a read of a
/// block that has not arrived). The source answers with `diskReply` carrying the same request id.
///
/// Layout (24 bytes): `u64 requestID, u32 diskID, u32 length, u64 offset`.
public struct DiskFetch: Hashable, Sendable {
    /// Chosen by the destination; echoed in the reply.
    public var requestID: UInt64
    /// Which disk.
    public var diskID: UInt32
    /// Byte offset on the disk.
    public var offset: UInt64
    /// Bytes wanted (at least 1).
    public var length: UInt32

    public init(requestID: UInt64, diskID: UInt32, offset: UInt64, length: UInt32) {
        self.requestID = requestID; self.diskID = diskID; self.offset = offset; self.length = length
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> DiskFetch {
        let req = try r.u64("requestID")
        let id = try r.u32("diskID")
        let lenAt = r.frameOffset
        let len = try r.u32("length")
        if len == 0 { throw r.invalid("length", len, at: lenAt) }
        let offAt = r.frameOffset
        let off = try r.u64("offset")
        if off.addingReportingOverflow(UInt64(len)).overflow { throw r.invalid("offset", off, at: offAt) }
        return DiskFetch(requestID: req, diskID: id, offset: off, length: len)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if length == 0 { throw .invalidValue(type: type, field: "length", offset: FrameHeader.size + 12, value: 0) }
        if offset.addingReportingOverflow(UInt64(length)).overflow {
            throw .invalidValue(type: type, field: "offset", offset: FrameHeader.size + 16, value: offset)
        }
        return 24
    }

    func write(to w: inout ByteWriter) { w.u64(requestID); w.u32(diskID); w.u32(length); w.u64(offset) }
}

/// A disk range the destination wrote itself during disk post-copy (`diskSkip`, after silo's
/// "DontNeedAt"): its data now wins, so the source drops the range from what it still has to send.
/// Advisory: the destination must still ignore any older bulk copy of the range that arrives later.
///
/// Layout (16 bytes): `u32 diskID, u32 length, u64 offset`.
public struct DiskRange: Hashable, Sendable {
    /// Which disk.
    public var diskID: UInt32
    /// Byte offset on the disk.
    public var offset: UInt64
    /// Length in bytes (at least 1).
    public var length: UInt32

    public init(diskID: UInt32, offset: UInt64, length: UInt32) {
        self.diskID = diskID; self.offset = offset; self.length = length
    }

    static func decode(from r: inout ByteReader) throws(WireError) -> DiskRange {
        let id = try r.u32("diskID")
        let lenAt = r.frameOffset
        let len = try r.u32("length")
        if len == 0 { throw r.invalid("length", len, at: lenAt) }
        let offAt = r.frameOffset
        let off = try r.u64("offset")
        if off.addingReportingOverflow(UInt64(len)).overflow { throw r.invalid("offset", off, at: offAt) }
        return DiskRange(diskID: id, offset: off, length: len)
    }

    func metadataSize(as type: MessageType) throws(WireError) -> Int {
        if length == 0 { throw .invalidValue(type: type, field: "length", offset: FrameHeader.size + 4, value: 0) }
        if offset.addingReportingOverflow(UInt64(length)).overflow {
            throw .invalidValue(type: type, field: "offset", offset: FrameHeader.size + 8, value: offset)
        }
        return 16
    }

    func write(to w: inout ByteWriter) { w.u32(diskID); w.u32(length); w.u64(offset) }
}
