import FerryTestSupport
import Foundation
import Glibc
import ProcessMemory
import Wire
import XCTest

/// The migration link against a man in the middle and a flood: whole-VM migrations by the real
/// agents through a relay that flips one bit in a disk block, a page or a digest, injects a forged
/// `error` frame, records every byte, or sees 2,000 stray and slow connections go to the
/// destination. Every change is caught by the frame seals; the link is dropped and resumed; the VM
/// runs in one place and verifies; the capture holds none of the VM's data in the clear.
final class SealedLinkTests: XCTestCase {
    /// What a completed migration shows: reports, one place for the VM, a verifying VM.
    private func checkCompleted(_ rig: WholeVMRig, reconnects: ClosedRange<Int>, file: StaticString = #filePath, line: UInt = #line) {
        let source = rig.waitForReport("source.json"), dest = rig.waitForReport("dest.json")
        XCTAssertEqual(source["status"] as? String, "completed", "\(source)\n\(rig.logs)", file: file, line: line)
        XCTAssertEqual(source["vm_location"] as? String, "destination", file: file, line: line)
        XCTAssertEqual(source["digests_agree"] as? Bool, true, file: file, line: line)
        XCTAssertEqual(dest["digests_agree"] as? Bool, true, "\(dest)", file: file, line: line)
        let count = (source["reconnects"] as? NSNumber)?.intValue ?? -1
        XCTAssertTrue(reconnects.contains(count), "reconnects \(count), expected \(reconnects)", file: file, line: line)
        // The stale copy at the source never runs again.
        if let pid = rig.workload?.pid, let state = MemE2E.state(of: pid) {
            XCTAssertEqual(state, "T", "the source resumed its copy of the VM", file: file, line: line)
        }
        rig.verifyResumed(file: file, line: line)
    }

