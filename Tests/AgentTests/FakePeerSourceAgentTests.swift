import FerryTestSupport
import Foundation
import Glibc
import MigrationEngine
import Wire
import XCTest

/// A fake destination (``FakePeer`` behind a ``FakeListener``) against the REAL source-agent, which
/// migrates a small disk and a small "VM" (`ferry-workload` with 4 MiB of memory that it dirties only
/// on command). These tests prove the hand-over rule (docs/wire.md, "Hand-over"): before the
/// destination says `resumed`, an `error` from it gives the VM back to the source, which resumes it;
/// a link cut between `switchover` and `resumed` does NOT: the source reconnects and the
/// destination's answer settles it (`resumed`: the VM runs there and never again at the source;
/// `ack`: the offer is made again).
final class FakeDestinationVersusSourceAgentTests: XCTestCase {
    /// A real source-agent, its VM and disk, and the fake destination's listening socket.
    private final class SourceAgentRig {
        let dir = TemporaryDirectory(prefix: "ferry-fake-dest")
        let key: SharedKey
        let listener: FakeListener
        let vm: ChildProcess
        let agent: E2E.Agent

        /// `diskMiB` of random data; a VM-state blob of `stateBytes` (sent after `switchover`).
        init(diskMiB: Int = 1, stateBytes: Int = 0) throws {
            try MemE2E.requireMemoryMigration()
            try writeKeyFile(at: dir.file("key"))
            key = try SharedKey(contentsOf: dir.file("key"))   // as the agent reads it (a trailing newline byte is not part of the key)
            listener = try FakeListener()
            let image = dir.file("src.img")
            guard FileManager.default.createFile(atPath: image, contents: Data(randomBytes(count: diskMiB << 20, seed: 0x5A5A))) else {
                throw SupportError("cannot write \(image)")
            }
            vm = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "4M", "--dirty-rate", "0", "--report-interval", "1"])
            try vm.waitFor(event: "ready", timeout: 60)
            var arguments = ["--disk", image, "--vm", "\(vm.pid)", "--dest", "127.0.0.1:\(listener.port)", "--key-file", dir.file("key"),
                             "--block-size", "4096", "--report", dir.file("source.json"), "--exit-after-migration",
                             "--link-timeout", "5", "--log-level", "debug"]
            if stateBytes > 0 { arguments += ["--state-cmd", "head -c \(stateBytes) /dev/zero > \"$FERRY_STATE_FILE\""] }
            agent = try E2E.Agent("source-agent", arguments, logPath: dir.file("source.log"))
        }

        /// The fake destination answers the source-agent's next connection; `handedOver` is its
        /// answer to a resume (`resumed` if true, `ack` if not).
        func accept(handedOver: Bool = false) throws -> FakePeer {
            try listener.accept(key: key, while: { self.agent.isRunning }) { _ in
                .init(features: FakePeer.destinationFeatures, handedOver: handedOver)
            }
        }

        /// Whether the VM is stopped (SIGSTOP, or a tracing stop while the source's tracker holds it).
        var vmStopped: Bool { MemE2E.isStopped(vm.pid) }

        /// The source-agent's exit status (it was started with --exit-after-migration).
        func exitStatus(file: StaticString = #filePath, line: UInt = #line) throws -> Int32 {
            try XCTUnwrap(agent.waitForExit(timeout: 60), "source-agent still runs:\n\(agent.log)", file: file, line: line)
        }

        func report() throws -> [String: Any] { try E2E.report(dir.file("source.json"), log: agent.log) }

        /// Waits (generously) until the source-agent's log has `text`.
        func source(waitsFor text: String) -> Bool { agent.waitForLog(text, timeout: 60) }

        /// The VM runs at the source: it leaves the stopped state and answers a command.
        func checkVMRuns(file: StaticString = #filePath, line: UInt = #line) throws {
            XCTAssertTrue(waitUntil(timeout: 30) { !vmStopped && MemE2E.state(of: vm.pid) != nil },
                          "the VM is not running at the source: state \(String(describing: MemE2E.state(of: vm.pid)))", file: file, line: line)
            _ = try vm.drainReports()
            vm.send("write 1 2")
            let written = try vm.waitFor(event: "written", timeout: 30)
            XCTAssertEqual(try written.integer("count", file: file, line: line), 2, file: file, line: line)
        }
    }

    private func error(_ code: ErrorCode) -> Message { .error(ErrorMessage(code: code, reason: "fake destination refuses: \(code)")) }

    // MARK: - An error before hand-over: the VM runs at the source

    /// The destination refuses with `code` after the whole offer (switchover, final data,
    /// `complete`): the source resumes its paused VM, reports it at the source, and does not
    /// reconnect (an explicit refusal is not a dropped link).
    private func refuseAfterTheOffer(_ code: ErrorCode, file: StaticString = #filePath, line: UInt = #line) throws {
        let rig = try SourceAgentRig()
        let peer = try rig.accept()
        let offer = try peer.run([.readUntil(.switchover), .readUntil(.complete)])
        XCTAssertNotNil(offer.lastCompletion, file: file, line: line)
        XCTAssertTrue(rig.vmStopped, "the VM is not paused once offered", file: file, line: line)
        try peer.run([.send(error(code))])
        XCTAssertEqual(try rig.exitStatus(file: file, line: line), 1, rig.agent.log, file: file, line: line)
        let report = try rig.report()
        XCTAssertEqual(try report.string("status", file: file, line: line), "failed", file: file, line: line)
        XCTAssertEqual(try report.string("vm_location", file: file, line: line), "source", "\(report)", file: file, line: line)
        XCTAssertTrue(try report.string("reason", file: file, line: line).contains("\(code)"), "\(report)", file: file, line: line)
        try rig.checkVMRuns(file: file, line: line)
        XCTAssertFalse(rig.agent.log.contains("reconnecting"), "the source took a refusal for a dropped link:\n\(rig.agent.log)", file: file, line: line)
        XCTAssertFalse(rig.listener.hasPendingConnection, "the source reconnected after a refusal", file: file, line: line)
    }

    func testVMStartFailedAfterTheOfferResumesTheVMAtTheSource() throws { try refuseAfterTheOffer(.vmStartFailed) }
    func testStorageFailureAfterTheOfferResumesTheVMAtTheSource() throws { try refuseAfterTheOffer(.storageFailure) }
    func testDigestMismatchAfterTheOfferResumesTheVMAtTheSource() throws { try refuseAfterTheOffer(.digestMismatch) }
    func testLayoutMismatchAfterTheOfferResumesTheVMAtTheSource() throws { try refuseAfterTheOffer(.layoutMismatch) }

    /// The destination refuses with `code` during the bulk copy, while the source is sending (the
    /// fake stops reading after the disk's layout, so the source's send is blocked when the error
    /// arrives): the VM never stops, the migration is abandoned at once with the destination's
    /// reason, and the source does not reconnect.
    private func refuseDuringTheBulkCopy(_ code: ErrorCode, file: StaticString = #filePath, line: UInt = #line) throws {
        let rig = try SourceAgentRig(diskMiB: 32)
        let peer = try rig.accept()
        try peer.run([.readUntil(.diskLayout), .send(error(code))])
        XCTAssertEqual(try rig.exitStatus(file: file, line: line), 1, rig.agent.log, file: file, line: line)
        XCTAssertFalse(rig.agent.log.contains("VM paused"), "the VM was paused:\n\(rig.agent.log)", file: file, line: line)
        let report = try rig.report()
        XCTAssertEqual(try report.string("vm_location", file: file, line: line), "source", "\(report)", file: file, line: line)
        try rig.checkVMRuns(file: file, line: line)
        XCTAssertTrue(try report.string("reason", file: file, line: line).contains("\(code)"),
                      "the report does not give the destination's reason (\(code)): \(report)", file: file, line: line)
        XCTAssertFalse(rig.agent.log.contains("reconnecting"), "the source took a refusal for a dropped link:\n\(rig.agent.log)", file: file, line: line)
    }

    func testStorageFailureDuringTheBulkCopyLeavesTheVMRunningAndAborts() throws { try refuseDuringTheBulkCopy(.storageFailure) }
    func testDigestMismatchDuringTheBulkCopyLeavesTheVMRunningAndAborts() throws { try refuseDuringTheBulkCopy(.digestMismatch) }
    func testLayoutMismatchDuringTheBulkCopyLeavesTheVMRunningAndAborts() throws { try refuseDuringTheBulkCopy(.layoutMismatch) }

    /// The destination refuses (`storageFailure`) right after `switchover`, while the source is
    /// still sending the offer (a 32 MiB VM state the fake does not read): no `resumed` came, so the
    /// VM is the source's and it must resume it. Leaving it paused and reconnecting would leave the
    /// VM nowhere: a destination that refused does not come back.
    func testStorageFailureWhileTheOfferIsSentResumesTheVMAtTheSource() throws {
        let rig = try SourceAgentRig(stateBytes: 32 << 20)
        let peer = try rig.accept()
        try peer.run([.readUntil(.switchover)])
        XCTAssertTrue(rig.vmStopped, "the VM is not paused once offered")
        try peer.run([.send(error(.storageFailure))])
        let status = rig.agent.waitForExit(timeout: 60)
        XCTAssertEqual(status, 1, "source-agent did not give the VM back after the refusal:\n\(rig.agent.log)")
        XCTAssertFalse(rig.listener.hasPendingConnection, "the source reconnected after a refusal:\n\(rig.agent.log)")
        guard status != nil else { return }
        let report = try rig.report()
        XCTAssertEqual(try report.string("vm_location"), "source", "\(report)")
        XCTAssertTrue(try report.string("reason").contains("storageFailure"), "\(report)")
        try rig.checkVMRuns()
    }

    // MARK: - A cut between switchover and resumed: only the destination settles it

    /// The link is cut after the whole offer and before `resumed`. The source must not resume its
    /// VM on its own (the destination may run it): it stays stopped while the source reconnects.
    /// The destination answers the reconnect with `resumed` (the VM runs there): the source never
    /// offers again, sends its closing digests, completes, reports the VM at the destination, and
    /// its copy stays stopped.
    func testCutAfterTheOfferThenHandedOverNeverResumesTheVMAtTheSource() throws {
        let rig = try SourceAgentRig()
        let first = try rig.accept()
        let offer = try first.run([.readUntil(.switchover), .readUntil(.complete), .cut])
        let digests = try XCTUnwrap(offer.lastCompletion)
        XCTAssertTrue(rig.source(waitsFor: "link lost; reconnecting"), "the source did not treat the cut as a dropped link:\n\(rig.agent.log)")
        XCTAssertTrue(rig.vmStopped, "the source resumed its VM after a cut between switchover and resumed:\n\(rig.agent.log)")

        let second = try rig.accept(handedOver: true)
        XCTAssertEqual(second.link.agreement.mode, .resume)
        XCTAssertEqual(second.link.agreement.sessionID, first.link.agreement.sessionID)
        let after = try second.run([.readUntil(.complete)])
        XCTAssertEqual(after.count(of: .switchover), 0, "the source offered the VM again though the destination runs it")
        XCTAssertEqual(after.lastCompletion, digests, "the closing digests changed")
        try second.run([.send(.complete(digests))])

        XCTAssertEqual(try rig.exitStatus(), 0, rig.agent.log)
        let report = try rig.report()
        XCTAssertEqual(try report.string("status"), "completed", "\(report)")
        XCTAssertEqual(try report.string("vm_location"), "destination", "\(report)")
        XCTAssertEqual(try report.integer("reconnects"), 1, "\(report)")
        XCTAssertEqual(MemE2E.state(of: rig.vm.pid), "T", "the VM's stale copy at the source is not stopped")
    }

    /// The same cut, but the destination answers the reconnect with `ack` (the VM does not run
    /// there): the VM stays stopped at the source and the whole offer comes again (a second
    /// `switchover`, then `complete`); `resumed` then hands it over.
    func testCutAfterTheOfferThenNotHandedOverOffersAgain() throws {
        let rig = try SourceAgentRig()
        let first = try rig.accept()
        try first.run([.readUntil(.switchover), .readUntil(.complete), .cut])
        XCTAssertTrue(rig.source(waitsFor: "link lost; reconnecting"), "the source did not treat the cut as a dropped link:\n\(rig.agent.log)")
        XCTAssertTrue(rig.vmStopped, "the source resumed its VM after a cut between switchover and resumed:\n\(rig.agent.log)")

        let second = try rig.accept(handedOver: false)
        XCTAssertEqual(second.link.agreement.mode, .resume)
        let again = try second.run([.readUntil(.switchover), .readUntil(.complete)])
        XCTAssertEqual(again.count(of: .switchover), 1, "the offer did not come again")
        XCTAssertTrue(rig.vmStopped, "the VM runs at the source while it is offered")
        let digests = try XCTUnwrap(again.lastCompletion)
        try second.run([.send(.resumed(VMResumed(sinceSwitchoverNanoseconds: 1_000_000))), .send(.complete(digests))])

        XCTAssertEqual(try rig.exitStatus(), 0, rig.agent.log)
        let report = try rig.report()
        XCTAssertEqual(try report.string("status"), "completed", "\(report)")
        XCTAssertEqual(try report.string("vm_location"), "destination", "\(report)")
        XCTAssertEqual(MemE2E.state(of: rig.vm.pid), "T", "the VM's stale copy at the source is not stopped")
    }
}
