import FerryTestSupport
import Foundation
import Glibc
import MigrationEngine
import Wire
import XCTest

/// A fake source (``FakePeer``) against the REAL dest-agent: frames in the wrong order, a wrong
/// digest, refused handshakes. The dest-agent has one `--disk` target and an `--on-switchover`
/// that only touches a marker file, so "the VM started" is a file that exists.
final class FakeSourceVersusDestAgentTests: XCTestCase {
    /// A real dest-agent waiting for a source.
    private final class DestAgentRig {
        let dir = TemporaryDirectory(prefix: "ferry-fake-source")
        let key: SharedKey
        let port: UInt16
        let agent: E2E.Agent
        /// Touched by `--on-switchover`: exists once the agent started the VM.
        var marker: String { dir.file("vm-started") }
        var nbdSocket: String { dir.file("dst.sock") }
        var image: String { dir.file("dst.img") }

        init() throws {
            try writeKeyFile(at: dir.file("key"))
            key = try SharedKey(contentsOf: dir.file("key"))   // as the agent reads it (a trailing newline byte is not part of the key)
            port = try freePort()
            agent = try E2E.Agent("dest-agent", [
                "--listen", "127.0.0.1:\(port)", "--key-file", dir.file("key"), "--disk", dir.file("dst.img"),
                "--nbd", "unix:\(dir.file("dst.sock"))", "--on-switchover", "touch \(dir.file("vm-started"))", "--work-dir", dir.file("work"), "--report", dir.file("dest.json"),
                "--accept-timeout", "60", "--exit-after-migration", "--log-level", "debug"], logPath: dir.file("dest.log"))
            guard agent.waitForLog("waiting for the source", timeout: 60) else { throw SupportError("dest-agent never listened: \(agent.log)") }
        }

        func connect(session: SessionID = .random(), mode: HelloMode = .new) throws -> FakePeer {
            try FakePeer.source(port: port, key: key, session: session, mode: mode)
        }

        /// After a refusal: the agent exits 1 with a failed report (the VM at the source), never
        /// ran `--on-switchover`, and never served the disk.
        func checkRefusedAndNothingStarted(file: StaticString = #filePath, line: UInt = #line) throws {
            XCTAssertEqual(agent.waitForExit(timeout: 60), 1, "dest-agent did not fail: \(agent.log)", file: file, line: line)
            let report = try E2E.report(dir.file("dest.json"), log: agent.log)
            XCTAssertEqual(try report.string("status", file: file, line: line), "failed", file: file, line: line)
            XCTAssertEqual(try report.string("vm_location", file: file, line: line), "source", file: file, line: line)
            XCTAssertFalse(FileManager.default.fileExists(atPath: marker), "the dest-agent started the VM", file: file, line: line)
            XCTAssertFalse(agent.log.contains("serving the migrated disk"), "the dest-agent served the disk: \(agent.log)", file: file, line: line)
            XCTAssertFalse(agent.log.contains("the VM runs here"), agent.log, file: file, line: line)
            XCTAssertFalse(FileManager.default.fileExists(atPath: nbdSocket), "an NBD socket was left at \(nbdSocket)", file: file, line: line)
        }
    }

    /// A 64 KiB disk of random data, 4 KiB blocks.
    private let disk = randomBytes(count: 64 << 10, seed: 0xFA4E_D15C)
    private let blockSize = 4096

    /// The digest the engine computes for `disk` (SHA-256 over its per-block hashes).
    private var rightDigest: Wire.Digest {
        let hashes = BlockHashes(diskSize: UInt64(disk.count), blockSize: blockSize)
        disk.withUnsafeBytes { raw in
            for block in 0..<hashes.blockCount {
                let start = block * blockSize
                hashes.update(block: block, contents: UnsafeRawBufferPointer(rebasing: raw[start..<(start + hashes.length(ofBlock: block))]))
            }
        }
        return hashes.digest()
    }

    private var layout: Message { .diskLayout(DiskLayout(diskID: 1, sizeBytes: UInt64(disk.count), blockSize: UInt32(blockSize), name: "fake")) }

