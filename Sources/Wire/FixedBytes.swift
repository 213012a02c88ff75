/// A 16-byte value stored inline (no heap): a session identifier.
public struct SessionID: Hashable, Sendable, CustomStringConvertible {
    @usableFromInline var w0: UInt64
    @usableFromInline var w1: UInt64

    /// Size in bytes on the wire.
    public static let size = 16
    /// The all-zero identifier.
    public static let zero = SessionID(w0: 0, w1: 0)

    @usableFromInline init(w0: UInt64, w1: UInt64) { self.w0 = w0; self.w1 = w1 }

    /// Makes an identifier from exactly 16 bytes; nil for any other count.
    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == SessionID.size else { return nil }
        var w = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &w) { raw in raw.copyBytes(from: bytes) }
        self.init(w0: w.0, w1: w.1)
    }

    /// Loads 16 bytes at `pointer` (no alignment needed).
    public init(loadingFrom pointer: UnsafeRawPointer) {
        self.init(w0: pointer.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                  w1: pointer.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    }

    /// Stores the 16 bytes at `pointer` in wire order.
    public func store(to pointer: UnsafeMutableRawPointer) {
        pointer.storeBytes(of: w0, toByteOffset: 0, as: UInt64.self)
        pointer.storeBytes(of: w1, toByteOffset: 8, as: UInt64.self)
    }

    /// A fresh random identifier from the system's CSPRNG.
    public static func random() -> SessionID {
        var rng = SystemRandomNumberGenerator()
        return SessionID(w0: rng.next(), w1: rng.next())
    }

    /// The 16 bytes in wire order.
    public var bytes: [UInt8] {
        [UInt8](unsafeUninitializedCapacity: 16) { buf, n in
            store(to: UnsafeMutableRawPointer(buf.baseAddress!)); n = 16
        }
    }

    public var description: String { hex(bytes) }
}

/// A 32-byte value stored inline (no heap): an authentication nonce, an HMAC proof, or a SHA-256 digest.
public struct Bytes32: Hashable, Sendable, CustomStringConvertible {
    @usableFromInline var w0: UInt64
    @usableFromInline var w1: UInt64
    @usableFromInline var w2: UInt64
    @usableFromInline var w3: UInt64

    /// Size in bytes on the wire.
    public static let size = 32
    /// All 32 bytes zero.
    public static let zero = Bytes32(w0: 0, w1: 0, w2: 0, w3: 0)

    @usableFromInline init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        self.w0 = w0; self.w1 = w1; self.w2 = w2; self.w3 = w3
    }

    /// Makes a value from exactly 32 bytes; nil for any other count.
    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == Bytes32.size else { return nil }
        var w = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &w) { raw in raw.copyBytes(from: bytes) }
        self.init(w0: w.0, w1: w.1, w2: w.2, w3: w.3)
    }

    /// Loads 32 bytes at `pointer` (no alignment needed).
    public init(loadingFrom pointer: UnsafeRawPointer) {
        self.init(w0: pointer.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                  w1: pointer.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                  w2: pointer.loadUnaligned(fromByteOffset: 16, as: UInt64.self),
                  w3: pointer.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
    }

    /// Stores the 32 bytes at `pointer` in wire order.
    public func store(to pointer: UnsafeMutableRawPointer) {
        pointer.storeBytes(of: w0, toByteOffset: 0, as: UInt64.self)
        pointer.storeBytes(of: w1, toByteOffset: 8, as: UInt64.self)
        pointer.storeBytes(of: w2, toByteOffset: 16, as: UInt64.self)
        pointer.storeBytes(of: w3, toByteOffset: 24, as: UInt64.self)
    }

    /// 32 fresh random bytes from the system's CSPRNG (for nonces).
    public static func random() -> Bytes32 {
        var rng = SystemRandomNumberGenerator()
        return Bytes32(w0: rng.next(), w1: rng.next(), w2: rng.next(), w3: rng.next())
    }

    /// The 32 bytes in wire order.
    public var bytes: [UInt8] {
        [UInt8](unsafeUninitializedCapacity: 32) { buf, n in
            store(to: UnsafeMutableRawPointer(buf.baseAddress!)); n = 32
        }
    }

    public var description: String { hex(bytes) }
}

/// A random challenge sent in `hello` / `helloAck`.
public typealias Nonce = Bytes32
/// A SHA-256 digest of a disk or of memory, sent in `complete`.
public typealias Digest = Bytes32

@usableFromInline
func hex(_ bytes: [UInt8]) -> String {
    let digits: [Character] = Array("0123456789abcdef")
    var s = ""
    s.reserveCapacity(bytes.count * 2)
    for b in bytes { s.append(digits[Int(b >> 4)]); s.append(digits[Int(b & 0xf)]) }
    return s
}
