import CFerryShims
import Glibc

/// Runs system calls inside another process through ptrace, built so that the target cannot be hurt by it, even
/// when the tracer is killed half-way: nothing is written to the target's memory, its signal mask is never
/// touched, and the window in which its registers are not its own is one system call long.
/// docs/ptrace-injection.md explains each choice, what CRIU's compel does instead, and what a tracer killed inside
/// that window leaves behind.
///
/// Attach (`init`): /proc/PID/status first (`ProcessStatus`): a seccomp filter or strict mode, a zombie or another
/// tracer is refused before anything is touched. `PTRACE_SEIZE` with `PTRACE_O_TRACESYSGOOD` only, never
/// `PTRACE_O_EXITKILL` (if we die, the target lives on, detached by the kernel); `PTRACE_INTERRUPT`; wait for the
/// stop. A signal that arrives first is delivered (`PTRACE_CONT` with it) and the wait goes on; a process stopped
/// by a signal (state T) reports a group-stop and stays stopped after the detach (refused if it has signals with
/// handlers pending: resuming its thread for the call would run them).
///
/// A call borrows the thread's own next system call: `PTRACE_SYSCALL` runs the thread to its next syscall-entry
/// stop (a thread stopped inside a restartable call, the usual case for a VMM's main loop, re-enters it at once,
/// without running any of its code); there `orig_rax` and the argument registers become ours; at the syscall-exit
/// stop rax is our result and the registers are set back to "about to execute its own `syscall` instruction"
/// (rip - 2, rax = its number, `orig_rax = -1`), so it runs its call afresh when it goes on. If the thread makes no
/// system call within ``ownSyscallWait``, or the process is stopped by a signal (its code must not run), it is
/// pointed at a `syscall` instruction that already exists in the target ([vdso]) instead, and at the entry stop
/// every register but the argument registers is set back.
///
/// Use it from one thread: ptrace binds the tracee to the thread that seized it (the whole session runs
/// synchronously, never across an `await`).
public struct RemoteSyscallSession: ~Copyable {
    public let pid: Int32

    /// How a call reached the kernel.
    public enum Route: Sendable, Equatable {
        /// It replaced one of the thread's own system calls (this number), which the thread then ran again.
        case borrowed(Int)
        /// The thread was pointed at the `syscall` instruction at this address.
        case pointed(UInt64)
    }

    /// How the last call reached the kernel (tests and logs).
    public private(set) var lastRoute: Route?
    /// How long the thread's registers were not its own during the last call: from the first PTRACE_SETREGS of
    /// ours to the one that set them back (the window in which our death would leave them so).
    public private(set) var lastWindow: Duration?
    /// Whether the process is stopped by a signal (SIGSTOP, state T): its own code must not run, pending signals
    /// must stay pending.
    public private(set) var groupStopped: Bool
    /// The registers the thread goes on with at detach.
    var resume: user_regs_struct
    /// `resume` is "about to execute its own syscall instruction" (set after a borrowed call): going on, the thread
    /// runs none of its code before entering that call, as in a restart.
    var resumeEntersSyscall = false
    /// A `syscall` instruction in the target, found on first need.
    var syscallAddress: UInt64?
    var finished = false

    /// How long a call waits for the thread's own next system call before pointing it at one.
    public static let ownSyscallWait: Duration = .milliseconds(50)

    /// Seizes and stops the thread-group leader of `pid`. `calls` names the calls to come, for a refusal's message.
    public init(pid: Int32, calls: String = "system calls") throws(ProcessMemoryError) {
        if let refusal = try ProcessStatus(pid: pid).injectionRefusal() {
            throw .refused(pid, refusal, calls: calls)
        }
        var r = ferry_ptrace_seize(pid, UInt(FERRY_PTRACE_O_TRACESYSGOOD))
        guard r == 0 else {
            throw ProcessMemoryError("PTRACE_SEIZE of process \(pid) failed"
                                     + (r == -1 || r == -13 ? " (need root or CAP_SYS_PTRACE; is another tracer attached?)" : ""), negated: r)
        }
        r = ferry_ptrace_interrupt(pid)
        guard r == 0 else {
            _ = ferry_ptrace_detach(pid, 0)
            throw ProcessMemoryError("PTRACE_INTERRUPT of process \(pid) failed", negated: r)
        }
        var regs = user_regs_struct()
        let stopSignal: CInt
        do throws(ProcessMemoryError) {
            stopSignal = try Self.waitForAttachStop(pid: pid)
            // Again now that it is stopped: another thread may have installed a filter for all (TSYNC) meanwhile.
            let status = try ProcessStatus(pid: pid)
            if let refusal = status.injectionRefusal(tracedByUs: true) { throw .refused(pid, refusal, calls: calls) }
            if stopSignal != SIGTRAP && status.pendingCaught != 0 {
                throw .refused(pid, .stoppedWithSignalsPending(status.pendingCaught), calls: calls)
            }
            r = ferry_ptrace_getregs(pid, &regs)
            guard r == 0 else { throw ProcessMemoryError("PTRACE_GETREGS of process \(pid) failed", negated: r) }
        } catch {
            _ = ferry_ptrace_detach(pid, 0)
            throw error
        }
        self.pid = pid
        resume = regs
        groupStopped = stopSignal != SIGTRAP
    }

