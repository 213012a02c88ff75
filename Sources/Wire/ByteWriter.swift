/// A little-endian cursor that writes a frame into memory the encoder has already sized.
///
/// The encoder computes the exact frame size and checks the output's capacity before any
/// write, so the cursor only asserts in debug builds.
struct ByteWriter {
    let out: UnsafeMutableRawBufferPointer
    private(set) var offset: Int

    init(_ out: UnsafeMutableRawBufferPointer, offset: Int = 0) {
        self.out = out
        self.offset = offset
    }

    @inline(__always) mutating func u8(_ v: UInt8) {
        assert(offset + 1 <= out.count)
        out.storeBytes(of: v, toByteOffset: offset, as: UInt8.self); offset += 1
    }
    @inline(__always) mutating func u16(_ v: UInt16) {
        assert(offset + 2 <= out.count)
        out.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt16.self); offset += 2
    }
    @inline(__always) mutating func u32(_ v: UInt32) {
        assert(offset + 4 <= out.count)
        out.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt32.self); offset += 4
    }
    @inline(__always) mutating func u64(_ v: UInt64) {
        assert(offset + 8 <= out.count)
        out.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt64.self); offset += 8
    }
    @inline(__always) mutating func zeros(_ n: Int) {
        assert(offset + n <= out.count)
        for i in 0..<n { out.storeBytes(of: 0, toByteOffset: offset + i, as: UInt8.self) }
        offset += n
    }
    mutating func sessionID(_ v: SessionID) {
        assert(offset + SessionID.size <= out.count)
        v.store(to: out.baseAddress! + offset); offset += SessionID.size
    }
    mutating func bytes32(_ v: Bytes32) {
        assert(offset + Bytes32.size <= out.count)
        v.store(to: out.baseAddress! + offset); offset += Bytes32.size
    }
    mutating func raw(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        assert(offset + bytes.count <= out.count)
        (out.baseAddress! + offset).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        offset += bytes.count
    }
    mutating func utf8(_ s: String) {
        var s = s
        s.withUTF8 { raw(UnsafeRawBufferPointer($0)) }
    }
}
