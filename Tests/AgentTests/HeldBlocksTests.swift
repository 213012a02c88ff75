import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// A destination that already holds an image of the disk (`dest-agent --disk-base`: a shared base
/// image, or what a previous migration left) is sent only the blocks whose content differs: the
/// real agents over a rate-limited relay, with the wire bytes counted.
final class HeldBlocksTests: XCTestCase {
    private static let mib = 1 << 20
    /// 32 MiB: random data in MiB 0-23, a hole in MiB 24-31.
    private static let imageMiB = 32
    private static let dataMiB = 24
    /// The MiB the base differs in (other random data): 3 of the 24.
    private static let changedMiB: Set<Int> = [2, 11, 19]
    /// A MiB where the base holds data and the source a hole (the destination must end with zeros).
    private static let baseOnlyMiB = 26

    private final class Rig {
        let dir = TemporaryDirectory(prefix: "ferry-held")
        let destPort: UInt16
        let relay: E2E.Relay
        var key: String { dir.file("key") }
        var source: String { dir.file("src.img") }

        init(linkBytesPerSecond: Double) throws {
            destPort = try freePort()
            relay = try E2E.Relay(targetPort: destPort, bytesPerSecond: linkBytesPerSecond)
            try writeKeyFile(at: dir.file("key"))
            try HeldBlocksTests.writeImage(source, base: false)
        }

        deinit { relay.stop() }

        /// One migration to `destination` (with `base`); with `writer`, fio writes through the source's
        /// NBD server meanwhile; `during` runs once the source-agent started.
        func run(destination: String, base: String?, writer: Bool = false,
                 during: (E2E.Agent) throws -> Void = { _ in }) throws -> (source: [String: Any], dest: [String: Any]) {
            var extra: [String] = []
            if let base { extra += ["--disk-base", base] }
            let dest = try E2E.Agent("dest-agent", ["--listen", "127.0.0.1:\(destPort)", "--key-file", key, "--disk", destination,
                                                    "--nbd", "unix:\(dir.file("dst.sock"))", "--report", dir.file("dst.json"),
                                                    "--exit-after-migration", "--link-timeout", "20", "--log-level", "debug"] + extra,
                                     logPath: dir.file("dest.log"))
            guard dest.waitForLog("waiting for the source", timeout: 60) else { throw SupportError("dest-agent never listened: \(dest.log)") }
            let source = try E2E.Agent("source-agent", ["--disk", self.source, "--nbd", "unix:\(dir.file("src.sock"))",
                                                        "--dest", "127.0.0.1:\(relay.port)", "--key-file", key, "--block-size", "65536",
                                                        "--report", dir.file("src.json"), "--exit-after-migration", "--log-level", "debug",
                                                        "--link-timeout", "20"] + (writer ? ["--migrate-on-signal"] : []),
                                       logPath: dir.file("src.log"))
            var fio: ChildProcess?
            if writer {
                guard source.waitForLog("the migration starts on SIGUSR2", timeout: 60) else { throw SupportError("source-agent never served: \(source.log)") }
                // 4 KiB random writes at 64 KB/s into MiB 8-23, from a second before the migration on:
                // blocks the base held that the VM changed before or during the bulk copy, which must go as data.
                fio = try ChildProcess(try require(tool: "fio"), ["--name=w", "--ioengine=nbd", "--uri=nbd+unix:///?socket=\(dir.file("src.sock"))",
                                                                  "--rw=randwrite", "--bs=4k", "--rate=64k", "--time_based", "--runtime=60",
                                                                  "--offset=8m", "--size=16m", "--output-format=json", "--output=\(dir.file("fio.json"))"],
                                       environment: E2E.toolEnvironment, stdout: .file(dir.file("fio.log")), stderr: .file(dir.file("fio.log")))
                usleep(1_000_000)
                source.signal(SIGUSR2)
            }
            try during(source)
            XCTAssertEqual(source.waitForExit(timeout: 120), 0, "source-agent failed:\n\(source.log)")
            XCTAssertEqual(dest.waitForExit(timeout: 30), 0, "dest-agent failed:\n\(dest.log)")
            if let fio {
                _ = fio.wait(timeout: 60)
                let text = (try? String(contentsOfFile: dir.file("fio.json"), encoding: .utf8)) ?? ""
                let json = text.firstIndex(of: "{").map { String(text[$0...]) } ?? ""
                let jobs = (try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["jobs"] as? [[String: Any]]
                let written = ((jobs?.first?["write"] as? [String: Any])?["io_bytes"] as? NSNumber)?.intValue ?? 0
                XCTAssertGreaterThan(written, 32 << 10, "fio wrote (almost) nothing: \(text.prefix(1500))")
            }
            _ = waitUntil(timeout: 10) { FileManager.default.fileExists(atPath: dir.file("src.json")) && FileManager.default.fileExists(atPath: dir.file("dst.json")) }
            return (try E2E.report(dir.file("src.json"), log: source.log), try E2E.report(dir.file("dst.json"), log: dest.log))
        }
    }

