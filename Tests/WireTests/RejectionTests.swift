import Testing
import Wire

@Suite("Hostile and broken frames are rejected with the specific error")
struct RejectionTests {
    let ackFrame: [UInt8] = try! frameBytes(.ack(Ack(stream: .disk, streamID: 1, sequence: 2, offset: 3)))

    @Test("every proper prefix of every frame asks for more bytes and never throws")
    func prefixesNeedMore() throws {
        let payloads = SamplePayloads()
        for message in sampleMessages(payloads, includeMaximal: false) {
            let bytes = try frameBytes(message)
            let whole = Buffer(bytes)
            let step = bytes.count > 8192 ? 997 : 1
            for n in stride(from: 0, to: bytes.count, by: step) {
                let prefix = UnsafeRawBufferPointer(rebasing: whole.view[0..<n])
                #expect(try FrameDecoder().decode(prefix) == nil, "\(message.type): prefix of \(n) bytes")
            }
        }
    }

    @Test("a declared length shorter than the fields is a truncation at the exact field")
    func declaredLengthTooShort() {
        var b = ackFrame
        putU32(&b, 0, 23)
        b.removeLast()
        #expect(decodeError(b) == .truncated(type: .ack, field: "offset", offset: 28, needed: 8, available: 7))
        var h = try! frameBytes(.hello(Hello(role: .source, features: [], sessionID: .zero, nonce: .zero)))
        putU32(&h, 0, 40)
        h.removeLast(24)
        #expect(decodeError(h) == .truncated(type: .hello, field: "nonce", offset: 44, needed: 32, available: 8))
        var e = try! frameBytes(.error(ErrorMessage(code: .busy, reason: "busy now")))
        putU32(&e, 0, 4 + 7)
        e.removeLast()
        #expect(decodeError(e) == .truncated(type: .error, field: "reason", offset: 16, needed: 8, available: 7))
        let empty: [UInt8] = [0, 0, 0, 0, FrameHeader.currentVersion, MessageType.switchover.rawValue, 0, 0, 0, 0, 0, 0]
        #expect(decodeError(empty) == .truncated(type: .switchover, field: "finalRound", offset: 12, needed: 4, available: 0))
    }

    @Test("bytes left inside a frame after the message are refused")
    func trailingGarbage() {
        var b = ackFrame
        putU32(&b, 0, 25)
        b.append(0xEE)
        #expect(decodeError(b) == .trailingBytes(type: .ack, offset: 36, count: 1))
        var a = try! frameBytes(.auth(proof: .zero))
        putU32(&a, 0, 32 + 100)
        a += [UInt8](repeating: 0, count: 100)
        #expect(decodeError(a) == .trailingBytes(type: .auth, offset: 44, count: 100))
    }

