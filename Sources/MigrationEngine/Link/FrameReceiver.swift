import CFerryShims
import Glibc
import SystemPackage
import URing
import Wire

/// Receives frames from one connection through its own io_uring ring into one reused buffer, and
/// decodes them with Wire's pure decoder. A returned frame's payload points into that buffer and
/// is valid until the next call to ``receive(during:)``. Owned by one thread.
///
/// A new receiver is sized for the handshake only (frames of at most ``handshakeMaxFrameSize``, a
/// 96 KiB buffer), so an unauthenticated peer costs little; ``startOpening(_:key:maxFrameSize:)``
/// then opens every later frame with the handshake's key (into a second buffer, before decoding)
/// and makes room for bulk frames. A frame that fails to open ends the link with ``LinkError/tampered(_:)``.
public struct FrameReceiver: ~Copyable {
    /// Largest frame (header included) accepted before authentication: a hello with its 256
    /// resume points is 6.2 KiB; an error frame is smaller.
    public static let handshakeMaxFrameSize = 16 << 10

    private var ring: Ring
    private let fd: Int32
    private var decoder: FrameDecoder
    private var buffer: UnsafeMutableRawBufferPointer
    private var start = 0, end = 0, pendingConsume = 0
    private let timeout: UnsafeMutablePointer<KernelTimespec>
    private var cipher: FrameCipher?
    /// Where a sealed frame's body is opened to (the decoded frame points into it); empty until sealing starts.
    private var opened = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    /// Expands compressed payloads, on a link that agreed on `compression` (``acceptCompressed()``); without it a
    /// compressed payload is a protocol violation.
    private var expander: PayloadExpander?
    private var framesOpened: UInt64 = 0
    /// How long a receive may see no bytes before it fails with ``LinkError/timedOut(during:seconds:)``.
    public var timeoutSeconds: Double
    /// A monotonic instant (``ferry_monotonic_ns()``) after which every receive fails with
    /// ``LinkError/timedOut(during:seconds:)``, however the bytes trickle in: the whole handshake's deadline.
    public var deadlineNanoseconds: UInt64?
    /// Bytes received so far.
    public private(set) var bytesReceived: UInt64 = 0

    /// A receiver on connected socket `fd` (not owned), for the handshake. A receive that sees no
    /// bytes for `timeoutSeconds` fails with ``LinkError/timedOut(during:seconds:)``.
    public init(fd: Int32, timeoutSeconds: Double = 30) throws(Errno) {
        self.fd = fd
        self.ring = try Ring(entries: 8)
        self.decoder = FrameDecoder(maxFrameSize: Self.handshakeMaxFrameSize)
        self.buffer = .allocate(byteCount: Self.handshakeMaxFrameSize + (80 << 10), alignment: 4096)
        self.timeoutSeconds = timeoutSeconds
        self.timeout = .allocate(capacity: 1)
        timeout.initialize(to: KernelTimespec(nanoseconds: UInt64(timeoutSeconds * 1e9)))
    }

    deinit {
        opened.deallocate()
        buffer.deallocate()
        timeout.deallocate()
    }

    /// After the handshake: every later frame is opened with `suite` under `key` (the peer's
    /// direction of the handshake's ``SessionKeys``; suite `none`, a benchmark build only, leaves
    /// them in the clear), and frames up to `maxFrameSize` (plus the tag) are accepted. Bytes
    /// already received after the handshake's last frame are kept.
    public mutating func startOpening(_ suite: CipherSuite, key: [UInt8],
                                      maxFrameSize: Int = FrameDecoder.defaultMaxFrameSize) throws(LinkError) {
        if suite != .none {
            cipher = try FrameCipher(suite: suite, key: key)
            opened = .allocate(byteCount: maxFrameSize + SealedRecords.recordBytes, alignment: 4096)
        }
        decoder = FrameDecoder(maxFrameSize: maxFrameSize + (suite == .none ? 0 : SealedRecords.overhead(bodyBytes: maxFrameSize)))
        start += pendingConsume
        pendingConsume = 0
        let larger = UnsafeMutableRawBufferPointer.allocate(byteCount: decoder.maxFrameSize + (1 << 20), alignment: 4096)
        if end > start { larger.baseAddress!.copyMemory(from: buffer.baseAddress! + start, byteCount: end - start) }
        end -= start
        start = 0
        buffer.deallocate()
        buffer = larger
    }

    /// Accepts compressed bulk payloads from now on (the handshake agreed on `compression`).
    public mutating func acceptCompressed() {
        if expander == nil { expander = PayloadExpander(limit: decoder.maxFrameSize) }
    }

    /// The next frame. `during` names the phase for error messages.
    public mutating func receive(during phase: String) throws(LinkError) -> DecodedFrame {
        start += pendingConsume
        pendingConsume = 0
        while true {
            let available = UnsafeRawBufferPointer(rebasing: buffer[start..<end])
            let header: FrameHeader?
            do { header = try decoder.decodeHeader(available) } catch { throw .malformed(error) }
            if let header, available.count >= header.frameSize {
                let frame = try decode(header, at: start)
                pendingConsume = frame.consumed
                if case .error(let message) = frame.message { throw .peer(message.code, reason: message.reason) }
                return frame
            }
            try fill(during: phase)
        }
    }

    /// Opens (when sealed, into ``opened``) and decodes the whole frame at `offset`.
    private mutating func decode(_ header: FrameHeader, at offset: Int) throws(LinkError) -> DecodedFrame {
        var body = UnsafeRawBufferPointer(rebasing: buffer[(offset + FrameHeader.size)..<(offset + header.frameSize)])
        if let cipher {
            let sequence = framesOpened + 1
            guard let records = SealedRecords.count(sealedBytes: body.count),
                  body.count - records * FrameCipher.tagSize <= opened.count else {
                throw .tampered("frame \(sequence) (\(header.type)) is not a whole number of sealed records (\(body.count) bytes)")
            }
            guard cipher.open(header: buffer.baseAddress! + offset, sealed: body, records: records, into: opened.baseAddress!) else {
                throw .tampered("frame \(sequence) (\(header.type)) failed its seal check: altered, replayed, reordered, or a frame before it was lost")
            }
            framesOpened = sequence
            body = UnsafeRawBufferPointer(rebasing: opened[..<(body.count - records * FrameCipher.tagSize)])
        }
        var message: Message
        do { message = try decoder.decodeBody(body, type: header.type) } catch { throw .malformed(error) }
        if message.isCompressed {
            guard let expander else {
                throw .local(.protocolViolation, reason: "a compressed \(header.type) on a link that did not agree on compression")
            }
            message = try expander.expand(message)
        }
        return DecodedFrame(header: header, message: message)
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
        var wait = timeoutSeconds
        if let deadline = deadlineNanoseconds {
            let now = ferry_monotonic_ns()
            if now >= deadline { throw .timedOut(during: phase, seconds: timeoutSeconds) }
            wait = min(wait, Double(deadline - now) / 1e9)
        }
        timeout.pointee = KernelTimespec(nanoseconds: UInt64(max(wait, 0.001) * 1e9))
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
        if result == -ECANCELED { throw .timedOut(during: phase, seconds: wait) }
        if result < 0 { throw .socket(Errno(rawValue: -result), during: phase) }
        if result == 0 { throw .closed(during: phase) }
        end += Int(result)
        bytesReceived += UInt64(result)
    }
}
