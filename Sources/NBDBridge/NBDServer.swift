import Glibc
import CFerryShims
import Logging
import Synchronization
import SystemPackage
import URing

/// An NBD server for one export backed by a ``BlockStore``: fixed-newstyle handshake, then per
/// connection one thread whose io_uring carries the socket and the store's I/O, many requests in
/// flight and replies out of order. Several listeners (Unix, TCP) and clients at once; multi-conn
/// is safe because every connection uses the same descriptor, so one `fdatasync` covers them all.
/// At most ``Options/maxConnections`` at once: past it, and when a connection's thread cannot be
/// created, the connection is refused with a reason the client shows (``ConnectionRefusal``) and
/// the server serves on.
///
/// For the migration engine: every completed write, trim or zero marks ``dirtyBitmap``; ``throttle``
/// delays writes when turned on; ``quiesce(timeoutNanoseconds:)``/``resume()`` hold writes for switchover.
///
/// ```swift
/// let server = try NBDServer(store: FileBlockStore(path: img), options: .init(exportName: "disk"))
/// try server.listen(NBDEndpoint.parse("unix:/run/ferry.sock"))
/// try server.start()          // or try server.run() to block until shutdown
/// server.shutdown(drain: true)
/// ```
public final class NBDServer: Sendable {
    /// How the export is offered and how connections are provisioned.
    public struct Options: Sendable {
        /// The export's name; the empty name ("default export") is accepted too. Left empty, the
        /// export is served under ANY name a client asks for (one export per server, as nbdkit).
        public var exportName: String
        /// Free text sent for NBD_INFO_DESCRIPTION.
        public var description: String
        /// Refuse writes, trims and zeroes with EPERM even if the store could take them.
        public var readOnly: Bool
        /// Advertised minimum block size (a power of two); requests not aligned to it get EINVAL.
        public var minimumBlockSize: UInt32
        /// Advertised preferred block size.
        public var preferredBlockSize: UInt32
        /// Largest READ or WRITE accepted (bigger ones get EINVAL/EOVERFLOW); 64 MiB by default, as nbdkit. Advertised in
        /// NBD_INFO_BLOCK_SIZE with the minimum and preferred sizes.
        public var maximumBlockSize: UInt32
        /// Requests in flight per connection (each slot owns a preallocated buffer).
        public var requestSlots: Int
        /// Bytes of each slot's buffer; larger requests share one lazily allocated buffer per connection.
        public var slotBufferSize: Int
        /// Advertise NBD_FLAG_CAN_MULTI_CONN.
        public var multiConn: Bool
        /// Bytes per bit of ``NBDServer/dirtyBitmap`` and per counter of ``NBDServer/throttle``.
        public var dirtyBlockSize: UInt64
        /// How long a connection with nothing in flight polls its socket (non-blocking `recv`)
        /// before it sleeps in a blocking `recv`; 0 never polls. A client at iodepth 1 on another
        /// CPU sends its next request within ~20 µs here, and a sleeping thread's cross-CPU wake-up
        /// costs about as much again on a 2-vCPU VM. Bounded, and skipped for a few waits after a
        /// poll that found nothing, so an idle or slow client costs no CPU. At most 1 ms.
        public var idleSpinNanoseconds: UInt64
        /// Connections served at once (handshaking or transmitting), over every listener; the next
        /// one is refused with NBD_REP_ERR_POLICY and the reason. Each costs a thread, an io_uring
        /// and ``requestSlots`` x ``slotBufferSize`` bytes of buffers (16 MiB by default, touched as
        /// used). A VM opens one per disk, `qemu-img` and nbdinfo one, nbdcopy up to four (multi-conn).
        public var maxConnections: Int
        /// Where refused connections are reported (a warning per 10 s, with the count).
        public var logger: Logger
        /// Creates the accepting and connection threads. Tests replace it to make `pthread_create` fail.
        var threadSpawner: ThreadSpawner = spawnDetachedThread

