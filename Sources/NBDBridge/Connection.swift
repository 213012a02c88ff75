import Glibc
import CFerryShims
import SystemPackage
import URing

/// One client connection in transmission phase: a thread, an io_uring, a fixed pool of request
/// slots with preallocated buffers, requests pipelined and answered out of order.
///
/// The hot path, top to bottom: `run` waits for completions; `parseInput` turns received bytes into
/// requests (header checks in `RequestValidation`), `start` dispatches each to the store's descriptor
/// through the ring, `complete` continues a request when its I/O completes, `replyOK`/`replyError`
/// encode the reply into the slot's header area, and `flushSends` gathers every ready reply (header
/// and payload iovecs) into one `sendmsg`. Nothing here allocates after `init`.
typealias Ring = URing.IORing

final class Connection {
    private enum Kind: UInt64 { case recv = 1, payload, io, send, throttle, poll }
    private enum Step: UInt8 { case free, payload, parkedGate, parkedData, throttled, io, sync, zeroFill, replying }

    private struct Slot {
        let ownBuffer: UnsafeMutableRawPointer
        var data: UnsafeMutableRawPointer
        let header: UnsafeMutableRawPointer
        let timespec: UnsafeMutablePointer<KernelTimespec>
        /// When a throttled write's timeout was armed (monotonic nanoseconds).
        var heldSince: UInt64 = 0
        var headerLength = 0
        var payloadLength = 0
        var command: UInt16 = 0
        var flags: UInt16 = 0
        var cookie: UInt64 = 0
        var offset: UInt64 = 0
        var length: UInt32 = 0
        var done: UInt32 = 0
        var step: Step = .free
        var gated = false
        var usesLarge = false
    }

    private static let headerArea = 32
    private static let receiveCapacity = 128 * 1024
    private static let maxBatch = 32
    private static let pollNanoseconds: UInt64 = 1_000_000
    /// Blocking waits that skip the poll after a poll found nothing.
    private static let spinBackoff = 4

    private let server: NBDServer
    private let store: any BlockStore
    private let dataFD: Int32
    private let fd: Int32
    private let session: NegotiatedSession
    private let limits: RequestValidation.Limits
    private let slotCount: Int
    private let slotBufferSize: Int
    private let maxBlock: UInt32
    private let inlineIO: Bool
    private let spinNanoseconds: UInt64
    private var spinSkip = 0

    private let slots: UnsafeMutablePointer<Slot>
    private let freeList: UnsafeMutablePointer<Int32>
    private var freeCount: Int
    private let parked: UnsafeMutablePointer<Int32>
    private var parkedCount = 0
    private let sendQueue: UnsafeMutablePointer<Int32>
    private var sendHead = 0
    private var sendCount = 0
    private let batch: UnsafeMutablePointer<Int32>
    private var batchCount = 0
    private let iovecs: UnsafeMutablePointer<iovec>
    private var iovCount = 0
    private let message: UnsafeMutablePointer<msghdr>
    private let rx: UnsafeMutableRawPointer
    private var rxStart = 0
    private var rxEnd = 0
    private let extents: UnsafeMutableBufferPointer<BlockExtent>
    private let completions: UnsafeMutablePointer<Completion>
    private let completionCapacity = 4096
    private let pollTimespec: UnsafeMutablePointer<KernelTimespec>
    private let slotMemory: UnsafeMutableRawPointer
    private let headerMemory: UnsafeMutableRawPointer
    private var large: UnsafeMutableRawPointer?
    private var largeBusy = false

    private var recvInFlight = false
    private var sendInFlight = false
    private var pollArmed = false
    private var payloadSlot = -1
    private var discardRemaining: UInt32 = 0
    private var discardSlot = -1
    private var needInput = true
    private var inputClosed = false
    private var outputBroken = false

