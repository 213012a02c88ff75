import CFerryShims
import CZstd
import Glibc
import Wire

/// Whether bulk payloads (`pageBatch`, `diskExtents`) travel compressed (docs/wire.md, "Compression").
public enum CompressionMode: String, Sendable, CaseIterable {
    /// Compress while it pays: the link is slower than compression and the data shrinks (measured, per stream).
    case auto
    /// Compress every bulk payload that shrinks.
    case on
    /// Never (the `compression` feature is not offered).
    case off
}

/// The session's compression decision and its record, shared by the links the session opens (a reconnect keeps the
/// estimates). For each kind of stream it keeps what compression costs and gains, measured on the frames themselves
/// (an exponentially weighted ratio and speed), and the link's rate as the session measures it. In `auto` a frame
/// is compressed when
///
///     link rate < speed × (1 − ratio) × 0.8
///
/// i.e. when compressing it and sending the result takes less time than sending it as it is, with a margin. So a
/// slow WAN link compresses a guest's disk and memory, a fast link never does, and random data (ratio ≈ 1) switches
/// compression off by itself. Until the link's rate is known, frames go raw. While off, one frame in 32 is sampled (its first 32 KiB compressed, the frame sent
/// raw) so the estimates follow the data. Every number here is read and written atomically: links update them
/// under their own sender lock, the report reads them.
public final class CompressionPolicy: @unchecked Sendable {
    public enum Kind: Int, Sendable, CaseIterable { case memory = 0, disk = 1 }

    /// What was done with one kind's payloads.
    public struct Counters: Sendable, Equatable {
        /// Data bytes offered (what the payloads held before compression).
        public var dataBytes: UInt64 = 0
        /// Payload bytes that went on the wire for them (compressed or not).
        public var payloadBytes: UInt64 = 0
        /// Frames sent compressed, and sent raw (skipped, sampled, or not shrinking).
        public var framesCompressed: UInt64 = 0
        public var framesRaw: UInt64 = 0
        /// Time spent compressing (samples included), nanoseconds.
        public var compressNanoseconds: UInt64 = 0
    }

    public let mode: CompressionMode
    /// zstd's level (1: its fastest standard level; negative levels are faster still and shrink less).
    public let level: Int32
    /// Per kind, 8 cells read and written atomically (ferry_counter_*): the ratio and speed estimates (as the
    /// bits of a Double), then the ``Counters`` in order; cell 16 is the link's rate.
    private let cells: UnsafeMutablePointer<UInt64>
    private enum Cell: Int { case ratio = 0, speed, dataBytes, payloadBytes, compressed, raw, nanoseconds }

    public init(mode: CompressionMode, level: Int32 = 1) {
        self.mode = mode
        self.level = level
        cells = .allocate(capacity: 17)
        cells.initialize(repeating: 0, count: 17)
        for kind in Kind.allCases {
            cells[kind.rawValue * 8 + Cell.ratio.rawValue] = 0.6.bitPattern
            cells[kind.rawValue * 8 + Cell.speed.rawValue] = 400e6.bitPattern
        }
    }

    deinit { cells.deallocate() }

    private func cell(_ kind: Kind, _ cell: Cell) -> UnsafeMutablePointer<UInt64> { cells + kind.rawValue * 8 + cell.rawValue }

    /// The link's rate as the session measures it (bytes on the wire per second); 0 while unknown.
    public func linkRate(bytesPerSecond: Double) { ferry_counter_store(cells + 16, UInt64(max(0, bytesPerSecond))) }

    /// The estimated ratio (compressed ÷ data) and speed (data bytes per second) for a kind.
    public func estimate(_ kind: Kind) -> (ratio: Double, speed: Double) {
        (Double(bitPattern: ferry_counter_load(cell(kind, .ratio))), Double(bitPattern: ferry_counter_load(cell(kind, .speed))))
    }

    /// What was done so far for a kind.
    public func counters(_ kind: Kind) -> Counters {
        Counters(dataBytes: ferry_counter_load(cell(kind, .dataBytes)), payloadBytes: ferry_counter_load(cell(kind, .payloadBytes)),
                 framesCompressed: ferry_counter_load(cell(kind, .compressed)), framesRaw: ferry_counter_load(cell(kind, .raw)),
                 compressNanoseconds: ferry_counter_load(cell(kind, .nanoseconds)))
    }

