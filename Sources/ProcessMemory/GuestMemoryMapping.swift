import Foundation

/// One guest-memory mapping as Firecracker's UFFD handshake describes it (reference-notes.md):
/// `{"base_host_virt_addr", "size", "offset", "page_size" | "page_size_kib"}`, where `offset` is the region's start in
/// the memory file (regions concatenated in guest-physical order) and the page size is in bytes whichever name carries
/// it. Decoding accepts either name (4096 when neither, as Firecracker up to v1.6 sent) and ignores unknown fields;
/// encoding writes both names, as Firecracker does since v1.12.
public struct GuestMemoryMapping: Codable, Sendable, Equatable, CustomStringConvertible {
    public var baseHostVirtAddr: UInt64
    public var size: UInt64
    public var offset: UInt64
    public var pageSize: UInt64

    public init(baseHostVirtAddr: UInt64, size: UInt64, offset: UInt64, pageSize: UInt64 = 4096) {
        self.baseHostVirtAddr = baseHostVirtAddr
        self.size = size
        self.offset = offset
        self.pageSize = pageSize
    }

    /// The host virtual range of the mapping.
    public var range: AddressRange { AddressRange(start: baseHostVirtAddr, length: size) }

    enum CodingKeys: String, CodingKey {
        case baseHostVirtAddr = "base_host_virt_addr", size, offset, pageSize = "page_size", pageSizeKib = "page_size_kib"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        baseHostVirtAddr = try c.decode(UInt64.self, forKey: .baseHostVirtAddr)
        size = try c.decode(UInt64.self, forKey: .size)
        offset = try c.decodeIfPresent(UInt64.self, forKey: .offset) ?? 0
        pageSize = try c.decodeIfPresent(UInt64.self, forKey: .pageSize)
            ?? c.decodeIfPresent(UInt64.self, forKey: .pageSizeKib) ?? 4096
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(baseHostVirtAddr, forKey: .baseHostVirtAddr)
        try c.encode(size, forKey: .size)
        try c.encode(offset, forKey: .offset)
        try c.encode(pageSize, forKey: .pageSize)
        try c.encode(pageSize, forKey: .pageSizeKib)
    }

    public var description: String { "\(range) offset \(offset) page \(pageSize)" }

    /// Decodes the handshake's JSON array, checking each mapping (page size 4 KiB or 2 MiB, aligned, non-empty).
    public static func decodeList(_ json: [UInt8]) throws(ProcessMemoryError) -> [GuestMemoryMapping] {
        let list: [GuestMemoryMapping]
        do {
            list = try JSONDecoder().decode([GuestMemoryMapping].self, from: Data(json))
        } catch {
            throw ProcessMemoryError("UFFD handshake payload of \(json.count) bytes is not a JSON array of mappings: \(error)")
        }
        for m in list {
            guard m.pageSize == 4096 || m.pageSize == 2 << 20 else {
                throw ProcessMemoryError("UFFD handshake mapping \(m): page size \(m.pageSize) is neither 4096 nor 2097152")
            }
            guard m.size > 0, m.size % m.pageSize == 0, m.baseHostVirtAddr % m.pageSize == 0 else {
                throw ProcessMemoryError("UFFD handshake mapping \(m): base and size must be non-zero multiples of the page size")
            }
        }
        return list
    }

    /// Encodes a list as the handshake's JSON array.
    public static func encodeList(_ list: [GuestMemoryMapping]) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array((try? encoder.encode(list)) ?? Data("[]".utf8))
    }
}

extension Array where Element == GuestMemoryMapping {
    /// The mapping holding `address` and the address's offset in the memory file, or nil.
    public func locate(_ address: UInt64) -> (index: Int, fileOffset: UInt64)? {
        for (i, m) in enumerated() where m.range.contains(address) {
            return (i, m.offset + (address - m.baseHostVirtAddr))
        }
        return nil
    }
}
