import CFerryShims
import Glibc

/// Fault-latency samples in nanoseconds, recorded from any thread into preallocated storage (an
/// atomic slot counter; no lock, no allocation per sample), summarised as percentiles at the end.
/// Samples beyond the capacity are counted but not kept.
public final class LatencyRecorder: @unchecked Sendable {
    private let samples: UnsafeMutablePointer<UInt64>
    private let capacity: Int
    private let counterCell: UnsafeMutablePointer<UInt64>

    /// Room for `capacity` samples, zeroed by the kernel as they are first written (`calloc` of a
    /// large block maps fresh pages): zeroing 8 MiB here cost a VM start 6 ms, each fresh page a
    /// fault to the host on this machine.
    public init(capacity: Int = 1 << 20) {
        self.capacity = capacity
        guard let storage = calloc(capacity, MemoryLayout<UInt64>.stride) else {
            fatalError("cannot reserve \(capacity) latency samples")
        }
        samples = storage.assumingMemoryBound(to: UInt64.self)
        counterCell = .allocate(capacity: 1)
        counterCell.initialize(to: 0)
    }

    deinit { free(samples); counterCell.deallocate() }

    /// Records one latency.
    @inline(__always) public func record(nanoseconds: UInt64) {
        let slot = Int(ferry_counter_add(counterCell, 1))
        if slot < capacity { samples[slot] = nanoseconds }
    }

    /// Samples recorded so far.
    public var count: Int { Int(ferry_counter_load(counterCell)) }

    /// Calls `body` with each sample kept from slot `cursor` on and returns where to go on next time. A slot
    /// whose sample is still being written (0) ends the walk there, to be read next time.
    public func forEach(from cursor: Int, _ body: (UInt64) -> Void) -> Int {
        var slot = cursor
        let end = min(count, capacity)
        while slot < end {
            let sample = samples[slot]
            if sample == 0 { break }
            body(sample)
            slot += 1
        }
        return slot
    }

    /// Percentiles of what was recorded, in microseconds (allocates: call at the end).
    public func summary() -> MigrationReport.LatencySummary {
        let n = min(count, capacity)
        var sorted = Array(UnsafeBufferPointer(start: samples, count: n))
        sorted.sort()
        func at(_ q: Double) -> Double {
            sorted.isEmpty ? 0 : Double(sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * q + 0.5))]) / 1000
        }
        return MigrationReport.LatencySummary(count: count, p50Us: at(0.5), p90Us: at(0.9), p99Us: at(0.99), maxUs: at(1))
    }
}
