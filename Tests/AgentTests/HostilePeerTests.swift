import CZstd
import FerryTestSupport
import Foundation
import Glibc
@testable import MigrationEngine
import Wire
import XCTest

/// Hostile values from an AUTHENTICATED peer: a scripted source and a scripted destination
/// (``FakePeer``) that hold the key and speak valid, sealed frames whose contents are hostile:
/// sizes near 2^64, ranges that overflow, overlap or leave the disk, a huge VM-state length, a
/// second layout or switchover, frames of the wrong phase, fetches past the end, floods of acks.
/// Each runs against a REAL agent process, and each proves the same four things:
///
/// - the agent answers with a clean `error(protocolViolation)` (or the precise code named) and
///   closes: its exit status is 1, never a signal (a Swift overflow trap is SIGILL/SIGTRAP);
/// - nothing was allocated without bound: its peak resident set (its own `VmHWM`, in its report) stays
///   under ``peakLimitKiB``;
/// - nothing was written outside the image: the destination's `--disk` image does not exist when
///   the layout was refused, and otherwise has exactly the announced size and contents;
/// - before hand-over the VM runs at the source: the destination reports `vm_location: source`
///   and never ran `--on-switchover`; a source-agent's VM process is running (not stopped) after
///   the agent ended.
///
/// Two bounded fuzzers then send random sequences of such frames to fresh agents.
final class HostilePeerTests: XCTestCase {
    /// The most an agent may have resident at its peak, in KiB: a dest-agent that received a
    /// 64 KiB disk peaks near 45 MiB here, a source-agent migrating 1 MiB of disk and 4 MiB of
    /// memory near 50 MiB; a hostile value that made either allocate what it names (1 GiB of VM
    /// state, 2^40 blocks of hashes) would be far above.
    static let peakLimitKiB = 128 << 10

    // MARK: - A hostile source against a real dest-agent

    /// A real dest-agent with one `--disk` target (not created beforehand) and an
    /// `--on-switchover` that only touches a marker file.
    private final class DestRig {
        let dir = TemporaryDirectory(prefix: "ferry-hostile-source")
        let key: SharedKey
        let port: UInt16
        let agent: E2E.Agent
        var image: String { dir.file("dst.img") }
        var marker: String { dir.file("vm-started") }

        /// With `base`, the image exists beforehand with those bytes and is its own base (`--disk-base`).
        init(linkTimeout: Double = 60, base: [UInt8]? = nil) throws {
            _ = try writeKeyFile(at: dir.file("key"))
            key = try SharedKey(contentsOf: dir.file("key"))
            port = try freePort()
            if let base { try Data(base).write(to: URL(fileURLWithPath: dir.file("dst.img"))) }
            agent = try E2E.Agent("dest-agent", (base == nil ? [] : ["--disk-base", dir.file("dst.img")]) + [
                "--listen", "127.0.0.1:\(port)", "--key-file", dir.file("key"), "--disk", dir.file("dst.img"),
                "--nbd", "unix:\(dir.file("dst.sock"))", "--on-switchover", "touch \(dir.file("vm-started"))",
                "--work-dir", dir.file("work"), "--report", dir.file("dest.json"), "--accept-timeout", "60",
                "--link-timeout", "\(linkTimeout)", "--exit-after-migration", "--log-level", "debug"], logPath: dir.file("dest.log"))
            guard agent.waitForLog("waiting for the source", timeout: 60) else { throw SupportError("dest-agent never listened: \(agent.log)") }
        }

        /// A hostile source, authenticated like any other.
        func connect(features: Features = [.disk, .memory, .zeroRuns, .resume]) throws -> FakePeer {
            let peer = try FakePeer.source(port: port, key: key, features: features)
            peer.stepTimeout = 30
            return peer
        }

        /// The image's size, nil when it does not exist.
        var imageSize: UInt64? {
            var info = stat()
            return stat(image, &info) == 0 ? UInt64(info.st_size) : nil
        }
    }

