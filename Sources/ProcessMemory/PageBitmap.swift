/// A fixed-size bitmap of pages, one bit per page, allocated once and reused.
///
/// Used for residency (present or swapped pages of a region) and for dirty sets when a caller wants a
/// bitmap rather than runs. Noncopyable: it owns its storage.
public struct PageBitmap: ~Copyable {
    public let pageCount: Int
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    @usableFromInline let wordCount: Int

    public init(pageCount: Int) {
        precondition(pageCount >= 0)
        self.pageCount = pageCount
        wordCount = (pageCount + 63) / 64
        words = .allocate(capacity: max(wordCount, 1))
        words.initialize(repeating: 0, count: max(wordCount, 1))
    }

    deinit { words.deallocate() }

    @inlinable public subscript(page: Int) -> Bool {
        get { words[page >> 6] & (1 << UInt64(page & 63)) != 0 }
        nonmutating set {
            if newValue { words[page >> 6] |= 1 << UInt64(page & 63) } else { words[page >> 6] &= ~(1 << UInt64(page & 63)) }
        }
    }

    /// Sets the bits of pages `[first, first+count)`.
    public func set(first: Int, count: Int) {
        precondition(first >= 0 && first + count <= pageCount, "pages \(first)+\(count) beyond bitmap of \(pageCount)")
        var p = first
        let end = first + count
        while p < end {
            if p & 63 == 0 && end - p >= 64 { words[p >> 6] = ~0; p += 64 } else { self[p] = true; p += 1 }
        }
    }

    public func clearAll() { words.update(repeating: 0, count: max(wordCount, 1)) }

    /// Number of set bits.
    public var popcount: Int {
        var n = 0
        for i in 0..<wordCount { n += words[i].nonzeroBitCount }
        return n
    }

    /// Calls `body` with each maximal run of set pages, as `(first, count)`.
    public func forEachRun(_ body: (Int, Int) throws -> Void) rethrows {
        var p = 0
        while p < pageCount {
            if words[p >> 6] == 0 && p & 63 == 0 { p += 64; continue }
            if !self[p] { p += 1; continue }
            let first = p
            while p < pageCount && self[p] { p += 1 }
            try body(first, p - first)
        }
    }
}
