/// The verifiable page pattern of `ferry-workload` (after QEMU's migration test guest, which lets a test find any
/// lost or stale page): every page is either all zeros (never written, generation 0) or
///
///     word 0: page index, word 1: generation (>= 1), word w >= 2: seed(index, generation) ^ (w &* K3)
///
/// so a page read anywhere (at the source, from the wire, at the destination) can be checked on its own.
public enum WorkloadPattern {
    /// What a page holds.
    public enum Verdict: Equatable, Sendable {
        /// All zeros: never written.
        case untouched
        /// A correct pattern page with this generation.
        case valid(generation: UInt64)
        /// Neither: a lost, torn or misplaced page. `word` is the first wrong 8-byte word.
        case corrupt(word: Int)
    }

    @usableFromInline static let k1: UInt64 = 0x9E37_79B9_7F4A_7C15
    @usableFromInline static let k2: UInt64 = 0xD6E8_FEB8_6659_FD93
    @usableFromInline static let k3: UInt64 = 0xA076_1D64_78BD_642F

    @inlinable static func seed(index: UInt64, generation: UInt64) -> UInt64 {
        (index &* k1) ^ (generation &* k2) ^ 0x5EED
    }

    /// Writes page `index` at `generation` (>= 1) into `page` (pageSize bytes, 8-byte aligned).
    @inlinable
    public static func fill(_ page: UnsafeMutableRawPointer, index: UInt64, generation: UInt64, pageSize: Int = 4096) {
        let words = page.assumingMemoryBound(to: UInt64.self)
        let s = seed(index: index, generation: generation)
        for w in 2..<(pageSize / 8) { words[w] = s ^ (UInt64(w) &* k3) }
        words[1] = generation
        words[0] = index
    }

    /// Checks page `index` in `page`.
    @inlinable
    public static func verify(_ page: UnsafeRawPointer, index: UInt64, pageSize: Int = 4096) -> Verdict {
        let words = page.assumingMemoryBound(to: UInt64.self)
        let generation = words[1]
        if generation == 0 {
            for w in 0..<(pageSize / 8) where words[w] != 0 { return .corrupt(word: w) }
            return .untouched
        }
        if words[0] != index { return .corrupt(word: 0) }
        let s = seed(index: index, generation: generation)
        for w in 2..<(pageSize / 8) where words[w] != s ^ (UInt64(w) &* k3) { return .corrupt(word: w) }
        return .valid(generation: generation)
    }
}