    deinit {
        if !finished { _ = try? restoreAndDetach() }
    }

    /// Sets the thread's registers back and detaches; the thread goes on where it was (a stopped process stays
    /// stopped).
    public consuming func finish() throws(ProcessMemoryError) {
        finished = true
        try restoreAndDetach()
    }

    private func restoreAndDetach() throws(ProcessMemoryError) {
        var regs = resume
        var r = ferry_ptrace_setregs(pid, &regs)
        let r2 = ferry_ptrace_detach(pid, 0)
        if r == 0 { r = r2 }
        guard r == 0 else { throw ProcessMemoryError("restoring and detaching process \(pid) failed", negated: r) }
    }

    /// Runs system call `number` with up to six arguments in the target; returns its raw result (negative =
    /// -errno, as the kernel returns it). Only the argument registers given are changed.
    public mutating func call(_ number: Int, _ args: UInt64...) throws(ProcessMemoryError) -> Int64 {
        precondition(args.count <= 6, "a system call takes at most six arguments")
        var pointed = groupStopped && !(resumeEntersSyscall || Self.restartsSyscall(resume))
        var deadline = ContinuousClock.now + Self.ownSyscallWait
        var modified = false       // pointed at the instruction, before the entry stop: the registers are not `resume`
        var inOurs = false         // between the entry and the exit stop of our call
        var inTheirs = false       // between the entry and the exit stop of a call of theirs that we let run
        var route: Route?
        var signal: CInt = 0
        var windowStart = ContinuousClock.now
        do throws(ProcessMemoryError) {
            if pointed { windowStart = ContinuousClock.now; try point(number, args); modified = true }
            for _ in 0..<1000 {
                try check(ferry_ptrace_syscall(pid, signal), "PTRACE_SYSCALL")
                signal = 0
                let stop: Stop
                if inOurs || pointed {
                    // In our call the next stop is its exit (no signal is taken in between): no need to ask.
                    stop = try waitStop(knownExit: inOurs, what: "syscall \(number)")
                } else if let s = try waitStop(until: deadline, what: "syscall \(number)") {
                    stop = s
                } else {
                    // No system call of its own in time: stop it where it is, then point it at one.
                    try check(ferry_ptrace_interrupt(pid), "PTRACE_INTERRUPT")
                    stop = try waitStop(what: "syscall \(number)")
                }
                switch stop {
                case .syscallEntry(let arch):
                    var regs = try registers()
                    if pointed {
                        let address = syscallAddress ?? 0
                        guard regs.orig_rax == UInt64(number), regs.rip == address + 2 else {
                            throw ProcessMemoryError("injected syscall \(number) in process \(pid) entered as \(Int64(bitPattern: regs.orig_rax)) at \(hex(regs.rip)), expected \(hex(address + 2))")
                        }
                        // Back at its own rip and registers: only orig_rax and the arguments are ours from here.
                        var carry = resume
                        carry.orig_rax = UInt64(number)
                        Self.setArguments(&carry, args)
                        try setRegisters(carry)
                        modified = false
                        route = .pointed(address)
                    } else {
                        guard arch == FERRY_AUDIT_ARCH_X86_64, try isSyscallInstruction(at: regs.rip &- 2) else {
                            inTheirs = true   // an `int 0x80` (i386 call): let it run, take the next one
                            continue
                        }
                        // Afterwards the thread is "about to execute its own syscall instruction" again.
                        var again = regs
                        again.rip -= 2
                        again.rax = regs.orig_rax
                        again.orig_rax = UInt64.max
                        let borrowed = Int(Int64(bitPattern: regs.orig_rax))
                        resume = again
                        resumeEntersSyscall = true
                        regs.orig_rax = UInt64(number)
                        Self.setArguments(&regs, args)
                        windowStart = ContinuousClock.now
                        try setRegisters(regs)
                        route = .borrowed(borrowed)
                    }
                    inOurs = true
                case .syscallExit:
                    if inTheirs { inTheirs = false; continue }
                    guard inOurs else { continue }
                    let result = Int64(bitPattern: try registers().rax)
                    try setRegisters(resume)
                    lastWindow = ContinuousClock.now - windowStart
                    inOurs = false
                    lastRoute = route
                    return result
                case .event(let sig):
                    if sig != SIGTRAP { groupStopped = true }
                    guard !pointed else { continue }
                    // Stopped where it stands (our interrupt, or a stop signal): these are its registers now.
                    resume = try registers()
                    resumeEntersSyscall = false
                    if ContinuousClock.now >= deadline || groupStopped && !Self.restartsSyscall(resume) {
                        windowStart = ContinuousClock.now
                        try point(number, args)
                        pointed = true
                        modified = true
                    }
                case .signal(let sig):
                    // Delivered in the thread's own context, at once, as without us; then wait for its next call.
                    if modified {
                        try setRegisters(resume)
                        modified = false
                        pointed = false
                        deadline = ContinuousClock.now + Self.ownSyscallWait
                    }
                    signal = sig
                }
            }
            throw ProcessMemoryError("injected syscall \(number) in process \(pid) did not complete after 1000 stops")
        } catch {
            // The thread's own registers back before the error goes up.
            if modified || inOurs { try? setRegisters(resume) }
            throw error
        }
    }

