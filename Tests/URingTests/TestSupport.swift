import Foundation
import Glibc

/// A temporary directory removed when the test is done.
struct TemporaryDirectory: ~Copyable {
    let path: String
    init() {
        var template = Array("/tmp/ferry-uring-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed: errno \(errno)")
        path = String(cString: template)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A fast, seeded generator (SplitMix64) for reproducible test data.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Fills `buffer` with pseudo-random bytes, eight at a time.
func fillRandom(_ buffer: UnsafeMutableRawBufferPointer, seed: UInt64) {
    var generator = SplitMix64(seed: seed)
    let words = buffer.count / 8
    let wordPointer = buffer.baseAddress!.bindMemory(to: UInt64.self, capacity: words)
    for index in 0..<words { wordPointer[index] = generator.next() }
    for index in (words * 8)..<buffer.count { buffer[index] = UInt8(truncatingIfNeeded: generator.next()) }
}
