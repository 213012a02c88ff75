import FerryTestSupport
import Foundation
import Glibc
import MigrationEngine
import Wire
import XCTest

/// The sealing of frames on a real socket: `FrameSender` seals, `FrameReceiver` opens; what an
/// attacker on the path can do to the bytes between them (replay, reorder, drop, flip, truncate,
/// trickle) is caught, and before authentication a peer costs little and not for long.
final class LinkSealingTests: XCTestCase {
    let key = (0..<32).map { UInt8($0) &* 7 }
    let otherKey = (0..<32).map { UInt8($0) &* 11 }

    /// A connected pair of stream sockets.
    private func socketPair() -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        return (fds[0], fds[1])
    }

    /// The sealed frames (raw bytes, one per message) a sender produces for `messages`.
    private func sealedFrames(_ messages: [Message], suite: CipherSuite = .aes256gcm) throws -> [[UInt8]] {
        let (a, b) = socketPair()
        defer { close(a); close(b) }
        final class Collected: @unchecked Sendable { var bytes: [UInt8] = [] }
        let collected = Collected()
        let done = DispatchSemaphore(value: 0)
        Thread {
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(b, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                collected.bytes += chunk[0..<n]
            }
            done.signal()
        }.start()
        var sender = try FrameSender(fd: a)
        try sender.startSealing(suite, key: key)
        for message in messages { try sender.send(message) }
        shutdown(a, Int32(SHUT_WR))
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        let bytes = collected.bytes
        var frames: [[UInt8]] = []
        var offset = 0
        while offset + 12 <= bytes.count {
            let length = Int(bytes[offset]) | Int(bytes[offset + 1]) << 8 | Int(bytes[offset + 2]) << 16 | Int(bytes[offset + 3]) << 24
            frames.append(Array(bytes[offset..<(offset + 12 + length)]))
            offset += 12 + length
        }
        XCTAssertEqual(offset, bytes.count)
        return frames
    }

    /// The reading end of a socket pair into which a thread writes `frames` (concatenated), then
    /// closes its end; a reader that stops early only ends the writes (no SIGPIPE).
    private func feed(_ frames: [[UInt8]]) -> Int32 {
        let (a, b) = socketPair()
        let all = frames.flatMap { $0 }
        Thread {
            var sent = 0
            while sent < all.count {
                let n = all.withUnsafeBytes { send(a, $0.baseAddress! + sent, all.count - sent, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { break }
                sent += n
            }
            close(a)
        }.start()
        return b
    }

    /// Feeds `frames` (concatenated) to a receiver opening with `key`; returns the messages' types
    /// it decoded and the error it stopped with.
    private func receive(_ frames: [[UInt8]], key: [UInt8]? = nil, suite: CipherSuite = .aes256gcm) throws -> (types: [MessageType], error: LinkError?) {
        let b = feed(frames)
        defer { close(b) }
        var receiver = try FrameReceiver(fd: b, timeoutSeconds: 5)
        try receiver.startOpening(suite, key: key ?? self.key)
        var types: [MessageType] = []
        while true {
            do {
                types.append(try receiver.receive(during: "test").header.type)
            } catch {
                return (types, error)
            }
        }
    }

    private func isTampered(_ error: LinkError?) -> Bool {
        if case .tampered? = error { return true }
        return false
    }

    private var messages: [Message] {
        [.keepalive(Keepalive(timestampNanoseconds: 1, isEcho: false)),
         .ack(Ack(stream: .disk, streamID: 1, sequence: 2, offset: 3)),
         .keepalive(Keepalive(timestampNanoseconds: 2, isEcho: false)),
         .ack(Ack(stream: .memory, streamID: 0, sequence: 5, offset: 6))]
    }

    func testSealedFramesRoundTripAndCarryNoPlaintext() throws {
        let secret = randomBytes(count: 256 << 10, seed: 42)
        try secret.withUnsafeBytes { raw in
            let batch = PageBatch(regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([PageRun(count: 64, isZero: false)]), payload: Payload(raw))
            for suite in [CipherSuite.aes256gcm, .chacha20poly1305] {
                let frames = try sealedFrames([.pageBatch(batch)] + messages, suite: suite)
                XCTAssertEqual(frames.count, 5)
                XCTAssertEqual(frames[0].count, 12 + 16 + 4 + (256 << 10) + 2 * 16, "header, metadata, payload and two records' tags")
                let wire = frames.flatMap { $0 }
                XCTAssertNil(secret.prefix(32).withUnsafeBytes { needle in wire.withUnsafeBytes { E2E.Relay.find(needle, in: $0) } },
                             "the payload crossed the socket in the clear (\(suite))")
                let (types, error) = try receive(frames, suite: suite)
                XCTAssertEqual(types, [.pageBatch, .keepalive, .ack, .keepalive, .ack], "\(suite)")
                guard case .closed? = error else { return XCTFail("ended with \(String(describing: error))") }
            }
        }
    }

    /// A frame of several records (a 1 MiB + 4 KiB page batch: 5 records, sealed and opened by two
    /// threads at once) arrives intact; a record swapped with another, moved from another frame, cut
    /// off, or with a flipped tag is caught.
    func testAFrameOfSeveralRecordsRoundTripsAndItsRecordsCannotBeMoved() throws {
        let pages = 257
        let secret = randomBytes(count: pages << 12, seed: 7)
        try secret.withUnsafeBytes { raw in
            let batch = PageBatch(regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([PageRun(count: UInt32(pages), isZero: false)]),
                                  payload: Payload(raw))
            let frames = try sealedFrames([.pageBatch(batch), .pageBatch(batch)] + messages)
            let body = 16 + 4 + (pages << 12)
            XCTAssertEqual(SealedRecords.count(bodyBytes: body), 5)
            XCTAssertEqual(frames[0].count, 12 + body + 5 * 16, "header, body and five tags")
            XCTAssertNotEqual(frames[0], frames[1], "the same batch sealed twice must differ")

            // Intact: both batches decode to the very bytes sent.
            let b = feed(frames)
            defer { close(b) }
            var receiver = try FrameReceiver(fd: b, timeoutSeconds: 5)
            try receiver.startOpening(.aes256gcm, key: key)
            for _ in 0..<2 {
                guard case .pageBatch(let got) = try receiver.receive(during: "test").message else { return XCTFail("not a page batch") }
                XCTAssertTrue(got.payload.bytes.elementsEqual(raw), "the payload changed on its way")
            }

            let record = SealedRecords.recordBytes + 16
            let r1 = 12 + record, r2 = 12 + 2 * record
            var swapped = frames[0]
            swapped.replaceSubrange(r1..<(r1 + record), with: frames[0][r2..<(r2 + record)])
            swapped.replaceSubrange(r2..<(r2 + record), with: frames[0][r1..<(r1 + record)])
            var moved = frames[0]
            moved.replaceSubrange(r1..<(r1 + record), with: frames[1][r1..<(r1 + record)])
            var cut = Array(frames[0][..<(12 + 4 * record)])
            withUnsafeBytes(of: UInt32(4 * record).littleEndian) { cut.replaceSubrange(0..<4, with: $0) }
            var flipped = frames[0]
            flipped[flipped.count - 1] ^= 0x01
            for (name, frame) in [("swapped", swapped), ("moved", moved), ("cut", cut), ("flipped tag", flipped)] {
                let (types, error) = try receive([frame, frames[1]])
                XCTAssertEqual(types.count, 0, name)
                XCTAssertTrue(isTampered(error), "\(name): \(String(describing: error))")
            }
            XCTAssertNil(SealedRecords.count(sealedBytes: 4 * record + 1), "a lone byte after whole records is no record")
            XCTAssertNil(SealedRecords.count(sealedBytes: 15))
            XCTAssertEqual(SealedRecords.count(sealedBytes: 16), 1, "an empty body is one record")
            XCTAssertEqual(SealedRecords.count(sealedBytes: 4 * record + 17), 5)
        }
    }

    func testReplayedReorderedDroppedAndFlippedFramesAreCaught() throws {
        let frames = try sealedFrames(messages)
        let cases: [(String, [[UInt8]], Int)] = [
            ("replayed", [frames[0], frames[1], frames[1]], 2),
            ("reordered", [frames[1], frames[0]], 0),
            ("dropped", [frames[0], frames[2]], 1),
            ("replayed from the start", [frames[0], frames[0]], 1),
        ]
        for (name, sequence, good) in cases {
            let (types, error) = try receive(sequence)
            XCTAssertEqual(types.count, good, name)
            XCTAssertTrue(isTampered(error), "\(name): \(String(describing: error))")
        }
        for position in [0, 4, 5, 8, 12, 20, frames[1].count - 1] {
            var flipped = frames[1]
            flipped[position] ^= 0x01
            let (types, error) = try receive([frames[0], flipped, frames[2]])
            XCTAssertEqual(types.count, 1, "bit flipped at byte \(position)")
            XCTAssertNotNil(error, "bit flipped at byte \(position)")
            // A flipped length or version is refused as malformed or waited for; anything else fails the seal.
            if position >= 5 && position != 5 { XCTAssertTrue(isTampered(error), "byte \(position): \(String(describing: error))") }
        }
        let (types, error) = try receive(frames, key: otherKey)
        XCTAssertEqual(types.count, 0)
        XCTAssertTrue(isTampered(error), "a frame sealed under another key opened: \(String(describing: error))")
    }

    func testAnUnsealedFrameAfterTheHandshakeIsCaught() throws {
        var forged: [UInt8] = []
        try FrameEncoder.encode(.error(ErrorMessage(code: .vmStartFailed, reason: "resume your copy")), appendingTo: &forged)
        var tiny: [UInt8] = []
        try FrameEncoder.encode(.keepalive(Keepalive(timestampNanoseconds: 0, isEcho: false)), appendingTo: &tiny)
        for frame in [forged, Array(tiny.prefix(12 + 16)), [4, 0, 0, 0, FrameHeader.currentVersion, MessageType.keepalive.rawValue, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]] {
            var header = frame
            if frame.count == 28 { header[0] = 16; header[1] = 0; header[2] = 0; header[3] = 0 }
            let (types, error) = try receive([header])
            XCTAssertEqual(types.count, 0)
            XCTAssertTrue(isTampered(error), "an unsealed frame was taken: \(String(describing: error))")
        }
    }

    func testBeforeAuthenticationFramesAreSmallAndTheWholeHandshakeHasOneDeadline() throws {
        // A header announcing a 1 MiB frame is refused at once, before the body is awaited.
        let (a, b) = socketPair()
        defer { close(a); close(b) }
        var receiver = try FrameReceiver(fd: b, timeoutSeconds: 5)
        let big: [UInt8] = [0, 0, 16, 0, FrameHeader.currentVersion, MessageType.hello.rawValue, 0, 0, 0, 0, 0, 0]
        _ = big.withUnsafeBytes { write(a, $0.baseAddress, $0.count) }
        XCTAssertThrowsError(try receiver.receive(during: "handshake")) { error in
            guard case LinkError.malformed(.frameTooLarge) = error else { return XCTFail("\(error)") }
        }
        // A slow-loris: one byte of a hello every 100 ms, never a whole frame: cut at the deadline
        // (0.5 s here) although bytes keep arriving well within the per-read timeout.
        let (c, d) = socketPair()
        defer { close(c); close(d) }
        var slow = try FrameReceiver(fd: d, timeoutSeconds: 5)
        slow.deadlineNanoseconds = UInt64(monotonicSeconds() * 1e9) + 500_000_000
        var hello: [UInt8] = []
        try FrameEncoder.encode(.hello(Hello(role: .source, features: [.disk], sessionID: .random(), nonce: .random())), appendingTo: &hello)
        let bytes = hello
        let trickle = Thread {
            for byte in bytes {
                var b = byte
                if write(c, &b, 1) != 1 { return }
                usleep(100_000)
            }
        }
        trickle.start()
        let started = monotonicSeconds()
        XCTAssertThrowsError(try slow.receive(during: "handshake")) { error in
            guard case LinkError.timedOut = error else { return XCTFail("\(error)") }
        }
        let took = monotonicSeconds() - started
        XCTAssertLessThan(took, 1.5, "the deadline did not hold: \(took) s")
        XCTAssertGreaterThan(took, 0.4)
        shutdown(c, Int32(SHUT_RDWR))
    }
}