    init(server: NBDServer, fd: Int32, session: NegotiatedSession) {
        self.server = server
        self.store = server.store
        self.dataFD = server.store.fileDescriptor
        self.fd = fd
        self.session = session
        self.limits = RequestValidation.Limits(
            exportSize: server.export.size, readOnly: server.readOnly,
            minimumBlockSize: server.export.minimumBlockSize, maximumBlockSize: server.export.maximumBlockSize,
            structuredReplies: session.structuredReplies, baseAllocation: session.baseAllocation)
        self.slotCount = server.options.requestSlots
        self.slotBufferSize = server.options.slotBufferSize
        self.maxBlock = server.export.maximumBlockSize
        self.inlineIO = server.store.memoryBacked
        self.spinNanoseconds = server.options.idleSpinNanoseconds

        slotMemory = .allocate(byteCount: slotCount * slotBufferSize, alignment: 4096)
        headerMemory = .allocate(byteCount: slotCount * Connection.headerArea, alignment: 64)
        let timespecs = UnsafeMutablePointer<KernelTimespec>.allocate(capacity: slotCount + 1)
        timespecs.initialize(repeating: KernelTimespec(tv_sec: 0, tv_nsec: 0), count: slotCount + 1)
        pollTimespec = timespecs + slotCount
        pollTimespec.pointee = KernelTimespec(nanoseconds: Connection.pollNanoseconds)
        slots = .allocate(capacity: slotCount)
        freeList = .allocate(capacity: slotCount)
        for i in 0..<slotCount {
            let buffer = slotMemory + i * slotBufferSize
            (slots + i).initialize(to: Slot(ownBuffer: buffer, data: buffer,
                                            header: headerMemory + i * Connection.headerArea, timespec: timespecs + i))
            freeList[i] = Int32(slotCount - 1 - i)
        }
        freeCount = slotCount
        parked = .allocate(capacity: slotCount)
        sendQueue = .allocate(capacity: slotCount)
        batch = .allocate(capacity: Connection.maxBatch)
        iovecs = .allocate(capacity: Connection.maxBatch * 2)
        message = .allocate(capacity: 1)
        message.initialize(to: msghdr())
        rx = .allocate(byteCount: Connection.receiveCapacity, alignment: 64)
        extents = .allocate(capacity: 1024)
        completions = .allocate(capacity: completionCapacity)
    }

    deinit {
        slotMemory.deallocate()
        headerMemory.deallocate()
        slots[0].timespec.deallocate()
        slots.deallocate()
        freeList.deallocate()
        parked.deallocate()
        sendQueue.deallocate()
        batch.deallocate()
        iovecs.deallocate()
        message.deallocate()
        rx.deallocate()
        extents.deallocate()
        completions.deallocate()
        large?.deallocate()
    }

    // MARK: the loop

    func run() {
        var entries: UInt32 = 64
        while entries < UInt32(slotCount * 2 + 16) { entries <<= 1 }
        guard var ring = try? Ring(entries: entries) else { return }
        while true {
            if ring.inFlight == 0 {
                // Nothing but the client to wait for (every request at iodepth 1): a plain blocking
                // recv(2), as nbdkit does. The socket's wake-up then carries the scheduler's sync
                // hint, so this thread tends to run on the client's CPU; an io_uring wait does not,
                // and a cross-CPU wake-up costs tens of microseconds on a loaded 2-core VM.
                if canReceive {
                    receiveBlocking()
                } else if inputClosed || needInput || rxEnd == rxStart {
                    break
                }
                // Otherwise parsing stopped for want of a slot that an inline send has since freed.
            } else {
                do { try ring.submitAndWait(1) } catch { break }
                completeReady(&ring)
            }
            parseInput(&ring)
            if !recvInFlight && ring.inFlight > 0 {
                // Submit now: store I/O that completes at submission (a read from the page cache)
                // is answered at once, and a lone request leaves the ring idle for the wait above.
                do { try ring.submit() } catch { break }
                completeReady(&ring)
                parseInput(&ring)
            }
            flushSends(&ring)
            armRecv(&ring)
        }
        // Everything completed; release anything a dead client left parked.
        for i in 0..<slotCount where slots[i].gated { server.gate.leave(); slots[i].gated = false }
    }

