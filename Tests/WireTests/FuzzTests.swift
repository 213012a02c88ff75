import FerryTestSupport
import Glibc
import Testing
import Wire

/// What the decoder may answer for an input, judged from the input's own bytes (an oracle that
/// does not trust the decoder): "need more" only while the declared frame is incomplete; a decoded
/// frame exactly as long as declared; header errors that name the header's real bytes; body errors
/// only once the whole frame is present, at offsets inside it that add up to its declared size.
/// Returns a description of the violation, nil when the answer is allowed.
func judge(_ input: UnsafeRawBufferPointer, _ outcome: Result<DecodedFrame?, WireError>, maxFrameSize: Int) -> String? {
    let n = input.count
    guard n >= FrameHeader.size else {
        if case .success(nil) = outcome { return nil }
        return "\(n) bytes (less than a header) answered \(outcome) instead of need-more"
    }
    let declared = Int(UInt32(littleEndian: input.loadUnaligned(fromByteOffset: 0, as: UInt32.self)))
    let frameSize = FrameHeader.size + declared
    let version = input[4], type = input[5]
    let flags = UInt16(littleEndian: input.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
    let headerValid = version == FrameHeader.currentVersion && frameSize <= maxFrameSize
        && MessageType(rawValue: type) != nil && flags & ~FrameFlags.known.rawValue == 0
    switch outcome {
    case .success(nil):
        if headerValid && n < frameSize { return nil }
        return headerValid ? "a whole \(frameSize)-byte frame (\(n) bytes present) answered need-more: a receiver would wait forever"
                           : "an invalid header (version \(version), type \(type), flags \(flags), size \(frameSize)) answered need-more"
    case .success(let frame?):
        if !headerValid { return "an invalid header decoded as \(frame.header.type)" }
        if n < frameSize { return "decoded \(frame.header.type) from \(n) bytes of a \(frameSize)-byte frame" }
        if frame.consumed != frameSize { return "consumed \(frame.consumed) bytes of a \(frameSize)-byte frame" }
        if frame.header.type.rawValue != type { return "decoded type \(frame.header.type) from type byte \(type)" }
        return nil
    case .failure(let error):
        switch error {
        case .unsupportedVersion(let v):
            return v == version && v != FrameHeader.currentVersion ? nil : "unsupportedVersion(\(v)) for version byte \(version)"
        case .frameTooLarge(let length, let max):
            return length == frameSize && length > max && max == maxFrameSize ? nil
                : "frameTooLarge(\(length), \(max)) for a declared \(frameSize)-byte frame, limit \(maxFrameSize)"
        case .unknownMessageType(let t):
            return t == type && MessageType(rawValue: t) == nil ? nil : "unknownMessageType(\(t)) for type byte \(type)"
        case .reservedFlags(let f):
            return f == flags && f & ~FrameFlags.known.rawValue != 0 ? nil : "reservedFlags(\(f)) for flags \(flags)"
        case .outputTooSmall:
            return "the decoder threw an encoder error: \(error)"
        default:
            break
        }
        // A body error: the header was valid and the whole frame present.
        if !headerValid { return "body error \(error) for an invalid header" }
        if n < frameSize { return "body error \(error) before the whole \(frameSize)-byte frame arrived (\(n) bytes)" }
        switch error {
        case let .truncated(_, field, offset, needed, available):
            if offset < FrameHeader.size || offset + available != frameSize || needed <= available {
                return "truncated('\(field)' at \(offset), needs \(needed), \(available) left) does not add up to a \(frameSize)-byte frame"
            }
        case let .trailingBytes(_, offset, count):
            if offset < FrameHeader.size || count <= 0 || offset + count != frameSize {
                return "trailingBytes(\(count) at \(offset)) does not end a \(frameSize)-byte frame"
            }
        case let .invalidValue(_, field, offset, _), let .reservedNonZero(_, field, offset), let .invalidUTF8(_, field, offset):
            if offset < FrameHeader.size || offset >= frameSize { return "'\(field)' at offset \(offset) lies outside the \(frameSize)-byte frame" }
        case let .payloadLengthMismatch(_, expected, actual):
            if actual < 0 || actual > declared || UInt64(actual) == expected { return "payloadLengthMismatch(expected \(expected), actual \(actual)) in a \(declared)-byte body" }
        case let .limitExceeded(_, field, value, max):
            if value <= max { return "limitExceeded('\(field)' \(value) <= max \(max))" }
        default:
            break
        }
        if let t = MessageType(rawValue: type), let errorType = error.messageType, errorType != t {
            return "error names type \(errorType) in a \(t) frame"
        }
        return nil
    }
}

extension WireError {
    /// The message type a body error names, nil for header errors.
    var messageType: MessageType? {
        switch self {
        case let .truncated(type, _, _, _, _), let .trailingBytes(type, _, _), let .invalidValue(type, _, _, _),
             let .reservedNonZero(type, _, _), let .payloadLengthMismatch(type, _, _), let .invalidUTF8(type, _, _),
             let .limitExceeded(type, _, _, _):
            return type
        default:
            return nil
        }
    }
}

/// The fuzz templates: a valid encoding of every sample message, with big payloads shrunk so each
/// iteration stays cheap. `keepAlive` must outlive the templates' use (their payload buffers).
func fuzzTemplates(keepAlive payloads: SamplePayloads, small: Buffer) throws -> [[UInt8]] {
    var templates: [[UInt8]] = []
    for m in sampleMessages(payloads, includeMaximal: false) {
        var m = m
        if case .pageBatch(var b) = m, b.pageShift > 12 {
            b.pageShift = 12; b.payload = Payload(UnsafeRawBufferPointer(rebasing: small.view[0..<4096])); m = .pageBatch(b)
        }
        templates.append(try frameBytes(m, sequence: UInt32(templates.count)))
    }
    return templates
}

/// Decodes `input` and judges the answer (see ``judge(_:_:maxFrameSize:)``); a decoded frame must
/// also re-encode to exactly the bytes it came from. Returns the outcome's kind and any violation.
func fuzzOne(_ input: UnsafeRawBufferPointer, decoder: FrameDecoder, reencode: UnsafeMutableRawBufferPointer) -> (kind: String, violation: String?) {
    let outcome: Result<DecodedFrame?, WireError> = Result { () throws(WireError) in try decoder.decode(input) }
    if let violation = judge(input, outcome, maxFrameSize: decoder.maxFrameSize) {
        return ("violation", violation)
    }
    switch outcome {
    case .success(nil):
        return ("needMore", nil)
    case .success(let frame?):
        do {
            let written = try FrameEncoder.encode(frame.message, sequence: frame.header.sequence,
                                                  urgent: frame.header.flags.contains(.urgent), into: reencode)
            if written != frame.consumed || !equalBytes(reencode, input, frame.consumed) {
                return ("decoded", "\(frame.header.type) re-encodes to \(written) different bytes (\(frame.consumed) decoded)")
            }
        } catch {
            return ("decoded", "\(frame.header.type) decoded but does not re-encode: \(error)")
        }
        return ("decoded", nil)
    case .failure(let error):
        return (errorKind(error), nil)
    }
}

@Suite("Fuzz: random and mutated frames never crash, hang or lie about what is wrong")
struct FuzzTests {
    @Test("1,000,000 random and mutated frames: each answer checked against the input's own bytes")
    func millionFrames() throws {
        let iterations = Int(envInt("FERRY_WIRE_FUZZ_ITERATIONS") ?? 1_000_000)
        let seed = UInt64(envInt("FERRY_WIRE_FUZZ_SEED") ?? 0x5EED_F3_22_0001)
        print("wire fuzz: seed 0x\(String(seed, radix: 16)) iterations \(iterations) (set FERRY_WIRE_FUZZ_SEED to reproduce)")
        var rng = SplitMix64(seed: seed)
        let payloads = SamplePayloads()
        let small = Buffer(count: 4096 * 2)
        let templates = try fuzzTemplates(keepAlive: payloads, small: small)
        let maxTemplate = templates.map(\.count).max()!
        #expect(maxTemplate < 64 << 10)

        let capacity = maxTemplate + 4096
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        defer { scratch.deallocate() }
        let reencode = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity * 2, alignment: 16)
        defer { reencode.deallocate() }
        let decoder = FrameDecoder(maxFrameSize: 1 << 20)

        var kinds = [String: Int]()
        var violations = 0
        let clock = ContinuousClock()
        let started = clock.now
        for i in 0..<iterations {
            let n = mutate(into: scratch, templates: templates, rng: &rng)
            let (kind, violation) = fuzzOne(UnsafeRawBufferPointer(rebasing: scratch[0..<n]), decoder: decoder, reencode: reencode)
            kinds[kind, default: 0] += 1
            if let violation {
                violations += 1
                let bytes = Array(scratch[0..<min(n, 64)]).map { String($0, radix: 16) }.joined(separator: " ")
                Issue.record("iteration \(i) (seed 0x\(String(seed, radix: 16))), \(n) bytes [\(bytes)...]: \(violation)")
                if violations >= 5 { break }
            }
        }
        let elapsed = clock.now - started
        print("wire fuzz: \(iterations) frames in \(elapsed): "
              + kinds.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
        #expect(violations == 0)
        // The mutations must reach acceptance, incompleteness and many distinct rejections, or the
        // loop proves little.
        #expect(kinds["decoded", default: 0] > iterations / 100, "decoded only \(kinds["decoded", default: 0])")
        #expect(kinds["needMore", default: 0] > iterations / 100, "need-more only \(kinds["needMore", default: 0])")
        let errorKinds = kinds.keys.filter { !["decoded", "needMore", "violation"].contains($0) }
        #expect(errorKinds.count >= 10, "only \(errorKinds.count) error kinds reached: \(errorKinds.sorted())")
        withExtendedLifetime((payloads, small)) {}
    }

    @Test("pure random bodies behind a valid header: whole frames, so never need-more; each answer checked")
    func randomBodies() throws {
        var rng = SplitMix64(seed: 0xB0D1E5)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { buf.deallocate() }
        let reencode = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
        defer { reencode.deallocate() }
        let types = MessageType.allCases
        var kinds = [String: Int]()
        var violations = 0
        for i in 0..<100_000 {
            let bodyLength = rng.below(300)
            for j in 0..<(12 + bodyLength) { buf[j] = UInt8(truncatingIfNeeded: rng.next()) }
            buf.storeBytes(of: UInt32(bodyLength).littleEndian, toByteOffset: 0, as: UInt32.self)
            buf[4] = FrameHeader.currentVersion
            buf[5] = types[rng.below(types.count)].rawValue
            buf.storeBytes(of: UInt16(rng.below(2)).littleEndian, toByteOffset: 6, as: UInt16.self)
            // Often zero the body so that reserved fields and counts pass and parsing goes deep.
            if rng.below(2) == 0 {
                for j in 12..<(12 + bodyLength) where rng.below(4) != 0 { buf[j] = 0 }
            }
            let (kind, violation) = fuzzOne(UnsafeRawBufferPointer(rebasing: buf[0..<(12 + bodyLength)]),
                                            decoder: FrameDecoder(), reencode: reencode)
            kinds[kind, default: 0] += 1
            if let violation {
                violations += 1
                Issue.record("random body \(i), type \(buf[5]), \(bodyLength) bytes: \(violation)")
                if violations >= 5 { break }
            }
        }
        print("wire random bodies: " + kinds.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
        #expect(violations == 0)
        #expect(kinds["needMore", default: 0] == 0, "a complete frame answered need-more \(kinds["needMore", default: 0]) times")
        #expect(kinds["decoded", default: 0] > 100, "decoded only \(kinds["decoded", default: 0])")
        let rejected = kinds.filter { !["decoded", "needMore", "violation"].contains($0.key) }.values.reduce(0, +)
        #expect(rejected > 1000, "rejected only \(rejected)")
    }
}

func envInt(_ name: String) -> Int? {
    guard let v = getenv(name) else { return nil }
    let s = String(cString: v)
    if s.hasPrefix("0x") { return Int(s.dropFirst(2), radix: 16) }
    return Int(s)
}

func equalBytes(_ a: UnsafeMutableRawBufferPointer, _ b: UnsafeRawBufferPointer, _ n: Int) -> Bool {
    for i in 0..<n where a[i] != b[i] { return false }
    return true
}

func errorKind(_ e: WireError) -> String {
    switch e {
    case .frameTooLarge: return "frameTooLarge"
    case .unsupportedVersion: return "unsupportedVersion"
    case .unknownMessageType: return "unknownMessageType"
    case .reservedFlags: return "reservedFlags"
    case .truncated: return "truncated"
    case .trailingBytes: return "trailingBytes"
    case .invalidValue: return "invalidValue"
    case .reservedNonZero: return "reservedNonZero"
    case .payloadLengthMismatch: return "payloadLengthMismatch"
    case .invalidUTF8: return "invalidUTF8"
    case .limitExceeded: return "limitExceeded"
    case .outputTooSmall: return "outputTooSmall"
    }
}

/// Writes one fuzz input into `out` and returns its length: a valid template mutated in one of
/// several ways, or pure noise.
func mutate(into out: UnsafeMutableRawBufferPointer, templates: [[UInt8]], rng: inout SplitMix64) -> Int {
    let t = templates[rng.below(templates.count)]
    var n = t.count
    t.withUnsafeBytes { out.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: n) }
    func setLength(_ v: UInt32) { out.storeBytes(of: v.littleEndian, toByteOffset: 0, as: UInt32.self) }
    switch rng.below(10) {
    case 0, 1:  // flip 1-4 random bytes anywhere
        for _ in 0...rng.below(4) { out[rng.below(n)] ^= UInt8(truncatingIfNeeded: rng.next() | 1) }
    case 2:  // flip bytes in the metadata region only (after the header)
        if n > 12 { for _ in 0...rng.below(3) { out[12 + rng.below(min(n - 12, 64))] = UInt8(truncatingIfNeeded: rng.next()) } }
    case 3:  // truncate the buffer
        n = rng.below(n + 1)
    case 4:  // truncate and fix the declared length to match (a shorter, self-consistent frame)
        n = 12 + rng.below(n - 11)
        setLength(UInt32(n - 12))
    case 5:  // extend with random bytes and fix the length
        let extra = 1 + rng.below(64)
        for j in n..<(n + extra) { out[j] = UInt8(truncatingIfNeeded: rng.next()) }
        n += extra
        setLength(UInt32(n - 12))
    case 6:  // random declared length
        setLength(rng.below(2) == 0 ? UInt32(truncatingIfNeeded: rng.next()) : UInt32(rng.below(n)))
    case 7:  // overwrite an aligned u16/u32 field in the metadata with an extreme value
        if n > 16 {
            let at = 12 + 2 * rng.below(min((n - 14) / 2, 40))
            let extremes: [UInt16] = [0, 1, 0x7fff, 0x8000, 0xffff, 0x1000]
            out.storeBytes(of: extremes[rng.below(extremes.count)], toByteOffset: at, as: UInt16.self)
        }
    case 8:  // splice: this header with another template's body
        let u = templates[rng.below(templates.count)]
        let m = min(u.count, out.count)
        u.withUnsafeBytes { src in
            (out.baseAddress! + 12).copyMemory(from: src.baseAddress! + 12, byteCount: m - 12)
        }
        n = m
    default:  // pure noise, sometimes with a plausible header
        n = rng.below(128)
        for j in 0..<n { out[j] = UInt8(truncatingIfNeeded: rng.next()) }
        if n >= 12 && rng.below(2) == 0 {
            out[4] = FrameHeader.currentVersion
            out[5] = MessageType.allCases[rng.below(MessageType.allCases.count)].rawValue
            out[6] = 0; out[7] = 0
            setLength(UInt32(n - 12))
        }
    }
    return n
}
