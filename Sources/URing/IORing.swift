import CURing
import SystemPackage

/// One io_uring instance: a submission queue and a completion queue shared with the kernel.
///
/// An `IORing` is used by one thread at a time; it may be created on one thread and handed to
/// another (so by default it is not set up with `IORING_SETUP_SINGLE_ISSUER`, under which a
/// submission from any thread but the creator's fails with `EEXIST`; ``SetupOptions`` asks for it).
/// It is noncopyable because it owns kernel resources; `deinit` tears the ring down.
///
/// Operations are queued with the `prepare…` methods (see `IORing+Operations.swift`), each tagged
/// with a caller-chosen `UInt64`, submitted with ``submit()`` or ``submitAndWait(_:)``, and their
/// results visited with ``drainCompletions(_:)``. Nothing on that path allocates: the tag is how a
/// caller finds its own state for a completion (an index into a slot table, say).
///
/// The corresponding C library is liburing (`io_uring_queue_init_params`, `io_uring_get_sqe`,
/// `io_uring_submit`, `io_uring_peek_batch_cqe`, `io_uring_cq_advance`).
public struct IORing: ~Copyable {
    @usableFromInline let ring: UnsafeMutablePointer<io_uring>
    @usableFromInline let cqeBatch: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
    @usableFromInline let cqeBatchCapacity: UInt32
    /// Entries in the submission queue.
    public let submissionQueueEntries: UInt32
    /// Entries in the completion queue.
    public let completionQueueEntries: UInt32
    @usableFromInline var _inFlight: Int = 0

    /// Operations prepared (queued or submitted) whose completion has not yet been visited.
    public var inFlight: Int { _inFlight }

    /// The setup options the kernel granted (empty when it took none of those asked for).
    public let options: SetupOptions

    /// Sets up a ring with `entries` submission slots (rounded up to a power of two by the kernel)
    /// and a completion queue twice that size.
    ///
    /// `options` asks for more than the default (`IORING_SETUP_COOP_TASKRUN`); a kernel that
    /// refuses them with `EINVAL` gets the default set-up instead, and ``options`` says what was
    /// granted. With ``SetupOptions/singleIssuer`` the ring may only be used from the thread that
    /// creates it.
    ///
    /// The corresponding C function is `io_uring_queue_init_params`.
    public init(entries: UInt32 = 256, options: SetupOptions = []) throws(Errno) {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var params = io_uring_params()
        var granted = options.contains(.deferTaskRun) ? options.union(.singleIssuer) : options
        // Fewer inter-processor interrupts on kernels that have COOP_TASKRUN.
        params.flags = UInt32(IORING_SETUP_COOP_TASKRUN) | options.setupFlags
        var rc = io_uring_queue_init_params(entries, ring, &params)
        if rc == -EINVAL && !options.isEmpty {
            granted = []
            params = io_uring_params()
            params.flags = UInt32(IORING_SETUP_COOP_TASKRUN)
            rc = io_uring_queue_init_params(entries, ring, &params)
        }
        if rc == -EINVAL {
            params = io_uring_params()
            rc = io_uring_queue_init_params(entries, ring, &params)
        }
        if rc < 0 {
            ring.deallocate()
            throw Errno(rawValue: -rc)
        }
        self.options = granted
        self.ring = ring
        self.submissionQueueEntries = params.sq_entries
        self.completionQueueEntries = params.cq_entries
        self.cqeBatchCapacity = params.cq_entries
        self.cqeBatch = .allocate(capacity: Int(params.cq_entries))
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        cqeBatch.deallocate()
    }

    /// The ring's own descriptor, for `IORING_OP_MSG_RING` or diagnostics.
    public var descriptor: Int32 { ring.pointee.ring_fd }

    /// Hands every queued submission to the kernel. Returns how many it took.
    ///
    /// The corresponding C function is `io_uring_submit`.
    @discardableResult
    public mutating func submit() throws(Errno) -> Int {
        while true {
            let rc = io_uring_submit(ring)
            if rc >= 0 { return Int(rc) }
            if rc == -EINTR { continue }
            throw Errno(rawValue: -rc)
        }
    }

    /// Submits what is queued and blocks until at least `minimum` completions are ready.
    /// Interrupted waits are retried.
    ///
    /// The corresponding C function is `io_uring_submit_and_wait`.
    public mutating func submitAndWait(_ minimum: Int = 1) throws(Errno) {
        while true {
            let rc = io_uring_submit_and_wait(ring, UInt32(max(0, minimum)))
            if rc >= 0 { return }
            if rc == -EINTR { continue }
            throw Errno(rawValue: -rc)
        }
    }