        public init(exportName: String = "", description: String = "Ferry NBD export", readOnly: Bool = false,
                    minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096,
                    maximumBlockSize: UInt32 = 64 * 1024 * 1024, requestSlots: Int = 64,
                    slotBufferSize: Int = 256 * 1024, multiConn: Bool = true, dirtyBlockSize: UInt64 = 64 * 1024,
                    idleSpinNanoseconds: UInt64 = 30_000, maxConnections: Int = 64,
                    logger: Logger = Logger(label: "ferry.nbd")) {
            self.exportName = exportName
            self.description = description
            self.readOnly = readOnly
            self.minimumBlockSize = minimumBlockSize
            self.preferredBlockSize = preferredBlockSize
            self.maximumBlockSize = maximumBlockSize
            self.requestSlots = requestSlots
            self.slotBufferSize = slotBufferSize
            self.multiConn = multiConn
            self.dirtyBlockSize = dirtyBlockSize
            self.idleSpinNanoseconds = idleSpinNanoseconds
            self.maxConnections = maxConnections
            self.logger = logger
        }
    }

    public let store: any BlockStore
    public let options: Options
    /// Blocks written, trimmed or zeroed since the last snapshot.
    public let dirtyBitmap: DirtyBitmap
    /// The write throttle (off until enabled).
    public let throttle: WriteThrottle
    /// The switchover valve for writes.
    public let gate: WriteGate
    /// Counters.
    public let stats = NBDServerStats()

    let export: ExportDescription
    let readOnly: Bool
    let zeroes: ZeroBuffer

    private struct State {
        var listeners: [NBDListener] = []
        var connections: Set<Int32> = []
        /// Kernel thread id of each connection's thread, by socket.
        var threadIDs: [Int32: Int32] = [:]
        var acceptors = 0
        var started = false
        var shuttingDown = false
        var finished = false
        var refusals = RefusalWindow()
    }
    private let state = Mutex(State())
    /// Accepting and connection threads running (shutdown waits for none).
    let liveThreads = Atomic<Int>(0)
    /// Set when shutdown begins; parked requests then fail with ESHUTDOWN instead of waiting.
    let stopping = Atomic<Bool>(false)

    /// A server for `store`. Nothing listens until ``listen(_:)``.
    public init(store: any BlockStore, options: Options = Options()) throws(NBDBridgeError) {
        let minimum = options.minimumBlockSize
        guard minimum >= 1, minimum <= 65536, minimum & (minimum - 1) == 0 else {
            throw NBDBridgeError(.invalidArgument, "minimum block size \(minimum) is not a power of two from 1 to 65536")
        }
        guard options.maximumBlockSize >= max(minimum, 512), options.requestSlots >= 1, options.requestSlots <= 1024,
              options.slotBufferSize >= 4096 else {
            throw NBDBridgeError(.invalidArgument, "bad provisioning: max block \(options.maximumBlockSize), \(options.requestSlots) slots of \(options.slotBufferSize) bytes")
        }
        guard options.idleSpinNanoseconds <= 1_000_000 else {
            throw NBDBridgeError(.invalidArgument, "idle spin of \(options.idleSpinNanoseconds) ns is over the 1 ms limit")
        }
        guard options.maxConnections >= 1 else {
            throw NBDBridgeError(.invalidArgument, "a connection limit of \(options.maxConnections) would refuse every client")
        }
        self.store = store
        self.options = options
        self.readOnly = options.readOnly || store.isReadOnly
        var flags = NBDProtocol.flagHasFlags | NBDProtocol.flagSendFlush | NBDProtocol.flagSendFUA
            | NBDProtocol.flagSendDF | NBDProtocol.flagSendCache
        if readOnly {
            flags |= NBDProtocol.flagReadOnly
        } else {
            flags |= NBDProtocol.flagSendTrim | NBDProtocol.flagSendWriteZeroes | NBDProtocol.flagSendFastZero
        }
        if options.multiConn { flags |= NBDProtocol.flagCanMultiConn }
        self.export = ExportDescription(name: options.exportName, description: options.description, size: store.size,
                                        transmissionFlags: flags, minimumBlockSize: minimum,
                                        preferredBlockSize: max(minimum, options.preferredBlockSize),
                                        maximumBlockSize: options.maximumBlockSize)
        self.dirtyBitmap = DirtyBitmap(diskSize: store.size, blockSize: options.dirtyBlockSize)
        self.throttle = WriteThrottle(diskSize: store.size, blockSize: options.dirtyBlockSize)
        self.gate = WriteGate()
        self.zeroes = ZeroBuffer(count: 1 << 20)
    }