    /// Continues every request whose operation has completed.
    private func completeReady(_ ring: inout Ring) {
        var count = 0
        let capacity = completionCapacity
        let buffer = completions
        ring.drainCompletions { c in
            if count < capacity { buffer[count] = c; count += 1 }
        }
        for i in 0..<count { complete(completions[i], &ring) }
    }

    private func complete(_ c: Completion, _ ring: inout Ring) {
        let index = Int(c.tag & 0xffff_ffff)
        switch Kind(rawValue: c.tag >> 32) {
        case .recv:
            recvInFlight = false
            if c.result <= 0 { inputClosed = true; return }
            rxEnd += Int(c.result)
        case .payload:
            recvInFlight = false
            if c.result <= 0 {
                // The client went away in the middle of a write payload: the write never happens.
                inputClosed = true
                payloadSlot = -1
                release(index)
                return
            }
            slots[index].done += UInt32(c.result)
            if slots[index].done < slots[index].length {
                receivePayload(index, &ring)
            } else {
                payloadSlot = -1
                start(index, &ring)
            }
        case .io:
            ioCompleted(index, c.result, &ring)
        case .send:
            sendCompleted(c.result, &ring)
        case .throttle:
            server.throttle.noteHeld(nanoseconds: MonotonicClock.nanoseconds() &- slots[index].heldSince)
            slots[index].step = .io
            issueWrite(index, &ring)
        case .poll:
            pollArmed = false
            retryParked(&ring)
        case nil:
            break
        }
    }

    // MARK: input

    /// Whether the next input is a header read into `rx` (not a payload, not blocked on slots).
    private var canReceive: Bool { !recvInFlight && !inputClosed && payloadSlot < 0 && needInput && freeCount > 0 }

    /// Arms the ring's `recv` when other operations are in flight; when the ring is idle the loop
    /// reads with ``receiveBlocking()`` instead.
    private func armRecv(_ ring: inout Ring) {
        guard canReceive, ring.inFlight > 0 else { return }
        compactInput()
        let space = UnsafeMutableRawBufferPointer(start: rx + rxEnd, count: Connection.receiveCapacity - rxEnd)
        do {
            try ring.prepareRecv(fd, into: space, tag: Kind.recv.rawValue << 32)
            recvInFlight = true
        } catch { fail() }
    }

    private func compactInput() {
        if rxStart > 0 {
            let pending = rxEnd - rxStart
            if pending > 0 { memmove(rx, rx + rxStart, pending) }
            rxEnd = pending
            rxStart = 0
        }
    }

    /// Waits for the client: first polls with a non-blocking `recv(2)` for up to
    /// `idleSpinNanoseconds` (a client at iodepth 1 answers within that, and the poll saves the
    /// sleeping thread's wake-up), then sleeps in `recv(2)` on the blocking socket. A poll that
    /// found nothing turns polling off for the next few waits (an idle or slow client).
    /// Server shutdown wakes the sleep (`shutdown(SHUT_RD)` makes it return 0).
    private func receiveBlocking() {
        compactInput()
        if spinSkip > 0 {
            spinSkip -= 1
        } else if spinNanoseconds > 0 {
            let deadline = MonotonicClock.nanoseconds() + spinNanoseconds
            repeat {
                let n = recv(fd, rx + rxEnd, Connection.receiveCapacity - rxEnd, Int32(MSG_DONTWAIT))
                if n > 0 { rxEnd += n; return }
                if n == 0 || (errno != EAGAIN && errno != EINTR) { inputClosed = true; return }
            } while MonotonicClock.nanoseconds() < deadline
            spinSkip = Connection.spinBackoff
        }
        while true {
            let n = recv(fd, rx + rxEnd, Connection.receiveCapacity - rxEnd, 0)
            if n > 0 { rxEnd += n; return }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            inputClosed = true
            return
        }
    }

