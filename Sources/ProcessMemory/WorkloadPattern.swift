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

    /// The generation a page was being rewritten to when its writer was stopped inside `fill`, or nil when `page` is
    /// not exactly such a page. `fill` stores words 2... in ascending order, then word 1 (the generation), then word 0
    /// (the index), so a pause between two of its stores leaves: word 0 still the old one (0 for a page never written);
    /// words 2... the new pattern up to some word and the old one after it (zeros for generation 0), with word 1 still
    /// the old generation; or every word new but word 0 (the first write of a page: word 0 still 0). A VM's vCPU finishes
    /// such a write when it runs on at a destination; a process restarted there must finish it itself.
    public static func interruptedFill(_ page: UnsafeRawPointer, index: UInt64, pageSize: Int = 4096) -> UInt64? {
        let words = page.assumingMemoryBound(to: UInt64.self)
        let count = pageSize / 8
        if words[1] == 1 && words[0] == 0 {
            let s = seed(index: index, generation: 1)
            for w in 2..<count where words[w] != s ^ (UInt64(w) &* k3) { return nil }
            return 1
        }
        let from = words[1]
        guard from < UInt64.max, words[0] == (from == 0 ? 0 : index) else { return nil }
        let new = seed(index: index, generation: from + 1)
        var w = 2
        while w < count && words[w] == new ^ (UInt64(w) &* k3) { w += 1 }
        guard w > 2 else { return nil }
        let old = seed(index: index, generation: from)
        while w < count && words[w] == (from == 0 ? 0 : old ^ (UInt64(w) &* k3)) { w += 1 }
        return w == count ? from + 1 : nil
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
