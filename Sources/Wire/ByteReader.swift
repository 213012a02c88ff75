/// A bounds-checked little-endian cursor over one frame's body, used by every message decoder.
///
/// Every read checks the remaining length first and throws ``WireError/truncated`` with the
/// field name and frame offset; nothing is ever read past the frame's declared end.
struct ByteReader {
    let body: UnsafeRawBufferPointer
    let type: MessageType
    private(set) var offset = 0

    init(body: UnsafeRawBufferPointer, type: MessageType) {
        self.body = body
        self.type = type
    }

    var remaining: Int { body.count - offset }
    /// The current position as an offset from the start of the frame.
    var frameOffset: Int { FrameHeader.size + offset }

    @inline(__always)
    func require(_ n: Int, _ field: String) throws(WireError) {
        if n > remaining {
            throw .truncated(type: type, field: field, offset: frameOffset, needed: n, available: remaining)
        }
    }

    @inline(__always)
    mutating func u8(_ field: String) throws(WireError) -> UInt8 {
        try require(1, field)
        defer { offset += 1 }
        return body.load(fromByteOffset: offset, as: UInt8.self)
    }

    @inline(__always)
    mutating func u16(_ field: String) throws(WireError) -> UInt16 {
        try require(2, field)
        defer { offset += 2 }
        return UInt16(littleEndian: body.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    @inline(__always)
    mutating func u32(_ field: String) throws(WireError) -> UInt32 {
        try require(4, field)
        defer { offset += 4 }
        return UInt32(littleEndian: body.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    @inline(__always)
    mutating func u64(_ field: String) throws(WireError) -> UInt64 {
        try require(8, field)
        defer { offset += 8 }
        return UInt64(littleEndian: body.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    /// Reads `size` bytes that must all be zero (reserved fields).
    mutating func reserved(_ size: Int, _ field: String) throws(WireError) {
        try require(size, field)
        let at = frameOffset
        for i in 0..<size where body.load(fromByteOffset: offset + i, as: UInt8.self) != 0 {
            throw .reservedNonZero(type: type, field: field, offset: at)
        }
        offset += size
    }

    mutating func sessionID(_ field: String) throws(WireError) -> SessionID {
        try require(SessionID.size, field)
        defer { offset += SessionID.size }
        return SessionID(loadingFrom: body.baseAddress! + offset)
    }

    mutating func bytes32(_ field: String) throws(WireError) -> Bytes32 {
        try require(Bytes32.size, field)
        defer { offset += Bytes32.size }
        return Bytes32(loadingFrom: body.baseAddress! + offset)
    }

    /// A zero-copy view of the next `n` bytes.
    mutating func view(_ n: Int, _ field: String) throws(WireError) -> UnsafeRawBufferPointer {
        try require(n, field)
        defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: body[offset..<(offset + n)])
    }

    /// A zero-copy view of everything left in the frame.
    mutating func rest() -> UnsafeRawBufferPointer {
        defer { offset = body.count }
        return UnsafeRawBufferPointer(rebasing: body[offset...])
    }

    /// A count of `elementSize`-byte entries, checked against `max` and against the bytes left
    /// BEFORE anything is allocated for it.
    func count<T: FixedWidthInteger>(_ raw: T, elementSize: Int, max: Int, _ field: String) throws(WireError) -> Int {
        let n = Int(raw)
        if n > max { throw .limitExceeded(type: type, field: field, value: n, max: max) }
        let (bytes, overflow) = n.multipliedReportingOverflow(by: elementSize)
        if overflow || bytes > remaining {
            throw .truncated(type: type, field: field, offset: frameOffset,
                             needed: overflow ? Int.max : bytes, available: remaining)
        }
        return n
    }

    /// A UTF-8 string of `length` bytes (length already read), at most `max` bytes.
    mutating func string(length: UInt16, max: Int, _ field: String) throws(WireError) -> String {
        let n = Int(length)
        if n > max { throw .limitExceeded(type: type, field: field, value: n, max: max) }
        let at = frameOffset
        let raw = try view(n, field)
        guard let s = String(validating: raw, as: UTF8.self) else {
            throw .invalidUTF8(type: type, field: field, offset: at)
        }
        return s
    }

    func invalid(_ field: String, _ value: some FixedWidthInteger, at fieldOffset: Int) -> WireError {
        .invalidValue(type: type, field: field, offset: fieldOffset, value: UInt64(truncatingIfNeeded: value))
    }

    /// Fails if bytes are left over in the frame.
    func end() throws(WireError) {
        if remaining != 0 { throw .trailingBytes(type: type, offset: frameOffset, count: remaining) }
    }
}
