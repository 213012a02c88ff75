import CFerryShims
import Glibc
import Synchronization

/// `ferry-workload --injection-target MODE`: a small process for the ptrace-injection tests
/// (Tests/ProcessMemoryTests/InjectionSafetyTests.swift). Its main thread, the one an injection seizes, does one
/// thing over and over and checks every result:
///
///     sleep   nanosleep(20 ms): returns 0 after at least 20 ms (EINTR only when a SIGUSR1 came)
///     read    read(2) of one byte from a pipe the helper thread feeds on "feed": 1 byte, the next in sequence
///     spin    arithmetic only, no system call: a running sum that must equal its closed form
///
/// It blocks SIGUSR2 and SIGRTMIN+3 (a SigBlk to recognize in /proc/PID/status) and counts SIGUSR1 in a handler.
/// `--target-threads N` adds N threads that spin and count. `--seccomp-deny-userfaultfd` installs a seccomp
/// filter (in every thread) that kills the process at userfaultfd(2).
///
/// A helper thread reads commands on stdin: `status` -> {"event":"status","loops":N,"anomalies":N,
/// "last_anomaly":"...","usr1":N,"workers":[N,...]}, `feed` (read mode) -> {"event":"fed","count":N}, `quit`.
enum InjectionTarget {
    enum Mode: String { case sleep, read, spin }

    final class Counter: Sendable {
        let value = Atomic<Int>(0)
    }
    static let loops = Counter()
    static let anomalies = Counter()
    static let usr1 = Counter()
    static let lastAnomaly = Counter()   // a code, see sleepLoop
    static let fed = Counter()
    nonisolated(unsafe) static var workers: [Counter] = []
    nonisolated(unsafe) static var pipeFDs: [Int32] = [-1, -1]

    static func run(mode modeName: String, threads: Int, denyUserfaultfd: Bool) -> Never {
        guard let mode = Mode(rawValue: modeName) else { Output.error("bad --injection-target '\(modeName)': sleep, read or spin") }
        if denyUserfaultfd { installSeccompFilter() }
        signal(SIGUSR1) { _ in InjectionTarget.usr1.value.add(1, ordering: .relaxed) }
        // Every thread made from here inherits SIGUSR1 blocked: a SIGUSR1 goes to the main thread.
        var blocked = sigset_t()
        sigemptyset(&blocked)
        for s in [SIGUSR1, SIGUSR2, 37 /* SIGRTMIN + 3 */] { sigaddset(&blocked, s) }
        pthread_sigmask(SIG_BLOCK, &blocked, nil)
        if mode == .read {
            var fds: [Int32] = [0, 0]
            guard pipe(&fds) == 0 else { Output.error("pipe failed: errno \(errno)") }
            pipeFDs = fds
        }
        workers = (0..<threads).map { _ in Counter() }
        for i in 0..<threads {
            var thread = pthread_t()
            pthread_create(&thread, nil, { arg in
                let counter = InjectionTarget.workers[Int(bitPattern: arg) - 1]
                var n = 0
                while true {
                    n &+= 1
                    if n & 0xffff == 0 { counter.value.store(n, ordering: .relaxed) }
                }
            }, UnsafeMutableRawPointer(bitPattern: i + 1))
        }
        var helper = pthread_t()
        pthread_create(&helper, nil, { _ in InjectionTarget.serveCommands() }, nil)
        var unblock = sigset_t()
        sigemptyset(&unblock)
        sigaddset(&unblock, SIGUSR1)
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        Output.line("{\"event\":\"ready\",\"pid\":\(getpid()),\"mode\":\"\(mode.rawValue)\",\"threads\":\(threads)}")
        switch mode {
        case .sleep: sleepLoop()
        case .read: readLoop()
        case .spin: spinLoop()
        }
    }

    static func anomaly(_ code: Int) {
        anomalies.value.add(1, ordering: .relaxed)
        lastAnomaly.value.store(code, ordering: .relaxed)
    }

