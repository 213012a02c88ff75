import Synchronization

/// A value behind a `Mutex` that closures and threads can share by reference (a `Mutex` itself
/// cannot be copied into a closure).
final class Locked<Value: ~Copyable>: Sendable {
    private let mutex: Mutex<Value>

    init(_ value: consuming sending Value) { mutex = Mutex(value) }

    /// Runs `body` with the value held.
    func withLock<Result, Failure: Error>(_ body: (inout sending Value) throws(Failure) -> sending Result) throws(Failure) -> sending Result {
        try mutex.withLock(body)
    }
}
