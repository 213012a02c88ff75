import Foundation
import Glibc
import XCTest

/// The WAN emulation (scripts/wan/wan-link.sh: two network namespaces, a veth pair shaped by tc
/// tbf, a delay relay) carries a real disk migration, as the benchmark uses it. Needs root.
final class WanLinkTests: XCTestCase {
    private var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    func testDiskMigrationAcrossTheEmulatedWAN() throws {
        try E2E.requireTool("/usr/sbin/ip")
        try E2E.requireTool("/usr/sbin/tc")
        guard getuid() == 0 else {
            let reason = "network namespaces need root"
            if ProcessInfo.processInfo.environment["FERRY_REQUIRE_ALL"] == "1" { XCTFail("required by FERRY_REQUIRE_ALL=1: \(reason)") }
            print("skipping: \(reason)")
            throw XCTSkip(reason)
        }
        let wan = repositoryRoot.appendingPathComponent("scripts/wan/wan-link.sh").path
        let name = "ft\(getpid() % 10000)"
        let up = E2E.run("/bin/bash", [wan, "up", name, "100", "20", "7391", "6391"], timeout: 30)
        defer { _ = E2E.run("/bin/bash", [wan, "down", name], timeout: 30) }
        XCTAssertEqual(up.status, 0, up.output)
        let relay = up.output.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(relay.hasSuffix(":6391"), "wan-link.sh printed no relay address: \(up.output)")

        let scratch = E2E.Scratch()
        FileManager.default.createFile(atPath: scratch.file("key"), contents: Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        let image = scratch.file("src.img")
        let random = try XCTUnwrap(FileHandle(forReadingAtPath: "/dev/urandom")).readData(ofLength: 8 << 20)
        FileManager.default.createFile(atPath: image, contents: random)
        truncate(image, 24 << 20)      // 8 MiB of data, then a hole
        let bin = E2E.Agent.productsDirectory.path
        let dest = try E2E.Agent("/bin/bash", [wan, "dst", name, "\(bin)/dest-agent", "--listen", "127.0.0.1:7391",
                                               "--key-file", scratch.file("key"), "--disk", scratch.file("dst.img"),
                                               "--nbd", "unix:\(scratch.file("dst.sock"))", "--exit-after-migration"],
                                 logPath: scratch.file("dest.log"), absolute: true)
        usleep(300_000)
        let source = try E2E.Agent("/bin/bash", [wan, "src", name, "\(bin)/source-agent", "--disk", image,
                                                 "--nbd", "unix:\(scratch.file("src.sock"))", "--dest", relay,
                                                 "--key-file", scratch.file("key"), "--exit-after-migration",
                                                 "--report", scratch.file("src.json")],
                                   logPath: scratch.file("src.log"), absolute: true)
        XCTAssertEqual(source.waitForExit(timeout: 60), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 20), 0, dest.log)
        XCTAssertEqual(E2E.sha256(image), E2E.sha256(scratch.file("dst.img")))
        let report = (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: scratch.file("src.json"))))) as? [String: Any] ?? [:]
        // 8 MiB of data over a 100 Mbit/s link take at least 671 ms: the shaping must show
        // (over loopback the same copy takes about 50 ms).
        let total = report["total_time_ms"] as? Double ?? 0
        XCTAssertGreaterThan(total, 640, "the link was not shaped: \(report)")
        print("across the emulated WAN: \(total) ms total, downtime \(report["downtime_ms"] ?? 0) ms")
    }
}
