import CFerryShims
import Glibc
import Synchronization

/// A dirty limit on another process's memory, without KVM's dirty ring: its regions are write-protected through
/// a userfaultfd in synchronous mode, so the first write to a page since the last scan stops its thread in the
/// kernel until this limit's thread lets it through (`UFFDIO_WRITEPROTECT` off, which wakes it). Pages are
/// let through at most at ``limit`` bytes/s (a virtual clock, with a burst of ``burstNanoseconds``); writes to a
/// page already written since the last scan run at full speed: only new dirtying is slowed, and a workload that
/// keeps rewriting its hot pages is not slowed at all.
///
/// The pages let through are the dirty set: a write-protect bit off means written (`PAGEMAP_SCAN`'s
/// `PAGE_IS_WRITTEN`), which ``DirtyTracker`` reads and sets again at each scan. If this agent dies, the kernel
/// closes the userfaultfd, wakes every waiting thread and drops the protection: the VM never stays blocked.
///
/// The thread reads faults with `poll` + `read` (the descriptor is O_NONBLOCK), one at a time in arrival order;
/// nothing on its path allocates.
public final class DirtyLimit: @unchecked Sendable {
    /// The synchronous-mode userfaultfd (the tracker registers the regions through it).
    let uffd: Userfaultfd
    let pageSize: UInt64
    /// New dirty bytes per second let through; 0 lets every write through at once.
    private let rate = Atomic<UInt64>(0)
    private let stopping = Atomic<Bool>(false)
    private let faultCount = Atomic<UInt64>(0)
    private let heldNanoseconds = Atomic<UInt64>(0)
    private let failures = Atomic<UInt64>(0)
    private var thread = pthread_t()
    private var running = false
    /// A pipe whose write end wakes the thread from its poll at ``stop()`` (-1 if none could be made: it
    /// then notices within its 20 ms poll timeout).
    private let wakeup: Int32
    private let wakeupWriter: Int32
    /// How far ahead of the virtual clock a writer may be before it waits (a burst of this much time's budget).
    public let burstNanoseconds: UInt64 = 5_000_000

    init(uffd: consuming Userfaultfd, pageSize: UInt64) {
        self.uffd = uffd
        self.pageSize = pageSize
        var ends: [Int32] = [-1, -1]
        if pipe(&ends) == 0 {
            for fd in ends { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        wakeup = ends[0]
        wakeupWriter = ends[1]
    }

    deinit {
        stop()
        if wakeup >= 0 { close(wakeup) }
        if wakeupWriter >= 0 { close(wakeupWriter) }
    }

    /// New dirty bytes let through per second (0: every write at once).
    public var limit: UInt64 {
        get { rate.load(ordering: .relaxed) }
        set { rate.store(newValue, ordering: .relaxed) }
    }

    /// Write faults served so far.
    public var faults: UInt64 { faultCount.load(ordering: .relaxed) }
    /// Total time writers were held, from the read of their fault to its release (nanoseconds).
    public var heldFor: UInt64 { heldNanoseconds.load(ordering: .relaxed) }

    /// Starts the thread that serves the faults.
    func start() throws(ProcessMemoryError) {
        let context = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let throttle = Unmanaged<DirtyLimit>.fromOpaque(raw!).takeRetainedValue()
            throttle.serve()
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<DirtyLimit>.fromOpaque(context).release()
            throw ProcessMemoryError("cannot start the dirty limit's thread", errno: .init(rawValue: rc))
        }
        running = true
    }

    /// Ends the thread and waits for it (every write it holds is let through first).
    func stop() {
        guard running else { return }
        rate.store(0, ordering: .relaxed)
        stopping.store(true, ordering: .releasing)
        if wakeupWriter >= 0 { var byte: UInt8 = 1; _ = write(wakeupWriter, &byte, 1) }
        pthread_join(thread, nil)
        running = false
    }

    /// Gives the regions back: every write goes through at once, the regions are unregistered (their
    /// protection is gone), every thread still waiting in them is woken (unregistering wakes only
    /// MISSING-mode waiters), and only then the thread ends. Returns the first failure.
    func end(regions: [AddressRange]) -> ProcessMemoryError? {
        rate.store(0, ordering: .relaxed)
        var first: ProcessMemoryError?
        for r in regions {
            do { try uffd.unregister(r) } catch { if first == nil { first = error } }
        }
        for r in regions { _ = ferry_uffdio_wake(uffd.descriptor.rawValue, r.start, r.length) }
        stop()
        return first
    }

    private static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    private func serve() {
        let events = UnsafeMutableBufferPointer<ferry_uffd_event>.allocate(capacity: 64)
        defer { events.deallocate() }
        let fd = uffd.descriptor.rawValue
        var clock: UInt64 = 0   // when the next page may go
        while !stopping.load(ordering: .acquiring) {
            var p = (pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeup, events: Int16(POLLIN), revents: 0))
            let ready = withUnsafeMutableBytes(of: &p) { poll($0.baseAddress!.assumingMemoryBound(to: pollfd.self), wakeup >= 0 ? 2 : 1, 20) }
            guard ready > 0, p.0.revents != 0 else { continue }
            let n = ferry_uffd_read_events(fd, events.baseAddress, 64)
            guard n > 0 else {
                // EAGAIN: another reader was first. Anything else (the process is gone): do not spin.
                if n < 0 && n != -EAGAIN { usleep(10_000) }
                continue
            }
            for i in 0..<Int(n) where events[i].event == UInt8(FERRY_UFFD_EVENT_PAGEFAULT) {
                let page = events[i].address & ~(pageSize - 1)
                let arrived = Self.now()
                var bytesPerSecond = rate.load(ordering: .relaxed)
                if bytesPerSecond > 0 {
                    clock = max(clock, arrived &- min(arrived, burstNanoseconds)) + pageSize * 1_000_000_000 / bytesPerSecond
                    // Sleep in short steps: a lifted limit or a stop lets the writer go at once.
                    while bytesPerSecond > 0 && !stopping.load(ordering: .relaxed) {
                        let now = Self.now()
                        guard now < clock else { break }
                        var step = timespec(tv_sec: 0, tv_nsec: Int(min(clock - now, 2_000_000)))
                        nanosleep(&step, nil)
                        bytesPerSecond = rate.load(ordering: .relaxed)
                    }
                }
                release(page)
                faultCount.add(1, ordering: .relaxed)
                heldNanoseconds.add(Self.now() &- arrived, ordering: .relaxed)
            }
        }
    }

    /// Turns the protection of `page` off, which wakes its writers. EAGAIN (the address space is changing)
    /// is retried; on any other failure the writers are woken anyway (they fault again and come back).
    private func release(_ page: UInt64) {
        let fd = uffd.descriptor.rawValue
        for _ in 0..<100 {
            let r = ferry_uffdio_writeprotect(fd, page, pageSize, 0)
            if r == 0 { return }
            if r != -EAGAIN { break }
        }
        failures.add(1, ordering: .relaxed)
        _ = ferry_uffdio_wake(fd, page, pageSize)
    }
}