    // MARK: - Stops

    enum Stop {
        /// A syscall-entry stop (`PTRACE_SYSCALL`) of a call of this AUDIT_ARCH.
        case syscallEntry(arch: UInt32)
        case syscallExit
        /// `PTRACE_EVENT_STOP`: SIGTRAP for a `PTRACE_INTERRUPT`, a stop signal for a group-stop.
        case event(CInt)
        /// A signal-delivery stop: the signal is delivered when the thread is resumed with it.
        case signal(CInt)
    }

    /// Classifies a wait status; throws if the process ended.
    func stop(from status: CInt, knownExit: Bool = false, what: String) throws(ProcessMemoryError) -> Stop {
        if ferry_wifexited(status) != 0 || ferry_wifsignaled(status) != 0 {
            throw ProcessMemoryError("process \(pid) ended during \(what) (status \(status))", errno: .noSuchProcess)
        }
        let sig = ferry_wstopsig(status)
        if ferry_wptrace_event(status) == FERRY_PTRACE_EVENT_STOP { return .event(sig) }
        if sig == SIGTRAP | 0x80 {
            if knownExit { return .syscallExit }
            var op: UInt8 = 0
            var arch: UInt32 = 0
            try check(ferry_ptrace_syscall_info(pid, &op, &arch), "PTRACE_GET_SYSCALL_INFO")
            return op == FERRY_PTRACE_SYSCALL_INFO_ENTRY ? .syscallEntry(arch: arch) : .syscallExit
        }
        return .signal(sig)
    }

    /// Waits for the next stop. `knownExit`: a syscall stop is the exit of the call that entered.
    func waitStop(knownExit: Bool = false, what: String) throws(ProcessMemoryError) -> Stop {
        var status: CInt = 0
        let r = ferry_waitpid_all(pid, &status)
        guard r >= 0 else { throw ProcessMemoryError("waitpid for process \(pid) during \(what) failed", negated: r) }
        return try stop(from: status, knownExit: knownExit, what: what)
    }

    /// Waits for the next stop until `deadline`; nil if none came. The thread is stopped or running its own code
    /// meanwhile, with its own registers: polling costs it nothing.
    func waitStop(until deadline: ContinuousClock.Instant, what: String) throws(ProcessMemoryError) -> Stop? {
        var status: CInt = 0
        var polls = 0
        while true {
            let r = ferry_waitpid_nohang(pid, &status)
            guard r >= 0 else { throw ProcessMemoryError("waitpid for process \(pid) during \(what) failed", negated: r) }
            if r > 0 { return try stop(from: status, what: what) }
            if ContinuousClock.now >= deadline { return nil }
            polls += 1
            if polls < 200 { sched_yield() } else { usleep(100) }
        }
    }

    /// Waits for the stop that follows PTRACE_INTERRUPT at attach; returns its signal (SIGTRAP, or the stop signal
    /// of a group-stop). A signal-delivery stop that comes first is delivered and the wait goes on (CRIU's
    /// compel_wait_task does the same).
    static func waitForAttachStop(pid: Int32) throws(ProcessMemoryError) -> CInt {
        for _ in 0..<64 {
            var status: CInt = 0
            let r = ferry_waitpid_all(pid, &status)
            guard r >= 0 else { throw ProcessMemoryError("waitpid for process \(pid) after PTRACE_INTERRUPT failed", negated: r) }
            if ferry_wifexited(status) != 0 || ferry_wifsignaled(status) != 0 {
                throw ProcessMemoryError("process \(pid) ended during PTRACE_INTERRUPT (status \(status))", errno: .noSuchProcess)
            }
            let sig = ferry_wstopsig(status)
            if ferry_wptrace_event(status) == FERRY_PTRACE_EVENT_STOP { return sig }
            let c = ferry_ptrace_cont(pid, sig)
            guard c == 0 else { throw ProcessMemoryError("PTRACE_CONT delivering signal \(sig) to process \(pid) failed", negated: c) }
        }
        throw ProcessMemoryError("process \(pid) did not stop after PTRACE_INTERRUPT (64 signals delivered first)")
    }

