import FerryTestSupport
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
        try require(tool: "/usr/sbin/ip", package: "iproute2")
        try require(tool: "/usr/sbin/tc", package: "iproute2")
        try require(root: "network namespaces")
        let wan = repositoryRoot.appendingPathComponent("scripts/wan/wan-link.sh").path
        let name = "ft\(getpid() % 10000)"
        let up = try E2E.run("/bin/bash", [wan, "up", name, "100", "20", "7391", "6391"], timeout: 60)
        defer { _ = try? E2E.run("/bin/bash", [wan, "down", name], timeout: 60) }
        XCTAssertEqual(up.status, 0, "\(up)")
        let relay = try XCTUnwrap(up.stdout.split(separator: "\n").last.map(String.init), "wan-link.sh printed nothing: \(up)")
        XCTAssertTrue(relay.hasSuffix(":6391"), "wan-link.sh printed no relay address: \(up)")

        let scratch = TemporaryDirectory(prefix: "ferry-wan")
        try writeKeyFile(at: scratch.file("key"))
        let image = scratch.file("src.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: Data(randomBytes(count: 8 << 20, seed: 0x3A4))))
        XCTAssertEqual(truncate(image, 24 << 20), 0)      // 8 MiB of data, then a hole
        let bin = E2E.Agent.productsDirectory.path
        let dest = try E2E.Agent("/bin/bash", [wan, "dst", name, "\(bin)/dest-agent", "--listen", "127.0.0.1:7391",
                                               "--key-file", scratch.file("key"), "--disk", scratch.file("dst.img"),
                                               "--nbd", "unix:\(scratch.file("dst.sock"))", "--exit-after-migration"],
                                 logPath: scratch.file("dest.log"), absolute: true)
        XCTAssertTrue(dest.waitForLog("waiting for the source", timeout: 60), "dest-agent never listened: \(dest.log)")
        let source = try E2E.Agent("/bin/bash", [wan, "src", name, "\(bin)/source-agent", "--disk", image,
                                                 "--nbd", "unix:\(scratch.file("src.sock"))", "--dest", relay,
                                                 "--key-file", scratch.file("key"), "--exit-after-migration",
                                                 "--report", scratch.file("src.json")],
                                   logPath: scratch.file("src.log"), absolute: true)
        XCTAssertEqual(source.waitForExit(timeout: 60), 0, source.log)
        XCTAssertEqual(dest.waitForExit(timeout: 20), 0, dest.log)
        XCTAssertEqual(try SHA256Hex.of(file: image), try SHA256Hex.of(file: scratch.file("dst.img")), "the images differ")
        let report = try E2E.report(scratch.file("src.json"), log: source.log)
        // 8 MiB of data over a 100 Mbit/s link take at least 671 ms: the shaping must show
        // (over loopback the same copy takes about 50 ms).
        let total = try report.number("total_time_ms")
        XCTAssertGreaterThan(total, 640, "the link was not shaped: \(report)")
        print("across the emulated WAN: \(total) ms total, downtime \(report["downtime_ms"] ?? 0) ms")
    }
}