    /// Binds and listens on `endpoint` (`socket`, `bind`, `listen`); returns the bound address (with
    /// the port the kernel chose when the endpoint said port 0). Connections are served after ``start()``;
    /// on a started server this starts accepting at once, and throws (listening nowhere) when the
    /// accepting thread cannot be created.
    @discardableResult
    public func listen(_ endpoint: NBDEndpoint) throws(NBDBridgeError) -> SocketAddress {
        let listener = try NBDListener(endpoint: endpoint)
        let startNow = state.withLock { s -> Bool in
            s.listeners.append(listener)
            if s.started { s.acceptors += 1 }
            return s.started
        }
        if startNow {
            do { try spawnAcceptor(listener) } catch { throw drop(listener, error) }
        }
        return listener.boundAddress
    }

    /// Starts accepting on every listener, each on its own thread. Returns at once. Throws when a
    /// listener's thread cannot be created (`pthread_create` failed: a thread limit, or memory):
    /// that listener is closed, the others serve on until ``shutdown(drain:)``.
    public func start() throws(NBDBridgeError) {
        let listeners = state.withLock { s -> [NBDListener] in
            if s.started { return [] }
            s.started = true
            s.acceptors += s.listeners.count
            return s.listeners
        }
        var failure: NBDBridgeError? = nil
        for listener in listeners {
            do { try spawnAcceptor(listener) } catch { failure = failure ?? drop(listener, error) }
        }
        if let failure { throw failure }
    }

    /// Starts, then blocks until ``shutdown(drain:)`` has finished (from another thread or a signal handler's thread).
    public func run() throws(NBDBridgeError) {
        try start()
        while !state.withLock({ $0.finished }) { usleep(10_000) }
    }

    /// Holds new writes and waits for in-flight ones to complete. True when drained within the timeout.
    @discardableResult
    public func quiesce(timeoutNanoseconds: UInt64 = 30_000_000_000) -> Bool {
        gate.quiesce(timeoutNanoseconds: timeoutNanoseconds)
    }

    /// Lets held writes go.
    public func resume() { gate.resume() }

    /// Stops accepting, then (with `drain`) lets every connection finish the requests it has read and
    /// send their replies before it closes; without `drain` connections are cut at once. Then flushes
    /// the store (`fdatasync`). Returns when all of it is done. Safe to call more than once.
    public func shutdown(drain: Bool = true) {
        let (listeners, connections, already) = state.withLock { s -> ([NBDListener], [Int32], Bool) in
            let already = s.shuttingDown
            s.shuttingDown = true
            return (s.listeners, Array(s.connections), already)
        }
        stopping.store(true, ordering: .relaxed)
        if !already {
            for listener in listeners { listener.close() }
            for fd in connections { _ = Glibc.shutdown(fd, drain ? Int32(SHUT_RD) : Int32(SHUT_RDWR)) }
        }
        let deadline = MonotonicClock.nanoseconds() + 60_000_000_000
        while liveThreads.load(ordering: .acquiring) > 0 && MonotonicClock.nanoseconds() < deadline {
            usleep(1000)
        }
        if !already {
            for listener in listeners { listener.release() }
            try? store.flush()
            state.withLock { $0.finished = true }
        } else {
            while !state.withLock({ $0.finished }) { usleep(1000) }
        }
    }

    /// The kernel thread ids of the threads serving connections now (one per connection), for
    /// per-thread measurements (/proc/self/task/TID, the thread's CPU clock).
    public var connectionThreadIDs: [Int32] { state.withLock { Array($0.threadIDs.values) } }

    /// Whether ``shutdown(drain:)`` has begun.
    public var isShuttingDown: Bool { state.withLock { $0.shuttingDown } }

    // MARK: threads

    /// Starts `listener`'s accepting thread, counted in `liveThreads` while it runs.
    private func spawnAcceptor(_ listener: NBDListener) throws(Errno) {
        liveThreads.add(1, ordering: .sequentiallyConsistent)
        do {
            try options.threadSpawner { [self] in
                acceptConnections(on: listener)
                liveThreads.subtract(1, ordering: .sequentiallyConsistent)
            }
        } catch {
            liveThreads.subtract(1, ordering: .sequentiallyConsistent)
            throw error
        }
    }

    /// Closes a listener whose accepting thread could not be created; the error to throw.
    private func drop(_ listener: NBDListener, _ error: Errno) -> NBDBridgeError {
        state.withLock { s in
            s.listeners.removeAll { $0 === listener }
            s.acceptors -= 1
        }
        listener.close()
        listener.release()
        return NBDBridgeError(error, "cannot start accepting NBD connections on \(listener.boundAddress): pthread_create failed")
    }