    static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Anomaly codes (`last_anomaly`): 2_000_000 + errno for an error the call should not give (EINTR without a
    /// SIGUSR1), 3 for a sleep cut short, 6 for a result the call never gives (a read of more than asked, an errno
    /// outside 1...4095: what a call returns when a tracer died while it carried another call, see
    /// docs/ptrace-injection.md), 1_000_000 + byte for a wrong byte, 5 for a wrong sum.
    static func sleepLoop() -> Never {
        // One system call per round (the vDSO's clock_gettime makes none): the only one an injection can borrow.
        while true {
            let signals = usr1.value.load(ordering: .relaxed)
            var request = timespec(tv_sec: 0, tv_nsec: 20_000_000)
            let t0 = seconds()
            let r = nanosleep(&request, nil)
            let elapsed = seconds() - t0
            if r != 0 {
                let e = Int(errno)
                if e <= 0 || e > 4095 { anomaly(6) } else if !(e == EINTR && usr1.value.load(ordering: .relaxed) != signals) { anomaly(2_000_000 + e) }
            } else if elapsed < 0.0199 {
                anomaly(3)
            }
            loops.value.add(1, ordering: .relaxed)
        }
    }

    static func readLoop() -> Never {
        var next: UInt8 = 0
        while true {
            var byte: UInt8 = 0
            let r = read(pipeFDs[0], &byte, 1)
            if r < 0 {
                anomaly(2_000_000 + Int(errno))
            } else if r != 1 {
                anomaly(6)
            } else if byte != next {
                anomaly(1_000_000 + Int(byte))
            }
            next = byte &+ 1
            loops.value.add(1, ordering: .relaxed)
        }
    }

    /// No system call: a sum kept in registers, checked against n(n+1)/2 every round.
    static func spinLoop() -> Never {
        var n: UInt64 = 0
        var sum: UInt64 = 0
        while true {
            n &+= 1
            sum &+= n
            if n & 0xfffff == 0 {
                if sum != n &* (n &+ 1) / 2 { anomaly(5) }
                loops.value.store(Int(n >> 20), ordering: .relaxed)
            }
        }
    }

    static func serveCommands() -> Never {
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 256)
        while true {
            let n = read(0, &chunk, chunk.count)
            if n <= 0 { exit(0) }
            buffer.append(contentsOf: chunk[0..<n])
            while let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let command = String(decoding: buffer[0..<nl], as: UTF8.self)
                buffer.removeSubrange(0...nl)
                switch command {
                case "status":
                    let w = workers.map { String($0.value.load(ordering: .relaxed)) }.joined(separator: ",")
                    Output.line("{\"event\":\"status\",\"loops\":\(loops.value.load(ordering: .relaxed)),\"anomalies\":\(anomalies.value.load(ordering: .relaxed)),\"last_anomaly\":\(lastAnomaly.value.load(ordering: .relaxed)),\"usr1\":\(usr1.value.load(ordering: .relaxed)),\"workers\":[\(w)]}")
                case "feed":
                    var byte = UInt8(truncatingIfNeeded: fed.value.load(ordering: .relaxed))
                    _ = write(pipeFDs[1], &byte, 1)
                    Output.line("{\"event\":\"fed\",\"count\":\(fed.value.add(1, ordering: .relaxed).newValue)}")
                case "quit":
                    exit(0)
                default:
                    Output.line("{\"event\":\"error\",\"message\":\"unknown command '\(command)'\"}")
                }
            }
        }
    }

    /// A seccomp filter that kills the process at userfaultfd(2) and allows everything else:
    /// `ld [nr]; jeq #323, kill, allow`.
    static func installSeccompFilter() {
        struct SockFilter { var code: UInt16; var jt: UInt8; var jf: UInt8; var k: UInt32 }
        struct SockFprog { var len: UInt16; var filter: UnsafeMutableRawPointer }
        var program = [
            SockFilter(code: 0x20, jt: 0, jf: 0, k: 0),            // BPF_LD | BPF_W | BPF_ABS: seccomp_data.nr
            SockFilter(code: 0x15, jt: 0, jf: 1, k: 323),          // BPF_JMP | BPF_JEQ | BPF_K: userfaultfd?
            SockFilter(code: 0x06, jt: 0, jf: 0, k: 0x8000_0000),  // BPF_RET: SECCOMP_RET_KILL_PROCESS
            SockFilter(code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000),  // BPF_RET: SECCOMP_RET_ALLOW
        ]
        let count = UInt16(program.count)
        let r = program.withUnsafeMutableBytes { bytes -> CInt in
            var prog = SockFprog(len: count, filter: bytes.baseAddress!)
            guard ferry_prctl(38 /* PR_SET_NO_NEW_PRIVS */, 1, 0, 0, 0) == 0 else { return -1 }
            return withUnsafeMutablePointer(to: &prog) {
                ferry_prctl(22 /* PR_SET_SECCOMP */, 2 /* SECCOMP_MODE_FILTER */, UInt(bitPattern: $0), 0, 0)
            }
        }
        if r != 0 { Output.error("installing the seccomp filter failed: \(r)") }
    }
}