    /// The bulk copy of the whole disk (one frame) and its round end.
    private func bulk(_ peer: FakePeer) -> [FakePeer.Step] {
        [.send(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: UInt32(disk.count))]),
                                        payload: peer.payload(disk)))),
         .send(.roundEnd(RoundEnd(stream: .disk, streamID: 1, round: 0, itemsSent: UInt64(disk.count / blockSize),
                                  bytesSent: UInt64(disk.count), dirtyRemaining: 0)))]
    }

    /// The offer: switchover (pre-copy), an empty final round, and `complete` with `digest`.
    private func offer(digest: Wire.Digest) -> [FakePeer.Step] {
        [.send(.switchover(Switchover(finalRound: 1, mode: [], diskBytesToCome: 0, memoryPagesToCome: 0, vmStateLength: 0))),
         .send(.roundEnd(RoundEnd(stream: .disk, streamID: 1, round: 1, itemsSent: 0, bytesSent: 0, dirtyRemaining: 0))),
         .send(.complete(Wire.Completion(digests: [StreamDigest(stream: .disk, streamID: 1, digest: digest)])))]
    }

    // MARK: - Frames in the wrong order

    /// `complete` before any `switchover`: a protocol violation; the VM does not start.
    func testCompleteBeforeSwitchoverIsAProtocolViolationAndStartsNoVM() throws {
        let rig = try DestAgentRig()
        let peer = try rig.connect()
        try peer.run([.send(layout)] + bulk(peer) + [
            .send(.complete(Wire.Completion(digests: [StreamDigest(stream: .disk, streamID: 1, digest: rightDigest)]))),
            .expectError(.protocolViolation)])
        XCTAssertTrue(peer.lastErrorReason?.contains("switchover first") == true, "\(peer.lastErrorReason ?? "no reason")")
        try rig.checkRefusedAndNothingStarted()
    }

    /// `pageBatch` before any `memoryLayout`: a protocol violation; the VM does not start.
    func testPageBatchBeforeMemoryLayoutIsAProtocolViolationAndStartsNoVM() throws {
        let rig = try DestAgentRig()
        let peer = try rig.connect()
        let page = peer.payload(randomBytes(count: 4096, seed: 1))
        try peer.run([
            .send(.pageBatch(PageBatch(regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([.data(1)]), payload: page))),
            .expectError(.protocolViolation)])
        XCTAssertTrue(peer.lastErrorReason?.contains("memoryLayout first") == true, "\(peer.lastErrorReason ?? "no reason")")
        try rig.checkRefusedAndNothingStarted()
    }

    /// A disk id beyond the destination's `--disk` targets: `layoutMismatch`; nothing starts.
    func testDiskBeyondTheDestinationTargetsIsALayoutMismatch() throws {
        let rig = try DestAgentRig()
        let peer = try rig.connect()
        try peer.run([
            .send(.diskLayout(DiskLayout(diskID: 2, sizeBytes: UInt64(disk.count), blockSize: UInt32(blockSize), name: "second"))),
            .expectError(.layoutMismatch)])
        XCTAssertTrue(peer.lastErrorReason?.contains("disk 2") == true, "\(peer.lastErrorReason ?? "no reason")")
        try rig.checkRefusedAndNothingStarted()
    }

    // MARK: - Digests

    /// The whole disk arrives, then a `complete` whose digest is wrong: `digestMismatch`, the disk
    /// is not served and the VM not started.
    func testWrongDiskDigestIsRefusedAndNothingIsServedOrStarted() throws {
        let rig = try DestAgentRig()
        let peer = try rig.connect()
        var wrong = rightDigest.bytes
        wrong[0] ^= 0xFF
        try peer.run([.send(layout)] + bulk(peer) + offer(digest: try XCTUnwrap(Wire.Digest(wrong))) + [.expectError(.digestMismatch)])
        try rig.checkRefusedAndNothingStarted()
    }

    /// The control for the test above: the same frames with the right digest start the VM (the
    /// marker appears), the destination answers `resumed` and its own equal digest, serves the disk
    /// and holds the disk's bytes.
    func testRightDiskDigestStartsTheVMAndServesTheDisk() throws {
        let rig = try DestAgentRig()
        let peer = try rig.connect()
        // The source says goodbye after the closing digests and both close (the destination reads until then).
        let frames = try peer.run([.send(layout)] + bulk(peer) + offer(digest: rightDigest) + [.readUntil(.resumed), .readUntil(.complete),
                                                                                              .send(.ack(Ack.goodbye)), .cut])
        XCTAssertEqual(frames.lastCompletion?.digests, [StreamDigest(stream: .disk, streamID: 1, digest: rightDigest)])
        XCTAssertTrue(waitUntil(timeout: 30) { FileManager.default.fileExists(atPath: rig.marker) }, "the VM was not started: \(rig.agent.log)")
        XCTAssertTrue(rig.agent.log.contains("serving the migrated disk"), rig.agent.log)
        XCTAssertEqual(rig.agent.waitForExit(timeout: 60), 0, rig.agent.log)
        XCTAssertEqual(try SHA256Hex.of(file: rig.image), SHA256Hex.of(disk))
        let report = try E2E.report(rig.dir.file("dest.json"), log: rig.agent.log)
        XCTAssertEqual(try report.string("status"), "completed")
        XCTAssertEqual(try report.string("vm_location"), "destination")
    }

    /// After the closing digests the destination reads until the source closes, "at most 10 s"
    /// (`DestinationSession.linger`): a source that stays silent without closing (stopped, or cut
    /// off without a FIN) must not hold the destination longer than that.
    func testDestinationLingersAtMostTenSecondsForASilentSource() throws {
        let rig = try DestAgentRig()
        let peer = try rig.connect()
        try peer.run([.send(layout)] + bulk(peer) + offer(digest: rightDigest) + [.readUntil(.resumed), .readUntil(.complete)])
        let start = monotonicSeconds()
        XCTAssertEqual(rig.agent.waitForExit(timeout: 90), 0, rig.agent.log)
        let waited = monotonicSeconds() - start
        XCTAssertLessThan(waited, 20, "the destination lingered \(String(format: "%.1f", waited)) s after its closing digests for a silent source")
        withExtendedLifetime(peer) {}
    }

    // MARK: - Handshake refusals

    /// A `resume` hello for a session this destination never held: `unknownSession`, and the
    /// destination still takes a new session afterwards.
    func testResumeOfAnUnknownSessionIsRefused() throws {
        let rig = try DestAgentRig()
        XCTAssertThrowsError(try rig.connect(mode: .resume)) { error in
            guard case LinkError.peer(let code, _)? = error as? LinkError else { return XCTFail("not refused by the agent: \(error)") }
            XCTAssertEqual(code, .unknownSession)
        }
        XCTAssertTrue(rig.agent.isRunning, rig.agent.log)
        let peer = try rig.connect()
        try peer.run([.send(layout)] + bulk(peer) + offer(digest: rightDigest) + [.readUntil(.resumed)])
        XCTAssertTrue(waitUntil(timeout: 30) { FileManager.default.fileExists(atPath: rig.marker) }, rig.agent.log)
    }

    /// While a session is held (its round 0 acknowledged), a second `new` hello is refused with
    /// `busy`, and the held session goes on undisturbed to the hand-over.
    func testSecondNewSessionWhileOneIsHeldIsBusy() throws {
        let rig = try DestAgentRig()
        let first = try rig.connect()
        try first.run([.send(layout)] + bulk(first) + [.readUntil(.ack)])
        XCTAssertThrowsError(try rig.connect()) { error in
            guard case LinkError.peer(let code, _)? = error as? LinkError else { return XCTFail("not refused by the agent: \(error)") }
            XCTAssertEqual(code, .busy)
        }
        try first.run(offer(digest: rightDigest) + [.readUntil(.resumed), .readUntil(.complete), .send(.ack(Ack.goodbye)), .cut])
        XCTAssertTrue(waitUntil(timeout: 30) { FileManager.default.fileExists(atPath: rig.marker) }, rig.agent.log)
        XCTAssertEqual(rig.agent.waitForExit(timeout: 60), 0, rig.agent.log)
    }

    // MARK: - Resume points

    /// A source that reconnects (its old connection still open at the destination, as after a
    /// network partition) must resume at least from what the destination acknowledged: docs/wire.md
    /// says the helloAck's resume point is "offset = bulk bytes applied". The fake sends 1 MiB of
    /// bulk copy, sees the destination acknowledge it all, then resumes the session on a second
    /// connection.
    func testResumePointCoversEveryAcknowledgedByte() throws {
        let rig = try DestAgentRig()
        let session = SessionID.random()
        let first = try rig.connect(session: session)
        let size = 1 << 20
        let data = randomBytes(count: size, seed: 0xACED)
        let payloads = (0..<(size / disk.count)).map { index in first.payload(Array(data[(index * disk.count)..<((index + 1) * disk.count)])) }
        try first.link.send(.diskLayout(DiskLayout(diskID: 1, sizeBytes: UInt64(size), blockSize: UInt32(blockSize), name: "fake")))
        for (index, payload) in payloads.enumerated() {
            try first.link.send(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: UInt64(index * disk.count),
                                                                                                          length: UInt32(disk.count))]),
                                                         payload: payload)))
        }
        // The destination acknowledges every 0.5 s of data: resend the last frame until it has
        // acknowledged the whole megabyte.
        final class Acknowledged: @unchecked Sendable {
            private let lock = NSLock()
            private var offset: UInt64 = 0
            var value: UInt64 { lock.withLock { offset } }
            func update(_ new: UInt64) { lock.withLock { offset = max(offset, new) } }
        }
        let acked = Acknowledged()
        first.link.startReader(name: "fake-source-reader") { frame throws(LinkError) in
            if case .ack(let ack) = frame.message, ack.stream == .disk { acked.update(ack.offset) }
        }
        let last = Extent(offset: UInt64(size - disk.count), length: UInt32(disk.count))
        XCTAssertTrue(try waitUntil(timeout: 60, interval: 0.05) {
            try first.link.send(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([last]), payload: payloads.last!)))
            return acked.value >= UInt64(size)
        }, "the destination never acknowledged the bulk copy: \(rig.agent.log)")

        let second = try rig.connect(session: session, mode: .resume)
        let point = try XCTUnwrap(second.link.agreement.peerResumePoints.first { $0.stream == .disk && $0.streamID == 1 },
                                  "no resume point for disk 1: \(second.link.agreement.peerResumePoints)")
        XCTAssertGreaterThanOrEqual(point.offset, UInt64(size),
                                    "the destination acknowledged \(size) bytes of bulk copy, then offered to resume at \(point.offset): "
                                    + "the source would send \(UInt64(size) - min(point.offset, UInt64(size))) applied bytes again")
    }
}