    /// One bit flipped in the `occurrence`-th frame of `type` going to the destination.
    private func flip(_ type: MessageType, occurrence: Int, mode: String = "precopy") throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64, linkBytesPerSecond: 40e6)
        rig.relay.tamper = .init(toTarget: true, type: type.rawValue, occurrence: occurrence, action: .flipBit)
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: mode, ["--link-timeout", "30"])
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        XCTAssertTrue(rig.relay.tampered, "the relay never saw frame \(occurrence) of \(type)")
        XCTAssertTrue(rig.destLog.contains("link tampered with"), "the flipped bit was not caught:\n\(rig.destLog)")
        checkCompleted(rig, reconnects: 1...3)
    }

    func testBitFlippedInADiskBlockIsCaughtAndTheMigrationResumes() throws {
        try flip(.diskExtents, occurrence: 20)
    }

    func testBitFlippedInAPageIsCaughtAndTheMigrationResumes() throws {
        try flip(.pageBatch, occurrence: 20)
    }

    func testBitFlippedInADigestIsCaughtAndTheMigrationResumes() throws {
        try flip(.complete, occurrence: 1)
    }

    /// A forged `error(vmStartFailed)` injected towards the source right after the destination's
    /// `frame` (its `resumed`: the VM runs there; or its `complete`): were it believed before the
    /// hand-over was known, the source would resume its copy and the VM would run twice. It does
    /// not open, the link is dropped, and the reconnect's sealed verdict says where the VM runs.
    private func injectError(after frame: MessageType, mode: String) throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64, linkBytesPerSecond: 40e6)
        var forged: [UInt8] = []
        try FrameEncoder.encode(.error(ErrorMessage(code: .vmStartFailed, reason: "forged: the VM did not start, resume it")),
                                sequence: 7, appendingTo: &forged)
        rig.relay.tamper = .init(toTarget: false, type: frame.rawValue, occurrence: 1, action: .inject(forged))
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: mode, ["--link-timeout", "30"])
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        XCTAssertTrue(rig.relay.tampered, "the relay never saw the destination's \(frame)")
        XCTAssertFalse(rig.sourceLog.contains("forged"), "the forged frame was read as the destination's word:\n\(rig.sourceLog)")
        checkCompleted(rig, reconnects: 0...2)
    }

    func testErrorInjectedAfterHandOverIsCaughtAndTheVMRunsOnlyAtTheDestination() throws {
        try injectError(after: .resumed, mode: "precopy")
    }

    func testErrorInjectedAfterCompletionChangesNothing() throws {
        try injectError(after: .complete, mode: "postcopy")
    }

    /// Everything the relay carried for a whole migration holds none of the VM's memory or disk in
    /// the clear, while it does hold what travels in the clear by design (frame headers), so the
    /// search itself is shown to work.
    func testACaptureOfAWholeMigrationHoldsNoPlaintext() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64, linkBytesPerSecond: 40e6)
        // The disk: a random marker written at 8 places in its second half (the workload writes the first).
        let marker = randomBytes(count: 64, seed: 0x5EA1_ED00)
        let fd = open(rig.sourceImage, O_WRONLY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        for i in 0..<8 {
            let offset = off_t((32 << 20) + i * (4 << 20) + 1000)
            XCTAssertEqual(marker.withUnsafeBytes { pwrite(fd, $0.baseAddress, 64, offset) }, 64)
        }
        close(fd)
        // The memory: 64 bytes from the middle of 8 pages as the workload fills them (generation 1).
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 8)
        defer { page.deallocate() }
        var markers = [marker]
        for index: UInt64 in [3, 1001, 2002, 4003, 8004, 10005, 14006, 16000] {
            WorkloadPattern.fill(page, index: index, generation: 1)
            markers.append(Array(UnsafeRawBufferPointer(start: page + 2048, count: 64)))
        }
        // The search works: a challenge frame's header travels in the clear (length 32, version 2, type 4).
        markers.append([32, 0, 0, 0, FrameHeader.currentVersion, MessageType.challenge.rawValue, 0, 0])
        try rig.startDest()
        rig.relay.watch(for: markers)
        try rig.startSourceAndWorkload(mode: "precopy", ["--link-timeout", "30"])
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        checkCompleted(rig, reconnects: 0...0)
        let sightings = rig.relay.sightings
        XCTAssertEqual(Array(sightings.dropLast()), [Int](repeating: 0, count: markers.count - 1), "the VM's data crossed the link in the clear")
        XCTAssertGreaterThanOrEqual(sightings.last ?? 0, 1, "the capture search did not even find the clear challenge header")
        // The marker did reach the destination's disk, through the seals.
        let image = try XCTUnwrap(FileManager.default.contents(atPath: rig.destImage))
        XCTAssertNotNil(image.range(of: Data(marker)), "the marker never reached the destination")
    }

    /// 2,000 connections to the destination during a migration, 250 at a time: silent ones,
    /// HTTP garbage, slow-loris hellos that trickle a byte every 100 ms, and ones closed at once;
    /// with a 3 s link outage in the middle, so the source must get its reconnect through the crowd.
    func testTwoThousandStrayAndSlowConnectionsDuringAMigration() throws {
        let rig = try WholeVMRig(memoryMiB: 64, diskMiB: 64, linkBytesPerSecond: 10e6)
        try rig.startDest()
        try rig.startSourceAndWorkload(mode: "precopy", ["--link-timeout", "60"])
        XCTAssertTrue(rig.waitForSourceLog("bulk copy started", timeout: 60), rig.logs)
        let flood = Flood(port: rig.destPort)
        let done = DispatchSemaphore(value: 0)
        Thread { flood.run(total: 2000, atOnce: 250); done.signal() }.start()
        usleep(3_000_000)
        rig.relay.outage(seconds: 3)
        XCTAssertEqual(done.wait(timeout: .now() + 240), .success, "the flood did not end")
        XCTAssertEqual(rig.waitForSource(timeout: 300), 0, rig.logs)
        XCTAssertEqual(flood.opened, 2000, "the flood opened \(flood.opened) connections")
        XCTAssertTrue(rig.destLog.contains("refused a connection"), "the flood was not even seen:\n\(rig.destLog)")
        checkCompleted(rig, reconnects: 1...5)
    }
}

/// Many connections to a port, in waves: silent, garbage, slow-loris, closed at once.
private final class Flood: @unchecked Sendable {
    let port: UInt16
    private(set) var opened = 0
    init(port: UInt16) { self.port = port }

    func run(total: Int, atOnce: Int) {
        var hello: [UInt8] = []
        try? FrameEncoder.encode(.hello(Hello(role: .source, features: [.disk], sessionID: .random(), nonce: .random())), appendingTo: &hello)
        var index = 0
        while index < total {
            var wave: [(fd: Int32, kind: Int)] = []
            for _ in 0..<min(atOnce, total - index) {
                guard let fd = connectToLoopback(port: port) else { continue }
                opened += 1
                let kind = index % 4
                index += 1
                switch kind {
                case 1: _ = "GET / HTTP/1.0\r\n\r\n".withCString { send(fd, $0, 18, Int32(MSG_NOSIGNAL)) }
                case 3: close(fd); continue
                default: break
                }
                wave.append((fd, kind))
            }
            // Slow-loris: a byte of a real hello every 100 ms for 2 s from each, the others silent.
            for step in 0..<20 {
                for (fd, kind) in wave where kind == 2 {
                    _ = hello.withUnsafeBytes { send(fd, $0.baseAddress! + step, 1, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                }
                usleep(100_000)
            }
            for (fd, _) in wave { close(fd) }
        }
    }
}