    // MARK: - Registers and the instruction

    /// Whether the thread is stopped inside a system call the kernel will restart (rax = -ERESTARTSYS,
    /// -ERESTARTNOINTR, -ERESTARTNOHAND or -ERESTART_RESTARTBLOCK): going on, it re-executes its `syscall`
    /// instruction before any of its own code.
    static func restartsSyscall(_ regs: user_regs_struct) -> Bool {
        guard Int64(bitPattern: regs.orig_rax) >= 0 else { return false }
        return [-512, -513, -514, -516].contains(Int64(bitPattern: regs.rax))
    }

    static func setArguments(_ regs: inout user_regs_struct, _ args: [UInt64]) {
        for (i, a) in args.enumerated() {
            switch i {
            case 0: regs.rdi = a
            case 1: regs.rsi = a
            case 2: regs.rdx = a
            case 3: regs.r10 = a
            case 4: regs.r8 = a
            default: regs.r9 = a
            }
        }
    }

    /// Points the thread at a `syscall` instruction with our number and arguments (orig_rax = -1: going on from
    /// this stop must not restart a call of its own).
    mutating func point(_ number: Int, _ args: [UInt64]) throws(ProcessMemoryError) {
        let address: UInt64
        if let known = syscallAddress {
            address = known
        } else {
            address = try Self.findSyscallInstruction(pid: pid, regions: try ProcessRegions(pid: pid))
            syscallAddress = address
        }
        var regs = resume
        regs.rax = UInt64(number)
        regs.orig_rax = UInt64.max
        regs.rip = address
        Self.setArguments(&regs, args)
        try setRegisters(regs)
    }

    func registers() throws(ProcessMemoryError) -> user_regs_struct {
        var regs = user_regs_struct()
        try check(ferry_ptrace_getregs(pid, &regs), "PTRACE_GETREGS")
        return regs
    }

    func setRegisters(_ regs: user_regs_struct) throws(ProcessMemoryError) {
        var regs = regs
        try check(ferry_ptrace_setregs(pid, &regs), "PTRACE_SETREGS")
    }

    func check(_ r: CInt, _ what: String) throws(ProcessMemoryError) {
        guard r >= 0 else { throw ProcessMemoryError("\(what) of process \(pid) failed", negated: r) }
    }

    /// Whether the two bytes at `address` are 0x0f 0x05 (`syscall`).
    func isSyscallInstruction(at address: UInt64) throws(ProcessMemoryError) -> Bool {
        var bytes: (UInt8, UInt8) = (0, 0)
        let n = withUnsafeMutableBytes(of: &bytes) { local in
            var l = iovec(iov_base: local.baseAddress, iov_len: 2)
            var remote = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address)), iov_len: 2)
            return ferry_process_vm_readv(pid, &l, 1, &remote, 1)
        }
        return n == 2 && bytes == (0x0f, 0x05)
    }

    /// Finds the bytes 0x0f 0x05 (`syscall`) in the target's [vdso], or else in its first executable file mapping.
    static func findSyscallInstruction(pid: Int32, regions: ProcessRegions) throws(ProcessMemoryError) -> UInt64 {
        let reader = try ProcessMemoryReader(pid: pid)
        let candidates = regions.all.filter { $0.path == "[vdso]" } + regions.all.filter { $0.executable && $0.readable && $0.kind == .file }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
        defer { buffer.deallocate() }
        for region in candidates {
            var address = region.range.start
            while address < region.range.end {
                let len = Int(min(UInt64(buffer.count), region.range.end - address))
                guard let n = try? reader.read(from: address, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<len])), n > 1 else { break }
                for i in 0..<(n - 1) where buffer[i] == 0x0f && buffer[i + 1] == 0x05 {
                    return address + UInt64(i)
                }
                address += UInt64(n - 1)
            }
        }
        throw ProcessMemoryError("no syscall instruction found in the [vdso] or executable mappings of process \(pid)")
    }
}

/// Descriptor numbers of the x86-64 system calls Ferry injects.
public enum SyscallNumber {
    public static let close = 3
    public static let userfaultfd = 323
}
