import CFerryShims
import Glibc
import SystemPackage

/// Starts detached threads with `pthread_create` and says when the system refuses one (`EAGAIN`
/// at a thread or memory limit), instead of crashing as Foundation's `Thread.start()` does: a
/// flood of connections must cost a refusal, never the agent. Used by every server of Ferry's
/// (the NBD server's connections, the migration link's door).
public enum DetachedThread {
    /// Runs `body` on a new detached thread named `name` (at most 15 bytes are kept) with a stack
    /// of `stackSize` bytes (0: the system's default). Returns the error when no thread could be made.
    @discardableResult
    public static func spawn(name: String, stackSize: Int = 0, _ body: @escaping @Sendable () -> Void) -> Errno? {
        final class Box {
            let name: String
            let body: @Sendable () -> Void
            init(_ name: String, _ body: @escaping @Sendable () -> Void) { self.name = name; self.body = body }
        }
        let context = Unmanaged.passRetained(Box(name, body)).toOpaque()
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        if stackSize > 0 { pthread_attr_setstacksize(&attributes, stackSize) }
        var thread = pthread_t()
        let rc = pthread_create(&thread, &attributes, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            _ = ferry_set_thread_name(box.name)
            box.body()
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(context).release()
            return Errno(rawValue: rc)
        }
        return nil
    }
}
