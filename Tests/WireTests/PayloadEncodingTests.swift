import Testing
import Wire

/// The `encoding` byte of `pageBatch` and `diskExtents` (docs/wire.md, "Compression"): a compressed payload is
/// never empty, always shorter than the data it stands for, and never stands for no data; unknown encodings are
/// refused at their byte.
@Suite("Compressed payloads: what the decoder takes and refuses")
struct PayloadEncodingTests {
    /// A batch of 4 data pages and 2 zero pages whose payload is `payloadBytes` bytes in `encoding`.
    func batch(_ encoding: PayloadEncoding, payloadBytes: Int, owner: Buffer) -> Message {
        .pageBatch(PageBatch(regionID: 1, pageShift: 12, firstPage: 10, runs: PageRunList([.data(4), .zero(2)]),
                             payload: Payload(UnsafeRawBufferPointer(rebasing: owner.view[0..<payloadBytes])), encoding: encoding))
    }

    func extents(_ encoding: PayloadEncoding, payloadBytes: Int, owner: Buffer, data: UInt32 = 8192) -> Message {
        .diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: data, kind: .data),
                                                                           Extent(offset: 1 << 20, length: 4096, kind: .zero)]),
                                 payload: Payload(UnsafeRawBufferPointer(rebasing: owner.view[0..<payloadBytes])), encoding: encoding))
    }

    @Test("a compressed payload shorter than its data round-trips with its encoding")
    func roundTrip() throws {
        let owner = Buffer(count: 16384)
        for message in [batch(.zstd, payloadBytes: 1000, owner: owner), extents(.zstd, payloadBytes: 77, owner: owner),
                        batch(.raw, payloadBytes: 16384, owner: owner)] {
            let bytes = try frameBytes(message)
            // The decoded message points into the frame's bytes: checked while they live.
            let checked = try withDecoded(bytes) { frame -> Bool in
                #expect(frame.message == message)
                switch frame.message {
                case .pageBatch(let b): #expect(b.encoding == (b.payload.count == 16384 ? .raw : .zstd)); #expect(b.dataBytes == 16384)
                case .diskExtents(let e): #expect(e.encoding == .zstd); #expect(e.dataBytes == 8192)
                default: Issue.record("decoded \(frame.message.type)")
                }
                return true
            }
            #expect(checked == true)
        }
    }

    @Test("the encoder refuses what the decoder would refuse")
    func encoderRefuses() {
        let owner = Buffer(count: 16384)
        #expect(throws: WireError.invalidValue(type: .pageBatch, field: "encoding", offset: 17, value: 1)) {
            try frameBytes(batch(.zstd, payloadBytes: 16384, owner: owner))
        }
        #expect(throws: WireError.payloadLengthMismatch(type: .pageBatch, expected: 16384, actual: 0)) {
            try frameBytes(batch(.zstd, payloadBytes: 0, owner: owner))
        }
        #expect(throws: WireError.payloadLengthMismatch(type: .diskExtents, expected: 8192, actual: 9000)) {
            try frameBytes(extents(.zstd, payloadBytes: 9000, owner: owner))
        }
    }

    @Test("on the wire: an unknown encoding, zstd without data, zstd as long as its data, and an empty zstd payload")
    func decoderRefuses() throws {
        let owner = Buffer(count: 16384)
        // pageBatch: the encoding byte is at 12 + 5.
        var unknown = try frameBytes(batch(.raw, payloadBytes: 16384, owner: owner))
        unknown[17] = 2
        #expect(decodeError(unknown) == .invalidValue(type: .pageBatch, field: "encoding", offset: 17, value: 2))
        var asLong = try frameBytes(batch(.raw, payloadBytes: 16384, owner: owner))
        asLong[17] = PayloadEncoding.zstd.rawValue
        #expect(decodeError(asLong) == .invalidValue(type: .pageBatch, field: "encoding", offset: 17, value: 1))
        // diskExtents: the encoding byte is at 12 + 10. Only zero extents: zstd has nothing to stand for.
        let zeros = Message.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096, kind: .zero)]),
                                                    payload: .empty))
        var noData = try frameBytes(zeros)
        noData[22] = PayloadEncoding.zstd.rawValue
        #expect(decodeError(noData) == .invalidValue(type: .diskExtents, field: "encoding", offset: 22, value: 1))
        // zstd with data but no payload bytes.
        var empty = try frameBytes(extents(.raw, payloadBytes: 8192, owner: owner))
        empty[22] = PayloadEncoding.zstd.rawValue
        empty.removeLast(8192)
        putU32(&empty, 0, UInt32(empty.count - FrameHeader.size))
        #expect(decodeError(empty) == .payloadLengthMismatch(type: .diskExtents, expected: 8192, actual: 0))
        // The reserved bytes after the encoding stay reserved.
        var reserved = try frameBytes(extents(.raw, payloadBytes: 8192, owner: owner))
        reserved[23] = 1
        #expect(decodeError(reserved) == .reservedNonZero(type: .diskExtents, field: "reserved", offset: 23))
    }
}