    enum Decision { case compress, sample, raw }

    /// Whether frame number `frame` of a kind goes compressed.
    func decide(_ kind: Kind, frame: UInt64) -> Decision {
        if mode == .on { return .compress }
        let rate = Double(ferry_counter_load(cells + 16))
        let (ratio, speed) = estimate(kind)
        // Until the session has measured the link (its first slice), frames go raw: a fast link never compresses.
        if rate > 0 && rate < speed * (1 - ratio) * 0.8 { return .compress }
        return frame % 32 == 0 ? .sample : .raw
    }

    /// Folds one compression's outcome into the estimates.
    func learn(_ kind: Kind, data: Int, compressed: Int, nanoseconds: UInt64) {
        let ratio = min(1, Double(compressed) / Double(max(1, data)))
        let speed = Double(data) / (Double(max(1, nanoseconds)) / 1e9)
        let (oldRatio, oldSpeed) = estimate(kind)
        // Weight 0.2 per MiB compressed (at least one step per sample), so the estimates learn per byte,
        // whatever the frame size: a 4 MiB frame moves them as four 1 MiB frames did.
        let keep = pow(0.8, max(1, Double(data) / Double(1 << 20)))
        ferry_counter_store(cell(kind, .ratio), (oldRatio * keep + ratio * (1 - keep)).bitPattern)
        ferry_counter_store(cell(kind, .speed), (oldSpeed * keep + speed * (1 - keep)).bitPattern)
        _ = ferry_counter_add(cell(kind, .nanoseconds), nanoseconds)
    }

    func count(_ kind: Kind, data: Int, payload: Int, compressed: Bool) {
        _ = ferry_counter_add(cell(kind, .dataBytes), UInt64(data))
        _ = ferry_counter_add(cell(kind, .payloadBytes), UInt64(payload))
        _ = ferry_counter_add(cell(kind, compressed ? .compressed : .raw), 1)
    }
}

/// The sending half of compression, one per link (owned by its ``FrameSender``, used under its lock): one zstd
/// context and one output buffer, both reused, so a frame costs no allocation. ``encode(_:)`` returns the message
/// to send: a `pageBatch` or `diskExtents` whose payload now points into this compressor's buffer (valid until the
/// next call), or the message as it was.
final class PayloadCompressor {
    private let policy: CompressionPolicy
    private let context: OpaquePointer
    private var output = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    private var frames: [UInt64] = [0, 0]
    /// Payloads smaller than this go as they are (a frame header and a tag weigh more than what they could save).
    static let smallest = 4096
    /// What a sample compresses of a frame sent raw.
    static let sampleBytes = 32 << 10

    init(policy: CompressionPolicy) {
        self.policy = policy
        context = ZSTD_createCCtx()
    }

    deinit {
        ZSTD_freeCCtx(context)
        output.deallocate()
    }

    func encode(_ message: Message) -> Message {
        switch message {
        case .pageBatch(var batch) where batch.encoding == .raw && batch.payload.count >= Self.smallest:
            guard let compressed = compress(batch.payload.bytes, .memory) else { return message }
            batch.payload = Payload(compressed)
            batch.encoding = .zstd
            return .pageBatch(batch)
        case .diskExtents(var extents) where extents.encoding == .raw && extents.payload.count >= Self.smallest:
            guard let compressed = compress(extents.payload.bytes, .disk) else { return message }
            extents.payload = Payload(compressed)
            extents.encoding = .zstd
            return .diskExtents(extents)
        default:
            return message
        }
    }