    /// A 64 KiB disk of random data, 4 KiB blocks.
    private let disk = randomBytes(count: 64 << 10, seed: 0x4057_11E5)
    private let blockSize = 4096
    private var layout: Message { .diskLayout(DiskLayout(diskID: 1, sizeBytes: UInt64(disk.count), blockSize: UInt32(blockSize), name: "hostile")) }
    private static let region = Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0x7f00_0000_0000, size: 1 << 20, fileOffset: 0)
    private var memoryLayout: Message { .memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [Self.region])) }

    /// The digest the engine computes for `disk`.
    private var diskDigest: Wire.Digest {
        let hashes = BlockHashes(diskSize: UInt64(disk.count), blockSize: blockSize)
        disk.withUnsafeBytes { raw in
            for block in 0..<hashes.blockCount {
                hashes.update(block: block, contents: UnsafeRawBufferPointer(rebasing: raw[(block * blockSize)..<((block + 1) * blockSize)]))
            }
        }
        return hashes.digest()
    }

    /// Stores `value` little-endian at `offset` of a frame's metadata (for ``FakePeer/Step/sendRewritten(_:_:)``).
    private static func put<T: FixedWidthInteger>(_ value: T, at offset: Int) -> (UnsafeMutableRawBufferPointer) -> Void {
        { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }

    /// Connects a hostile source, runs `script`, expects `error(code)` with `reason` in it, and
    /// checks the refusal: ``checkRefused(_:image:file:line:)``.
    private func refuse(_ script: (FakePeer) -> [FakePeer.Step], code: ErrorCode = .protocolViolation, reason: String,
                        image: UInt64? = nil, features: Features = [.disk, .memory, .zeroRuns, .resume],
                        file: StaticString = #filePath, line: UInt = #line) throws {
        let rig = try DestRig()
        let peer = try rig.connect(features: features)
        try peer.run(script(peer) + [.expectError(code)])
        let said = peer.lastErrorReason ?? ""
        XCTAssertTrue(said.contains(reason), "the agent's reason \"\(said)\" does not say \"\(reason)\"", file: file, line: line)
        try checkRefused(rig, image: image, file: file, line: line)
    }

    /// After a refusal before hand-over: the dest-agent exits 1 (not by a signal) within its
    /// memory limit, reports the migration failed with the VM at the source, never started it or
    /// served the disk, and its image is absent (`image` nil: the layout was refused before the
    /// image was created) or exactly `image` bytes long.
    private func checkRefused(_ rig: DestRig, image: UInt64?, file: StaticString = #filePath, line: UInt = #line) throws {
        let status = rig.agent.waitForExit(timeout: 60)
        XCTAssertNil(rig.agent.child.terminatingSignal, "dest-agent was killed by signal \(rig.agent.child.terminatingSignal ?? 0):\n\(rig.agent.log)",
                     file: file, line: line)
        XCTAssertEqual(status, 1, "dest-agent did not fail cleanly:\n\(rig.agent.log)", file: file, line: line)
        Self.checkPeak(report: rig.dir.file("dest.json"), file: file, line: line)
        let report = try E2E.report(rig.dir.file("dest.json"), log: rig.agent.log)
        XCTAssertEqual(try report.string("status", file: file, line: line), "failed", file: file, line: line)
        XCTAssertEqual(try report.string("vm_location", file: file, line: line), "source", file: file, line: line)
        XCTAssertFalse(FileManager.default.fileExists(atPath: rig.marker), "the dest-agent started the VM", file: file, line: line)
        XCTAssertFalse(rig.agent.log.contains("serving the migrated disk"), "the dest-agent served the disk", file: file, line: line)
        XCTAssertEqual(rig.imageSize, image, "the image is not as the refusal must leave it (nil: absent)", file: file, line: line)
    }

    /// The agent's peak resident set (`peak_resident_bytes` of its report at `path`: its own `VmHWM`;
    /// `wait4`'s `ru_maxrss` would count this test process's memory, folded in at the agent's `exec`)
    /// stayed under ``peakLimitKiB``.
    static func checkPeak(report path: String, _ context: String = "", required: Bool = true, file: StaticString = #filePath, line: UInt = #line) {
        guard let data = FileManager.default.contents(atPath: path),
              let report = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let bytes = (report["peak_resident_bytes"] as? NSNumber)?.intValue, bytes > 0 else {
            if required { XCTFail("\(context): no peak_resident_bytes in \(path)", file: file, line: line) }
            return
        }
        XCTAssertLessThan(bytes >> 10, peakLimitKiB, "\(context): the agent's peak resident set was \(bytes >> 20) MiB", file: file, line: line)
    }

    // MARK: Compressed payloads

    /// `data` as one zstd frame.
    private static func zstd(_ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: ZSTD_compressBound(data.count))
        let n = data.withUnsafeBytes { d in out.withUnsafeMutableBytes { ZSTD_compress($0.baseAddress, $0.count, d.baseAddress, d.count, 1) } }
        return Array(out[0..<n])
    }

    private static let compressing: Features = [.disk, .memory, .zeroRuns, .resume, .compression]

    /// A compressed extent whose zstd frame holds `content`, announced as `length` data bytes at offset 0.
    private func compressedExtent(_ peer: FakePeer, content: [UInt8], length: UInt32) -> Message {
        .diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: length)]),
                                 payload: peer.payload(Self.zstd(content)), encoding: .zstd))
    }

    func testACompressedFrameOnALinkThatDidNotAgreeIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.layout), .send(self.compressedExtent(peer, content: [UInt8](repeating: 7, count: 4096), length: 4096))] },
                   reason: "did not agree on compression", image: UInt64(disk.count))
    }

    func testCompressedGarbageIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.layout), .send(.diskExtents(DiskExtents(
            diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096)]),
            payload: peer.payload(randomBytes(count: 200, seed: 9)), encoding: .zstd)))] },
                   reason: "does not expand", image: UInt64(disk.count), features: Self.compressing)
    }

    /// A zstd frame of 2 KiB announced as 4 KiB of data: the expansion must be exactly the data.
    func testACompressedFrameThatExpandsShortIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.layout), .send(self.compressedExtent(peer, content: [UInt8](repeating: 1, count: 2048), length: 4096))] },
                   reason: "expands to 2048 bytes, not its 4096", image: UInt64(disk.count), features: Self.compressing)
    }

    /// 44 bytes of zstd announced as 1 GiB of data: refused before any buffer is sized for it (the peak stays
    /// under the limit ``checkRefused`` checks).
    func testACompressionBombIsRefusedBeforeItExpands() throws {
        try refuse({ peer in [.send(self.layout), .send(self.compressedExtent(peer, content: [UInt8](repeating: 0, count: 1 << 20), length: 1 << 30))] },
                   reason: "at most", image: UInt64(disk.count), features: Self.compressing)
    }

    // MARK: Disk layouts

    /// A disk of 2^64 - 1 bytes: no file can be that large (`off_t`); refused before the image is
    /// created (it used to trap converting the size to `off_t`).
    func testDiskOfUInt64MaxBytesIsRefusedBeforeTheImageExists() throws {
        try refuse({ _ in [.send(.diskLayout(DiskLayout(diskID: 1, sizeBytes: .max, blockSize: 4096, name: "huge")))] },
                   reason: "largest file size")
    }

    /// A disk of 2^62 bytes in 512-byte blocks: 2^53 blocks whose hashes would take 2^56 bytes:
    /// `outOfSpace`, before the image is created or a hash allocated.
    func testDiskTooLargeToTrackIsOutOfSpace() throws {
        try refuse({ _ in [.send(.diskLayout(DiskLayout(diskID: 1, sizeBytes: 1 << 62, blockSize: 512, name: "huge")))] },
                   code: .outOfSpace, reason: "more than an eighth of this host's")
    }

    /// A block size of 0 (sealed, the encoder's check bypassed): the decoder's refusal reaches the
    /// source as `error(protocolViolation)`.
    func testBlockSizeZeroIsAProtocolViolation() throws {
        try refuse({ _ in [.sendRewritten(self.layout, Self.put(UInt32(0), at: 4))] }, reason: "blockSize")
    }

    /// A block size that is not a power of two (3000).
    func testBlockSizeNotAPowerOfTwoIsAProtocolViolation() throws {
        try refuse({ _ in [.sendRewritten(self.layout, Self.put(UInt32(3000), at: 4))] }, reason: "blockSize")
    }

    /// A block size of 1 GiB (the limit is 64 MiB).
    func testBlockSizeOfOneGiBIsAProtocolViolation() throws {
        try refuse({ _ in [.sendRewritten(self.layout, Self.put(UInt32(1 << 30), at: 4))] }, reason: "blockSize")
    }

    /// The same disk announced again with another size: refused, and the image keeps the first
    /// layout's size.
    func testSecondDifferentLayoutOfADiskIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.layout), .send(.diskLayout(DiskLayout(diskID: 1, sizeBytes: 1 << 40, blockSize: 4096, name: "again")))] },
                   reason: "announced twice", image: UInt64(disk.count))
    }

    /// A disk announced after the switchover: the layouts come first.
    func testDiskLayoutAfterSwitchoverIsAProtocolViolation() throws {
        try refuse({ _ in [.send(.switchover(Switchover(finalRound: 1, mode: [], diskBytesToCome: 0, memoryPagesToCome: 0, vmStateLength: 0))),
                           .send(self.layout)] }, reason: "after switchover")
    }

    // MARK: Disk extents

    /// An extent at 2^64 - 4097 (its end, 2^64 - 1, does not overflow, so the wire accepts it):
    /// far past the 64 KiB disk; nothing written (it was reported as a storage failure before).
    func testExtentNearTwoToThe64IsRefusedAndNothingIsWritten() throws {
        try refuse({ peer in [.send(self.layout), .send(.diskExtents(DiskExtents(
            diskID: 1, round: 0, extents: ExtentList([Extent(offset: .max - 4096, length: 4096)]), payload: peer.payload(Array(self.disk[0..<4096])))))] },
                   reason: "beyond the disk", image: UInt64(disk.count))
    }

    /// An extent whose end overflows 2^64 (offset rewritten to 2^64 - 16 under a 4 KiB length).
    func testExtentOverflowingTwoToThe64IsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.layout), .sendRewritten(.diskExtents(DiskExtents(
            diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096)]), payload: peer.payload(Array(self.disk[0..<4096])))),
            Self.put(UInt64.max - 15, at: 16))] }, reason: "extent.offset", image: UInt64(disk.count))
    }

    /// A frame whose first extent is fine and whose second runs 3 KiB past the end of the disk:
    /// refused before either is written (the image stays all zeros, and 64 KiB long).
    func testExtentPastTheEndOfTheDiskWritesNothing() throws {
        let rig = try DestRig()
        let peer = try rig.connect()
        try peer.run([.send(layout), .send(.diskExtents(DiskExtents(
            diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096), Extent(offset: UInt64(disk.count) - 1024, length: 4096)]),
            payload: peer.payload(Array(disk[0..<8192]))))), .expectError(.protocolViolation)])
        XCTAssertTrue(peer.lastErrorReason?.contains("beyond the disk") == true, peer.lastErrorReason ?? "")
        try checkRefused(rig, image: UInt64(disk.count))
        XCTAssertEqual(try SHA256Hex.of(file: rig.image), SHA256Hex.of([UInt8](repeating: 0, count: disk.count)), "a block was written")
    }

    /// Two extents of one frame that overlap: extents go in ascending order without overlap.
    func testOverlappingExtentsInOneFrameAreAProtocolViolation() throws {
        try refuse({ peer in [.send(self.layout), .send(.diskExtents(DiskExtents(
            diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 8192), Extent(offset: 4096, length: 4096)]),
            payload: peer.payload(Array(self.disk[0..<12288])))))] }, reason: "overlaps", image: UInt64(disk.count))
    }

    /// A held extent to a destination with no base image: it never reported holding anything.
    func testHeldExtentWithoutABaseIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.layout), .send(.diskExtents(DiskExtents(
            diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096, kind: .held)]), payload: .empty)))] },
                   reason: "no base image", image: UInt64(disk.count))
    }

    /// In place (the image is its own base), a held extent for a block this session overwrote with
    /// other data: the block no longer holds what was reported.
    func testHeldExtentForAnOverwrittenBlockIsAProtocolViolation() throws {
        try refuseHeld(block: 0, reason: "already wrote with other data") { peer in
            .diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: 4096)]),
                                     payload: peer.payload(randomBytes(count: 4096, seed: 7))))
        }
    }

    /// A held extent for a block the destination reported as not held (a zero block of its base).
    func testHeldExtentForABlockNotReportedAsHeldIsAProtocolViolation() throws {
        try refuseHeld(block: 3, reason: "did not report as held", before: nil)
    }

    /// A destination whose image (the 64 KiB disk with block 3 zeroed) is its own base: after its
    /// report, `before` (if any) and then a held extent for `block` are refused with `reason`.
    private func refuseHeld(block: Int, reason: String, file: StaticString = #filePath, line: UInt = #line,
                            before: ((FakePeer) -> Message)?) throws {
        var base = disk
        for i in (3 * blockSize)..<(4 * blockSize) { base[i] = 0 }
        let rig = try DestRig(base: base)
        let peer = try rig.connect(features: [.disk, .memory, .zeroRuns, .resume, .heldBlocks])
        var steps: [FakePeer.Step] = [.send(layout), .readUntil(.diskHeld)]
        if let before { steps.append(.send(before(peer))) }
        steps += [.send(.diskExtents(DiskExtents(diskID: 1, round: 1, extents: ExtentList([Extent(offset: UInt64(block * blockSize), length: 4096, kind: .held)]),
                                                 payload: .empty))),
                  .drainUntilError(.protocolViolation)]
        try peer.run(steps)
        let said = peer.lastErrorReason ?? ""
        XCTAssertTrue(said.contains(reason), "the agent's reason \"\(said)\" does not say \"\(reason)\"", file: file, line: line)
        try checkRefused(rig, image: UInt64(disk.count), file: file, line: line)
    }

    // MARK: Memory layouts and pages

    /// Two regions whose guest ranges overlap.
    func testOverlappingMemoryRegionsAreAProtocolViolation() throws {
        let second = Wire.MemoryRegion(id: 1, guestAddress: 1 << 19, hostAddress: 0x7f10_0000_0000, size: 1 << 20, fileOffset: 1 << 20)
        try refuse({ _ in [.send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [Self.region, second])))] }, reason: "overlap in their guest ranges")
    }

    /// A region of 2^64 - 4096 bytes: its end in the memory file is past `off_t` (it used to trap
    /// computing the mapping's size).
    func testMemoryRegionNearTwoToThe64BytesIsAProtocolViolation() throws {
        let huge = Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0, size: UInt64.max - 4095, fileOffset: 0)
        try refuse({ _ in [.send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [huge])))] }, reason: "largest file size")
    }

    /// A region whose host range wraps past 2^64.
    func testMemoryRegionWrappingTwoToThe64IsAProtocolViolation() throws {
        let wrapping = Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: UInt64.max - 4095, size: 1 << 20, fileOffset: 0)
        try refuse({ _ in [.send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [wrapping])))] }, reason: "overflows 2^64")
    }

    /// 1 PiB of memory: more than this host's RAM, `outOfSpace` before anything is mapped.
    func testMoreMemoryThanThisHostIsOutOfSpace() throws {
        let huge = Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0, size: 1 << 50, fileOffset: 0)
        try refuse({ _ in [.send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [huge])))] }, code: .outOfSpace, reason: "RAM")
    }

    /// A region that is not whole pages (it was reported as a storage failure before).
    func testMemoryRegionOfPartPagesIsAProtocolViolation() throws {
        let odd = Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0, size: 4097, fileOffset: 0)
        try refuse({ _ in [.send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [odd])))] }, reason: "multiple of the 4096-byte page")
    }

    /// Two regions with one id.
    func testMemoryRegionIDGivenTwiceIsAProtocolViolation() throws {
        let twin = Wire.MemoryRegion(id: 0, guestAddress: 1 << 20, hostAddress: 0x7f10_0000_0000, size: 1 << 20, fileOffset: 1 << 20)
        try refuse({ _ in [.send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [Self.region, twin])))] }, reason: "given twice")
    }

    /// A page size of 0 and of 1000 (sealed, the encoder's check bypassed): the decoder refuses both.
    func testPageSizeZeroIsAProtocolViolation() throws {
        try refuse({ _ in [.sendRewritten(self.memoryLayout, Self.put(UInt32(0), at: 0))] }, reason: "pageSize")
    }

    func testPageSizeNotAPowerOfTwoIsAProtocolViolation() throws {
        try refuse({ _ in [.sendRewritten(self.memoryLayout, Self.put(UInt32(1000), at: 0))] }, reason: "pageSize")
    }

    /// A region count of 65535 (more than the 4096 allowed, and more than the frame holds).
    func testMoreRegionsThanAllowedIsAProtocolViolation() throws {
        try refuse({ _ in [.sendRewritten(self.memoryLayout, Self.put(UInt16.max, at: 4))] }, reason: "regionCount")
    }

    /// A second, different memory layout (it was `layoutMismatch` before).
    func testSecondDifferentMemoryLayoutIsAProtocolViolation() throws {
        let bigger = Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0x7f00_0000_0000, size: 2 << 20, fileOffset: 0)
        try refuse({ _ in [.send(self.memoryLayout), .send(.memoryLayout(GuestMemoryLayout(pageSize: 4096, regions: [bigger])))] },
                   reason: "a second, different memory layout")
    }

    /// Pages 255 and 256 of a 256-page region. Before, the refusal was thrown as if the source had
    /// said it, so the destination closed without telling the source why.
    func testPageBatchPastTheRegionEndIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.memoryLayout), .send(.pageBatch(PageBatch(
            regionID: 0, pageShift: 12, firstPage: 255, runs: PageRunList([.data(2)]), payload: peer.payload(Array(self.disk[0..<8192])))))] },
                   reason: "beyond region 0")
    }

    /// A zero run at page 2^64 - 2 (its end does not overflow, so the wire accepts it).
    func testPageBatchNearTwoToThe64IsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.memoryLayout), .send(.pageBatch(PageBatch(
            regionID: 0, pageShift: 12, firstPage: .max - 1, runs: PageRunList([.zero(1)]), payload: .empty)))] }, reason: "beyond region 0")
    }

    /// Runs whose end overflows 2^64 (first page rewritten to 2^64 - 1 under a 2-page run).
    func testPageRunsOverflowingTwoToThe64AreAProtocolViolation() throws {
        try refuse({ _ in [.send(self.memoryLayout), .sendRewritten(.pageBatch(PageBatch(
            regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([.zero(2)]), payload: .empty)), Self.put(UInt64.max, at: 8))] },
                   reason: "firstPage")
    }

    /// A batch for a region the layout does not have, and one with the wrong page shift.
    func testPageBatchForAnUnknownRegionIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.memoryLayout), .send(.pageBatch(PageBatch(
            regionID: 9, pageShift: 12, firstPage: 0, runs: PageRunList([.zero(1)]), payload: .empty)))] }, reason: "unknown region 9")
    }

    func testPageBatchWithAnotherPageSizeIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.memoryLayout), .send(.pageBatch(PageBatch(
            regionID: 0, pageShift: 13, firstPage: 0, runs: PageRunList([.data(1)]), payload: peer.payload(Array(self.disk[0..<8192])))))] },
                   reason: "page shift 13")
    }

    /// Pages 200 ..< 300 of a 256-page region dropped.
    func testPageDiscardPastTheRegionEndIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.memoryLayout), .send(.pageDiscard(PageRange(regionID: 0, pageIndex: 200, count: 100)))] },
                   reason: "beyond region 0")
    }

    // MARK: Switchover and VM state

    private func switchover(state length: UInt64, mode: SwitchoverMode = []) -> Message {
        .switchover(Switchover(finalRound: 1, mode: mode, diskBytesToCome: 0, memoryPagesToCome: 0, vmStateLength: length))
    }

    /// A VM state of 2^63 bytes, and one byte over the 1 GiB cap.
    func testVMStateOfTwoToThe63BytesIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.switchover(state: 1 << 63))] }, reason: "VM state of 9223372036854775808 bytes")
    }

    func testVMStateJustOverTheCapIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.switchover(state: (1 << 30) + 1))] }, reason: "at most 1073741824")
    }

    /// A VM state of exactly the cap (1 GiB) announced, then 4 KiB of it sent: the destination
    /// holds what arrived, not what was announced (it used to allocate and zero the whole GiB at
    /// the switchover); the `complete` that follows is refused for the missing bytes.
    func testVMStateAtTheCapIsNotAllocatedUpFront() throws {
        try refuse({ peer in [.send(self.switchover(state: 1 << 30)),
                              .send(.vmState(VMStateChunk(totalLength: 1 << 30, offset: 0, payload: peer.payload(Array(self.disk[0..<4096]))))),
                              .send(.complete(Wire.Completion(digests: [])))] }, reason: "bytes of VM state missing")
    }

    /// A second switchover on one connection (a source offers again only after a reconnect).
    func testSecondSwitchoverOnOneConnectionIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.switchover(state: 0)), .send(self.switchover(state: 4096))] }, reason: "a second switchover")
    }

    /// A chunk of a blob of 2^64 - 1 bytes at offset 2^64 - 5 (valid on the wire).
    func testVMStateChunkNearTwoToThe64IsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.switchover(state: 4096)),
                              .send(.vmState(VMStateChunk(totalLength: .max, offset: .max - 4, payload: peer.payload([1, 2, 3, 4]))))] },
                   reason: "expected the chunk at 0")
    }

    /// A chunk past the announced length: 4 bytes at 4094 of 4096 (the decoder refuses it), and
    /// a chunk of a longer blob than announced.
    func testVMStateChunkPastTheAnnouncedLengthIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.switchover(state: 4096)),
                              .sendRewritten(.vmState(VMStateChunk(totalLength: 4096, offset: 0, payload: peer.payload([1, 2, 3, 4]))),
                                             Self.put(UInt64(4094), at: 8))] }, reason: "offset")
    }

    func testVMStateChunkOfALongerBlobIsAProtocolViolation() throws {
        try refuse({ peer in [.send(self.switchover(state: 4096)),
                              .send(.vmState(VMStateChunk(totalLength: 8192, offset: 0, payload: peer.payload(Array(self.disk[0..<8192])))))] },
                   reason: "of a 8192-byte blob")
    }

    /// Chunks out of order (the second half first).
    func testVMStateChunksOutOfOrderAreAProtocolViolation() throws {
        try refuse({ peer in [.send(self.switchover(state: 8192)),
                              .send(.vmState(VMStateChunk(totalLength: 8192, offset: 4096, payload: peer.payload(Array(self.disk[0..<4096])))))] },
                   reason: "expected the chunk at 0")
    }

    /// An (empty) VM-state chunk before any switchover: it used to be taken silently.
    func testVMStateBeforeSwitchoverIsAProtocolViolation() throws {
        try refuse({ _ in [.send(.vmState(VMStateChunk(totalLength: 0, offset: 0, payload: .empty)))] }, reason: "switchover first")
    }

    // MARK: Frames in the wrong phase

    /// A round end for a stream that was never announced.
    func testRoundEndForAnUnknownStreamIsAProtocolViolation() throws {
        try refuse({ _ in [.send(self.layout), .send(.roundEnd(RoundEnd(stream: .disk, streamID: 7, round: 0, itemsSent: 0, bytesSent: 0, dirtyRemaining: 0)))] },
                   reason: "diskLayout of disk 7 first", image: UInt64(disk.count))
    }

    /// The VM's Ethernet frames on the main link, not on a tunnel lane: refused.
    func testTunnelFramesOnTheMainLinkAreAProtocolViolation() throws {
        let frame: Message = .tunnelFrames(TunnelFrames(vmMAC: 0x5254_0000_0001, frameCount: 0, payload: .empty))
        try refuse({ _ in [.send(self.layout), .send(frame)] }, reason: "unexpected tunnelFrames", image: UInt64(disk.count))
    }

    /// A tunnel lane to a destination that has no bridge for the VM (no --vm-bridge) is refused in
    /// the handshake, saying so; the session's main link is not disturbed.
    func testTunnelLaneWithoutABridgeIsRefused() throws {
        let rig = try DestRig()
        let session = SessionID.random()
        let peer = try FakePeer.source(port: rig.port, key: rig.key, session: session)
        peer.stepTimeout = 30
        try peer.run([.send(layout)])
        XCTAssertThrowsError(try FakePeer.source(port: rig.port, key: rig.key, session: session, features: [.tunnelLane])) { error in
            // An authenticated refusal reads as the peer's own word; either way: the code and the reason.
            switch error as? LinkError {
            case .peer(let code, let reason)?, .refusedByPeer(let code, let reason)?:
                XCTAssertEqual(code, .featureMismatch)
                XCTAssertTrue(reason.contains("--vm-bridge"), reason)
            default:
                XCTFail("\(error)")
            }
        }
        try peer.run([.send(.keepalive(Keepalive(timestampNanoseconds: 1, isEcho: false)))])
        XCTAssertTrue(rig.agent.child.isRunning, "dest-agent ended: \(rig.agent.log)")
    }

    /// Frames only a destination sends, from a source: each is refused (a fresh agent for each).
    func testDestinationFramesFromASourceAreProtocolViolations() throws {
        let frames: [Message] = [
            .pageRequest(PageRequest(requestID: 1, regionID: 0, pageIndex: 0, count: 1)),
            .diskFetch(DiskFetch(requestID: 1, diskID: 1, offset: 0, length: 4096)),
            .resumed(VMResumed(sinceSwitchoverNanoseconds: 1)),
            .diskSkip(DiskRange(diskID: 1, offset: 0, length: 4096)),
            .diskHeld(DiskHeld(diskID: 1, firstBlock: 16, count: 0, hashes: .empty)),
        ]
        for message in frames {
            try refuse({ _ in [.send(self.layout), .send(message)] }, reason: "unexpected \(message.type)", image: UInt64(disk.count))
        }
    }

    /// Hands the VM over in a mixed session (disk pre-copy, memory post-copy): the disk's bulk copy
    /// and final round, an urgent lane for the memory, the offer with the right disk digest; the
    /// destination starts the VM and says `resumed`, and keeps reading (the memory's push is to come).
    private func handOverWithMemoryInPostcopy(_ rig: DestRig, session: SessionID) throws -> (main: FakePeer, lane: FakePeer) {
        let peer = try FakePeer.source(port: rig.port, key: rig.key, session: session)
        peer.stepTimeout = 30
        try peer.run([.send(layout), .send(memoryLayout),
                      .send(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: UInt32(disk.count))]),
                                                     payload: peer.payload(disk)))),
                      .send(.roundEnd(RoundEnd(stream: .disk, streamID: 1, round: 0, itemsSent: 16, bytesSent: UInt64(disk.count), dirtyRemaining: 0)))])
        let lane = try FakePeer.source(port: rig.port, key: rig.key, session: session, features: [.urgentLane, .memory])
        try peer.run([.send(switchover(state: 0, mode: .memoryPostcopy)),
                      .send(.roundEnd(RoundEnd(stream: .disk, streamID: 1, round: 1, itemsSent: 0, bytesSent: 0, dirtyRemaining: 0))),
                      .send(.complete(Wire.Completion(digests: [StreamDigest(stream: .disk, streamID: 1, digest: diskDigest)]))),
                      .readUntil(.resumed)])
        XCTAssertTrue(waitUntil(timeout: 30) { FileManager.default.fileExists(atPath: rig.marker) }, "the VM did not start: \(rig.agent.log)")
        return (peer, lane)
    }

    /// After a hand-over refused by `frame`: the dest-agent exits 1 (not by a signal) within its
    /// memory limit; the VM is the destination's now (`vm_location: destination`), and its disk
    /// still holds exactly the migrated bytes.
    private func refuseAfterHandOver(_ frame: (FakePeer) -> Message, reason: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let rig = try DestRig()
        let (peer, lane) = try handOverWithMemoryInPostcopy(rig, session: .random())
        try peer.run([.send(frame(peer)), .expectError(.protocolViolation)])
        XCTAssertTrue(peer.lastErrorReason?.contains(reason) == true, "\(peer.lastErrorReason ?? "no reason")", file: file, line: line)
        XCTAssertEqual(rig.agent.waitForExit(timeout: 60), 1, rig.agent.log, file: file, line: line)
        XCTAssertNil(rig.agent.child.terminatingSignal, file: file, line: line)
        Self.checkPeak(report: rig.dir.file("dest.json"), file: file, line: line)
        XCTAssertEqual(try E2E.report(rig.dir.file("dest.json"), log: rig.agent.log).string("vm_location"), "destination", file: file, line: line)
        XCTAssertEqual(try SHA256Hex.of(file: rig.image), SHA256Hex.of(disk), "the running VM's disk changed", file: file, line: line)
        withExtendedLifetime(lane) {}
    }

    /// Data for the pre-copy disk after the VM started on it: refused, never written into the
    /// running VM's disk (it was applied before).
    func testPrecopyDiskDataAfterTheVMStartedIsRefusedAndNotWritten() throws {
        try refuseAfterHandOver({ peer in .diskExtents(DiskExtents(diskID: 1, round: 2, extents: ExtentList([Extent(offset: 0, length: 4096)]),
                                                                   payload: peer.payload([UInt8](repeating: 0xEE, count: 4096)))) },
                                reason: "disk 1, a pre-copy stream, after the VM started")
    }

    /// Stale-page discards after the VM started: they would drop pages the running VM has.
    func testPageDiscardAfterTheVMStartedIsRefused() throws {
        try refuseAfterHandOver({ _ in .pageDiscard(PageRange(regionID: 0, pageIndex: 0, count: 1)) }, reason: "pageDiscard after the VM started")
    }

    /// A VM-state chunk after the VM started on the state it had.
    func testVMStateAfterTheVMStartedIsRefused() throws {
        try refuseAfterHandOver({ peer in .vmState(VMStateChunk(totalLength: 0, offset: 0, payload: .empty)) }, reason: "once the VM runs")
    }

    // MARK: Floods

    /// 100,000 acks and 100,000 keepalives from a source: taken without growing the agent's
    /// memory (its resident set, sampled throughout, stays within 64 MiB of where it started),
    /// and the agent still answers: the bulk copy that follows is acknowledged.
    func testFloodOfAcksAndKeepalivesKeepsTheDestinationBounded() throws {
        let rig = try DestRig()
        let peer = try rig.connect()
        let before = try XCTUnwrap(Self.residentKiB(rig.agent.pid))
        var highest = before
        for index in 0..<200_000 {
            try peer.link.send(index % 2 == 0 ? .ack(Ack(stream: .disk, streamID: 1, sequence: UInt64(index), offset: UInt64.max))
                                              : .keepalive(Keepalive(timestampNanoseconds: UInt64(index), isEcho: index % 4 == 1)))
            if index % 10_000 == 0, let now = Self.residentKiB(rig.agent.pid) { highest = max(highest, now) }
        }
        try peer.run([.send(layout),
                      .send(.diskExtents(DiskExtents(diskID: 1, round: 0, extents: ExtentList([Extent(offset: 0, length: UInt32(disk.count))]),
                                                     payload: peer.payload(disk)))),
                      .send(.roundEnd(RoundEnd(stream: .disk, streamID: 1, round: 0, itemsSent: 16, bytesSent: UInt64(disk.count), dirtyRemaining: 0))),
                      .readUntil(.ack)])
        if let now = Self.residentKiB(rig.agent.pid) { highest = max(highest, now) }
        XCTAssertLessThan(highest - before, 64 << 10, "the flood grew the agent's resident set from \(before >> 10) to \(highest >> 10) MiB")
        try peer.run([.send(.complete(Wire.Completion(digests: []))), .expectError(.protocolViolation)])
        try checkRefused(rig, image: UInt64(disk.count))
    }

    /// VmRSS of a live process, in KiB.
    static func residentKiB(_ pid: pid_t) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return nil }
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }

    // MARK: - A hostile destination against a real source-agent

    /// A real source-agent migrating a 1 MiB disk and a "VM" (`ferry-workload`, 4 MiB of memory
    /// it dirties only on command) to a fake destination's listening socket.
    private final class SourceRig {
        let dir = TemporaryDirectory(prefix: "ferry-hostile-dest")
        let key: SharedKey
        let listener: FakeListener
        let vm: ChildProcess
        let agent: E2E.Agent

        /// `arguments`: more source-agent options (`--mode postcopy`, `--state-cmd ...`). `vm`: an
        /// existing VM process (the fuzzer's, reused), else a new one.
        init(_ arguments: [String] = [], vm existing: ChildProcess? = nil) throws {
            try MemE2E.requireMemoryMigration()
            _ = try writeKeyFile(at: dir.file("key"))
            key = try SharedKey(contentsOf: dir.file("key"))
            listener = try FakeListener()
            let image = dir.file("src.img")
            guard FileManager.default.createFile(atPath: image, contents: Data(randomBytes(count: 1 << 20, seed: 0x5A5A))) else {
                throw SupportError("cannot write \(image)")
            }
            if let existing {
                vm = existing
            } else {
                vm = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "4M", "--dirty-rate", "0", "--report-interval", "1"])
                try vm.waitFor(event: "ready", timeout: 60)
            }
            agent = try E2E.Agent("source-agent", ["--disk", image, "--vm", "\(vm.pid)", "--dest", "127.0.0.1:\(listener.port)",
                                                   "--key-file", dir.file("key"), "--block-size", "4096", "--report", dir.file("source.json"),
                                                   "--exit-after-migration", "--link-timeout", "5", "--log-level", "debug"] + arguments,
                                  logPath: dir.file("source.log"))
        }

        /// The hostile destination answers the source-agent's next connection (`points`: its resume points).
        func accept(resumePoints points: [ResumePoint] = []) throws -> FakePeer {
            let peer = try listener.accept(key: key, while: { self.agent.isRunning }) { _ in
                .init(features: FakePeer.destinationFeatures, resumePoints: points)
            }
            peer.stepTimeout = 30
            return peer
        }

        func report() throws -> [String: Any] { try E2E.report(dir.file("source.json"), log: agent.log) }

        /// The source-agent ended: exit status 1, not a signal, within its memory limit.
        func checkFailedCleanly(file: StaticString = #filePath, line: UInt = #line) {
            let status = agent.waitForExit(timeout: 60)
            XCTAssertNil(agent.child.terminatingSignal, "source-agent was killed by signal \(agent.child.terminatingSignal ?? 0):\n\(agent.log)",
                         file: file, line: line)
            XCTAssertEqual(status, 1, "source-agent did not fail cleanly:\n\(agent.log)", file: file, line: line)
            HostilePeerTests.checkPeak(report: dir.file("source.json"), "source-agent", file: file, line: line)
        }

        /// The VM runs at the source: the agent's report says so, the process is not stopped
        /// after the agent ended, and it answers a command.
        func checkVMRunsAtTheSource(file: StaticString = #filePath, line: UInt = #line) throws {
            XCTAssertEqual(try report().string("vm_location", file: file, line: line), "source", file: file, line: line)
            XCTAssertTrue(waitUntil(timeout: 30) { !MemE2E.isStopped(vm.pid) && MemE2E.state(of: vm.pid) != nil },
                          "the VM is not running at the source: state \(String(describing: MemE2E.state(of: vm.pid)))", file: file, line: line)
            _ = try vm.drainReports()
            vm.send("write 1 2")
            XCTAssertEqual(try vm.waitFor(event: "written", timeout: 30).integer("count", file: file, line: line), 2, file: file, line: line)
        }
    }

    /// The hostile destination reads until `type`, sends `message`, and expects
    /// `error(protocolViolation)` with `reason` (frames of the migration may come before it):
    /// the source-agent aborts (exit 1, no signal, no reconnect) and the VM runs on at the source.
    private func sourceRefuses(_ message: Message, after type: MessageType = .memoryLayout, reason: String, arguments: [String] = [],
                               file: StaticString = #filePath, line: UInt = #line) throws {
        let rig = try SourceRig(arguments)
        let peer = try rig.accept()
        try peer.run([.readUntil(type), .send(message), .drainUntilError(.protocolViolation)])
        XCTAssertTrue(peer.lastErrorReason?.contains(reason) == true, "the reason \"\(peer.lastErrorReason ?? "")\" does not say \"\(reason)\"",
                      file: file, line: line)
        rig.checkFailedCleanly(file: file, line: line)
        try rig.checkVMRunsAtTheSource(file: file, line: line)
        XCTAssertFalse(rig.listener.hasPendingConnection, "the source reconnected after its refusal", file: file, line: line)
    }

    // MARK: Acks

    /// An ack for a disk the source never announced (it used to be thrown as if the destination
    /// had said it: the source closed without telling the destination why).
    func testAckForAnUnknownStreamIsRefusedAndTheVMRunsOn() throws {
        try sourceRefuses(.ack(Ack(stream: .disk, streamID: 7, sequence: 0, offset: 0)), reason: "unknown stream")
    }

    /// An ack whose sequence is 2^64 - 1 (it used to trap converting it to `Int`).
    func testAckWithSequenceNearTwoToThe64IsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .disk, streamID: 1, sequence: .max, offset: 0)), reason: "says round 18446744073709551614 was applied")
    }

    /// An ack of round 2^40 - 1, never sent: the source would have dropped rounds it still had to resend.
    func testAckOfARoundNeverSentIsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .disk, streamID: 1, sequence: 1 << 40, offset: 0)), reason: "was applied")
    }

    /// An ack whose bulk high-water mark is past the end of the 1 MiB disk.
    func testAckPastTheEndOfTheDiskIsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .disk, streamID: 1, sequence: 0, offset: (1 << 20) + 1)), reason: "of a 1048576-byte disk")
    }

    /// Memory acks: a sequence of 2^64 - 1 (it used to trap), a page high-water mark of 2^64 - 1,
    /// a post-copy push acknowledged though nothing was pushed, and an unknown memory stream id.
    func testMemoryAckWithSequenceNearTwoToThe64IsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .memory, streamID: 0, sequence: .max, offset: 0)), reason: "for memory says round")
    }

    func testMemoryAckPastTheLastPageIsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .memory, streamID: 0, sequence: 0, offset: .max)), reason: "up to page 18446744073709551615")
    }

    func testPushAckBeyondThePushFramesSentIsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .memory, streamID: 1, sequence: 0, offset: 1 << 40)), reason: "post-copy push frames applied; 0 were sent")
    }

    func testAckForAnUnknownMemoryStreamIDIsRefused() throws {
        try sourceRefuses(.ack(Ack(stream: .memory, streamID: 9, sequence: 0, offset: 0)), reason: "memory stream id 9")
    }

    /// 100,000 acks (valid ones) while the source sends: taken without growing it, and the
    /// migration goes on to the offer; the destination then refuses (`vmStartFailed`), and the
    /// VM runs on at the source.
    func testFloodOfAcksKeepsTheSourceBounded() throws {
        let rig = try SourceRig()
        let peer = try rig.accept()
        try peer.run([.readUntil(.memoryLayout)])
        for index in 0..<100_000 {
            try peer.link.send(.ack(Ack(stream: index % 2 == 0 ? .disk : .control, streamID: index % 2 == 0 ? 1 : 0, sequence: 0, offset: 0)))
        }
        try peer.run([.readUntil(.switchover), .readUntil(.complete),
                      .send(.error(ErrorMessage(code: .vmStartFailed, reason: "hostile destination: no VM here")))])
        rig.checkFailedCleanly()
        try rig.checkVMRunsAtTheSource()
    }

    // MARK: Frames in the wrong phase

    /// `resumed` before the VM was offered: it used to be taken as the hand-over, so that at its
    /// switchover the source paused the VM and left it to a destination that never ran it.
    func testResumedBeforeTheOfferIsRefusedAndTheVMRunsOn() throws {
        try sourceRefuses(.resumed(VMResumed(sinceSwitchoverNanoseconds: 1)), reason: "resumed before the VM was offered")
    }

    /// The destination's closing digests before it said `resumed`.
    func testCompleteBeforeResumedIsRefused() throws {
        try sourceRefuses(.complete(Wire.Completion(digests: [])), reason: "complete before resumed")
    }

    /// A `pageRequest` and a `diskFetch` on the main link (they travel only on urgent lanes, after
    /// switchover): the reader's refusal used to look like a dropped link, and the source reconnected.
    func testPageRequestOnTheMainLinkIsRefused() throws {
        try sourceRefuses(.pageRequest(PageRequest(requestID: 1, regionID: 0, pageIndex: 0, count: 1)), reason: "unexpected pageRequest")
    }

    func testDiskFetchOnTheMainLinkIsRefused() throws {
        try sourceRefuses(.diskFetch(DiskFetch(requestID: 1, diskID: 1, offset: .max - 4096, length: 4096)), reason: "unexpected diskFetch")
    }

    /// Frames only a source sends, from a destination.
    func testSwitchoverFromADestinationIsRefused() throws {
        try sourceRefuses(.switchover(Switchover(finalRound: 1, mode: [], diskBytesToCome: 0, memoryPagesToCome: 0, vmStateLength: .max)),
                          reason: "unexpected switchover")
    }

    // MARK: After the hand-over

    /// The whole offer, then `resumed` (the VM is the destination's), then `complete` naming the
    /// disk twice: refused. The VM stays stopped at the source: it runs at the destination.
    func testCompleteNamingAStreamTwiceIsRefused() throws {
        let rig = try SourceRig()
        let peer = try rig.accept()
        let digests = try XCTUnwrap(try peer.run([.readUntil(.switchover), .readUntil(.complete)]).lastCompletion)
        try peer.run([.send(.resumed(VMResumed(sinceSwitchoverNanoseconds: 1))),
                      .send(.complete(Wire.Completion(digests: digests.digests + digests.digests))), .drainUntilError(.protocolViolation)])
        XCTAssertTrue(peer.lastErrorReason?.contains("twice") == true, peer.lastErrorReason ?? "")
        rig.checkFailedCleanly()
        XCTAssertEqual(try rig.report().string("vm_location"), "destination")
        XCTAssertEqual(MemE2E.state(of: rig.vm.pid), "T", "the source resumed a VM it handed over")
    }

    /// The same with wrong digests: the source reports that they differ (exit 1) and, the VM
    /// being the destination's, does not resume its stale copy.
    func testWrongDigestsAfterTheHandOverAreReportedAndTheVMStaysStopped() throws {
        let rig = try SourceRig()
        let peer = try rig.accept()
        let digests = try XCTUnwrap(try peer.run([.readUntil(.switchover), .readUntil(.complete)]).lastCompletion)
        let wrong = digests.digests.map { digest -> StreamDigest in
            var bytes = digest.digest.bytes
            bytes[0] ^= 0xFF
            return StreamDigest(stream: digest.stream, streamID: digest.streamID, digest: Wire.Digest(bytes)!)
        }
        try peer.run([.send(.resumed(VMResumed(sinceSwitchoverNanoseconds: 1))), .send(.complete(Wire.Completion(digests: wrong)))])
        rig.checkFailedCleanly()
        let report = try rig.report()
        XCTAssertEqual(try report.string("vm_location"), "destination")
        XCTAssertTrue(try report.string("reason").contains("digests differ"), "\(report)")
        XCTAssertEqual(MemE2E.state(of: rig.vm.pid), "T", "the source resumed a VM it handed over")
    }

    // MARK: Resume points

    /// The link is cut during the bulk copy; the destination answers the reconnect with a resume
    /// point of round 2^64 - 2 and byte 2^64 - 1 (it used to trap converting them): refused on the
    /// new link, and the VM runs on at the source.
    func testResumePointsPastWhatWasSentAreRefused() throws {
        let rig = try SourceRig()
        let first = try rig.accept()
        try first.run([.readUntil(.memoryLayout), .cut])
        let second = try rig.accept(resumePoints: [ResumePoint(stream: .disk, streamID: 1, sequence: .max, offset: .max),
                                                   ResumePoint(stream: .memory, streamID: 0, sequence: .max, offset: .max)])
        try second.run([.drainUntilError(.protocolViolation)])
        XCTAssertTrue(second.lastErrorReason?.contains("resume point") == true, second.lastErrorReason ?? "")
        rig.checkFailedCleanly()
        try rig.checkVMRunsAtTheSource()
    }

    // MARK: Urgent lanes

    /// Post-copy for the disk and the memory: the source opens an urgent lane for each before it
    /// pauses the VM. Returns the main link and the two lanes (disk, memory).
    private func postcopyLanes(_ rig: SourceRig) throws -> (main: FakePeer, disk: FakePeer, memory: FakePeer) {
        let main = try rig.accept()
        let one = try rig.accept(), two = try rig.accept()
        let (disk, memory) = one.link.agreement.features.contains(.memory) ? (two, one) : (one, two)
        XCTAssertTrue(disk.link.agreement.features.contains(.disk) && memory.link.agreement.features.contains(.memory))
        return (main, disk, memory)
    }

    /// After both lanes' refusals the destination refuses the offer (`vmStartFailed`): the VM,
    /// offered but never started there, runs on at the source.
    private func refuseTheOffer(_ main: FakePeer, _ rig: SourceRig, file: StaticString = #filePath, line: UInt = #line) throws {
        try main.run([.readUntil(.complete), .send(.error(ErrorMessage(code: .vmStartFailed, reason: "hostile destination: no VM here")))])
        rig.checkFailedCleanly(file: file, line: line)
        try rig.checkVMRunsAtTheSource(file: file, line: line)
    }

    /// A `pageRequest` and a `diskFetch` on the lanes while the VM is paused but not yet offered
    /// (a 2 s `--state-cmd` holds the source between its pause and its `switchover`): both are
    /// refused (a page read then could change before the switchover, yet the push would skip it).
    func testFetchesOnTheUrgentLanesBeforeSwitchoverAreRefused() throws {
        let rig = try SourceRig(["--mode", "postcopy", "--disk-postcopy",
                                 "--state-cmd", "sleep 2; head -c 4096 /dev/zero > \"$FERRY_STATE_FILE\""])
        let (main, disk, memory) = try postcopyLanes(rig)
        try memory.run([.send(.pageRequest(PageRequest(requestID: 1, regionID: 0, pageIndex: 0, count: 1))), .expectError(.protocolViolation)])
        XCTAssertTrue(memory.lastErrorReason?.contains("before switchover") == true, memory.lastErrorReason ?? "")
        try disk.run([.send(.diskFetch(DiskFetch(requestID: 1, diskID: 1, offset: 0, length: 4096))), .expectError(.protocolViolation)])
        XCTAssertTrue(disk.lastErrorReason?.contains("before switchover") == true, disk.lastErrorReason ?? "")
        try refuseTheOffer(main, rig)
    }

    /// After the switchover: a page past the end of its region, and a fetch at 2^64 - 4097 (it
    /// used to trap rounding its end up to a block): both refused on their lanes.
    func testFetchesPastTheEndOnTheUrgentLanesAreRefused() throws {
        let rig = try SourceRig(["--mode", "postcopy", "--disk-postcopy"])
        let (main, disk, memory) = try postcopyLanes(rig)
        try main.run([.readUntil(.switchover)])
        try memory.run([.send(.pageRequest(PageRequest(requestID: 1, regionID: 0, pageIndex: 1 << 40, count: 1))), .expectError(.protocolViolation)])
        XCTAssertTrue(memory.lastErrorReason?.contains("beyond region") == true, memory.lastErrorReason ?? "")
        try disk.run([.send(.diskFetch(DiskFetch(requestID: 1, diskID: 1, offset: .max - 4096, length: 4096))), .expectError(.protocolViolation)])
        XCTAssertTrue(disk.lastErrorReason?.contains("beyond the 1048576-byte disk") == true, disk.lastErrorReason ?? "")
        try refuseTheOffer(main, rig)
    }

    /// After the switchover: a request for a region that does not exist, and a fetch of 4 GiB
    /// (2^32 - 1 bytes) from a 1 MiB disk.
    func testUnknownRegionAndHugeFetchOnTheUrgentLanesAreRefused() throws {
        let rig = try SourceRig(["--mode", "postcopy", "--disk-postcopy"])
        let (main, disk, memory) = try postcopyLanes(rig)
        try main.run([.readUntil(.switchover)])
        try memory.run([.send(.pageRequest(PageRequest(requestID: 1, regionID: 77, pageIndex: 0, count: .max))), .expectError(.protocolViolation)])
        XCTAssertTrue(memory.lastErrorReason?.contains("unknown region 77") == true, memory.lastErrorReason ?? "")
        try disk.run([.send(.diskFetch(DiskFetch(requestID: 1, diskID: 1, offset: 0, length: .max))), .expectError(.protocolViolation)])
        XCTAssertTrue(disk.lastErrorReason?.contains("beyond the 1048576-byte disk") == true, disk.lastErrorReason ?? "")
        try refuseTheOffer(main, rig)
    }

    // MARK: - Fuzzers: random frame sequences against real agents

    /// The seed of both fuzzers: FERRY_HOSTILE_FUZZ_SEED, else fixed (so CI runs the same sequences).
    private static var fuzzSeed: UInt64 {
        ProcessInfo.processInfo.environment["FERRY_HOSTILE_FUZZ_SEED"].flatMap { UInt64($0, radix: 16) } ?? 0xF022_5EED_0001
    }

    /// An integer from the environment, else `fallback`.
    private static func setting(_ name: String, _ fallback: Int) -> Int {
        ProcessInfo.processInfo.environment[name].flatMap { Int($0) } ?? fallback
    }

    /// 120 sessions (FERRY_HOSTILE_FUZZ_SESSIONS), each a fresh dest-agent (it handles one session
    /// and ends after a refusal) and a hostile source that sends 5 to 30 random frames
    /// (``HostileFrames/sourceFrame()``, with 3 to 60 % of the fields hostile; half the sessions
    /// begin with a valid disk and memory layout, so that data frames meet real streams), then
    /// reads what the agent answers. Whatever
    /// the frames, the agent must end by itself (a refusal, or the 1 s link timeout after the cut)
    /// or run on with the VM started (then SIGTERM ends it), never by a signal; its peak resident
    /// set stays under ``peakLimitKiB``; its image holds no more than the data bytes sent (plus
    /// the hashes' read-back block); and when it reports the VM at the source, it never started it.
    func testRandomFrameSequencesNeverCrashTheDestination() throws {
        let seed = Self.fuzzSeed
        let sessions = Self.setting("FERRY_HOSTILE_FUZZ_SESSIONS", 120)
        print("hostile source fuzzer: seed \(String(seed, radix: 16)) (FERRY_HOSTILE_FUZZ_SEED), \(sessions) sessions")
        var seeds = SplitMix64(seed: seed)
        var verdicts: [String: Int] = [:]
        for session in 0..<sessions {
            let rig = try DestRig(linkTimeout: 1)
            let peer = try rig.connect()
            var frames = HostileFrames(seed: seeds.next(), payload: peer.payload)
            frames.hostility = [3, 10, 30, 60][session % 4]
            var script: [(Message, ((UnsafeMutableRawBufferPointer) -> Void)?)] = []
            if session % 2 == 0 { script = [(layout, nil), (memoryLayout, nil)] }
            for _ in 0..<(5 + frames.random.below(26)) { script.append((frames.sourceFrame(), frames.rewrite())) }
            var dataBytes: UInt64 = 0
            var sent: [String] = []
            sending: for (message, rewrite) in script {
                do {
                    try peer.link.withSender { (sender: inout FrameSender) throws(LinkError) in try sender.send(message, rewritingMetadata: rewrite) }
                } catch {
                    if case .malformed = error { return XCTFail("session \(session): the generator made an unencodable frame: \(message)") }
                    break sending   // the agent closed the connection: it refused something already
                }
                sent.append("\(message.type)\(rewrite == nil ? "" : "*")")
                if case .diskExtents(let extents) = message { dataBytes += UInt64(extents.payload.count) }
            }
            // Its answer: an error (the reason is the verdict), or nothing within half a second.
            var verdict = "taken"
            do { while try peer.nextFrame(within: 0.5) != nil {} } catch {
                if case .peer(let code, let reason) = error { verdict = "\(code) " + Self.gist(reason) } else { verdict = "closed without error: \(error)" }
            }
            peer.link.close()
            var status = rig.agent.waitForExit(timeout: 20)
            if status == nil {   // the VM started here and its post-copy stream waits: an operator's SIGTERM ends it
                XCTAssertTrue(FileManager.default.fileExists(atPath: rig.marker), "session \(session) (\(sent)): the agent hangs:\n\(rig.agent.log)")
                rig.agent.signal(SIGTERM)
                status = rig.agent.waitForExit(timeout: 20)
                verdict += ", ran on"
            }
            let context = "session \(session) [\(sent.joined(separator: " "))] -> \(verdict)"
            XCTAssertNil(rig.agent.child.terminatingSignal, "\(context): killed by signal \(rig.agent.child.terminatingSignal ?? 0)\n\(rig.agent.log)")
            XCTAssertNotNil(status, "\(context): still running after SIGTERM")
            XCTAssertFalse(verdict.hasPrefix("closed without error"), "\(context)\n\(rig.agent.log)")
            Self.checkPeak(report: rig.dir.file("dest.json"), context, required: false)
            var info = stat()
            if stat(rig.image, &info) == 0 {
                XCTAssertLessThanOrEqual(UInt64(info.st_blocks) * 512, dataBytes + (1 << 20), "\(context): the image holds more than was sent")
            }
            if let report = try? E2E.report(rig.dir.file("dest.json"), log: rig.agent.log), (try? report.string("vm_location")) == "source" {
                XCTAssertFalse(FileManager.default.fileExists(atPath: rig.marker), "\(context): the VM started though it is reported at the source")
            }
            verdicts[verdict, default: 0] += 1
        }
        print("hostile source fuzzer: \(verdicts.count) outcomes:\n" + verdicts.sorted { $0.key < $1.key }.map { "  \($1) x \($0)" }.joined(separator: "\n"))
    }

    /// A refusal's reason without its numbers and paths, to count refusals by kind.
    private static func gist(_ reason: String) -> String {
        let words = reason.split(separator: " ").filter { word in !word.contains(where: { $0.isNumber || $0 == "/" }) }
        return words.prefix(7).joined(separator: " ")
    }

    /// 40 sessions (FERRY_HOSTILE_FUZZ_SOURCE_SESSIONS) of a real source-agent (a fresh one each,
    /// the VM process shared) against a hostile destination that, 40 times, either reads a frame
    /// (acknowledging round ends, as a destination does) or sends a random one
    /// (``HostileFrames/destinationFrame()``), then cuts the link (and drops the reconnects). The
    /// agent must end by itself (a refusal, or its 1 s link timeout) or, once it offered the VM,
    /// on SIGTERM; never by a signal, under ``peakLimitKiB``; when it reports the VM at the
    /// source, the VM runs there; it never reports it at the destination unless the destination
    /// said `resumed`. (Outcomes are counted by the reason in its report: the error frame it sends
    /// may be lost when it closes on a peer that is still writing.)
    func testRandomFrameSequencesNeverCrashTheSource() throws {
        let seed = Self.fuzzSeed ^ 0xD357
        let sessions = Self.setting("FERRY_HOSTILE_FUZZ_SOURCE_SESSIONS", 40)
        print("hostile destination fuzzer: seed \(String(seed, radix: 16)) (FERRY_HOSTILE_FUZZ_SEED), \(sessions) sessions")
        try MemE2E.requireMemoryMigration()
        let vm = try ChildProcess(E2E.tool("ferry-workload"), ["--memory", "4M", "--dirty-rate", "0", "--report-interval", "1"])
        try vm.waitFor(event: "ready", timeout: 60)
        var seeds = SplitMix64(seed: seed)
        var verdicts: [String: Int] = [:]
        for session in 0..<sessions {
            let rig = try SourceRig(["--link-timeout", "1"], vm: vm)
            let peer = try rig.accept()
            var frames = HostileFrames(seed: seeds.next(), payload: peer.payload)
            var saidResumed = false
            var steps: [String] = []
            session: for _ in 0..<40 {
                do {
                    if frames.random.below(100) < 60 {
                        if let frame = try peer.nextFrame(within: 0.05) { steps.append("<\(frame.type)") }
                    } else {
                        let message = frames.destinationFrame(), rewrite = frames.rewrite()
                        try peer.link.withSender { (sender: inout FrameSender) throws(LinkError) in try sender.send(message, rewritingMetadata: rewrite) }
                        steps.append(">\(message.type)\(rewrite == nil ? "" : "*")")
                        if case .resumed = message, rewrite == nil { saidResumed = true }
                    }
                } catch {
                    if case .malformed = error { return XCTFail("session \(session): the generator made an unencodable frame") }
                    steps.append("x")   // the source closed (its error frame may be lost to the reset: its report says why)
                    break session
                }
            }
            peer.link.close()
            // Its reconnects are refused at once; once it offered the VM it retries for ever (only
            // the destination, or an operator, settles an offer): SIGTERM then.
            let offered = steps.contains("<switchover")
            let deadline = monotonicSeconds() + (offered ? 1.5 : 5)
            var status: Int32? = nil
            while status == nil && monotonicSeconds() < deadline {
                rig.listener.dropPendingConnections()
                status = rig.agent.waitForExit(timeout: 0.1)
            }
            var stopped = ""
            if status == nil {
                rig.agent.signal(SIGTERM)
                status = rig.agent.waitForExit(timeout: 20)
                stopped = ", stopped"
            }
            let report = try? rig.report()
            let verdict = ((try? report?.string("reason")).map { Self.gist($0.components(separatedBy: ";").first ?? $0) } ?? "no reason") + stopped
            let context = "session \(session) [\(steps.joined(separator: " "))] -> \(verdict)"
            XCTAssertNil(rig.agent.child.terminatingSignal, "\(context): killed by signal \(rig.agent.child.terminatingSignal ?? 0)\n\(rig.agent.log)")
            XCTAssertNotNil(status, "\(context): still running after SIGTERM")
            Self.checkPeak(report: rig.dir.file("source.json"), context, required: false)
            let location = (try? report?.string("vm_location")) ?? "no report"
            if location == "source" {
                XCTAssertTrue(waitUntil(timeout: 10) { !MemE2E.isStopped(vm.pid) }, "\(context): reported at the source, but stopped")
            }
            if location == "destination" { XCTAssertTrue(saidResumed, "\(context): handed over without `resumed`") }
            kill(vm.pid, SIGCONT)   // a VM handed over (or left paused) is the next session's VM again
            verdicts[verdict + " (\(offered ? "offered, " : "")VM at \(location))", default: 0] += 1
        }
        XCTAssertTrue(waitUntil(timeout: 10) { !MemE2E.isStopped(vm.pid) })
        _ = try vm.drainReports()
        vm.send("write 1 2")
        XCTAssertEqual(try vm.waitFor(event: "written", timeout: 30).integer("count"), 2, "the VM no longer answers")
        print("hostile destination fuzzer: \(verdicts.count) outcomes:\n" + verdicts.sorted { $0.key < $1.key }.map { "  \($1) x \($0)" }.joined(separator: "\n"))
    }
}
