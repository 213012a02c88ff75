import Glibc
import SystemPackage
import URing
import Wire

/// Sends frames on one connection through its own io_uring ring: small frames are encoded into a
/// reused buffer; frames with a bulk payload go out as header + metadata and the payload, gathered
/// by one `sendmsg`. Before the handshake ends frames go in the clear, the payload with no copy;
/// after it (``startSealing(_:key:)``) every frame is sealed (``FrameCipher``): the metadata in
/// place, the payload encrypted into a reused buffer, each record's tag after it. Owned by one thread.
public struct FrameSender: ~Copyable {
    private var ring: Ring
    private let fd: Int32
    private let prefixBuffer: UnsafeMutableRawBufferPointer
    private let vectors: UnsafeMutablePointer<iovec>
    private let header: UnsafeMutablePointer<msghdr>
    private var cipher: FrameCipher?
    /// Compresses bulk payloads once the session turned it on (``compress(with:)``).
    private var compressor: PayloadCompressor?
    /// Where a sealed payload and its tag are written; grown to the largest payload seen.
    private var sealedPayload = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    /// Frames sent so far; also the next frame's sequence number minus one.
    public private(set) var framesSent: UInt64 = 0
    /// Bytes sent so far, headers included.
    public private(set) var bytesSent: UInt64 = 0

    /// A sender on connected socket `fd` (not owned: the connection's owner closes it).
    public init(fd: Int32) throws(Errno) {
        self.fd = fd
        self.ring = try Ring(entries: 8)
        self.prefixBuffer = .allocate(byteCount: 128 << 10, alignment: 64)
        self.vectors = .allocate(capacity: 2)
        self.header = .allocate(capacity: 1)
        header.initialize(to: msghdr())
    }

    deinit {
        sealedPayload.deallocate()
        prefixBuffer.deallocate()
        vectors.deallocate()
        header.deallocate()
    }

    /// Seals every frame sent from now on with `suite` under `key` (this direction's key of the
    /// handshake's ``SessionKeys``). Suite `none` (a benchmark build only) leaves them in the clear.
    public mutating func startSealing(_ suite: CipherSuite, key: [UInt8]) throws(LinkError) {
        if suite == .none { return }
        cipher = try FrameCipher(suite: suite, key: key)
    }

    /// From now on, bulk payloads go compressed when `policy` says it pays (the link agreed on `compression`).
    public mutating func compress(with policy: CompressionPolicy) {
        compressor = PayloadCompressor(policy: policy)
    }

    /// Sends one frame. Its payload (if any) is read in place; it must stay valid during the call.
    public mutating func send(_ message: Message) throws(LinkError) {
        try send(message, rewritingMetadata: nil)
    }

    /// Sends one frame whose metadata (the bytes after the header, before the payload) `rewrite`
    /// may change after encoding and before sealing: how a test's hostile peer sends a sealed frame
    /// with values the encoder refuses (a block size of 0, an extent past 2^64).
    mutating func send(_ message: Message, rewritingMetadata rewrite: ((UnsafeMutableRawBufferPointer) -> Void)?) throws(LinkError) {
        let message = compressor?.encode(message) ?? message
        let prefixLength: Int
        do {
            prefixLength = try FrameEncoder.encodePrefix(message, sequence: UInt32(truncatingIfNeeded: framesSent + 1),
                                                         sealed: cipher != nil,
                                                         into: UnsafeMutableRawBufferPointer(rebasing: prefixBuffer[..<(prefixBuffer.count - FrameCipher.tagSize)]))
        } catch {
            throw .malformed(error)
        }
        rewrite?(UnsafeMutableRawBufferPointer(rebasing: prefixBuffer[FrameHeader.size..<prefixLength]))
        var payload = message.payload.bytes
        var prefixTotal = prefixLength
        if let cipher {
            // Every record's tag follows it; a frame without a payload is one record, its tag after the metadata.
            let tags = SealedRecords.overhead(bodyBytes: prefixLength - FrameHeader.size + payload.count)
            if !payload.isEmpty && sealedPayload.count < payload.count + tags {
                sealedPayload.deallocate()
                sealedPayload = .allocate(byteCount: max(payload.count + tags, 1 << 20), alignment: 64)
            }
            let metadata = UnsafeMutableRawBufferPointer(rebasing: prefixBuffer[FrameHeader.size..<prefixLength])
            let output = payload.isEmpty ? prefixBuffer.baseAddress! + prefixLength : sealedPayload.baseAddress!
            guard cipher.seal(header: prefixBuffer.baseAddress!, metadata: metadata, payload: payload, payloadOutput: output) else {
                throw .local(.internalError, reason: "BoringSSL failed to seal a \(message.type) frame")
            }
            if payload.isEmpty {
                prefixTotal += tags
            } else {
                payload = UnsafeRawBufferPointer(rebasing: sealedPayload[..<(payload.count + tags)])
            }
        }
        do throws(Errno) {
            if payload.isEmpty {
                try ring.sendAll(fd, UnsafeRawBufferPointer(rebasing: prefixBuffer[..<prefixTotal]))
            } else {
                try sendGathered(prefixLength: prefixTotal, payload: payload)
            }
        } catch {
            throw .socket(error, during: "send \(message.type)")
        }
        framesSent += 1
        bytesSent += UInt64(prefixTotal + payload.count)
    }

    /// Sends prefix and payload with `sendmsg`, resuming after a short send.
    private mutating func sendGathered(prefixLength: Int, payload: UnsafeRawBufferPointer) throws(Errno) {
        var prefixSent = 0, payloadSent = 0
        while prefixSent < prefixLength || payloadSent < payload.count {
            var count = 0
            if prefixSent < prefixLength {
                vectors[count] = iovec(iov_base: prefixBuffer.baseAddress! + prefixSent, iov_len: prefixLength - prefixSent)
                count += 1
            }
            if payloadSent < payload.count {
                vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: payload.baseAddress! + payloadSent),
                                       iov_len: payload.count - payloadSent)
                count += 1
            }
            header.pointee = msghdr()
            header.pointee.msg_iov = vectors
            header.pointee.msg_iovlen = count
            do {
                try ring.prepareSendmsg(fd, message: header, tag: Ring.sequentialTag)
            } catch {
                throw error.errno
            }
            let completion = try ring.waitCompletion()
            if completion.result == -EINTR || completion.result == -EAGAIN { continue }
            var sent = try completion.get()
            let fromPrefix = min(sent, prefixLength - prefixSent)
            prefixSent += fromPrefix
            sent -= fromPrefix
            payloadSent += sent
        }
    }
}
