import Glibc
import XCTest

/// A PID with no process behind it.
func unusedPID() -> Int32 {
    var pid: Int32 = 32000
    while kill(pid, 0) == 0 || errno != ESRCH { pid -= 1 }
    return pid
}

/// p50, p90, p99 and max of `nanos`, in microseconds.
func percentiles(_ nanos: [UInt64]) -> (p50: Double, p90: Double, p99: Double, max: Double) {
    let s = nanos.sorted()
    func at(_ q: Double) -> Double { s.isEmpty ? 0 : Double(s[min(s.count - 1, Int(Double(s.count - 1) * q + 0.5))]) / 1000 }
    return (at(0.5), at(0.9), at(0.99), at(1))
}

/// XCTAssertThrowsError for expressions of noncopyable type.
func expectError(_ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line, _ check: (any Error) -> Void) {
    do {
        try body()
        XCTFail("expected an error", file: file, line: line)
    } catch {
        check(error)
    }
}
