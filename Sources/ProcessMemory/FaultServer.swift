import CFerryShims
import SystemPackage

/// One userfaultfd event, flattened from `struct uffd_msg`.
public struct FaultEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// UFFD_EVENT_PAGEFAULT: a thread waits for the page at `address` (page-aligned by the server).
        case pageFault
        /// UFFD_EVENT_REMOVE: madvise(DONTNEED/REMOVE) dropped `[address, end)`; answer later faults there with zeros.
        case remove
        /// UFFD_EVENT_UNMAP: `[address, end)` was unmapped.
        case unmap
        /// Any other event (FORK, REMAP), with its code.
        case other(UInt8)
    }
    public var kind: Kind
    public var address: UInt64
    /// End of the range for remove/unmap.
    public var end: UInt64
    /// Pagefault flags: bit 0 = write, bit 1 = write-protect fault.
    public var flags: UInt64

    public var isWrite: Bool { flags & UInt64(FERRY_UFFD_PAGEFAULT_FLAG_WRITE) != 0 }
}

/// The destination's fault service primitives over a userfaultfd in MISSING mode (Firecracker's handler example and
/// CRIU's lazy-pages daemon are the models): read events, answer a fault with `copy(page:to:)` (UFFDIO_COPY) or
/// `zero(range:)` (UFFDIO_ZEROPAGE), `wake`.
///
/// Allocation-free after init: events land in a preallocated array; events read while retrying an EAGAIN copy are
/// kept and returned first by the next `nextEvents`. EEXIST (the page is already there) counts as success.
public struct FaultServer: ~Copyable {
    public let uffd: Userfaultfd
    public let mappings: [GuestMemoryMapping]
    let raw: UnsafeMutablePointer<ferry_uffd_event>
    let events: UnsafeMutablePointer<FaultEvent>
    static let batch = 64
    /// Events read during an EAGAIN retry, returned by the next `nextEvents`.
    var stash: [FaultEvent] = []
    public private(set) var copies = 0
    public private(set) var zeroes = 0
    public private(set) var alreadyPresent = 0

    public init(uffd: consuming Userfaultfd, mappings: [GuestMemoryMapping]) {
        self.uffd = uffd
        self.mappings = mappings
        raw = .allocate(capacity: Self.batch)
        events = .allocate(capacity: Self.batch)
        stash.reserveCapacity(Self.batch * 4)
    }

    /// Serves a received handshake's userfaultfd and mappings.
    public init(handshake: consuming UFFDHandshake) {
        let mappings = handshake.mappings
        // Take the userfaultfd; the connection closes when the rest of the handshake is dropped.
        self.init(uffd: handshake.uffd, mappings: mappings)
    }

    deinit {
        raw.deallocate()
        events.deallocate()
    }

    /// Waits up to `timeoutMilliseconds` (-1 forever, 0 not at all) for events and returns those pending (at most 64).
    /// The buffer stays valid until the next call. The corresponding system calls are `poll` and `read`.
    public mutating func nextEvents(timeoutMilliseconds: Int32) throws(ProcessMemoryError) -> UnsafeBufferPointer<FaultEvent> {
        if !stash.isEmpty {
            let n = min(stash.count, Self.batch)
            for i in 0..<n { events[i] = stash[i] }
            stash.removeFirst(n)
            return UnsafeBufferPointer(start: events, count: n)
        }
        var n = try uffd.readEvents(into: UnsafeMutableBufferPointer(start: raw, count: Self.batch))
        if n == 0 && timeoutMilliseconds != 0 {
            guard try UnixSocket.waitReadable(uffd.descriptor, timeoutMilliseconds: timeoutMilliseconds) else {
                return UnsafeBufferPointer(start: events, count: 0)
            }
            n = try uffd.readEvents(into: UnsafeMutableBufferPointer(start: raw, count: Self.batch))
        }
        for i in 0..<n { events[i] = Self.convert(raw[i]) }
        return UnsafeBufferPointer(start: events, count: n)
    }

    @inline(__always)
    static func convert(_ e: ferry_uffd_event) -> FaultEvent {
        let kind: FaultEvent.Kind
        switch Int32(e.event) {
        case FERRY_UFFD_EVENT_PAGEFAULT: kind = .pageFault
        case FERRY_UFFD_EVENT_REMOVE: kind = .remove
        case FERRY_UFFD_EVENT_UNMAP: kind = .unmap
        default: kind = .other(e.event)
        }
        let address = kind == .pageFault ? e.address & ~UInt64(4095) : e.address
        return FaultEvent(kind: kind, address: address, end: e.end, flags: e.flags)
    }

    /// Installs `page` (one or more whole pages) at `address` and wakes the faulting thread (UFFDIO_COPY).
    /// EEXIST counts as success (`.alreadyPresent`); on EAGAIN the pending events are read into the stash and the
    /// copy retried. Returns `.copied` or `.alreadyPresent`.
    @discardableResult
    public mutating func copy(page: UnsafeRawBufferPointer, to address: UInt64) throws(ProcessMemoryError) -> Userfaultfd.CopyOutcome {
        for _ in 0..<1000 {
            let outcome = try uffd.copy(page, to: address)
            switch outcome {
            case .copied: copies += 1; return outcome
            case .alreadyPresent: alreadyPresent += 1; return outcome
            case .retry: try drainIntoStash()
            }
        }
        throw ProcessMemoryError("UFFDIO_COPY to \(hex(address)) still EAGAIN after 1000 retries", errno: .resourceTemporarilyUnavailable)
    }

    /// Maps zero pages over `range` and wakes the faulting threads (UFFDIO_ZEROPAGE); EEXIST counts as success,
    /// EAGAIN drains events and retries.
    @discardableResult
    public mutating func zero(range: AddressRange) throws(ProcessMemoryError) -> Userfaultfd.CopyOutcome {
        for _ in 0..<1000 {
            let outcome = try uffd.zero(range)
            switch outcome {
            case .copied: zeroes += 1; return outcome
            case .alreadyPresent: alreadyPresent += 1; return outcome
            case .retry: try drainIntoStash()
            }
        }
        throw ProcessMemoryError("UFFDIO_ZEROPAGE of \(range) still EAGAIN after 1000 retries", errno: .resourceTemporarilyUnavailable)
    }

    /// Wakes threads waiting in `range` (UFFDIO_WAKE), e.g. after another resolver installed the pages.
    public func wake(range: AddressRange) throws(ProcessMemoryError) { try uffd.wake(range) }

    mutating func drainIntoStash() throws(ProcessMemoryError) {
        let n = try uffd.readEvents(into: UnsafeMutableBufferPointer(start: raw, count: Self.batch))
        for i in 0..<n { stash.append(Self.convert(raw[i])) }
    }
}
