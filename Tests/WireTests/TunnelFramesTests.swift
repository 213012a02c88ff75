import Testing
import Wire

@Suite("tunnelFrames: the VM's Ethernet frames on the tunnel lane")
struct TunnelFramesTests {
    let mac: UInt64 = 0x5254_0012_3456

    /// A whole `tunnelFrames` frame with `count` in its metadata and `records` as its payload.
    func frame(count: UInt16, records: [UInt8], mac: UInt64 = 0x5254_0012_3456) -> [UInt8] {
        // The header of a real (empty) batch, then hand-made metadata and records.
        let real = try! frameBytes(.tunnelFrames(TunnelFrames(vmMAC: 0, frameCount: 0, payload: .empty)))
        var bytes = Array(real[0..<12]) + [UInt8](repeating: 0, count: 16) + records
        putU32(&bytes, 0, UInt32(16 + records.count))
        putU64(&bytes, 12, mac)
        putU16(&bytes, 20, count)
        return bytes
    }

    @Test("a batch decodes to its frames, in order, without copying them")
    func framesComeOutInOrder() throws {
        let records = tunnelRecords([14, 60, 1514, 9216])
        let seen = try #require(try withDecoded(frame(count: 4, records: records)) { decoded -> [Int] in
            guard case .tunnelFrames(let batch) = decoded.message else { return [] }
            #expect(batch.vmMAC == mac)
            var lengths: [Int] = []
            batch.forEachFrame { frame in
                lengths.append(frame.count)
                #expect(frame.first == UInt8(truncatingIfNeeded: lengths.count - 1))   // the record's own bytes
            }
            return lengths
        })
        #expect(seen == [14, 60, 1514, 9216])
    }

    @Test("the builder's batches decode to what was appended, and it refuses what cannot be a frame")
    func builderRoundTrips() throws {
        var batch = TunnelFrameBatch(capacity: 4096)
        let small = [UInt8](repeating: 0xab, count: 60), big = [UInt8](repeating: 0xcd, count: 1514)
        #expect(small.withUnsafeBytes { batch.append($0) })
        #expect(big.withUnsafeBytes { batch.append($0) })
        #expect(![UInt8](repeating: 0, count: 13).withUnsafeBytes { batch.append($0) })      // shorter than a header
        #expect(![UInt8](repeating: 0, count: 9217).withUnsafeBytes { batch.append($0) })    // longer than a jumbo frame
        #expect(batch.frameCount == 2 && batch.byteCount == 2 + 60 + 2 + 1514)
        let bytes = try frameBytes(batch.message(vmMAC: mac))
        let lengths = try #require(try withDecoded(bytes) { decoded -> [Int] in
            guard case .tunnelFrames(let decodedBatch) = decoded.message else { return [] }
            var lengths: [Int] = []
            decodedBatch.forEachFrame { lengths.append($0.count); #expect($0.allSatisfy { $0 == ($0 == 0xab ? 0xab : 0xcd) }) }
            return lengths
        })
        #expect(lengths == [60, 1514])
        batch.reset()
        #expect(batch.frameCount == 0 && batch.byteCount == 0)
    }

    @Test("hostile batches are refused by the decoder: bad lengths, a count that does not match, a MAC past 48 bits")
    func hostileBatchesAreRefused() {
        var cases: [(String, [UInt8])] = [
            ("a record shorter than an Ethernet header", frame(count: 1, records: tunnelRecords([13]))),
            ("a record longer than a jumbo frame", frame(count: 1, records: [0x01, 0x24] + [UInt8](repeating: 0, count: 9217))),
            ("a length past the payload", frame(count: 1, records: [60, 0] + [UInt8](repeating: 0, count: 59))),
            ("more records than the count", frame(count: 1, records: tunnelRecords([60, 60]))),
            ("fewer records than the count", frame(count: 3, records: tunnelRecords([60, 60]))),
            ("a count past the limit", frame(count: 1025, records: tunnelRecords(Array(repeating: 14, count: 1025)))),
            ("a lone length byte", frame(count: 1, records: [60])),
            ("a MAC past 48 bits", frame(count: 0, records: [], mac: 1 << 48)),
        ]
        var reserved = frame(count: 0, records: [])
        reserved[23] = 1
        cases.append(("a reserved byte set", reserved))
        for (name, bytes) in cases {
            #expect(decodeError(bytes) != nil, "\(name) was accepted")
        }
        #expect(decodeError(frame(count: 2, records: tunnelRecords([60, 60]))) == nil)
    }

    @Test("the encoder refuses a batch whose records do not match its count")
    func encoderChecksTheRecords() {
        let records = tunnelRecords([60])
        records.withUnsafeBytes { raw in
            #expect(throws: WireError.self) { try FrameEncoder.frameSize(of: .tunnelFrames(TunnelFrames(vmMAC: mac, frameCount: 2, payload: Payload(raw)))) }
            #expect(throws: WireError.self) { try FrameEncoder.frameSize(of: .tunnelFrames(TunnelFrames(vmMAC: 1 << 50, frameCount: 1, payload: Payload(raw)))) }
            #expect((try? FrameEncoder.frameSize(of: .tunnelFrames(TunnelFrames(vmMAC: mac, frameCount: 1, payload: Payload(raw))))) == 12 + 16 + 62)
        }
    }
}
