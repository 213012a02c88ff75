/// A reusable list of address runs `[start, end)`: the output of a dirty scan.
///
/// Preallocated with a capacity; `removeAll()` keeps the storage, so a scan loop allocates only while warming
/// up (when a round has more runs than any before it, the storage doubles). Noncopyable: it owns its storage.
public struct PageRunBuffer: ~Copyable {
    @usableFromInline var storage: UnsafeMutablePointer<AddressRange>
    public private(set) var capacity: Int
    public private(set) var count: Int = 0

    public init(capacity: Int = 4096) {
        self.capacity = max(capacity, 16)
        storage = .allocate(capacity: self.capacity)
    }

    deinit { storage.deallocate() }

    public mutating func removeAll() { count = 0 }

    /// Appends a run, merging it with the last one when they touch.
    public mutating func append(_ run: AddressRange) {
        if count > 0 && storage[count - 1].end == run.start {
            storage[count - 1].end = run.end
            return
        }
        if count == capacity { grow(to: capacity * 2) }
        (storage + count).initialize(to: run)
        count += 1
    }

    mutating func grow(to newCapacity: Int) {
        let bigger = UnsafeMutablePointer<AddressRange>.allocate(capacity: newCapacity)
        bigger.moveInitialize(from: storage, count: count)
        storage.deallocate()
        storage = bigger
        capacity = newCapacity
    }

    /// Ensures room for `n` runs without a later allocation.
    public mutating func reserve(_ n: Int) { if n > capacity { grow(to: n) } }

    public subscript(i: Int) -> AddressRange {
        precondition(i >= 0 && i < count, "run \(i) of \(count)")
        return storage[i]
    }

    /// The runs as a buffer valid until the next mutation.
    public var runs: UnsafeBufferPointer<AddressRange> { UnsafeBufferPointer(start: storage, count: count) }

    /// Total pages in all runs.
    public func pageCount(pageSize: UInt64 = 4096) -> Int {
        var n = 0
        for i in 0..<count { n += storage[i].pageCount(pageSize: pageSize) }
        return n
    }

    /// Every page address in the runs, in order (for tests and logs; allocates).
    public func pageAddresses(pageSize: UInt64 = 4096) -> [UInt64] {
        var out: [UInt64] = []
        for i in 0..<count {
            var a = storage[i].start
            while a < storage[i].end { out.append(a); a += pageSize }
        }
        return out
    }
}
