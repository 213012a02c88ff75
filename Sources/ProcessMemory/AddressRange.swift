/// A half-open range of virtual addresses `[start, end)` in some process.
///
/// Used for memory regions (`/proc/PID/maps` lines), for dirty page runs returned by a tracker,
/// and for userfaultfd ranges. Addresses are plain `UInt64`, as the kernel's interfaces use them.
public struct AddressRange: Hashable, Sendable, CustomStringConvertible {
    public var start: UInt64
    public var end: UInt64

    public init(start: UInt64, end: UInt64) {
        precondition(end >= start, "address range end \(hex(end)) before start \(hex(start))")
        self.start = start
        self.end = end
    }

    public init(start: UInt64, length: UInt64) {
        self.init(start: start, end: start + length)
    }

    /// Bytes in the range.
    public var length: UInt64 { end - start }
    /// Pages in the range for a page size (the range is expected to be page-aligned).
    public func pageCount(pageSize: UInt64 = 4096) -> Int { Int(length / pageSize) }
    public func contains(_ address: UInt64) -> Bool { address >= start && address < end }
    public func overlaps(_ other: AddressRange) -> Bool { start < other.end && other.start < end }

    /// Parses `START-END` in hexadecimal (with or without 0x), as `/proc/PID/maps` and `--region` spell it.
    public init(parsing text: Substring) throws(ProcessMemoryError) {
        let parts = text.split(separator: "-", maxSplits: 1)
        func number(_ s: Substring) -> UInt64? {
            var t = s
            if t.hasPrefix("0x") || t.hasPrefix("0X") { t = t.dropFirst(2) }
            return UInt64(t, radix: 16)
        }
        guard parts.count == 2, let s = number(parts[0]), let e = number(parts[1]), e > s else {
            throw ProcessMemoryError("bad address range '\(text)': expected START-END in hex with END > START")
        }
        self.init(start: s, end: e)
    }

    /// Parses `START-END` in hexadecimal.
    public init(parsing text: String) throws(ProcessMemoryError) { try self.init(parsing: text[...]) }

    public var description: String { "\(hex(start))-\(hex(end))" }
}
