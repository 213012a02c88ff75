import Synchronization
import CFerryShims

/// Slows a writer that dirties the disk faster than a migration can copy it (Bradford et al. 2007's
/// write throttling). Inactive until ``enable(_:)``; then, over a sliding window, once the bytes
/// written exceed `bytesPerSecond × window` (the whole disk) or one block has been rewritten more
/// than `hotBlockWrites` times in the window, each further write waits `delay` before it is issued.
///
/// The server asks ``delay(offset:length:)`` before each write and, when it is non-zero, arms an
/// io_uring timeout on the connection's ring: the thread never blocks. When the timeout expires the
/// connection reports how long the write was really held (``noteHeld(nanoseconds:)``, monotonic
/// clock), so ``totalDelayNanoseconds`` is a measurement, not the policy's delay times a count.
/// Lock-free (atomics).
public final class WriteThrottle: @unchecked Sendable {
    /// The throttle's settings.
    public struct Policy: Sendable, Equatable {
        /// Dirty rate above which writes are delayed, over the whole disk.
        public var bytesPerSecond: UInt64
        /// How long each write over the limit waits.
        public var delayNanoseconds: UInt64
        /// The measuring window.
        public var windowNanoseconds: UInt64
        /// Writes to one block within a window above which writes to that block are delayed (0: off).
        public var hotBlockWrites: UInt32

        public init(bytesPerSecond: UInt64, delayNanoseconds: UInt64 = 1_000_000,
                    windowNanoseconds: UInt64 = 100_000_000, hotBlockWrites: UInt32 = 0) {
            self.bytesPerSecond = bytesPerSecond
            self.delayNanoseconds = delayNanoseconds
            self.windowNanoseconds = max(1_000_000, windowNanoseconds)
            self.hotBlockWrites = hotBlockWrites
        }
    }

    private let enabled = Atomic<Bool>(false)
    private let limitBytes = Atomic<UInt64>(0)          // bytesPerSecond × window
    private let delayNs = Atomic<UInt64>(0)
    private let windowNs = Atomic<UInt64>(100_000_000)
    private let hotLimit = Atomic<UInt32>(0)
    private let windowStart = Atomic<UInt64>(0)
    private let windowBytes = Atomic<UInt64>(0)
    private let delayed = Atomic<UInt64>(0)
    private let delayTotal = Atomic<UInt64>(0)
    /// Per block: (window epoch << 32) | writes in that epoch.
    private let blockCounters: UnsafeMutablePointer<UInt64>
    private let blockCount: Int
    private let blockShift: UInt64

    /// A throttle for a disk of `diskSize` bytes; hot blocks are counted in blocks of `blockSize`.
    public init(diskSize: UInt64, blockSize: UInt64 = 64 * 1024) {
        precondition(blockSize > 0 && blockSize & (blockSize - 1) == 0, "block size \(blockSize) is not a power of two")
        blockShift = UInt64(blockSize.trailingZeroBitCount)
        blockCount = max(1, Int((diskSize + blockSize - 1) >> blockShift))
        blockCounters = .allocate(capacity: blockCount)
        blockCounters.initialize(repeating: 0, count: blockCount)
    }

    deinit { blockCounters.deallocate() }

    /// Turns the throttle on (or changes its policy).
    public func enable(_ policy: Policy) {
        let limit = policy.bytesPerSecond.multipliedReportingOverflow(by: policy.windowNanoseconds)
        limitBytes.store(limit.overflow ? .max : limit.partialValue / 1_000_000_000, ordering: .relaxed)
        delayNs.store(policy.delayNanoseconds, ordering: .relaxed)
        windowNs.store(policy.windowNanoseconds, ordering: .relaxed)
        hotLimit.store(policy.hotBlockWrites, ordering: .relaxed)
        windowStart.store(MonotonicClock.nanoseconds(), ordering: .relaxed)
        windowBytes.store(0, ordering: .relaxed)
        enabled.store(true, ordering: .releasing)
    }

    /// Turns the throttle off: writes go at full speed.
    public func disable() { enabled.store(false, ordering: .releasing) }

    /// Whether the throttle is on.
    public var isEnabled: Bool { enabled.load(ordering: .acquiring) }
    /// Writes that were delayed.
    public var writesDelayed: UInt64 { delayed.load(ordering: .relaxed) }
    /// Total time writes were really held, in nanoseconds: for each delayed write, from arming its
    /// timeout to the timeout's expiry, on the monotonic clock (``noteHeld(nanoseconds:)``).
    public var totalDelayNanoseconds: UInt64 { delayTotal.load(ordering: .relaxed) }

    /// A delayed write was held `nanoseconds` (measured) before it was issued. Called by the
    /// connection loop when the write's timeout expires.
    public func noteHeld(nanoseconds: UInt64) {
        delayTotal.add(nanoseconds, ordering: .relaxed)
    }

    /// How long the write of `[offset, offset+length)` must wait before it is issued (0: go now).
    /// Counts the write in the current window. Called once per write by the connection loop.
    @inline(__always)
    public func delay(offset: UInt64, length: UInt64) -> UInt64 {
        guard enabled.load(ordering: .acquiring) else { return 0 }
        let now = MonotonicClock.nanoseconds()
        let window = windowNs.load(ordering: .relaxed)
        let start = windowStart.load(ordering: .relaxed)
        if now &- start >= window {
            // New window: one thread wins the exchange and resets the byte count.
            if windowStart.compareExchange(expected: start, desired: now, ordering: .relaxed).exchanged {
                windowBytes.store(0, ordering: .relaxed)
            }
        }
        let bytes = windowBytes.add(length, ordering: .relaxed).newValue
        var throttle = bytes > limitBytes.load(ordering: .relaxed)
        let hot = hotLimit.load(ordering: .relaxed)
        if hot > 0 {
            let epoch = (windowStart.load(ordering: .relaxed) / 1_000_000) & 0xffff_ffff
            let block = min(Int(offset >> blockShift), blockCount - 1)
            let counter = blockCounters + block
            while true {
                let old = ferry_nbd_atomic_load_u64(counter)
                let new: UInt64 = (old >> 32) == epoch ? old + 1 : (epoch << 32) | 1
                if ferry_nbd_atomic_cas_u64(counter, old, new) {
                    if UInt32(truncatingIfNeeded: new) > hot { throttle = true }
                    break
                }
            }
        }
        guard throttle else { return 0 }
        let d = delayNs.load(ordering: .relaxed)
        delayed.add(1, ordering: .relaxed)
        return d
    }
}