    private func receivePayload(_ index: Int, _ ring: inout Ring) {
        let slot = slots[index]
        let rest = UnsafeMutableRawBufferPointer(start: slot.data + Int(slot.done), count: Int(slot.length - slot.done))
        do {
            try ring.prepareRecv(fd, into: rest, flags: Int32(MSG_WAITALL), tag: Kind.payload.rawValue << 32 | UInt64(index))
            recvInFlight = true
        } catch { fail() }
    }

    private func parseInput(_ ring: inout Ring) {
        needInput = false
        while !inputClosed && payloadSlot < 0 {
            if discardSlot >= 0 {
                // Skipping the payload of a refused write; its error reply waits until the payload
                // is consumed (a client may still be sending it and cannot take the reply yet).
                let take = min(UInt32(rxEnd - rxStart), discardRemaining)
                rxStart += Int(take)
                discardRemaining -= take
                if discardRemaining > 0 { needInput = true; return }
                enqueue(discardSlot)
                discardSlot = -1
            }
            let available = rxEnd - rxStart
            if available < NBDProtocol.requestHeaderSize { needInput = true; return }
            if freeCount == 0 { return }
            guard let request = RequestHeader(rx + rxStart) else {
                violation()
                return
            }
            if request.command == NBDProtocol.cmdDisc {
                rxStart += NBDProtocol.requestHeaderSize
                inputClosed = true
                return
            }
            let code = RequestValidation.check(request, limits)
            let needsLarge = code == .ok && request.length > UInt32(slotBufferSize)
                && (request.command == NBDProtocol.cmdRead || request.command == NBDProtocol.cmdWrite)
            if needsLarge && largeBusy { return }
            rxStart += NBDProtocol.requestHeaderSize
            server.stats.requests.add(1, ordering: .relaxed)

            let index = Int(freeList[freeCount - 1])
            freeCount -= 1
            slots[index].command = request.command
            slots[index].flags = request.flags
            slots[index].cookie = request.cookie
            slots[index].offset = request.offset
            slots[index].length = request.length
            slots[index].done = 0
            slots[index].gated = false
            if needsLarge {
                if large == nil { large = .allocate(byteCount: Int(maxBlock), alignment: 4096) }
                largeBusy = true
                slots[index].usesLarge = true
                slots[index].data = large!
            }
            if code != .ok {
                if request.command == NBDProtocol.cmdWrite {
                    if UInt64(request.length) > 2 * UInt64(maxBlock) {
                        // Too much to skip: answer, then close (nbdkit closes past 2× its maximum too).
                        replyError(index, code)
                        violation()
                        return
                    }
                    discardRemaining = request.length
                    discardSlot = index
                    replyError(index, code, send: false)
                    continue
                }
                replyError(index, code)
                continue
            }
            if request.command == NBDProtocol.cmdWrite {
                let have = min(rxEnd - rxStart, Int(request.length))
                memcpy(slots[index].data, rx + rxStart, have)
                rxStart += have
                slots[index].done = UInt32(have)
                if have < Int(request.length) {
                    slots[index].step = .payload
                    payloadSlot = index
                    receivePayload(index, &ring)
                    return
                }
            }
            start(index, &ring)
        }
    }

    // MARK: dispatch

