import FerryTestSupport
import Foundation
import XCTest
@testable import NBDBridge

/// Real NBD clients (libnbd's tools, qemu, fio) against the in-process server.
final class ClientToolTests: XCTestCase {
    func testNbdinfoReportsSizeContextsAndMap() throws {
        try require(tool: "/usr/bin/nbdinfo", package: "libnbd-bin")
        let f = try ServerFixture(size: 64 << 20) { try fillPattern($0, offset: 1 << 20, count: 1 << 20, seed: 7) }
        defer { f.stop() }
        let size = try runTool("/usr/bin/nbdinfo", ["--size", f.uri])
        XCTAssertEqual(size.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "67108864", size.stderr)
        let list = try runTool("/usr/bin/nbdinfo", ["--list", "--content", f.uri])
        XCTAssertEqual(list.status, 0, list.stderr)
        XCTAssertTrue(list.stdout.contains("base:allocation"), list.stdout)
        XCTAssertTrue(list.stdout.contains("can_multi_conn: true"), list.stdout)
        let map = try runTool("/usr/bin/nbdinfo", ["--map", f.uri])
        XCTAssertEqual(map.status, 0, map.stderr)
        let rows = map.stdout.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true) }
        // 0..1M hole, 1M..2M data, 2M..64M hole.
        XCTAssertEqual(rows.count, 3, map.stdout)
        XCTAssertEqual(rows.first?.prefix(3).joined(separator: " "), "0 1048576 3", map.stdout)
        XCTAssertEqual(rows.dropFirst().first?.prefix(3).joined(separator: " "), "1048576 1048576 0", map.stdout)
        XCTAssertEqual(rows.last?.prefix(3).joined(separator: " "), "2097152 65011712 3", map.stdout)
    }

    func testNbdcopyBothDirectionsPreservesContent() throws {
        try require(tool: "/usr/bin/nbdcopy", package: "libnbd-bin")
        let f = try ServerFixture(size: 64 << 20)
        defer { f.stop() }
        let source = try f.directory.sparseFile("source.raw", size: 64 << 20)
        for i in 0..<16 where i % 3 != 1 { try fillPattern(source, offset: UInt64(i) << 22, count: 3 << 20, seed: UInt64(i + 1)) }
        let up = try runTool("/usr/bin/nbdcopy", [source, f.uri])
        XCTAssertEqual(up.status, 0, up.stderr)
        XCTAssertEqual(try SHA256Hex.of(file: f.imagePath), try SHA256Hex.of(file: source))
        let back = f.path("back.raw")
        let down = try runTool("/usr/bin/nbdcopy", [f.uri, back])
        XCTAssertEqual(down.status, 0, down.stderr)
        XCTAssertEqual(try SHA256Hex.of(file: back), try SHA256Hex.of(file: source))
        XCTAssertGreaterThan(f.server.stats.snapshot.connectionsAccepted, 1, "nbdcopy should use multi-conn")
    }

    func testQemuImgCompareConvertAndQemuIo() throws {
        try require(tool: "/usr/bin/qemu-img", package: "qemu-utils")
        try require(tool: "/usr/bin/qemu-io", package: "qemu-utils")
        let f = try ServerFixture(size: 32 << 20) { try fillPattern($0, offset: 4096, count: 5 << 20, seed: 3) }
        defer { f.stop() }
        let qemuURI = "nbd+unix:///?socket=\(f.socketPath)"
        let copy = f.path("copy.qcow2")
        let convert = try runTool("/usr/bin/qemu-img", ["convert", "-f", "raw", "-O", "qcow2", qemuURI, copy])
        XCTAssertEqual(convert.status, 0, convert.stderr)
        let same = try runTool("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "qcow2", qemuURI, copy])
        XCTAssertEqual(same.status, 0, same.stdout + same.stderr)
        // Write through qemu-io, then the comparison must see a difference, and the pattern read back.
        let io = try runTool("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "read -P 0xab 1M 64k",
                                                    "-c", "write -z 8M 1M", "-c", "read -P 0 8M 1M", "-c", "flush", qemuURI])
        XCTAssertEqual(io.status, 0, io.stdout + io.stderr)
        XCTAssertFalse(io.stdout.contains("Pattern verification failed"), io.stdout)
        let differ = try runTool("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "qcow2", qemuURI, copy])
        XCTAssertEqual(differ.status, 1, differ.stdout + differ.stderr)
        // And convert back the other way (qcow2 -> NBD export), then they compare equal again.
        let restore = try runTool("/usr/bin/qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", copy, qemuURI])
        XCTAssertEqual(restore.status, 0, restore.stderr)
        let again = try runTool("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "qcow2", qemuURI, copy])
        XCTAssertEqual(again.status, 0, again.stdout + again.stderr)
    }

    func testFioRandomWritesIodepth32WithCrc32cVerify() throws {
        try fioVerify(inMemory: false)
    }

    /// The same on tmpfs, where reads and writes take the inline path instead of io_uring.
    func testFioVerifyOnTmpfsInlinePath() throws {
        try require(path: "/dev/shm")
        try fioVerify(inMemory: true)
    }

    private func fioVerify(inMemory: Bool) throws {
        try require(tool: "/usr/bin/fio", package: "fio")
        let f = try ServerFixture(size: 64 << 20, inMemory: inMemory)
        defer { f.stop() }
        XCTAssertEqual(f.store.memoryBacked, inMemory)
        let result = try runTool("/usr/bin/fio", [
            "--name=ferry", "--ioengine=nbd", "--uri=\(f.uri)", "--rw=randwrite", "--bs=4k", "--iodepth=32",
            "--size=16m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
        ], timeout: 60)
        XCTAssertEqual(result.status, 0, result.stdout.suffix(2000) + result.stderr)
        XCTAssertFalse(result.stderr.contains("verify"), result.stderr)
        XCTAssertGreaterThanOrEqual(f.server.stats.snapshot.bytesWritten, 16 << 20)
        XCTAssertGreaterThanOrEqual(f.server.stats.snapshot.bytesRead, 16 << 20, "fio verify reads everything back")
    }

    func testTCPListenerOnEphemeralPort() throws {
        try require(tool: "/usr/bin/nbdinfo", package: "libnbd-bin")
        try require(tool: "/usr/bin/nbdcopy", package: "libnbd-bin")
        let f = try ServerFixture(size: 8 << 20) { try fillPattern($0, offset: 0, count: 8 << 20, seed: 11) }
        defer { f.stop() }
        let bound = try f.server.listen(NBDEndpoint.parse("tcp:127.0.0.1:0"))
        try f.server.start()
        let port = try XCTUnwrap(bound.port)
        XCTAssertNotEqual(port, 0)
        let uri = "nbd://127.0.0.1:\(port)/"
        let size = try runTool("/usr/bin/nbdinfo", ["--size", uri])
        XCTAssertEqual(size.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "8388608", size.stderr)
        let out = f.path("tcp.raw")
        let copy = try runTool("/usr/bin/nbdcopy", [uri, out])
        XCTAssertEqual(copy.status, 0, copy.stderr)
        XCTAssertEqual(try SHA256Hex.of(file: out), try SHA256Hex.of(file: f.imagePath))
    }
}
