import Testing
import Wire

@Suite("Round trips: encode then decode gives the same message")
struct RoundTripTests {
    @Test("every message type, including empty and maximal lists, round-trips")
    func everyMessageRoundTrips() throws {
        let payloads = SamplePayloads()
        let messages = sampleMessages(payloads)
        var seen = Set<MessageType>()
        for (i, message) in messages.enumerated() {
            let bytes = try frameBytes(message, sequence: UInt32(i + 1))
            #expect(bytes.count == (try FrameEncoder.frameSize(of: message)))
            let decoded = try #require(try withDecoded(bytes) { frame -> DecodedFrame in
                #expect(frame.message == message, "message \(i) (\(message.type)) changed in a round trip")
                #expect(frame.consumed == bytes.count)
                #expect(frame.header.sequence == UInt32(i + 1))
                #expect(frame.header.type == message.type)
                #expect(frame.header.flags.contains(.urgent) == message.type.isUrgentByDefault)
                return frame
            })
            _ = decoded.header
            seen.insert(message.type)
        }
        #expect(seen == Set(MessageType.allCases), "missing types: \(Set(MessageType.allCases).subtracting(seen))")
        withExtendedLifetime(payloads) {}
    }

    @Test("the three encoder entry points produce identical bytes")
    func encoderEntryPointsAgree() throws {
        let payloads = SamplePayloads()
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 16)
        defer { out.deallocate() }
        var appended: [UInt8] = []
        for message in sampleMessages(payloads, includeMaximal: false) {
            let n = try FrameEncoder.encode(message, sequence: 5, into: out)
            let whole = Array(out[0..<n])
            appended.removeAll(keepingCapacity: true)
            try FrameEncoder.encode(message, sequence: 5, appendingTo: &appended)
            #expect(appended == whole)
            // Prefix + payload sent separately (scatter-gather) equals the whole frame.
            let prefix = try FrameEncoder.encodePrefix(message, sequence: 5, into: out)
            let gathered = Array(out[0..<prefix]) + Array(message.payload.bytes)
            #expect(gathered == whole, "\(message.type): prefix+payload differs from the whole frame")
            #expect(prefix + message.payload.count == n)
        }
    }

    @Test("decoded payloads are views into the input buffer, not copies")
    func payloadsAreZeroCopy() throws {
        let payloads = SamplePayloads()
        for message in sampleMessages(payloads, includeMaximal: false) where message.payload.count > 0 {
            let input = Buffer(try frameBytes(message))
            let frame = try #require(try FrameDecoder().decode(input.view))
            let start = UInt(bitPattern: input.view.baseAddress!)
            let p = UInt(bitPattern: frame.message.payload.bytes.baseAddress!)
            #expect(p >= start && p + UInt(frame.message.payload.count) <= start + UInt(input.view.count),
                    "\(message.type) payload is not inside the input buffer")
            #expect(p + UInt(frame.message.payload.count) == start + UInt(input.view.count),
                    "\(message.type) payload does not end the frame")
        }
    }

    @Test("a stream of frames decodes frame by frame when fed one byte at a time")
    func incrementalStream() throws {
        let payloads = SamplePayloads()
        let messages = sampleMessages(payloads, includeMaximal: false)
        var stream: [UInt8] = []
        for (i, m) in messages.enumerated() { try FrameEncoder.encode(m, sequence: UInt32(i), appendingTo: &stream) }
        let all = Buffer(stream)
        let decoder = FrameDecoder()
        var start = 0, end = 0, index = 0
        var nilAnswers = 0
        while index < messages.count {
            let window = UnsafeRawBufferPointer(rebasing: all.view[start..<end])
            if let frame = try decoder.decode(window) {
                #expect(frame.message == messages[index])
                #expect(frame.header.sequence == UInt32(index))
                start += frame.consumed
                index += 1
            } else {
                nilAnswers += 1
                #expect(end < stream.count, "decoder wants more bytes at the end of the stream")
                if end == stream.count { break }
                // Grow by one byte for small frames, by large steps inside big payloads.
                end = min(stream.count, end + (end - start < 4096 ? 1 : 4096))
            }
        }
        #expect(index == messages.count)
        #expect(start == stream.count)
        #expect(nilAnswers > stream.count / 1000)
    }

    @Test("urgent lane: default per type, override both ways")
    func urgentFlag() throws {
        let request = Message.pageRequest(PageRequest(requestID: 1, regionID: 0, pageIndex: 0, count: 1))
        let keep = Message.keepalive(Keepalive(timestampNanoseconds: 1, isEcho: false))
        #expect(try withDecoded(try frameBytes(request)) { $0.header.flags } == .urgent)
        #expect(try withDecoded(try frameBytes(keep)) { $0.header.flags } == [])
        #expect(try withDecoded(try frameBytes(keep, urgent: true)) { $0.header.flags } == .urgent)
        #expect(try withDecoded(try frameBytes(request, urgent: false)) { $0.header.flags } == [])
    }

    @Test("header bytes follow the documented layout")
    func headerLayout() throws {
        let bytes = try frameBytes(.ack(Ack(stream: .disk, streamID: 0x0102_0304, sequence: 5, offset: 6)),
                                   sequence: 0xA1B2_C3D4)
        #expect(bytes.count == 12 + 24)
        #expect(Array(bytes[0..<12]) == [24, 0, 0, 0, 2, 0x40, 0, 0, 0xD4, 0xC3, 0xB2, 0xA1])
        #expect(Array(bytes[12..<20]) == [1, 0, 0, 0, 4, 3, 2, 1])
    }

    @Test("error codes keep unknown values; known values map to names")
    func errorCodes() {
        for raw in UInt16(0)...UInt16(300) { #expect(ErrorCode(rawValue: raw).rawValue == raw) }
        #expect(ErrorCode(rawValue: 3) == .authenticationFailed)
        #expect(ErrorCode(rawValue: 999) == .unknown(999))
        #expect(ErrorCode.timeout.description == "timeout(11)")
        let long = String(repeating: "ü", count: 2000)
        let cut = ErrorMessage.truncating(code: .aborted, reason: long)
        #expect(cut.reason.utf8.count <= ErrorMessage.maxReasonLength && cut.reason.utf8.count >= 1022)
    }

    @Test("encoder refuses messages that break the protocol's limits, before writing")
    func encoderValidates() throws {
        let p = SamplePayloads()
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 16)
        defer { out.deallocate() }
        // Payload length disagreeing with the runs.
        let bad = Message.pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([.data(1)]),
                                              payload: p.disk.payload))
        #expect(throws: WireError.payloadLengthMismatch(type: .pageBatch, expected: 4096, actual: p.disk.payload.count)) {
            _ = try FrameEncoder.frameSize(of: bad)
        }
        let name = Message.diskLayout(DiskLayout(diskID: 0, sizeBytes: 0, blockSize: 4096,
                                                 name: String(repeating: "a", count: 1025)))
        #expect(throws: WireError.limitExceeded(type: .diskLayout, field: "name", value: 1025, max: 1024)) {
            _ = try FrameEncoder.frameSize(of: name)
        }
        let small = Message.ack(Ack(stream: .disk, streamID: 0, sequence: 0, offset: 0))
        #expect(throws: WireError.outputTooSmall(needed: 36, available: 20)) {
            _ = try FrameEncoder.encode(small, into: UnsafeMutableRawBufferPointer(rebasing: out[0..<20]))
        }
        let zeroRun = Message.pageRequest(PageRequest(requestID: 0, regionID: 0, pageIndex: 0, count: 0))
        #expect(throws: WireError.self) { _ = try FrameEncoder.frameSize(of: zeroRun) }
        withExtendedLifetime(p) {}
    }

    @Test("appending to a reused array does not grow its capacity once warmed")
    func appendReusesCapacity() throws {
        let p = SamplePayloads()
        let m = Message.pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([.data(5)]),
                                            payload: p.pages.payload))
        var out: [UInt8] = []
        out.reserveCapacity(64 << 10)
        let capacity = out.capacity
        for _ in 0..<100 {
            out.removeAll(keepingCapacity: true)
            try FrameEncoder.encode(m, appendingTo: &out)
        }
        #expect(out.capacity == capacity)
        #expect(out.count == 12 + 16 + 4 + 5 * 4096)
    }
}
