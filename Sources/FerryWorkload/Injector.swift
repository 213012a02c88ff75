import Glibc
import ProcessMemory

/// `ferry-workload --inject-into PID`: the injection an agent does at attach, alone in a process a test can kill
/// with SIGKILL at any moment (Tests/ProcessMemoryTests/InjectionSafetyTests.swift). Prints {"event":"ready"},
/// waits for a line on stdin, then injects userfaultfd into PID (and closes the target's copy: `Userfaultfd.inject`)
/// `--inject-times` times, and prints {"event":"injected","us":[...]}: the microseconds each took.
enum Injector {
    static func run(pid: Int32, times: Int) -> Int32 {
        Output.line("{\"event\":\"ready\",\"pid\":\(getpid())}")
        var byte: UInt8 = 0
        guard read(0, &byte, 1) == 1 else { return 2 }
        var micros: [Int] = []
        for _ in 0..<max(1, times) {
            var t0 = timespec(), t1 = timespec()
            clock_gettime(CLOCK_MONOTONIC, &t0)
            do {
                let uffd = try Userfaultfd.inject(into: pid)
                _ = uffd
            } catch {
                Output.line("{\"event\":\"error\",\"message\":\"\(String(error.description.map { $0 == "\"" ? "'" : $0 }))\"}")
                return 1
            }
            clock_gettime(CLOCK_MONOTONIC, &t1)
            micros.append((t1.tv_sec - t0.tv_sec) * 1_000_000 + (t1.tv_nsec - t0.tv_nsec) / 1000)
        }
        Output.line("{\"event\":\"injected\",\"us\":[\(micros.map(String.init).joined(separator: ","))]}")
        return 0
    }
}
