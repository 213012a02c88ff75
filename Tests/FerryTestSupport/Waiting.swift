import Foundation
import Glibc

/// Waits for `condition` to hold, checking it every `interval` seconds, for at most `timeout`
/// seconds (generous: a loaded 2-core CI machine is slow). Returns whether it held. Use this
/// instead of a sleep whenever a test waits for something to happen.
@discardableResult
public func waitUntil(timeout: Double, interval: Double = 0.005, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        if try condition() { return true }
        if Date() >= deadline { return false }
        usleep(UInt32(interval * 1_000_000))
    }
}

/// Seconds elapsed on the monotonic clock since `start` (from ``monotonicSeconds()``).
public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
