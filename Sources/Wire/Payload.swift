/// A zero-copy view of a frame's bulk bytes (disk blocks, memory pages, VM-state chunks).
///
/// A decoded `Payload` points into the buffer handed to ``FrameDecoder/decode(_:)``: it is valid
/// only while that buffer is alive and unchanged. Copy it (or write it to its destination) before
/// the receive buffer is reused. On the encoding side a `Payload` points at the caller's memory
/// (a page of the source process, a block in a read buffer) and is copied once into the output,
/// or not at all with ``FrameEncoder/encodePrefix(_:sequence:urgent:into:)`` and scatter-gather I/O.
///
/// Equality compares the bytes, not the addresses.
public struct Payload: Equatable, @unchecked Sendable {
    /// The bytes viewed.
    public let bytes: UnsafeRawBufferPointer

    /// Views `bytes` without copying them.
    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// An empty payload.
    public static let empty = Payload(UnsafeRawBufferPointer(start: nil, count: 0))

    /// Number of bytes viewed.
    public var count: Int { bytes.count }

    public static func == (lhs: Payload, rhs: Payload) -> Bool {
        guard lhs.count == rhs.count else { return false }
        if lhs.count == 0 { return true }
        return memcmpEqual(lhs.bytes.baseAddress!, rhs.bytes.baseAddress!, lhs.count)
    }
}

@inline(__always)
func memcmpEqual(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ n: Int) -> Bool {
    var i = 0
    while i + 8 <= n {
        if a.loadUnaligned(fromByteOffset: i, as: UInt64.self) != b.loadUnaligned(fromByteOffset: i, as: UInt64.self) {
            return false
        }
        i += 8
    }
    while i < n {
        if a.load(fromByteOffset: i, as: UInt8.self) != b.load(fromByteOffset: i, as: UInt8.self) { return false }
        i += 1
    }
    return true
}