    private func start(_ index: Int, _ ring: inout Ring) {
        let command = slots[index].command
        switch command {
        case NBDProtocol.cmdRead:
            if !store.isReadable(offset: slots[index].offset, length: UInt64(slots[index].length)) {
                park(index, .parkedData, &ring)
                return
            }
            slots[index].step = .io
            issueRead(index, &ring)
        case NBDProtocol.cmdWrite, NBDProtocol.cmdTrim, NBDProtocol.cmdWriteZeroes:
            // Post-copy: a range that has not arrived is fetched before it is changed, so data
            // arriving later can never overwrite what the VM wrote here (fetch-before-write).
            if !store.isReadable(offset: slots[index].offset, length: UInt64(slots[index].length)) {
                park(index, .parkedData, &ring)
                return
            }
            if !server.gate.tryEnter() {
                park(index, .parkedGate, &ring)
                return
            }
            slots[index].gated = true
            slots[index].done = 0
            if command == NBDProtocol.cmdWrite {
                let delay = server.throttle.delay(offset: slots[index].offset, length: UInt64(slots[index].length))
                if delay > 0 {
                    slots[index].step = .throttled
                    slots[index].timespec.pointee = KernelTimespec(nanoseconds: delay)
                    slots[index].heldSince = MonotonicClock.nanoseconds()
                    do {
                        try ring.prepareTimeout(slots[index].timespec, tag: Kind.throttle.rawValue << 32 | UInt64(index))
                    } catch { fail() }
                    return
                }
                slots[index].step = .io
                issueWrite(index, &ring)
            } else {
                issueAllocate(index, &ring)
            }
        case NBDProtocol.cmdFlush:
            slots[index].step = .sync
            do { try ring.prepareFsync(dataFD, dataOnly: true, tag: tag(index)) } catch { fail() }
        case NBDProtocol.cmdCache:
            store.prefetch(offset: slots[index].offset, length: UInt64(slots[index].length))
            replyOK(index)
        case NBDProtocol.cmdBlockStatus:
            replyBlockStatus(index)
        default:
            replyError(index, .einval)
        }
    }

    @inline(__always)
    private func tag(_ index: Int) -> UInt64 { Kind.io.rawValue << 32 | UInt64(index) }

    private func issueRead(_ index: Int, _ ring: inout Ring) {
        let s = slots[index]
        if inlineIO {
            let n = pread(dataFD, s.data + Int(s.done), Int(s.length - s.done), off_t(s.offset + UInt64(s.done)))
            ioCompleted(index, n < 0 ? -errno : Int32(n), &ring)
            return
        }
        let buffer = UnsafeMutableRawBufferPointer(start: s.data + Int(s.done), count: Int(s.length - s.done))
        do { try ring.prepareRead(dataFD, into: buffer, offset: s.offset + UInt64(s.done), tag: tag(index)) } catch { fail() }
    }

    private func issueWrite(_ index: Int, _ ring: inout Ring) {
        let s = slots[index]
        if inlineIO {
            let n = pwrite(dataFD, s.data + Int(s.done), Int(s.length - s.done), off_t(s.offset + UInt64(s.done)))
            ioCompleted(index, n < 0 ? -errno : Int32(n), &ring)
            return
        }
        let buffer = UnsafeRawBufferPointer(start: s.data + Int(s.done), count: Int(s.length - s.done))
        do { try ring.prepareWrite(dataFD, from: buffer, offset: s.offset + UInt64(s.done), tag: tag(index)) } catch { fail() }
    }

    private func issueAllocate(_ index: Int, _ ring: inout Ring) {
        let s = slots[index]
        slots[index].step = .io
        let keep = ferry_nbd_falloc_keep_size
        let mode: Int32
        if s.command == NBDProtocol.cmdTrim {
            guard store.canPunchHoles else { finishWrite(index, .ok, &ring); return }
            mode = ferry_nbd_falloc_punch_hole | keep
        } else if s.flags & NBDProtocol.cmdFlagNoHole != 0 || !store.canPunchHoles {
            mode = ferry_nbd_falloc_zero_range | keep
        } else {
            mode = ferry_nbd_falloc_punch_hole | keep
        }
        do {
            try ring.prepareFallocate(dataFD, mode: mode, offset: s.offset, length: UInt64(s.length), tag: tag(index))
        } catch { fail() }
    }

    private func issueZeroWrite(_ index: Int, _ ring: inout Ring) {
        let s = slots[index]
        let count = min(Int(s.length - s.done), server.zeroes.bytes.count)
        let buffer = UnsafeRawBufferPointer(start: server.zeroes.bytes.baseAddress, count: count)
        do { try ring.prepareWrite(dataFD, from: buffer, offset: s.offset + UInt64(s.done), tag: tag(index)) } catch { fail() }
    }

