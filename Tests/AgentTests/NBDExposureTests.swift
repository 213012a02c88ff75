import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// `--nbd tcp:HOST:PORT` off the loopback: both agents refuse it at start, saying why, unless
/// `--nbd-allow-remote` is given (NBD has no authentication).
final class NBDExposureTests: XCTestCase {
    func testAgentsRefuseANonLoopbackNBDEndpointWithoutTheOptIn() throws {
        let scratch = TemporaryDirectory(prefix: "ferry-exposure")
        let image = try scratch.sparseFile("vm.img", size: 1 << 20)
        let port = try freePort()
        let endpoint = "tcp:0.0.0.0:\(port)"
        let runs: [(String, [String])] = [
            ("source-agent", ["--disk", image, "--nbd", endpoint]),
            ("dest-agent", ["--listen", "127.0.0.1:\(try freePort())", "--key-file", scratch.file("none.key"),
                            "--disk", scratch.file("out.img"), "--nbd", endpoint]),
        ]
        for (index, (name, arguments)) in runs.enumerated() {
            let agent = try E2E.Agent(name, arguments, logPath: scratch.file("\(index).log"))
            let status = try XCTUnwrap(agent.waitForExit(timeout: 30), "\(name) kept running with \(endpoint): \(agent.log)")
            XCTAssertNotEqual(status, 0, agent.log)
            XCTAssertTrue(agent.log.contains("no authentication") && agent.log.contains("--nbd-allow-remote"), agent.log)
        }

        // With the opt-in the source agent serves there.
        let allowed = try E2E.Agent("source-agent", ["--disk", image, "--nbd", endpoint, "--nbd-allow-remote"],
                                    logPath: scratch.file("allowed.log"))
        XCTAssertTrue(allowed.waitForLog("serving disk", timeout: 60), allowed.log)
        allowed.signal(SIGTERM)
        XCTAssertEqual(allowed.waitForExit(timeout: 30), 0, allowed.log)
    }
}
