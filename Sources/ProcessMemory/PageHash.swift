/// A fast, well-defined 64-bit hash of a page's bytes, for the content-hash dirty tracker.
///
/// Per 8-byte little-endian word w: h = rotl(h ^ (w &* K1), 31) &* K2, seeded with the length; final avalanche as
/// in SplitMix64. Not cryptographic: it only has to notice that a page changed between two rounds.
public enum PageHash {
    @usableFromInline static let k1: UInt64 = 0x9E37_79B9_7F4A_7C15
    @usableFromInline static let k2: UInt64 = 0xC2B2_AE3D_27D4_EB4F

    @inlinable
    public static func hash(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var h: UInt64 = UInt64(bytes.count) &* k2
        let words = bytes.count / 8
        var i = 0
        // Four independent lanes keep the multiplier busy.
        var a = h, b = h ^ k1, c = h ^ k2, d = h &+ 1
        while i + 4 <= words {
            a = ((a ^ (bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) &* k1)) .rotl31) &* k2
            b = ((b ^ (bytes.loadUnaligned(fromByteOffset: i * 8 + 8, as: UInt64.self) &* k1)) .rotl31) &* k2
            c = ((c ^ (bytes.loadUnaligned(fromByteOffset: i * 8 + 16, as: UInt64.self) &* k1)) .rotl31) &* k2
            d = ((d ^ (bytes.loadUnaligned(fromByteOffset: i * 8 + 24, as: UInt64.self) &* k1)) .rotl31) &* k2
            i += 4
        }
        h = a ^ b.rotl31 ^ (c &* k1) ^ (d &* k2)
        while i < words {
            h = ((h ^ (bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) &* k1)).rotl31) &* k2
            i += 1
        }
        for j in (words * 8)..<bytes.count { h = (h ^ UInt64(bytes[j])) &* k1 }
        h ^= h >> 30; h = h &* 0xBF58_476D_1CE4_E5B9
        h ^= h >> 27; h = h &* 0x94D0_49BB_1331_11EB
        return h ^ (h >> 31)
    }
}

extension UInt64 {
    @usableFromInline var rotl31: UInt64 { (self << 31) | (self >> 33) }
}