    /// Visits every completion ready now, in the order the kernel posted them, then marks them seen.
    /// Allocates nothing. Returns how many were visited.
    ///
    /// If `body` throws, the completions already visited (including the one that threw) are marked
    /// seen and the rest stay queued for the next call.
    ///
    /// The corresponding C functions are `io_uring_peek_batch_cqe` and `io_uring_cq_advance`.
    @discardableResult
    public mutating func drainCompletions<E: Error>(_ body: (Completion) throws(E) -> Void) throws(E) -> Int {
        var total = 0
        while true {
            let count = io_uring_peek_batch_cqe(ring, cqeBatch, cqeBatchCapacity)
            if count == 0 { return total }
            var index: UInt32 = 0
            defer {
                io_uring_cq_advance(ring, index)
                _inFlight -= Int(index)
            }
            while index < count {
                let cqe = cqeBatch[Int(index)]!.pointee
                index += 1
                total += 1
                try body(Completion(tag: cqe.user_data, result: cqe.res, flags: cqe.flags))
            }
        }
    }

    /// Blocks until one completion is ready and returns it (marking it seen).
    /// Meant for simple sequential code; event loops use ``drainCompletions(_:)``.
    ///
    /// The corresponding C function is `io_uring_wait_cqe`.
    public mutating func waitCompletion() throws(Errno) -> Completion {
        var cqe: UnsafeMutablePointer<io_uring_cqe>? = nil
        while true {
            let rc = io_uring_submit_and_wait(ring, 1)
            if rc < 0 && rc != -EINTR { throw Errno(rawValue: -rc) }
            let peeked = io_uring_peek_batch_cqe(ring, &cqe, 1)
            if peeked == 1, let cqe {
                let completion = Completion(tag: cqe.pointee.user_data, result: cqe.pointee.res, flags: cqe.pointee.flags)
                io_uring_cq_advance(ring, 1)
                _inFlight -= 1
                return completion
            }
        }
    }

    /// Registers buffers with the kernel for ``prepareReadFixed(_:into:offset:bufferIndex:tag:)`` and
    /// ``prepareWriteFixed(_:from:offset:bufferIndex:tag:)``; it pins them once instead of per operation.
    ///
    /// The corresponding C function is `io_uring_register_buffers`.
    public mutating func registerBuffers(_ buffers: [UnsafeMutableRawBufferPointer]) throws(Errno) {
        let vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        let rc = vectors.withUnsafeBufferPointer { io_uring_register_buffers(ring, $0.baseAddress, UInt32($0.count)) }
        if rc < 0 { throw Errno(rawValue: -rc) }
    }

    /// Drops the buffers registered with ``registerBuffers(_:)``.
    ///
    /// The corresponding C function is `io_uring_unregister_buffers`.
    public mutating func unregisterBuffers() throws(Errno) {
        let rc = io_uring_unregister_buffers(ring)
        if rc < 0 { throw Errno(rawValue: -rc) }
    }

    /// A free submission slot, submitting what is queued first when the queue is full.
    /// Throws ``IORingError/submissionQueueFull`` when the kernel still has no room: back-pressure.
    /// Also refuses once as many operations are in flight as the completion queue holds, so the
    /// completion queue can never overflow.
    @usableFromInline
    mutating func nextSubmission() throws(IORingError) -> UnsafeMutablePointer<io_uring_sqe> {
        if _inFlight >= Int(completionQueueEntries) { throw .submissionQueueFull }
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        let rc = io_uring_submit(ring)
        if rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY {
            throw .system(Errno(rawValue: -rc))
        }
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        throw .submissionQueueFull
    }

    /// Tags a freshly prepared submission and counts it as in flight.
    @usableFromInline
    mutating func finish(_ sqe: UnsafeMutablePointer<io_uring_sqe>, tag: UInt64, flags: UInt8 = 0) {
        sqe.pointee.user_data = tag
        if flags != 0 { sqe.pointee.flags |= flags }
        _inFlight += 1
    }
}

extension IORing {
    /// Optional `io_uring_setup` flags for ``IORing/init(entries:options:)``.
    public struct SetupOptions: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }

        /// Only the creating thread submits (`IORING_SETUP_SINGLE_ISSUER`); the kernel skips some
        /// locking. A submission from another thread fails with `EEXIST`.
        public static let singleIssuer = SetupOptions(rawValue: 1 << 0)
        /// Completion work (e.g. finishing a `recv` whose data arrived) runs only when the owning
        /// thread enters the kernel to wait or to ask for events, not at interrupt time
        /// (`IORING_SETUP_DEFER_TASKRUN`, which implies ``singleIssuer``). Set up together with
        /// `IORING_SETUP_TASKRUN_FLAG`, so ``IORing/drainCompletions(_:)`` sees that work is pending
        /// and runs it (`io_uring_enter` with `IORING_ENTER_GETEVENTS`) before it reports none.
        public static let deferTaskRun = SetupOptions(rawValue: 1 << 1)

        /// The `IORING_SETUP_*` bits these options stand for.
        var setupFlags: UInt32 {
            var flags: UInt32 = 0
            if contains(.singleIssuer) || contains(.deferTaskRun) { flags |= UInt32(IORING_SETUP_SINGLE_ISSUER) }
            if contains(.deferTaskRun) {
                flags |= UInt32(IORING_SETUP_DEFER_TASKRUN) | UInt32(IORING_SETUP_TASKRUN_FLAG)
            }
            return flags
        }
    }
}