    /// The compressed bytes when they go compressed; nil when the payload goes raw.
    private func compress(_ data: UnsafeRawBufferPointer, _ kind: CompressionPolicy.Kind) -> UnsafeRawBufferPointer? {
        frames[kind.rawValue] &+= 1
        switch policy.decide(kind, frame: frames[kind.rawValue]) {
        case .raw:
            policy.count(kind, data: data.count, payload: data.count, compressed: false)
            return nil
        case .sample:
            _ = run(UnsafeRawBufferPointer(rebasing: data[..<min(data.count, Self.sampleBytes)]), kind)
            policy.count(kind, data: data.count, payload: data.count, compressed: false)
            return nil
        case .compress:
            guard let size = run(data, kind), size < data.count else {
                policy.count(kind, data: data.count, payload: data.count, compressed: false)
                return nil
            }
            policy.count(kind, data: data.count, payload: size, compressed: true)
            return UnsafeRawBufferPointer(rebasing: output[..<size])
        }
    }

    /// Compresses `data` into `output` and learns from it; the compressed size, or nil when zstd fails.
    private func run(_ data: UnsafeRawBufferPointer, _ kind: CompressionPolicy.Kind) -> Int? {
        let bound = ZSTD_compressBound(data.count)
        if output.count < bound {
            output.deallocate()
            output = .allocate(byteCount: max(bound, 1 << 20), alignment: 64)
        }
        let start = ferry_monotonic_ns()
        let size = ZSTD_compressCCtx(context, output.baseAddress, output.count, data.baseAddress, data.count, policy.level)
        guard ZSTD_isError(size) == 0 else { return nil }
        policy.learn(kind, data: data.count, compressed: size, nanoseconds: ferry_monotonic_ns() &- start)
        return size
    }
}

/// The receiving half, one per link that agreed on `compression` (owned by its ``FrameReceiver``): expands a
/// zstd payload into a reused buffer, to exactly the data bytes the frame's runs or extents describe, and at most
/// `limit` bytes (the largest raw frame's payload), so a hostile frame costs no more than a raw one. Anything else
/// (a zstd error, a size that differs) is a protocol violation.
final class PayloadExpander {
    private let context: OpaquePointer
    private var output = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    let limit: Int

    init(limit: Int) {
        self.limit = limit
        context = ZSTD_createDCtx()
    }

    deinit {
        ZSTD_freeDCtx(context)
        output.deallocate()
    }

    /// The message with its payload raw (pointing into this expander's buffer until the next call).
    func expand(_ message: Message) throws(LinkError) -> Message {
        switch message {
        case .pageBatch(var batch) where batch.encoding == .zstd:
            batch.payload = Payload(try expand(batch.payload.bytes, to: batch.dataBytes, what: "pageBatch"))
            batch.encoding = .raw
            return .pageBatch(batch)
        case .diskExtents(var extents) where extents.encoding == .zstd:
            extents.payload = Payload(try expand(extents.payload.bytes, to: extents.dataBytes, what: "diskExtents"))
            extents.encoding = .raw
            return .diskExtents(extents)
        default:
            return message
        }
    }

    private func expand(_ data: UnsafeRawBufferPointer, to expected: UInt64, what: String) throws(LinkError) -> UnsafeRawBufferPointer {
        guard expected <= UInt64(limit) else {
            throw .local(.protocolViolation, reason: "a compressed \(what) of \(expected) data bytes (at most \(limit), as a raw frame)")
        }
        let size = Int(expected)
        if output.count < size {
            output.deallocate()
            output = .allocate(byteCount: max(size, 1 << 20), alignment: 4096)
        }
        let got = ZSTD_decompressDCtx(context, output.baseAddress, size, data.baseAddress, data.count)
        if ZSTD_isError(got) != 0 {
            throw .local(.protocolViolation, reason: "a compressed \(what) does not expand to its \(size) data bytes: "
                         + String(cString: ZSTD_getErrorName(got)))
        }
        guard got == size else {
            throw .local(.protocolViolation, reason: "a compressed \(what) expands to \(got) bytes, not its \(size) data bytes")
        }
        return UnsafeRawBufferPointer(rebasing: output[..<size])
    }
}

extension Message {
    /// Whether this is a bulk frame whose payload is compressed.
    var isCompressed: Bool {
        switch self {
        case .pageBatch(let b): return b.encoding != .raw
        case .diskExtents(let e): return e.encoding != .raw
        default: return false
        }
    }
}
