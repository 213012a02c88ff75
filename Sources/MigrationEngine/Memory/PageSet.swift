import CFerryShims

/// A fixed set of pages, one bit each, that several threads may read and update at once without a
/// lock (atomic bit operations from the `ferry_memengine.h` shim): which pages the destination has
/// received, which it has requested, which the source has delivered on the urgent lane.
/// Allocated once; no allocation per page.
public final class PageSet: @unchecked Sendable {
    /// Pages in the set's range.
    public let pageCount: Int
    let words: UnsafeMutablePointer<UInt64>
    let wordCount: Int

    public init(pageCount: Int) {
        self.pageCount = pageCount
        wordCount = max(1, (pageCount + 63) / 64)
        words = .allocate(capacity: wordCount)
        words.initialize(repeating: 0, count: wordCount)
    }

    deinit { words.deallocate() }

    /// Whether page `index` is in the set (acquire: what was written before it was added is visible).
    @inline(__always) public func contains(_ index: Int) -> Bool {
        ferry_bitmap_test_acquire(words, UInt64(index)) != 0
    }

    /// Adds page `index` (release); returns whether it was already there.
    @inline(__always) @discardableResult public func insert(_ index: Int) -> Bool {
        ferry_bitmap_set_release(words, UInt64(index)) != 0
    }

    /// Removes page `index`; returns whether it was there.
    @inline(__always) @discardableResult public func remove(_ index: Int) -> Bool {
        ferry_bitmap_clear(words, UInt64(index)) != 0
    }

    /// Adds every page (single-threaded set-up only).
    public func insertAll() {
        words.update(repeating: ~0, count: wordCount)
        let tail = pageCount & 63
        if tail != 0 { words[wordCount - 1] = (1 << UInt64(tail)) - 1 }
        if pageCount == 0 { words[0] = 0 }
    }

    /// Removes every page (single-threaded, or where a racing insert may be lost harmlessly).
    public func removeAll() {
        words.update(repeating: 0, count: wordCount)
    }

    /// Number of pages in the set (a racy snapshot while others update it).
    public var count: Int {
        var n = 0
        for i in 0..<wordCount { n += ferry_counter_load(words + i).nonzeroBitCount }
        return n
    }

    /// The first page at or after `start` in the set, or nil (wraps to nothing: the caller wraps).
    public func firstMember(from start: Int) -> Int? {
        var p = start
        while p < pageCount {
            let word = ferry_counter_load(words + (p >> 6)) >> UInt64(p & 63)
            if word == 0 { p = (p | 63) + 1; continue }
            let found = p + word.trailingZeroBitCount
            return found < pageCount ? found : nil
        }
        return nil
    }
}

/// A monotonic counter several threads add to (relaxed atomics; read for reports).
public final class SharedCounter: @unchecked Sendable {
    private let cell: UnsafeMutablePointer<UInt64>
    public init() { cell = .allocate(capacity: 1); cell.initialize(to: 0) }
    deinit { cell.deallocate() }
    @inline(__always) public func add(_ n: UInt64) { _ = ferry_counter_add(cell, n) }
    public var value: UInt64 { ferry_counter_load(cell) }
}
