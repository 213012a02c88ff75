import CFerryShims
import Glibc

/// Runs system calls inside another process through ptrace, the way CRIU's compel does (compel/src/lib/infect.c),
/// without modifying the target's code: it points the stopped thread at a `syscall` instruction that already exists
/// in the target (found in the `[vdso]` or else in an executable file mapping), single-steps it, and restores.
///
/// Sequence: `PTRACE_SEIZE`, `PTRACE_INTERRUPT`, `waitpid`; save registers (`PTRACE_GETREGS`) and the signal mask
/// (`PTRACE_GETSIGMASK`); block every signal (`PTRACE_SETSIGMASK`); for each call set rax/rdi/rsi/rdx/r10/r8/r9,
/// `orig_rax = -1` (no syscall restart), rip = the syscall instruction, `PTRACE_SINGLESTEP`, read rax;
/// finally restore registers and mask and `PTRACE_DETACH`.
///
/// The target must not be group-stopped (SIGSTOP) at attach. A thread stopped inside a blocking system call sees it
/// interrupted: restartable calls restart, KVM_RUN returns EINTR (VMMs retry it). Use it from one thread: ptrace
/// binds the tracee to the thread that seized it (the whole session runs synchronously, never across an `await`).
public struct RemoteSyscallSession: ~Copyable {
    public let pid: Int32
    /// The address of the `syscall` instruction (0x0f 0x05) used for every call.
    public let syscallAddress: UInt64
    var saved: user_regs_struct
    let savedMask: UInt64
    var finished = false

    /// Seizes and stops the target, saves its state and blocks its signals.
    public init(pid: Int32) throws(ProcessMemoryError) {
        let regions = try ProcessRegions(pid: pid)
        let address = try Self.findSyscallInstruction(pid: pid, regions: regions)
        var r = ferry_ptrace_seize(pid)
        guard r == 0 else {
            throw ProcessMemoryError("PTRACE_SEIZE of process \(pid) failed"
                                     + (r == -1 || r == -13 ? " (need root or CAP_SYS_PTRACE; is another tracer attached?)" : ""), negated: r)
        }
        r = ferry_ptrace_interrupt(pid)
        guard r == 0 else {
            _ = ferry_ptrace_detach(pid, 0)
            throw ProcessMemoryError("PTRACE_INTERRUPT of process \(pid) failed", negated: r)
        }
        do {
            try Self.waitForStop(pid: pid, what: "PTRACE_INTERRUPT")
        } catch {
            _ = ferry_ptrace_detach(pid, 0)
            throw error
        }
        var regs = user_regs_struct()
        var mask: UInt64 = 0
        r = ferry_ptrace_getregs(pid, &regs)
        if r == 0 { r = ferry_ptrace_getsigmask(pid, &mask) }
        if r == 0 { r = ferry_ptrace_setsigmask(pid, ~UInt64(0)) }
        guard r == 0 else {
            _ = ferry_ptrace_detach(pid, 0)
            throw ProcessMemoryError("saving registers and signal mask of process \(pid) failed", negated: r)
        }
        self.pid = pid
        syscallAddress = address
        saved = regs
        savedMask = mask
    }

    deinit {
        if !finished { _ = try? restoreAndDetach() }
    }

    /// Restores registers and signal mask and detaches; the target continues where it was stopped.
    public consuming func finish() throws(ProcessMemoryError) {
        finished = true
        try restoreAndDetach()
    }

    private func restoreAndDetach() throws(ProcessMemoryError) {
        var regs = saved
        var r = ferry_ptrace_setregs(pid, &regs)
        let r2 = ferry_ptrace_setsigmask(pid, savedMask)
        if r == 0 { r = r2 }
        let r3 = ferry_ptrace_detach(pid, 0)
        if r == 0 { r = r3 }
        guard r == 0 else { throw ProcessMemoryError("restoring and detaching process \(pid) failed", negated: r) }
    }

    /// Runs system call `number` with up to six arguments in the target; returns its raw result
    /// (negative = -errno, as the kernel returns it).
    public func call(_ number: Int, _ args: UInt64...) throws(ProcessMemoryError) -> Int64 {
        var regs = saved
        regs.rax = UInt64(number)
        regs.orig_rax = UInt64.max
        regs.rip = syscallAddress
        let a = args + Array(repeating: 0, count: max(0, 6 - args.count))
        regs.rdi = (a[0]); regs.rsi = (a[1]); regs.rdx = (a[2])
        regs.r10 = (a[3]); regs.r8 = (a[4]); regs.r9 = (a[5])
        var r = ferry_ptrace_setregs(pid, &regs)
        guard r == 0 else { throw ProcessMemoryError("PTRACE_SETREGS for syscall \(number) in process \(pid) failed", negated: r) }
        // Single-step until the instruction has run: other stops (a late PTRACE_INTERRUPT event, SIGSTOP) leave rip
        // where it was and are simply stepped again.
        var out = user_regs_struct()
        for _ in 0..<16 {
            r = ferry_ptrace_singlestep(pid, 0)
            guard r == 0 else { throw ProcessMemoryError("PTRACE_SINGLESTEP over syscall \(number) in process \(pid) failed", negated: r) }
            let sig = try Self.waitForStop(pid: pid, what: "single-step of syscall \(number)")
            r = ferry_ptrace_getregs(pid, &out)
            guard r == 0 else { throw ProcessMemoryError("PTRACE_GETREGS after syscall \(number) in process \(pid) failed", negated: r) }
            if sig == SIGTRAP && out.rip == syscallAddress + 2 {
                return Int64(bitPattern: out.rax)
            }
            if out.rip != syscallAddress {
                throw ProcessMemoryError("injected syscall \(number) in process \(pid) stopped at \(hex(out.rip)) (signal \(sig)), expected \(hex(syscallAddress + 2))")
            }
        }
        throw ProcessMemoryError("injected syscall \(number) in process \(pid) did not complete after 16 single-steps")
    }

    /// Waits for the tracee to stop; returns the stop signal. Throws if it exited.
    @discardableResult
    static func waitForStop(pid: Int32, what: String) throws(ProcessMemoryError) -> CInt {
        var status: CInt = 0
        let r = ferry_waitpid_all(pid, &status)
        guard r >= 0 else { throw ProcessMemoryError("waitpid for process \(pid) after \(what) failed", negated: r) }
        if ferry_wifexited(status) != 0 || ferry_wifsignaled(status) != 0 {
            throw ProcessMemoryError("process \(pid) ended during \(what) (status \(status))", errno: .noSuchProcess)
        }
        return ferry_wstopsig(status)
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