    /// The accepting thread: each connection gets a thread of its own, or is refused (at the
    /// connection limit, or when its thread cannot be created) right here. Ends at shutdown.
    private func acceptConnections(on listener: NBDListener) {
        enum Admission { case admitted, full(open: Int), shuttingDown }
        while true {
            let fd: Int32
            do throws(Errno) {
                fd = try Socket.accept(from: listener.fd).take()
            } catch {
                if error.rawValue == ECONNABORTED { continue }
                if error == .tooManyOpenFiles || error == .tooManyOpenFilesInSystem || error == .noBufferSpace
                    || error == .noMemory {
                    usleep(10_000); continue
                }
                return
            }
            let admission = state.withLock { s -> Admission in
                if s.shuttingDown { return .shuttingDown }
                if s.connections.count >= options.maxConnections { return .full(open: s.connections.count) }
                s.connections.insert(fd)
                return .admitted
            }
            switch admission {
            case .shuttingDown:
                Glibc.close(fd)
                return
            case .full(let open):
                refuse(fd, reason: "Ferry NBD server: too many connections (\(open) open, the limit is \(options.maxConnections)); close another connection to this export first")
                continue
            case .admitted:
                break
            }
            liveThreads.add(1, ordering: .sequentiallyConsistent)
            do {
                try options.threadSpawner { [self] in
                    let tid = ferry_nbd_gettid()
                    state.withLock { $0.threadIDs[fd] = tid }
                    serve(fd)
                    state.withLock { _ = $0.connections.remove(fd); $0.threadIDs[fd] = nil }
                    Glibc.close(fd)
                    liveThreads.subtract(1, ordering: .sequentiallyConsistent)
                }
                stats.connectionsAccepted.add(1, ordering: .relaxed)
            } catch {
                liveThreads.subtract(1, ordering: .sequentiallyConsistent)
                state.withLock { _ = $0.connections.remove(fd) }
                refuse(fd, reason: "Ferry NBD server: cannot start a thread for this connection (pthread_create: \(error)); try again later")
            }
        }
    }

    /// Refuses `fd` on this thread with `reason` (``ConnectionRefusal``, within the window's budget),
    /// logs it (the first of each ``RefusalWindow``, with the count since the last line) and closes it.
    private func refuse(_ fd: Int32, reason: String) {
        stats.connectionsRefused.add(1, ordering: .relaxed)
        let begun = MonotonicClock.nanoseconds()
        let plan = state.withLock { $0.refusals.begin(now: begun) }
        if plan.log {
            options.logger.warning("refused an NBD connection", metadata: [
                "reason": "\(reason)", "limit": "\(options.maxConnections)",
                "refused_since_last_warning": "\(plan.unloggedBefore)"])
        }
        if let deadline = plan.deadline {
            _ = ConnectionRefusal(fd: fd, reason: reason, deadline: deadline).run()
            let took = MonotonicClock.nanoseconds() - begun
            state.withLock { $0.refusals.end(took: took) }
        }
        Glibc.close(fd)
    }

    private func serve(_ fd: Int32) {
        stats.connectionsOpen.add(1, ordering: .relaxed)
        defer { stats.connectionsOpen.subtract(1, ordering: .relaxed) }
        // A client that stalls in the handshake is dropped after 30 s.
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        switch Handshake(fd: fd, export: export).run() {
        case .closed:
            stats.handshakesFailed.add(1, ordering: .relaxed)
            return
        case .transmission(let session):
            var none = timeval(tv_sec: 0, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
            if isShuttingDown { return }
            let connection = Connection(server: self, fd: fd, session: session)
            connection.run()
        }
    }
}

/// A read-only block of zero bytes shared by every connection (the fallback for WRITE_ZEROES).
final class ZeroBuffer: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer
    init(count: Int) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
    }
    deinit { bytes.deallocate() }
}

/// Starts a detached thread that runs its argument; throws the errno of a failed `pthread_create`.
typealias ThreadSpawner = @Sendable (_ body: @escaping @Sendable () -> Void) throws(Errno) -> Void

/// Runs `body` on a new detached thread. Throws what `pthread_create` returned (EAGAIN when a
/// thread or process limit or memory ran out) and then never runs `body`.
///
/// The corresponding C function is `pthread_create`.
func spawnDetachedThread(_ body: @escaping @Sendable () -> Void) throws(Errno) {
    if let error = DetachedThread.spawn(name: "ferry-nbd", body) { throw error }
}