    /// The test image (`base` false) or its base (`base` true: three MiB of other data, and data
    /// in a MiB that is a hole in the image).
    private static func writeImage(_ path: String, base: Bool) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SupportError("open \(path): errno \(errno)") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(imageMiB * mib)) == 0 else { throw SupportError("ftruncate \(path): errno \(errno)") }
        var chunks = Array(0..<dataMiB).map { (at: $0, seed: 0x4E1D_0000 + UInt64($0)) }
        if base {
            chunks = chunks.map { changedMiB.contains($0.at) ? ($0.at, $0.seed ^ 0xBA5E) : $0 }
            chunks.append((baseOnlyMiB, 0xBA5E_0001))
        }
        for chunk in chunks {
            let bytes = randomBytes(count: mib, seed: chunk.seed)
            let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(chunk.at * mib)) }
            guard written == mib else { throw SupportError("pwrite \(path): errno \(errno)") }
        }
    }

    /// Checks a completed migration with equal images; returns the bytes the destination took from
    /// its base, the data bytes sent, and the source's wire bytes. Without a link cut, the source
    /// left out exactly what the destination took (after one, it may have sent held extents that were lost).
    private func check(_ reports: (source: [String: Any], dest: [String: Any]), destination: String, source: String,
                       cut: Bool = false) throws -> (held: Int, sent: Int, wire: Int) {
        XCTAssertEqual(try reports.source.string("status"), "completed", "\(reports.source)")
        XCTAssertEqual(reports.source["digests_agree"] as? Bool, true)
        XCTAssertEqual(try SHA256Hex.of(file: source), try SHA256Hex.of(file: destination), "the images differ")
        let disk = try reports.source.object("disk")
        let held = try reports.dest.object("disk").integer("held")
        if cut {
            XCTAssertLessThanOrEqual(held, try disk.integer("held"), "the destination took more from its base than the source left out")
        } else {
            XCTAssertEqual(try disk.integer("held"), held, "the destination took other blocks from its base than the source left out")
        }
        return (held, try disk.integer("transferred"), try reports.source.integer("wire_bytes"))
    }

    /// A separate base image (a shared base, or a copy of an older state), a writer changing blocks
    /// meanwhile, and the link cut during the bulk copy: only the 3 MiB that differ and what the VM
    /// writes are sent; the base-only data becomes a hole; the images end equal and the base unchanged.
    func testASeparateBaseImageIsNotSentAgainUnderAWriterAndALinkCut() throws {
        try writerAndCut(inPlace: false)
    }

    /// The same with the image itself as its base: after the cut, the blocks the source sent as
    /// data are never left out again (the destination overwrote what it reported), the others may be.
    func testTheImageItselfAsItsBaseUnderAWriterAndALinkCut() throws {
        try writerAndCut(inPlace: true)
    }

    private func writerAndCut(inPlace: Bool) throws {
        try require(tool: "fio")
        let rig = try Rig(linkBytesPerSecond: 4e6)
        let destination = rig.dir.file("dst.img")
        let base = inPlace ? destination : rig.dir.file("base.img")
        try Self.writeImage(base, base: true)
        let baseDigest = try SHA256Hex.of(file: base)
        let reports = try rig.run(destination: destination, base: base, writer: true) { source in
            XCTAssertTrue(source.waitForLog("bulk copy started", timeout: 60), source.log)
            XCTAssertTrue(waitUntil(timeout: 60) { rig.relay.bytesToTarget >= 1 << 20 }, "1 MiB never reached the destination")
            // The source may have sent its whole bulk copy into the buffers by now; the destination has not got it.
            XCTAssertLessThan(rig.relay.bytesToTarget, 2 << 20, "the cut came after the bulk copy's data arrived")
            rig.relay.cut()
            XCTAssertTrue(source.waitForLog("link resumed", timeout: 60), "no resume after the cut:\n\(source.log)")
        }
        let (held, sent, wire) = try check(reports, destination: destination, source: rig.source, cut: true)
        if !inPlace { XCTAssertEqual(try SHA256Hex.of(file: base), baseDigest, "the base image changed") }
        XCTAssertGreaterThanOrEqual(try reports.source.integer("reconnects"), 1)
        // 21 MiB held, less what the writer changed before the bulk copy reached it (sent as data),
        // some of it twice (resent after the cut).
        XCTAssertGreaterThan(held, 12 * Self.mib, "too few blocks were taken from the base: \(reports.source)")
        let rounds = try reports.source.object("disk").integers("blocks_per_round")
        XCTAssertGreaterThan(rounds.dropFirst().reduce(0, +), 0, "the writer's blocks were never sent again: \(rounds)")
        XCTAssertLessThan(wire, Self.dataMiB * Self.mib / 2, "the wire carried more than half the data: \(reports.source)")
        print("\(inPlace ? "image as its own base" : "separate base") under a writer and a link cut: \(held >> 10) KiB taken from the base, "
              + "\(sent >> 10) KiB sent as data, \(wire >> 10) KiB on the wire for \(Self.dataMiB << 10) KiB of data "
              + "(\(String(format: "%.3f", Double(wire) / Double(Self.dataMiB * Self.mib)))), rounds \(rounds)")
    }

    /// The image a previous migration left, kept in place (`--disk-base` naming the `--disk`):
    /// exactly the 21 unchanged MiB are held; the 3 changed ones and the hole come.
    func testTheImageItselfAsItsBaseIsKeptAndCompleted() throws {
        let rig = try Rig(linkBytesPerSecond: 16e6)
        let destination = rig.dir.file("dst.img")
        try Self.writeImage(destination, base: true)
        let reports = try rig.run(destination: destination, base: destination)
        let (held, sent, wire) = try check(reports, destination: destination, source: rig.source)
        XCTAssertEqual(held, (Self.dataMiB - Self.changedMiB.count) * Self.mib, "\(reports.source)")
        XCTAssertEqual(sent, Self.changedMiB.count * Self.mib, "\(reports.source)")
        XCTAssertLessThan(wire, 4 * Self.mib, "\(reports.source)")
        print("image as its own base: \(held >> 10) KiB held, \(sent >> 10) KiB sent, \(wire >> 10) KiB on the wire")
    }

    /// The same migration without a base: everything is sent (the control for the two above).
    func testWithoutABaseEverythingIsSent() throws {
        let rig = try Rig(linkBytesPerSecond: 64e6)
        let destination = rig.dir.file("dst.img")
        try Self.writeImage(destination, base: true)
        let reports = try rig.run(destination: destination, base: nil)
        let (held, sent, _) = try check(reports, destination: destination, source: rig.source)
        XCTAssertEqual(held, 0)
        XCTAssertEqual(sent, Self.dataMiB * Self.mib)
    }
}
