import Foundation
import Glibc
import XCTest

/// `source-agent --disk IMG --nbd ENDPOINT` with no destination: it serves the VM's disk to real
/// NBD clients until SIGTERM, which drains in-flight requests and flushes before exit.
final class SourceServeTests: XCTestCase {
    func testServesUntilSIGTERMAndKeepsEveryAcknowledgedWrite() throws {
        try E2E.requireTool("/usr/bin/nbdsh")
        try E2E.requireTool("/usr/bin/nbdinfo")
        let scratch = E2E.Scratch()
        let image = scratch.file("vm.img")
        FileManager.default.createFile(atPath: image, contents: nil)
        truncate(image, 16 << 20)
        let socket = scratch.file("vm.sock")
        let agent = try E2E.Agent("source-agent", ["--disk", image, "--nbd", "unix:\(socket)"], logPath: scratch.file("agent.log"))
        XCTAssertTrue(agent.waitForLog("serving disk", timeout: 20), agent.log)

        let info = E2E.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///?socket=\(socket)"])
        XCTAssertEqual(info.output.trimmingCharacters(in: .whitespacesAndNewlines), "\(16 << 20)", info.output)
        let write = E2E.run("/usr/bin/nbdsh", ["-u", "nbd+unix:///?socket=\(socket)", "-c",
                                               "for i in range(64): h.pwrite(bytes([i]) * 65536, i * 65536)\nprint('written')"])
        XCTAssertTrue(write.output.contains("written"), write.output)

        agent.signal(SIGTERM)
        XCTAssertEqual(agent.waitForExit(timeout: 20), 0, agent.log)
        XCTAssertTrue(agent.log.contains("draining"), agent.log)
        let contents = try Data(contentsOf: URL(fileURLWithPath: image))
        for i in 0..<64 { XCTAssertEqual(contents[i * 65536 + 100], UInt8(i), "block \(i) lost") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: socket) && E2E.run("/usr/bin/nbdinfo", ["--size", "nbd+unix:///?socket=\(socket)"]).status == 0,
                       "still serving after SIGTERM")
    }

    func testWrongOptionsGiveClearErrors() throws {
        let scratch = E2E.Scratch()
        let missing = try E2E.Agent("source-agent", ["--disk", scratch.file("nope.img"), "--nbd", "unix:\(scratch.file("s"))"],
                                    logPath: scratch.file("a.log"))
        XCTAssertNotEqual(missing.waitForExit(timeout: 20), 0)
        XCTAssertTrue(missing.log.contains("nope.img"), "the error does not name the missing image: \(missing.log)")
        let noKey = try E2E.Agent("source-agent", ["--disk", scratch.file("nope.img"), "--dest", "127.0.0.1:1"], logPath: scratch.file("b.log"))
        XCTAssertNotEqual(noKey.waitForExit(timeout: 20), 0)
        XCTAssertTrue(noKey.log.contains("--key-file"), noKey.log)
    }
}
