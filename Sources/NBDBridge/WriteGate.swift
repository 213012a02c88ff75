import Synchronization
import Glibc

/// The switchover valve in front of the store's writes: ``quiesce()`` stops new writes (they wait,
/// parked in their connection's loop) and returns once the writes already in flight have completed;
/// ``resume()`` lets the parked ones go.
///
/// Lock-free on the write path: a write first counts itself in, then checks the gate; `quiesce`
/// first closes the gate, then waits for the count to reach zero (sequentially consistent atomics,
/// so one of the two always sees the other).
public final class WriteGate: Sendable {
    private let closed = Atomic<Bool>(false)
    private let inFlight = Atomic<Int>(0)

    public init() {}

    /// Whether writes are being held.
    public var isQuiesced: Bool { closed.load(ordering: .sequentiallyConsistent) }

    /// Writes (and trims, zeroes) currently past the gate.
    public var writesInFlight: Int { inFlight.load(ordering: .sequentiallyConsistent) }

    /// Tries to let one write through. False: the gate is closed, park the write and retry later.
    @inline(__always)
    public func tryEnter() -> Bool {
        inFlight.add(1, ordering: .sequentiallyConsistent)
        if closed.load(ordering: .sequentiallyConsistent) {
            inFlight.subtract(1, ordering: .sequentiallyConsistent)
            return false
        }
        return true
    }

    /// A write admitted by ``tryEnter()`` has completed.
    @inline(__always)
    public func leave() {
        inFlight.subtract(1, ordering: .sequentiallyConsistent)
    }

    /// Stops new writes and waits until in-flight ones have completed, or `timeoutNanoseconds` passed.
    /// Returns true when drained. Blocks the calling thread (the engine's, never a connection's).
    @discardableResult
    public func quiesce(timeoutNanoseconds: UInt64 = 30_000_000_000) -> Bool {
        closed.store(true, ordering: .sequentiallyConsistent)
        let deadline = MonotonicClock.nanoseconds() + timeoutNanoseconds
        while inFlight.load(ordering: .sequentiallyConsistent) > 0 {
            if MonotonicClock.nanoseconds() > deadline { return false }
            usleep(100)
        }
        return true
    }

    /// Lets writes through again.
    public func resume() {
        closed.store(false, ordering: .sequentiallyConsistent)
    }
}

/// CLOCK_MONOTONIC in nanoseconds (`clock_gettime`).
enum MonotonicClock {
    @inline(__always)
    static func nanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
