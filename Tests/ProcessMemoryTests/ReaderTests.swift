import ProcessMemory
import XCTest

/// process_vm_readv reads and pagemap residency of a real ferry-workload.
final class ReaderTests: XCTestCase {
    func testReaderReturnsThePatternAndSkipsUntouchedPages() throws {
        let filled = 1000
        let w = try WorkloadProcess(["--memory", "16M", "--fill-pages", String(filled)])
        defer { w.stop() }
        try w.write(pages: [3, 3, 7]) // page 3 at generation 3, page 7 at 2
        let reader = try ProcessMemoryReader(pid: w.pid)
        let pages = Int(w.regionSize / 4096)

        // Residency: exactly the filled pages are present; the rest were never touched.
        let resident = PageBitmap(pageCount: pages)
        let count = try reader.residency(of: w.region, into: resident)
        XCTAssertEqual(count, filled)
        XCTAssertTrue(resident[0] && resident[filled - 1])
        XCTAssertFalse(resident[filled])
        XCTAssertFalse(resident[pages - 1])

        // Read every resident page in batches of runs (one iovec per run), and check the pattern.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: filled * 4096, alignment: 4096)
        defer { buffer.deallocate() }
        var runs = PageRunBuffer(capacity: 64)
        resident.forEachRun { first, n in
            // Split into single pages on purpose to exercise many iovecs per call.
            for p in first..<(first + n) { runs.append(AddressRange(start: w.regionStart + UInt64(p) * 4096, length: 4096)) }
        }
        XCTAssertEqual(runs.count, 1, "adjacent runs merge")
        let got = try reader.read(runs: runs.runs, into: buffer)
        XCTAssertEqual(got, filled * 4096)
        for p in 0..<filled {
            let verdict = WorkloadPattern.verify(buffer.baseAddress! + p * 4096, index: UInt64(p))
            let expected: UInt64 = p == 3 ? 3 : (p == 7 ? 2 : 1)
            XCTAssertEqual(verdict, .valid(generation: expected), "page \(p)")
        }
        // Many separate runs in one batch (every other page), also through the iovec batching limit.
        let small = try ProcessMemoryReader(pid: w.pid, maxIovecs: 7)
        var sparse = PageRunBuffer(capacity: 16)
        for p in stride(from: 0, to: 200, by: 2) { sparse.append(AddressRange(start: w.regionStart + UInt64(p) * 4096, length: 4096)) }
        XCTAssertEqual(sparse.count, 100)
        XCTAssertEqual(try small.read(runs: sparse.runs, into: buffer), 100 * 4096)
        for i in 0..<100 {
            XCTAssertEqual(WorkloadPattern.verify(buffer.baseAddress! + i * 4096, index: UInt64(i * 2)), .valid(generation: 1), "page \(i * 2)")
        }

        // The digest of the process (non-resident pages as zeros, not read) equals the workload's own digest.
        let digest = try MemoryDigest.of(pid: w.pid, regions: [w.region])
        let residentAfterDigest = try reader.residency(of: w.region, into: resident)
        XCTAssertEqual(residentAfterDigest, filled, "the digest must not populate untouched pages")
        let own = try w.command("digest", expect: "digest")["sha256"] as? String
        XCTAssertEqual(digest, own)

        // Reading beyond the mapping fails with a clear error.
        XCTAssertThrowsError(try reader.read(from: 0x1000, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<4096]))) { error in
            XCTAssertTrue("\(error)".contains("process_vm_readv of 0x1000+4096"), "\(error)")
        }
    }
}
