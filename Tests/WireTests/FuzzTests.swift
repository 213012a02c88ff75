import Testing
import Wire
#if canImport(Glibc)
import Glibc
#endif

/// Resident set size of this process in bytes, from /proc/self/statm.
func residentBytes() -> Int {
    guard let f = fopen("/proc/self/statm", "r") else { return 0 }
    defer { fclose(f) }
    var size = 0, resident = 0
    guard withUnsafeMutablePointer(to: &size, { s in
        withUnsafeMutablePointer(to: &resident) { r in fscanfTwo(f, s, r) }
    }) else { return 0 }
    return resident * Int(sysconf(Int32(_SC_PAGESIZE)))
}

private func fscanfTwo(_ f: UnsafeMutablePointer<FILE>, _ a: UnsafeMutablePointer<Int>, _ b: UnsafeMutablePointer<Int>) -> Bool {
    var line = [CChar](repeating: 0, count: 256)
    guard fgets(&line, 256, f) != nil else { return false }
    let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let fields = text.split(separator: " ")
    guard fields.count >= 2, let x = Int(fields[0]), let y = Int(fields[1]) else { return false }
    a.pointee = x; b.pointee = y
    return true
}

@Suite("Fuzz: random and mutated frames never crash, hang or grow memory")
struct FuzzTests {
    /// Outcome counters, so the test can show that mutations reach deep into the decoder.
    struct Tally {
        var decoded = 0, needMore = 0, errors = [String: Int]()
    }

    @Test("1,000,000 random and mutated frames: typed errors or valid messages, nothing else")
    func millionFrames() throws {
        let iterations = Int(envInt("FERRY_WIRE_FUZZ_ITERATIONS") ?? 1_000_000)
        let seed = UInt64(envInt("FERRY_WIRE_FUZZ_SEED") ?? 0x5EED_F3_22_0001)
        print("wire fuzz: seed 0x\(String(seed, radix: 16)) iterations \(iterations) (set FERRY_WIRE_FUZZ_SEED to reproduce)")
        var rng = SplitMix64(seed: seed)

        // Templates: valid encodings of every message (small ones, so each iteration is cheap).
        let payloads = SamplePayloads()
        let small = Buffer(count: 4096 * 2)
        var templates: [[UInt8]] = []
        for m in sampleMessages(payloads, includeMaximal: false) {
            var m = m
            // Shrink big payloads so templates stay small.
            if case .pageBatch(var b) = m, b.pageShift > 12 {
                b.pageShift = 12; b.payload = Payload(UnsafeRawBufferPointer(rebasing: small.view[0..<4096])); m = .pageBatch(b)
            }
            templates.append(try frameBytes(m, sequence: UInt32(templates.count)))
        }
        let maxTemplate = templates.map(\.count).max()!
        #expect(maxTemplate < 64 << 10)

        let capacity = maxTemplate + 4096
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        defer { scratch.deallocate() }
        let reencode = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity * 2, alignment: 16)
        defer { reencode.deallocate() }
        let decoder = FrameDecoder(maxFrameSize: 1 << 20)

        var tally = Tally()
        var mismatches = 0
        let rssBefore = residentBytes()
        let clock = ContinuousClock()
        let started = clock.now
        for i in 0..<iterations {
            let n = mutate(into: scratch, templates: templates, rng: &rng)
            let input = UnsafeRawBufferPointer(rebasing: scratch[0..<n])
            do {
                if let frame = try decoder.decode(input) {
                    tally.decoded += 1
                    #expect(frame.consumed <= n && frame.consumed >= FrameHeader.size)
                    // Property: whatever decodes re-encodes to the same bytes and decodes equal.
                    let written = try FrameEncoder.encode(frame.message, sequence: frame.header.sequence,
                                                          urgent: frame.header.flags.contains(.urgent), into: reencode)
                    if written != frame.consumed || !equalBytes(reencode, input, frame.consumed) {
                        Issue.record("iteration \(i) (seed 0x\(String(seed, radix: 16))): \(frame.header.type) re-encodes differently")
                        mismatches += 1
                        if mismatches >= 5 { break }
                    }
                } else {
                    tally.needMore += 1
                }
            } catch {
                tally.errors[errorKind(error), default: 0] += 1
            }
            if i & 0xFFFF == 0, clock.now - started > .seconds(110) {
                Issue.record("fuzz loop too slow: stopped at iteration \(i) after 110 s")
                break
            }
        }
        let elapsed = clock.now - started
        let growth = residentBytes() - rssBefore
        print("wire fuzz: \(iterations) frames in \(elapsed): decoded \(tally.decoded), need-more \(tally.needMore), "
              + "errors \(tally.errors.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")); "
              + "RSS growth \(growth >> 10) KiB")
        #expect(mismatches == 0)
        #expect(tally.decoded + tally.needMore + tally.errors.values.reduce(0, +) == iterations)
        // The mutations must exercise both acceptance and many distinct rejections.
        #expect(tally.decoded > iterations / 100)
        #expect(tally.needMore > iterations / 100)
        #expect(tally.errors.count >= 10, "only \(tally.errors.count) error kinds reached")
        #expect(growth < 64 << 20, "resident memory grew by \(growth) bytes")
        withExtendedLifetime((payloads, small)) {}
    }

    @Test("pure random buffers with a valid header prefix never crash")
    func randomBodies() throws {
        var rng = SplitMix64(seed: 0xB0D1E5)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { buf.deallocate() }
        let types = MessageType.allCases
        var decoded = 0, failed = 0
        for _ in 0..<100_000 {
            let bodyLength = rng.below(300)
            for j in 0..<(12 + bodyLength) { buf[j] = UInt8(truncatingIfNeeded: rng.next()) }
            buf.storeBytes(of: UInt32(bodyLength).littleEndian, toByteOffset: 0, as: UInt32.self)
            buf[4] = 1
            buf[5] = types[rng.below(types.count)].rawValue
            buf.storeBytes(of: UInt16(rng.below(2)).littleEndian, toByteOffset: 6, as: UInt16.self)
            // Often zero the body so that reserved fields and counts pass and parsing goes deep.
            if rng.below(2) == 0 {
                for j in 12..<(12 + bodyLength) where rng.below(4) != 0 { buf[j] = 0 }
            }
            do {
                if try FrameDecoder().decode(UnsafeRawBufferPointer(rebasing: buf[0..<(12 + bodyLength)])) != nil {
                    decoded += 1
                }
            } catch { failed += 1 }
        }
        print("wire random bodies: decoded \(decoded), rejected \(failed) of 100000")
        #expect(decoded + failed == 100_000)
        #expect(decoded > 100 && failed > 1000)
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
            out[4] = 1
            out[5] = MessageType.allCases[rng.below(MessageType.allCases.count)].rawValue
            out[6] = 0; out[7] = 0
            setLength(UInt32(n - 12))
        }
    }
    return n
}
