import Foundation
import Glibc
@testable import MigrationEngine
import Wire
import XCTest

/// The memory engine's pure parts, without processes or sockets: the destination's image (batches
/// in, discards, digest, memory file), the lock-free page sets, and the push pacer's window.
final class MemoryEngineUnitTests: XCTestCase {
    /// Two regions; a batch of data, zero and data runs lands where the layout says, counts fresh
    /// pages once, and the digest equals SHA-256 of the expected bytes (regions in layout order).
    func testImageAppliesBatchesDiscardsAndDigests() throws {
        let layout = GuestMemoryLayout(pageSize: 4096, regions: [
            Wire.MemoryRegion(id: 0, guestAddress: 0, hostAddress: 0x7000_0000_0000, size: 8 * 4096, fileOffset: 0),
            Wire.MemoryRegion(id: 1, guestAddress: 8 * 4096, hostAddress: 0x7100_0000_0000, size: 4 * 4096, fileOffset: 8 * 4096),
        ])
        let image = try GuestMemoryImage(layout: layout)
        XCTAssertEqual(image.totalPages, 12)
        // Region 1, pages 0...3: data, zero, zero, data.
        var payload = [UInt8](repeating: 0, count: 2 * 4096)
        for i in 0..<4096 { payload[i] = 0xAB; payload[4096 + i] = UInt8(i & 0xFF) }
        let fresh = try payload.withUnsafeBytes { raw in
            try image.apply(PageBatch(regionID: 1, pageShift: 12, firstPage: 0, runs: PageRunList([.data(1), .zero(2), .data(1)]),
                                      payload: Payload(raw)))
        }
        XCTAssertEqual(fresh, 4)
        XCTAssertEqual(image.receivedCount, 4)
        XCTAssertTrue(image.zero.contains(9) && image.zero.contains(10))
        XCTAssertFalse(image.zero.contains(8))
        // Region 0 entirely as one zero run: never-touched pages, no content on the wire.
        try image.apply(PageBatch(regionID: 0, pageShift: 12, firstPage: 0, runs: PageRunList([.zero(8)]), payload: .empty))
        XCTAssertEqual(image.receivedCount, 12)
        // The same page again is not fresh.
        let again = try payload.withUnsafeBytes { raw in
            try image.apply(PageBatch(regionID: 1, pageShift: 12, firstPage: 0, runs: PageRunList([.data(1)]),
                                      payload: Payload(UnsafeRawBufferPointer(rebasing: raw[0..<4096]))))
        }
        XCTAssertEqual(again, 0)

        var expected = [UInt8](repeating: 0, count: 12 * 4096)
        for i in 0..<4096 { expected[8 * 4096 + i] = 0xAB; expected[11 * 4096 + i] = UInt8(i & 0xFF) }
        XCTAssertEqual(image.digest(), pageDigest(expected), "the digest is over the per-page hashes of what was applied")

        // Hybrid: a discarded page is no longer received, until it comes again.
        try image.discard(PageRange(regionID: 1, pageIndex: 3, count: 1))
        XCTAssertEqual(image.receivedCount, 11)
        XCTAssertFalse(image.received.contains(11))
        XCTAssertThrowsError(try image.discard(PageRange(regionID: 1, pageIndex: 3, count: 2)), "beyond the region")
        XCTAssertThrowsError(try image.apply(PageBatch(regionID: 5, pageShift: 12, firstPage: 0, runs: PageRunList([.zero(1)]),
                                                       payload: .empty)), "unknown region")

        // The memory file: regions at their offsets, zero pages left as holes (read back as zeros).
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-memfile-\(getpid()).bin").path
        defer { unlink(path) }
        try image.write(memoryFile: path)
        let file = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        // A discarded page's stale bytes leave the local copy at once (the digest is taken over it,
        // and a later zero push only zeroes pages it knows hold data).
        for i in 0..<4096 { expected[11 * 4096 + i] = 0 }
        XCTAssertEqual(file, expected, "the local copy kept a discarded page's stale bytes")
        // The page pushed again as a zero run stays zero.
        try image.apply(PageBatch(regionID: 1, pageShift: 12, firstPage: 3, runs: PageRunList([.zero(1)]), payload: .empty))
        XCTAssertEqual(image.digest(), pageDigest(expected))
    }

    /// The digest a source computes over `bytes` page by page (``PageHashes``), for comparison.
    private func pageDigest(_ bytes: [UInt8]) -> Digest {
        let hashes = PageHashes(pageCount: bytes.count / 4096, pageSize: 4096)
        bytes.withUnsafeBytes { raw in
            for page in 0..<(bytes.count / 4096) {
                hashes.record(page: page, contents: UnsafeRawBufferPointer(rebasing: raw[(page * 4096)..<((page + 1) * 4096)]))
            }
        }
        return hashes.digest()
    }

    /// Page sets: insert reports what was there, firstMember finds the next member across words.
    func testPageSet() {
        let set = PageSet(pageCount: 200)
        XCTAssertFalse(set.insert(3))
        XCTAssertTrue(set.insert(3))
        set.insert(130)
        XCTAssertEqual(set.firstMember(from: 0), 3)
        XCTAssertEqual(set.firstMember(from: 4), 130)
        XCTAssertNil(set.firstMember(from: 131))
        XCTAssertEqual(set.count, 2)
        XCTAssertTrue(set.remove(3))
        XCTAssertFalse(set.contains(3))
        set.insertAll()
        XCTAssertEqual(set.count, 200, "insertAll sets exactly the pages, not the tail bits")
        XCTAssertEqual(set.firstMember(from: 199), 199)
    }

    /// The pacer's window grows while acknowledgements come back without extra delay and shrinks
    /// when they come back late (queueing above the target).
    func testPushPacerGrowsWithoutQueueingAndShrinksWithIt() {
        var pacer = PushPacer(targetNanoseconds: 2_000_000, initialWindow: 1_048_576)
        defer { pacer.deallocate() }
        let start = pacer.window
        for _ in 0..<20 {
            pacer.sent(bytes: 65536)
            usleep(500)
            pacer.acknowledged(upTo: pacer.framesSent)
        }
        XCTAssertGreaterThan(pacer.window, start, "no queueing: the window grows")
        let grown = pacer.window
        for _ in 0..<20 {
            pacer.sent(bytes: 65536)
            usleep(8_000)   // 7.5 ms more than the base round trip: queueing above the 2 ms target
            pacer.acknowledged(upTo: pacer.framesSent)
        }
        XCTAssertLessThan(pacer.window, grown, "queueing: the window shrinks")
        XCTAssertGreaterThanOrEqual(pacer.window, pacer.minimumWindow)
        // An acknowledgement for a frame not yet sent is ignored, as is an old one.
        let window = pacer.window
        pacer.acknowledged(upTo: pacer.framesSent + 5)
        pacer.acknowledged(upTo: 1)
        XCTAssertEqual(pacer.window, window)
        XCTAssertTrue(pacer.maySend)
    }
}
