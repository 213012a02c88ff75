import ProcessMemory
import Wire

/// One region of the migrating process as the memory engine sends it: its id on the wire, its
/// addresses, and its place in the memory file (regions concatenated in the layout's order).
public struct SourceRegion: Sendable {
    public let id: UInt32
    public let range: AddressRange
    public let fileOffset: UInt64
    public let pageSize: Int

    public var pageCount: Int { Int(range.length) / pageSize }
    /// Its first page's number among all regions' pages (regions back to back, as in the memory file).
    public var firstGlobalPage: Int { Int(fileOffset) / pageSize }

    /// The layout entry for `memoryLayout`.
    public var wire: Wire.MemoryRegion {
        Wire.MemoryRegion(id: id, guestAddress: fileOffset, hostAddress: range.start, size: range.length, fileOffset: fileOffset)
    }

    /// Numbers `ranges` in order, concatenating them in the memory file.
    public static func numbered(_ ranges: [AddressRange], pageSize: Int = 4096) -> [SourceRegion] {
        var offset: UInt64 = 0
        return ranges.enumerated().map { index, range in
            defer { offset += range.length }
            return SourceRegion(id: UInt32(index), range: range, fileOffset: offset, pageSize: pageSize)
        }
    }
}

extension Digest {
    /// The digest from MemoryDigest's lowercase hex.
    static func fromHex(_ text: String) -> Digest {
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex, let next = text.index(index, offsetBy: 2, limitedBy: text.endIndex) {
            bytes.append(UInt8(text[index..<next], radix: 16) ?? 0)
            index = next
        }
        return Digest(bytes) ?? .zero
    }
}
