/// SplitMix64: a tiny, fast, seeded generator, so test data and fuzz failures reproduce from the
/// printed seed.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A value in `0..<n` (n > 0).
    public mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

/// Fills `buffer` with SplitMix64 bytes from `seed`, eight at a time.
public func fillRandom(_ buffer: UnsafeMutableRawBufferPointer, seed: UInt64) {
    var generator = SplitMix64(seed: seed)
    let words = buffer.count / 8
    for index in 0..<words { buffer.storeBytes(of: generator.next(), toByteOffset: index * 8, as: UInt64.self) }
    for index in (words * 8)..<buffer.count { buffer[index] = UInt8(truncatingIfNeeded: generator.next()) }
}

/// `count` SplitMix64 bytes from `seed`.
public func randomBytes(count: Int, seed: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { fillRandom($0, seed: seed) }
    return bytes
}
