import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// `source-agent --disk IMG --nbd ENDPOINT` with no destination: it serves the VM's disk to real
/// NBD clients until SIGTERM, which drains in-flight requests and flushes before exit.
final class SourceServeTests: XCTestCase {
    func testServesUntilSIGTERMAndKeepsEveryAcknowledgedWrite() throws {
        let nbdsh = try require(tool: "nbdsh")
        let nbdinfo = try require(tool: "nbdinfo")
        let scratch = TemporaryDirectory(prefix: "ferry-serve")
        let image = try scratch.sparseFile("vm.img", size: 16 << 20)
        let socket = scratch.file("vm.sock")
        let agent = try E2E.Agent("source-agent", ["--disk", image, "--nbd", "unix:\(socket)"], logPath: scratch.file("agent.log"))
        XCTAssertTrue(agent.waitForLog("serving disk", timeout: 60), agent.log)

        let info = try E2E.run(nbdinfo, ["--size", "nbd+unix:///?socket=\(socket)"])
        XCTAssertEqual(info.status, 0, "\(info)")
        XCTAssertEqual(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "\(16 << 20)", "\(info)")
        let write = try E2E.run(nbdsh, ["-u", "nbd+unix:///?socket=\(socket)", "-c",
                                        "for i in range(64): h.pwrite(bytes([i]) * 65536, i * 65536)\nprint('written')"])
        XCTAssertEqual(write.status, 0, "\(write)")
        XCTAssertTrue(write.stdout.contains("written"), "\(write)")

        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(timeout: 30), 0, agent.log)
        XCTAssertTrue(agent.log.contains("draining"), agent.log)
        let contents = try Data(contentsOf: URL(fileURLWithPath: image))
        XCTAssertEqual(contents.count, 16 << 20)
        for i in 0..<64 { XCTAssertEqual(contents[i * 65536 + 100], UInt8(i), "block \(i) lost") }
        let after = try E2E.run(nbdinfo, ["--size", "nbd+unix:///?socket=\(socket)"])
        XCTAssertFalse(after.timedOut, "\(after)")
        XCTAssertNotEqual(after.status, 0, "still serving after SIGTERM: \(after)")
    }

    func testWrongOptionsGiveClearErrors() throws {
        let scratch = TemporaryDirectory(prefix: "ferry-serve")
        let missing = try E2E.Agent("source-agent", ["--disk", scratch.file("nope.img"), "--nbd", "unix:\(scratch.file("s"))"],
                                    logPath: scratch.file("a.log"))
        let missingStatus = try XCTUnwrap(missing.waitForExit(timeout: 30), "source-agent kept running with a missing image")
        XCTAssertNotEqual(missingStatus, 0)
        XCTAssertTrue(missing.log.contains("nope.img"), "the error does not name the missing image: \(missing.log)")
        let noKey = try E2E.Agent("source-agent", ["--disk", scratch.file("nope.img"), "--dest", "127.0.0.1:1"], logPath: scratch.file("b.log"))
        let noKeyStatus = try XCTUnwrap(noKey.waitForExit(timeout: 30), "source-agent kept running without --key-file")
        XCTAssertNotEqual(noKeyStatus, 0)
        XCTAssertTrue(noKey.log.contains("--key-file"), noKey.log)
    }
}