    private func ioCompleted(_ index: Int, _ result: Int32, _ ring: inout Ring) {
        let command = slots[index].command
        let step = slots[index].step
        if step == .sync {
            let code: NBDErrorCode = result < 0 ? NBDErrorCode(hostErrno: -result) : .ok
            if code == .ok { server.stats.syncs.add(1, ordering: .relaxed) }
            if command == NBDProtocol.cmdFlush { code == .ok ? replyOK(index) : replyError(index, code) }
            else { finishWrite(index, code, &ring) }
            return
        }
        switch command {
        case NBDProtocol.cmdRead:
            if result < 0 { replyError(index, NBDErrorCode(hostErrno: -result)); return }
            if result == 0 {
                // Past the end of a shorter file: the rest reads as zeroes.
                memset(slots[index].data + Int(slots[index].done), 0, Int(slots[index].length - slots[index].done))
                slots[index].done = slots[index].length
            } else {
                slots[index].done += UInt32(result)
            }
            if slots[index].done < slots[index].length { issueRead(index, &ring); return }
            server.stats.bytesRead.add(UInt64(slots[index].length), ordering: .relaxed)
            replyRead(index)
        case NBDProtocol.cmdWrite:
            if result <= 0 { finishWrite(index, result == 0 ? .eio : NBDErrorCode(hostErrno: -result), &ring); return }
            slots[index].done += UInt32(result)
            if slots[index].done < slots[index].length { issueWrite(index, &ring); return }
            server.stats.bytesWritten.add(UInt64(slots[index].length), ordering: .relaxed)
            syncIfFUA(index, &ring)
        case NBDProtocol.cmdTrim:
            // Trim is advisory: a file system that cannot punch holes still succeeds.
            if result < 0 && result != -EOPNOTSUPP { finishWrite(index, NBDErrorCode(hostErrno: -result), &ring); return }
            syncIfFUA(index, &ring)
        case NBDProtocol.cmdWriteZeroes:
            if step == .io {
                if result == -EOPNOTSUPP || result == -EINVAL || result == -ENODEV {
                    // No fast way to zero here: FAST_ZERO says fail rather than write (proto.md).
                    if slots[index].flags & NBDProtocol.cmdFlagFastZero != 0 { finishWrite(index, .enotsup, &ring); return }
                    slots[index].step = .zeroFill
                    slots[index].done = 0
                    issueZeroWrite(index, &ring)
                    return
                }
                if result < 0 { finishWrite(index, NBDErrorCode(hostErrno: -result), &ring); return }
                syncIfFUA(index, &ring)
            } else {
                if result <= 0 { finishWrite(index, result == 0 ? .eio : NBDErrorCode(hostErrno: -result), &ring); return }
                slots[index].done += UInt32(result)
                if slots[index].done < slots[index].length { issueZeroWrite(index, &ring); return }
                syncIfFUA(index, &ring)
            }
        default:
            replyError(index, .einval)
        }
    }

    private func syncIfFUA(_ index: Int, _ ring: inout Ring) {
        if slots[index].flags & NBDProtocol.cmdFlagFUA != 0 {
            slots[index].step = .sync
            do { try ring.prepareFsync(dataFD, dataOnly: true, tag: tag(index)) } catch { fail() }
        } else {
            finishWrite(index, .ok, &ring)
        }
    }

    /// A write, trim or zero is over: mark the bitmap (before the reply, so a client that saw the
    /// reply can rely on the engine seeing the block), leave the gate, answer.
    private func finishWrite(_ index: Int, _ code: NBDErrorCode, _ ring: inout Ring) {
        let s = slots[index]
        if code == .ok {
            server.dirtyBitmap.markDirty(offset: s.offset, length: UInt64(s.length))
            store.noteWritten(offset: s.offset, length: UInt64(s.length))
        }
        if s.gated { server.gate.leave(); slots[index].gated = false }
        code == .ok ? replyOK(index) : replyError(index, code)
    }

    // MARK: parking (quiesced writes, post-copy reads)

    private func park(_ index: Int, _ step: Step, _ ring: inout Ring) {
        slots[index].step = step
        parked[parkedCount] = Int32(index)
        parkedCount += 1
        armPoll(&ring)
    }

