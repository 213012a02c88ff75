import Crypto

/// SHA-256 of memory, computed the same way on both sides so the agents can compare at pause: the bytes of the
/// regions, in the order given, concatenated. Pages not resident in the source process are hashed as zeros without
/// being read (they read as zeros anyway), so a digest does not populate the target's memory.
public struct MemoryDigest {
    var hasher = SHA256()

    public init() {}

    /// Adds bytes.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) { hasher.update(bufferPointer: bytes) }

    /// Adds `count` zero bytes.
    public mutating func updateZeros(count: Int) {
        withUnsafeTemporaryAllocation(byteCount: 65536, alignment: 64) { zero in
            zero.initializeMemory(as: UInt8.self, repeating: 0)
            var left = count
            while left > 0 {
                let n = min(left, zero.count)
                hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: zero[0..<n]))
                left -= n
            }
        }
    }

    /// The digest as lowercase hex.
    public consuming func finalizeHex() -> String {
        hasher.finalize().map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
    }

    /// SHA-256 of a local buffer (the destination's copy), as lowercase hex.
    public static func of(_ bytes: UnsafeRawBufferPointer) -> String {
        var d = MemoryDigest()
        d.update(bytes)
        return d.finalizeHex()
    }

    /// SHA-256 of `regions` of process `pid` (in the order given), read with `process_vm_readv` in 1 MiB chunks;
    /// non-resident pages count as zeros, except in the regions `readWhole` marks (shared memory, whose
    /// pages may hold data without a page-table entry here), which are read page by page in full.
    public static func of(pid: Int32, regions: [AddressRange], pageSize: UInt64 = 4096,
                          readWhole: [Bool] = []) throws(ProcessMemoryError) -> String {
        let reader = try ProcessMemoryReader(pid: pid, pageSize: pageSize)
        let maxPages = regions.map { $0.pageCount(pageSize: pageSize) }.max() ?? 0
        let resident = PageBitmap(pageCount: maxPages)
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { chunk.deallocate() }
        let chunkPages = chunk.count / Int(pageSize)
        var d = MemoryDigest()
        for (index, region) in regions.enumerated() {
            if index < readWhole.count && readWhole[index] {
                resident.set(first: 0, count: region.pageCount(pageSize: pageSize))
            } else {
                try reader.residency(of: region, into: resident)
            }
            let pages = region.pageCount(pageSize: pageSize)
            var p = 0
            while p < pages {
                let isResident = resident[p]
                var n = 1
                while p + n < pages && resident[p + n] == isResident && (!isResident || n < chunkPages) { n += 1 }
                let bytes = n * Int(pageSize)
                if isResident {
                    let got = try reader.read(from: region.start + UInt64(p) * pageSize,
                                              into: UnsafeMutableRawBufferPointer(rebasing: chunk[0..<bytes]))
                    guard got == bytes else {
                        throw ProcessMemoryError("digest read \(got) of \(bytes) bytes at \(hex(region.start + UInt64(p) * pageSize)) in process \(pid)", errno: .badAddress)
                    }
                    d.update(UnsafeRawBufferPointer(rebasing: chunk[0..<bytes]))
                } else {
                    d.updateZeros(count: bytes)
                }
                p += n
            }
        }
        return d.finalizeHex()
    }
}
