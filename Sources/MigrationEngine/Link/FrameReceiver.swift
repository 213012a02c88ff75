import Glibc
import SystemPackage
import URing
import Wire

/// Receives frames from one connection through its own io_uring ring into one reused buffer, and
/// decodes them with Wire's pure decoder. A returned frame's payload points into that buffer and
/// is valid until the next call to ``receive(during:)``. Owned by one thread.
public struct FrameReceiver: ~Copyable {
    private var ring: Ring
    private let fd: Int32
    private let decoder: FrameDecoder
    private let buffer: UnsafeMutableRawBufferPointer
    private var start = 0, end = 0, pendingConsume = 0
    private let timeout: UnsafeMutablePointer<KernelTimespec>
    /// How long a receive may see no bytes before it fails with ``LinkError/timedOut(during:seconds:)``.
    public var timeoutSeconds: Double {
        didSet { timeout.pointee = KernelTimespec(nanoseconds: UInt64(timeoutSeconds * 1e9)) }
    }
    /// Bytes received so far.
    public private(set) var bytesReceived: UInt64 = 0

    /// A receiver on connected socket `fd` (not owned). A receive that sees no bytes for
    /// `timeoutSeconds` fails with ``LinkError/timedOut(during:seconds:)``.
    public init(fd: Int32, maxFrameSize: Int = FrameDecoder.defaultMaxFrameSize, timeoutSeconds: Double = 30) throws(Errno) {
        self.fd = fd
        self.ring = try Ring(entries: 8)
        self.decoder = FrameDecoder(maxFrameSize: maxFrameSize)
        self.buffer = .allocate(byteCount: maxFrameSize + (1 << 20), alignment: 4096)
        self.timeoutSeconds = timeoutSeconds
        self.timeout = .allocate(capacity: 1)
        timeout.initialize(to: KernelTimespec(nanoseconds: UInt64(timeoutSeconds * 1e9)))
    }

    deinit {
        buffer.deallocate()
        timeout.deallocate()
    }

    /// The next frame. `during` names the phase for error messages.
    public mutating func receive(during phase: String) throws(LinkError) -> DecodedFrame {
        start += pendingConsume
        pendingConsume = 0
        while true {
            let available = UnsafeRawBufferPointer(rebasing: buffer[start..<end])
            let frame: DecodedFrame?
            do { frame = try decoder.decode(available) } catch { throw .malformed(error) }
            if let frame {
                pendingConsume = frame.consumed
                if case .error(let message) = frame.message { throw .peer(message.code, reason: message.reason) }
                return frame
            }
            try fill(during: phase)
        }
    }

    /// Reads more bytes, first moving a partial frame to the front when the buffer's tail is short.
    private mutating func fill(during phase: String) throws(LinkError) {
        if start == end {
            start = 0; end = 0
        } else if buffer.count - end < (64 << 10) || start > buffer.count / 2 {
            let count = end - start
            memmove(buffer.baseAddress!, buffer.baseAddress! + start, count)
            start = 0; end = count
        }
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[end...])
        var result: Int32 = 0
        do {
            try ring.prepareRecv(fd, into: target, tag: 1, options: .linkNext)
            try ring.prepareLinkTimeout(timeout, tag: 2)
        } catch {
            throw .socket(error.errno, during: phase)
        }
        while ring.inFlight > 0 {
            do { try ring.submitAndWait(1) } catch { throw .socket(error, during: phase) }
            ring.drainCompletions { completion in
                if completion.tag == 1 { result = completion.result }
            }
        }
        if result == -ECANCELED { throw .timedOut(during: phase, seconds: timeoutSeconds) }
        if result < 0 { throw .socket(Errno(rawValue: -result), during: phase) }
        if result == 0 { throw .closed(during: phase) }
        end += Int(result)
        bytesReceived += UInt64(result)
    }
}