    private func armPoll(_ ring: inout Ring) {
        guard !pollArmed else { return }
        do {
            try ring.prepareTimeout(pollTimespec, tag: Kind.poll.rawValue << 32)
            pollArmed = true
        } catch { fail() }
    }

    private func retryParked(_ ring: inout Ring) {
        let count = parkedCount
        parkedCount = 0
        for i in 0..<count {
            let index = Int(parked[i])
            if outputBroken { release(index); continue }
            if server.stopping.load(ordering: .relaxed) {
                // Shutting down while writes are held (switchover): they must not reach the disk now.
                replyError(index, .eshutdown)
                continue
            }
            start(index, &ring)
        }
    }

    // MARK: replies

    private func writeSimpleHeader(_ index: Int, _ code: NBDErrorCode) {
        let h = slots[index].header
        h.storeBytes(of: NBDProtocol.simpleReplyMagic.bigEndian, as: UInt32.self)
        h.storeBytes(of: code.rawValue.bigEndian, toByteOffset: 4, as: UInt32.self)
        h.storeBytes(of: slots[index].cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
        slots[index].headerLength = NBDProtocol.simpleReplySize
    }

    private func writeStructuredHeader(_ index: Int, type: UInt16, length: UInt32) {
        let h = slots[index].header
        h.storeBytes(of: NBDProtocol.structuredReplyMagic.bigEndian, as: UInt32.self)
        h.storeBytes(of: NBDProtocol.replyFlagDone.bigEndian, toByteOffset: 4, as: UInt16.self)
        h.storeBytes(of: type.bigEndian, toByteOffset: 6, as: UInt16.self)
        h.storeBytes(of: slots[index].cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
        h.storeBytes(of: length.bigEndian, toByteOffset: 16, as: UInt32.self)
        slots[index].headerLength = NBDProtocol.structuredReplyHeaderSize
    }

    private func replyOK(_ index: Int) {
        writeSimpleHeader(index, .ok)
        slots[index].payloadLength = 0
        enqueue(index)
    }

    private func replyError(_ index: Int, _ code: NBDErrorCode, send: Bool = true) {
        server.stats.errorReplies.add(1, ordering: .relaxed)
        let command = slots[index].command
        if session.structuredReplies && (command == NBDProtocol.cmdRead || command == NBDProtocol.cmdBlockStatus) {
            writeStructuredHeader(index, type: NBDProtocol.replyTypeError, length: 6)
            let h = slots[index].header
            h.storeBytes(of: code.rawValue.bigEndian, toByteOffset: 20, as: UInt32.self)
            h.storeBytes(of: UInt16(0), toByteOffset: 24, as: UInt16.self)
            slots[index].headerLength = 26
        } else {
            writeSimpleHeader(index, code)
        }
        slots[index].payloadLength = 0
        if send { enqueue(index) } else { slots[index].step = .payload }
    }

    private func replyRead(_ index: Int) {
        if session.structuredReplies {
            writeStructuredHeader(index, type: NBDProtocol.replyTypeOffsetData, length: 8 + slots[index].length)
            slots[index].header.storeBytes(of: slots[index].offset.bigEndian, toByteOffset: 20, as: UInt64.self)
            slots[index].headerLength = 28
        } else {
            writeSimpleHeader(index, .ok)
        }
        slots[index].payloadLength = Int(slots[index].length)
        enqueue(index)
    }

    private func replyBlockStatus(_ index: Int) {
        let s = slots[index]
        let maxCount = s.flags & NBDProtocol.cmdFlagReqOne != 0 ? 1 : min(extents.count, slotBufferSize / 8)
        let count = store.extents(offset: s.offset, length: UInt64(s.length), maxCount: maxCount, into: extents)
        if count == 0 { replyError(index, .eio); return }
        let out = s.data
        for i in 0..<count {
            let length = UInt32(min(extents[i].length, UInt64(UInt32.max & ~4095)))
            let status = extents[i].isHole ? NBDProtocol.stateHole | NBDProtocol.stateZero : 0
            out.storeBytes(of: length.bigEndian, toByteOffset: i * 8, as: UInt32.self)
            out.storeBytes(of: status.bigEndian, toByteOffset: i * 8 + 4, as: UInt32.self)
        }
        writeStructuredHeader(index, type: NBDProtocol.replyTypeBlockStatus, length: UInt32(4 + count * 8))
        slots[index].header.storeBytes(of: NBDProtocol.baseAllocationID.bigEndian, toByteOffset: 20, as: UInt32.self)
        slots[index].headerLength = 24
        slots[index].payloadLength = count * 8
        enqueue(index)
    }

    private func enqueue(_ index: Int) {
        if outputBroken { release(index); return }
        slots[index].step = .replying
        sendQueue[(sendHead + sendCount) % slotCount] = Int32(index)
        sendCount += 1
    }

    private func flushSends(_ ring: inout Ring) {
        guard !sendInFlight, sendCount > 0, !outputBroken else { return }
        iovCount = 0
        batchCount = 0
        while sendCount > 0 && batchCount < Connection.maxBatch {
            let index = Int(sendQueue[sendHead])
            sendHead = (sendHead + 1) % slotCount
            sendCount -= 1
            batch[batchCount] = Int32(index)
            batchCount += 1
            let s = slots[index]
            iovecs[iovCount] = iovec(iov_base: s.header, iov_len: s.headerLength)
            iovCount += 1
            if s.payloadLength > 0 {
                iovecs[iovCount] = iovec(iov_base: s.data, iov_len: s.payloadLength)
                iovCount += 1
            }
        }
        sendFrom(0, &ring)
    }

    /// Sends the batch from iovec `first` on: at once with a non-blocking `sendmsg(2)` (the usual
    /// case: the socket buffer has room), through the ring only when the socket is full.
    private func sendFrom(_ first: Int, _ ring: inout Ring) {
        message.pointee.msg_iov = iovecs + first
        message.pointee.msg_iovlen = iovCount - first
        let n = sendmsg(fd, message, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
        if n >= 0 || (errno != EAGAIN && errno != EINTR) {
            sendCompleted(n >= 0 ? Int32(truncatingIfNeeded: n) : -errno, &ring)
            return
        }
        do {
            try ring.prepareSendmsg(fd, message: message, tag: Kind.send.rawValue << 32)
            sendInFlight = true
        } catch { fail() }
    }

    private func sendCompleted(_ result: Int32, _ ring: inout Ring) {
        sendInFlight = false
        if result <= 0 {
            outputBroken = true
            inputClosed = true
            for i in 0..<batchCount { release(Int(batch[i])) }
            batchCount = 0
            while sendCount > 0 {
                release(Int(sendQueue[sendHead]))
                sendHead = (sendHead + 1) % slotCount
                sendCount -= 1
            }
            return
        }
        var left = Int(result)
        let base = message.pointee.msg_iov!
        let count = Int(message.pointee.msg_iovlen)
        var k = 0
        while k < count && left >= base[k].iov_len { left -= base[k].iov_len; k += 1 }
        if k < count {
            base[k].iov_base = base[k].iov_base + left
            base[k].iov_len -= left
            sendFrom(base + k - iovecs, &ring)
            return
        }
        for i in 0..<batchCount { release(Int(batch[i])) }
        batchCount = 0
        flushSends(&ring)
    }

    // MARK: slots and failures

    private func release(_ index: Int) {
        if slots[index].usesLarge {
            slots[index].usesLarge = false
            slots[index].data = slots[index].ownBuffer
            largeBusy = false
        }
        if slots[index].gated { server.gate.leave(); slots[index].gated = false }
        slots[index].step = .free
        freeList[freeCount] = Int32(index)
        freeCount += 1
    }

    /// The client broke the protocol (bad magic, absurd payload): read nothing more, finish what is
    /// in flight, close.
    private func violation() {
        server.stats.protocolViolations.add(1, ordering: .relaxed)
        inputClosed = true
    }

    /// The ring refused a submission: stop reading; what is in flight still completes.
    private func fail() {
        inputClosed = true
    }
}