    @Test("an oversized frame is refused from its header alone, before the body arrives")
    func oversized() {
        var b = ackFrame
        putU32(&b, 0, .max)
        let headerOnly = Array(b[0..<12])
        #expect(decodeError(headerOnly) == .frameTooLarge(length: 12 + Int(UInt32.max), max: FrameDecoder.defaultMaxFrameSize))
        let small = FrameDecoder(maxFrameSize: 35)
        #expect(decodeError(ackFrame, decoder: small) == .frameTooLarge(length: 36, max: 35))
        #expect(decodeError(ackFrame, decoder: FrameDecoder(maxFrameSize: 36)) == nil)
        putU32(&b, 0, UInt32(FrameDecoder.defaultMaxFrameSize - 12 + 1))
        #expect(decodeError(Array(b[0..<12])) == .frameTooLarge(length: FrameDecoder.defaultMaxFrameSize + 1,
                                                                 max: FrameDecoder.defaultMaxFrameSize))
    }

    @Test("unknown types, bad versions and reserved flags are refused from the header")
    func headerChecks() {
        let known = Set(MessageType.allCases.map(\.rawValue))
        for t in UInt8.min...UInt8.max where !known.contains(t) {
            var b = ackFrame
            b[5] = t
            #expect(decodeError(Array(b[0..<12])) == .unknownMessageType(t))
        }
        for v: UInt8 in [0, 1, 3, 0xff] {
            var b = ackFrame
            b[4] = v
            #expect(decodeError(b) == .unsupportedVersion(v))
        }
        for f: UInt16 in [2, 0x8000, 0x8001, 0xffff] {
            var b = ackFrame
            putU16(&b, 6, f)
            #expect(decodeError(b) == .reservedFlags(f))
        }
    }

    @Test("reserved fields, enum values and zero counts are checked")
    func fieldChecks() throws {
        var b = ackFrame
        b[13] = 1
        #expect(decodeError(b) == .reservedNonZero(type: .ack, field: "reserved", offset: 13))
        b = ackFrame
        b[12] = 9
        #expect(decodeError(b) == .invalidValue(type: .ack, field: "stream", offset: 12, value: 9))

        var h = try frameBytes(.hello(Hello(role: .source, features: [], sessionID: .zero, nonce: .zero)))
        h[14] = 0
        #expect(decodeError(h) == .invalidValue(type: .hello, field: "role", offset: 14, value: 0))
        h[14] = 1; h[15] = 2
        #expect(decodeError(h) == .invalidValue(type: .hello, field: "mode", offset: 15, value: 2))

        var k = try frameBytes(.keepalive(Keepalive(timestampNanoseconds: 1, isEcho: true)))
        k[20] = 2
        #expect(decodeError(k) == .invalidValue(type: .keepalive, field: "isEcho", offset: 20, value: 2))

        var s = try frameBytes(.switchover(Switchover(finalRound: 1, mode: [], diskBytesToCome: 0,
                                                      memoryPagesToCome: 0, vmStateLength: 0)))
        s[16] = 4
        #expect(decodeError(s) == .invalidValue(type: .switchover, field: "mode", offset: 16, value: 4))

        var d = try frameBytes(.diskLayout(DiskLayout(diskID: 0, sizeBytes: 1, blockSize: 4096, name: "ab")))
        putU32(&d, 16, 4095)
        #expect(decodeError(d) == .invalidValue(type: .diskLayout, field: "blockSize", offset: 16, value: 4095))

        var m = try frameBytes(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [])))
        putU32(&m, 12, 3000)
        #expect(decodeError(m) == .invalidValue(type: .memoryLayout, field: "pageSize", offset: 12, value: 3000))

        var r = try frameBytes(.pageRequest(PageRequest(requestID: 1, regionID: 2, pageIndex: 3, count: 1)))
        putU32(&r, 24, 0)
        #expect(decodeError(r) == .invalidValue(type: .pageRequest, field: "count", offset: 24, value: 0))
        putU32(&r, 24, 2)
        putU64(&r, 28, .max)
        #expect(decodeError(r) == .invalidValue(type: .pageRequest, field: "pageIndex", offset: 28, value: .max))

        var k2 = try frameBytes(.diskSkip(DiskRange(diskID: 1, offset: 0, length: 1)))
        putU32(&k2, 16, 0)
        #expect(decodeError(k2) == .invalidValue(type: .diskSkip, field: "length", offset: 16, value: 0))
        var v = try frameBytes(.resumed(VMResumed(sinceSwitchoverNanoseconds: 5)))
        v[27] = 1
        #expect(decodeError(v) == .reservedNonZero(type: .resumed, field: "reserved", offset: 20))
    }

    @Test("diskHeld: its count, its first block and its hashes' length are checked")
    func diskHeldLimits() throws {
        let hashes = Buffer(count: 2 * DiskHeld.hashSize)
        let good = try frameBytes(.diskHeld(DiskHeld(diskID: 1, firstBlock: 10, count: 2, hashes: hashes.payload)))
        var tooMany = good
        putU32(&tooMany, 16, UInt32(DiskHeld.maxBlocks + 1))
        #expect(decodeError(tooMany) == .invalidValue(type: .diskHeld, field: "count", offset: 16, value: UInt64(DiskHeld.maxBlocks + 1)))
        var wraps = good
        putU64(&wraps, 20, .max)
        #expect(decodeError(wraps) == .invalidValue(type: .diskHeld, field: "firstBlock", offset: 20, value: .max))
        var short = good
        putU32(&short, 16, 3)
        #expect(decodeError(short) == .truncated(type: .diskHeld, field: "hashes", offset: 28, needed: 96, available: 64))
        var long = good
        putU32(&long, 16, 1)
        #expect(decodeError(long) == .trailingBytes(type: .diskHeld, offset: 60, count: 32))
        #expect(throws: WireError.self) { try frameBytes(.diskHeld(DiskHeld(diskID: 1, firstBlock: 0, count: 3, hashes: hashes.payload))) }
        var badKind = try frameBytes(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096, kind: .held)]),
                                                              payload: Buffer(count: 0).payload)))
        badKind[12 + 16 + 12] = 3
        #expect(decodeError(badKind) == .invalidValue(type: .diskExtents, field: "extent.kind", offset: 40, value: 3))
    }

    @Test("counts larger than the frame are refused before anything is allocated")
    func hostileCounts() throws {
        // A memory layout claiming 4096 regions (160 KiB) in an 8-byte body.
        var m = try frameBytes(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [])))
        putU16(&m, 16, 4096)
        #expect(decodeError(m) == .truncated(type: .memoryLayout, field: "regionCount", offset: 20,
                                             needed: 4096 * 40, available: 0))
        putU16(&m, 16, 65535)
        #expect(decodeError(m) == .limitExceeded(type: .memoryLayout, field: "regionCount", value: 65535, max: 4096))
        // A hello claiming 200 resume points with none present.
        var h = try frameBytes(.hello(Hello(role: .source, features: [], sessionID: .zero, nonce: .zero)))
        putU16(&h, 18, 200)
        #expect(decodeError(h) == .truncated(type: .hello, field: "resumeCount", offset: 76, needed: 4800, available: 0))
        // Disk extents claiming 65535 extents.
        let p = SamplePayloads()
        var e = try frameBytes(.diskExtents(DiskExtents(diskID: 0, round: 0, extents: ExtentList([]), payload: p.empty.payload)))
        putU16(&e, 20, 65535)
        #expect(decodeError(e) == .truncated(type: .diskExtents, field: "extentCount", offset: 28,
                                             needed: 65535 * 16, available: 0))
        // A name longer than allowed.
        var d = try frameBytes(.diskLayout(DiskLayout(diskID: 0, sizeBytes: 1, blockSize: 4096, name: "ab")))
        putU16(&d, 28, 5000)
        #expect(decodeError(d) == .limitExceeded(type: .diskLayout, field: "name", value: 5000, max: 1024))
    }

    @Test("payload sizes must match the runs and extents exactly")
    func payloadMismatch() throws {
        let p = SamplePayloads()
        let batch = Message.pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 0,
                                                runs: PageRunList([.data(2), .zero(1)]),
                                                payload: Payload(UnsafeRawBufferPointer(rebasing: p.pages.view[0..<8192]))))
        var b = try frameBytes(batch)
        // One extra byte of payload.
        putU32(&b, 0, UInt32(b.count - 12 + 1))
        b.append(0)
        #expect(decodeError(b) == .payloadLengthMismatch(type: .pageBatch, expected: 8192, actual: 8193))
        // A data run of 2^31-1 pages of 1 GiB: computed without overflow, refused as a mismatch.
        b = try frameBytes(batch)
        b[16] = 30
        putU32(&b, 28, PageRun.maxCount)
        #expect(decodeError(b) == .payloadLengthMismatch(type: .pageBatch, expected: UInt64(PageRun.maxCount) << 30, actual: 8192))
        // A zero-count run.
        b = try frameBytes(batch)
        putU32(&b, 28, 0)
        #expect(decodeError(b) == .invalidValue(type: .pageBatch, field: "run.count", offset: 28, value: 0))
        // firstPage + pages overflows.
        b = try frameBytes(batch)
        putU64(&b, 20, .max - 1)
        #expect(decodeError(b) == .invalidValue(type: .pageBatch, field: "firstPage", offset: 20, value: .max - 1))
        // Page shift out of range.
        b = try frameBytes(batch)
        b[16] = 11
        #expect(decodeError(b) == .invalidValue(type: .pageBatch, field: "pageShift", offset: 16, value: 11))

        let extents = Message.diskExtents(DiskExtents(diskID: 0, round: 1, extents: ExtentList([Extent(offset: 0, length: 512)]),
                                                      payload: Payload(UnsafeRawBufferPointer(rebasing: p.disk.view[0..<512]))))
        var e = try frameBytes(extents)
        putU32(&e, 36, 0)
        #expect(decodeError(e) == .invalidValue(type: .diskExtents, field: "extent.length", offset: 36, value: 0))
        e = try frameBytes(extents)
        e[40] = 1  // the data extent becomes a zero extent: 512 payload bytes are now unexpected
        #expect(decodeError(e) == .payloadLengthMismatch(type: .diskExtents, expected: 0, actual: 512))
        e = try frameBytes(extents)
        e[40] = 7
        #expect(decodeError(e) == .invalidValue(type: .diskExtents, field: "extent.kind", offset: 40, value: 7))
        e = try frameBytes(extents)
        putU64(&e, 28, .max - 10)
        #expect(decodeError(e) == .invalidValue(type: .diskExtents, field: "extent.offset", offset: 28, value: .max - 10))

        var v = try frameBytes(.vmState(VMStateChunk(totalLength: 777, offset: 0, payload: p.vmState.payload)))
        putU64(&v, 12, 776)
        #expect(decodeError(v) == .invalidValue(type: .vmState, field: "offset", offset: 20, value: 0))
        withExtendedLifetime(p) {}
    }

    @Test("strings must be valid UTF-8")
    func utf8() throws {
        var d = try frameBytes(.diskLayout(DiskLayout(diskID: 0, sizeBytes: 1, blockSize: 4096, name: "ab")))
        d[32] = 0xC3  // a lead byte followed by 'b'
        #expect(decodeError(d) == .invalidUTF8(type: .diskLayout, field: "name", offset: 32))
        var e = try frameBytes(.error(ErrorMessage(code: .busy, reason: "x")))
        e[16] = 0xFF
        #expect(decodeError(e) == .invalidUTF8(type: .error, field: "reason", offset: 16))
    }

    @Test("error descriptions say what and where")
    func descriptions() {
        let e = WireError.truncated(type: .pageBatch, field: "runs", offset: 28, needed: 400, available: 12)
        #expect(e.description == "pageBatch frame truncated: field 'runs' at offset 28 needs 400 bytes, 12 left in the frame")
        #expect(WireError.frameTooLarge(length: 20_000_000, max: 16_842_752).description
                == "frame of 20000000 bytes exceeds the maximum of 16842752 bytes")
        #expect(WireError.unknownMessageType(0x99).description == "unknown message type 0x99 at offset 5")
    }
}
