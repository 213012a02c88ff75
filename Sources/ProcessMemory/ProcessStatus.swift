/// The fields of /proc/PID/status that decide whether a system call may be injected into a process
/// (`RemoteSyscallSession`). They describe the thread-group leader, the thread that is seized.
public struct ProcessStatus: Sendable, Equatable {
    /// The `State:` letter: R, S, D, T (stopped by a signal), t (stopped by a tracer), Z, X.
    public var state: Character
    /// `TracerPid:`, 0 when nobody traces the process.
    public var tracerPID: Int32
    /// `Seccomp:`: 0 none, 1 strict, 2 filter.
    public var seccompMode: Int
    /// `Seccomp_filters:` (Linux 5.9), the number of filters installed; nil when the kernel does not show it.
    public var seccompFilters: Int?
    /// `SigBlk:`, `SigPnd:` (this thread) and `ShdPnd:` (the whole process): 64-bit signal sets, bit n-1 for signal n.
    public var blocked: UInt64
    public var pending: UInt64
    public var sharedPending: UInt64
    /// `SigCgt:`: the signals with a handler.
    public var caught: UInt64
    /// `Threads:`.
    public var threads: Int

    /// Reads /proc/PID/status.
    public init(pid: Int32) throws(ProcessMemoryError) {
        let text = try ProcFiles.readText(pid: pid, "status")
        guard let parsed = Self(parsing: text) else {
            throw ProcessMemoryError("/proc/\(pid)/status lacks State:, TracerPid:, Seccomp: or SigBlk:")
        }
        self = parsed
    }

    /// Parses the text of a status file; nil if a required field is missing.
    public init?(parsing text: String) {
        var state: Character?, tracer: Int32?, mode: Int?, blocked: UInt64?
        var filters: Int?, pending: UInt64 = 0, shared: UInt64 = 0, caught: UInt64 = 0, threads = 1
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let value = line[line.index(after: colon)...].drop { $0 == " " || $0 == "\t" }
            switch line[..<colon] {
            case "State": state = value.first
            case "TracerPid": tracer = Int32(value)
            case "Seccomp": mode = Int(value)
            case "Seccomp_filters": filters = Int(value)
            case "SigBlk": blocked = UInt64(value, radix: 16)
            case "SigPnd": pending = UInt64(value, radix: 16) ?? 0
            case "ShdPnd": shared = UInt64(value, radix: 16) ?? 0
            case "SigCgt": caught = UInt64(value, radix: 16) ?? 0
            case "Threads": threads = Int(value) ?? 1
            default: break
            }
        }
        guard let state, let tracer, let mode, let blocked else { return nil }
        self.state = state
        tracerPID = tracer
        seccompMode = mode
        seccompFilters = filters
        self.blocked = blocked
        self.pending = pending
        sharedPending = shared
        self.caught = caught
        self.threads = threads
    }

    /// Why a system call must not be injected into this process, or nil. `tracedByUs`: skip the tracer check
    /// (after our own PTRACE_SEIZE, TracerPid is us).
    public func injectionRefusal(tracedByUs: Bool = false) -> InjectionRefusal? {
        switch seccompMode {
        case 0: break
        case 1: return .seccompStrict
        default: return .seccompFilter(filters: seccompFilters)
        }
        if state == "Z" || state == "X" { return .zombie }
        if !tracedByUs && tracerPID != 0 { return .traced(by: tracerPID) }
        return nil
    }

    /// The signals pending (for this thread or the process), not blocked, with a handler: a stopped process that
    /// has some would run the handlers as soon as an injection resumes its thread.
    public var pendingCaught: UInt64 { (pending | sharedPending) & ~blocked & caught }
}

/// Why Ferry refuses to inject a system call into a process; see ``ProcessMemoryError/refusal``.
public enum InjectionRefusal: Sendable, Equatable {
    /// `Seccomp: 2`: a filter could answer the injected calls with SIGSYS (killing the VM) or an error, and
    /// Ferry cannot evaluate BPF programs safely.
    case seccompFilter(filters: Int?)
    /// `Seccomp: 1`: only read, write, exit and sigreturn are allowed; anything else kills the process.
    case seccompStrict
    /// The main thread has exited (a zombie): nothing to seize.
    case zombie
    /// Another tracer (a debugger, another agent) holds the process: `PTRACE_SEIZE` would fail.
    case traced(by: Int32)
    /// The process is stopped by a signal (state T) and has signals pending with handlers (this set): the
    /// injection would run those handlers while the process is meant to be stopped.
    case stoppedWithSignalsPending(UInt64)
}

extension ProcessMemoryError {
    /// The error for a process Ferry will not inject into, saying which /proc/PID/status field decided and what
    /// the operator can do.
    static func refused(_ pid: Int32, _ refusal: InjectionRefusal, calls: String) -> ProcessMemoryError {
        let why: String
        switch refusal {
        case .seccompFilter(let filters):
            why = "it runs under a seccomp filter (/proc/\(pid)/status Seccomp: 2"
                + (filters.map { ", Seccomp_filters: \($0)" } ?? "") + "). A filter that does not allow \(calls) "
                + "would kill it with SIGSYS, and Ferry cannot evaluate BPF filters safely. Run the VM without a "
                + "seccomp filter, or with one that allows \(calls) (QEMU: -sandbox off; Firecracker: --no-seccomp "
                + "or a custom filter), or use content hashing (the source falls back to it by itself)"
        case .seccompStrict:
            why = "it runs in seccomp strict mode (/proc/\(pid)/status Seccomp: 1), where \(calls) would kill it"
        case .zombie:
            why = "its main thread has exited (/proc/\(pid)/status State: Z)"
        case .stoppedWithSignalsPending(let set):
            why = "it is stopped by a signal (State: T) with signals pending that have handlers (set 0x\(String(set, radix: 16)) "
                + "of /proc/\(pid)/status SigPnd/ShdPnd); the injection would run their handlers while it is stopped. "
                + "Continue it (SIGCONT) first"
        case .traced(let tracer):
            why = "cannot PTRACE_SEIZE: it is already traced by process \(tracer) (/proc/\(pid)/status TracerPid), "
                + "a debugger or another agent"
        }
        var error = ProcessMemoryError("refusing to inject \(calls) into process \(pid): " + why)
        error.refusal = refusal
        return error
    }
}
