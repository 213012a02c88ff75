import Glibc

/// Turns SIGTERM, SIGINT and a "work finished" wake-up (SIGUSR1) into something the main thread
/// waits for: the signals are blocked in every thread (call ``blockAll()`` before starting any)
/// and taken with `sigwait`, so no handler runs in the middle of I/O.
public enum SignalWaiter {
    /// What woke the main thread.
    public enum Event: Sendable, Equatable {
        /// SIGTERM or SIGINT: drain and exit.
        case stop(Int32)
        /// ``wake()`` was called: background work has finished.
        case workFinished
        /// SIGUSR2: the operator says "migrate now" (`source-agent --migrate-on-signal`).
        case go
    }

    private static func set() -> sigset_t {
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGUSR1)
        sigaddset(&signals, SIGUSR2)
        return signals
    }

    /// Blocks the signals in the calling thread and every thread it starts later.
    ///
    /// The corresponding C function is `pthread_sigmask`.
    public static func blockAll() {
        var signals = set()
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)
    }

    /// Waits for a stop signal or a wake-up.
    ///
    /// The corresponding C function is `sigwait`.
    public static func wait() -> Event {
        var signals = set()
        var received: Int32 = 0
        sigwait(&signals, &received)
        switch received {
        case SIGUSR1: return .workFinished
        case SIGUSR2: return .go
        default: return .stop(received)
        }
    }

    /// Wakes the thread in ``wait()`` from any thread.
    public static func wake() {
        kill(getpid(), SIGUSR1)
    }
}
