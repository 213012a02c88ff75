import FerryTestSupport
import Foundation
import Glibc
import ProcessMemory
import XCTest

/// The destination's fault service: a real `ferry-workload --resume` registers its memory with userfaultfd in MISSING
/// mode, hands it over with Firecracker's handshake, and this test serves every fault from a local buffer.
final class FaultServerTests: XCTestCase {
    func testResumedWorkloadIsServedAndVerifiesEveryPage() throws {
        try runResumedWorkload(dirtyRate: "0")
    }

    /// The resumed workload keeps dirtying at 8 MB/s (random pages, each verified before rewriting) while it verifies.
    func testResumedWorkloadDirtyingWhileFaultsAreServed() throws {
        try runResumedWorkload(dirtyRate: "8M")
    }

    func runResumedWorkload(dirtyRate: String) throws {
        let dirtying = dirtyRate != "0"
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        let socketPath = dir.file("uffd.sock")
        let layoutPath = dir.file("layout.json")

        // The "source memory": 16 MiB in the workload's pattern; every 4th page never touched (served as zeros).
        let size = 16 << 20
        let pages = size / 4096
        let base: UInt64 = 0x3e00_0000_0000
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { source.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 0)
        var expectedValid = 0
        for p in 0..<pages where p % 4 != 0 {
            WorkloadPattern.fill(source.baseAddress! + p * 4096, index: UInt64(p), generation: UInt64(1 + p % 7))
            expectedValid += 1
        }
        let mapping = GuestMemoryMapping(baseHostVirtAddr: base, size: UInt64(size), offset: 0)
        // Written the way Firecracker's older releases spell it (page_size_kib only), plus an unknown field.
        let layout = "[{\"base_host_virt_addr\":\(base),\"size\":\(size),\"offset\":0,\"page_size_kib\":4096,\"future_field\":1}]"
        try layout.write(toFile: layoutPath, atomically: true, encoding: .utf8)

        let listener = try UFFDHandshakeListener(path: socketPath)
        let w = try WorkloadProcess(["--resume", "--uffd-socket", socketPath, "--layout", layoutPath, "--dirty-rate", dirtyRate], waitReady: false)
        defer { w.stop() }
        let handshake = try listener.accept(timeoutMilliseconds: 60_000)
        XCTAssertEqual(handshake.mappings, [mapping])
        XCTAssertEqual(handshake.peerPID, w.pid, "SO_PEERCRED names the VMM")
        var server = FaultServer(handshake: handshake)
        _ = try w.waitFor("ready", timeout: 60)

        // Serve faults until the workload has touched and verified every page.
        var serviceNanos: [UInt64] = []
        serviceNanos.reserveCapacity(pages)
        var faults = 0
        var zeroFaults = 0
        w.send("verify")
        var verified: [String: Any]?
        let deadline = Date().addingTimeInterval(120)
        var ts = timespec()
        while verified == nil && Date() < deadline {
            let events = try server.nextEvents(timeoutMilliseconds: 20)
            for e in events {
                guard e.kind == .pageFault else { continue }
                clock_gettime(CLOCK_MONOTONIC, &ts)
                let t0 = UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
                guard let (_, offset) = server.mappings.locate(e.address) else {
                    XCTFail("fault at \(String(e.address, radix: 16)) outside the mappings"); continue
                }
                let page = Int(offset / 4096)
                if page % 4 == 0 {
                    try server.zero(range: AddressRange(start: e.address, length: 4096))
                    zeroFaults += 1
                } else {
                    try server.copy(page: UnsafeRawBufferPointer(rebasing: source[(page * 4096)..<((page + 1) * 4096)]), to: e.address)
                }
                clock_gettime(CLOCK_MONOTONIC, &ts)
                serviceNanos.append((UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)) &- t0)
                faults += 1
            }
            if events.isEmpty || faults % 256 == 0, let line = try w.nextLine(timeout: 0) {
                if line["event"] as? String == "verified" { verified = line }
                if line["event"] as? String == "corrupt" || line["event"] as? String == "error" { XCTFail("workload: \(line)") }
            }
        }
        guard let verified else { XCTFail("no verify result from the resumed workload"); return }
        XCTAssertEqual((verified["corrupt"] as? NSNumber)?.intValue, 0)
        let valid = try XCTUnwrap((verified["valid"] as? NSNumber)?.intValue, "verified line without valid: \(verified)")
        let untouched = try XCTUnwrap((verified["untouched"] as? NSNumber)?.intValue, "verified line without untouched: \(verified)")
        if dirtying {
            // Dirtied zero pages became pattern pages: the split moves, the total does not.
            XCTAssertEqual(valid + untouched, pages)
            XCTAssertGreaterThanOrEqual(valid, expectedValid)
        } else {
            XCTAssertEqual(valid, expectedValid)
            XCTAssertEqual(untouched, pages - expectedValid)
        }
        XCTAssertEqual(faults, pages, "one fault per page")
        XCTAssertEqual(zeroFaults, pages / 4)
        // The server's own counts of what it did: a copy per pattern page, a zero page per untouched
        // one, and no fault answered twice (one faulting thread: nothing can race it).
        XCTAssertEqual(server.copies, pages - pages / 4, "UFFDIO_COPYs")
        XCTAssertEqual(server.zeroes, pages / 4, "UFFDIO_ZEROPAGEs")
        XCTAssertEqual(server.alreadyPresent, 0, "faults answered for pages already present")

        // The workload's digest of its memory equals the digest of the source buffer (while nothing was dirtied).
        if !dirtying {
            let digest = try w.command("digest", expect: "digest")["sha256"] as? String
            XCTAssertEqual(digest, MemoryDigest.of(UnsafeRawBufferPointer(source)))
        }
        // It keeps running: writes verify the served pages first.
        try w.write(pages: [1, 2, 3, 4, pages - 1])

        let service = percentiles(serviceNanos)
        // The workload's own latency figures must be there and be figures: a missing field fails
        // here (it used to read as -1, below any limit).
        let p50 = try XCTUnwrap((verified["p50_us"] as? NSNumber)?.doubleValue, "verified line without p50_us: \(verified)")
        let p90 = try XCTUnwrap((verified["p90_us"] as? NSNumber)?.doubleValue, "verified line without p90_us: \(verified)")
        let p99 = try XCTUnwrap((verified["p99_us"] as? NSNumber)?.doubleValue, "verified line without p99_us: \(verified)")
        XCTAssertGreaterThan(p50, 0, "a fault served from another process cannot take 0 us: \(verified)")
        XCTAssertTrue(p50 <= p90 && p90 <= p99, "percentiles out of order: p50 \(p50), p90 \(p90), p99 \(p99)")
        print("[dirty-rate \(dirtyRate)] fault latency seen by the faulting thread over \(pages) faults: p50 \(p50) us, p90 \(p90) us, p99 \(p99) us (goal: median < 20 us)")
        print("handler service time (event read -> UFFDIO_COPY/ZEROPAGE done): p50 \(service.p50) us, p90 \(service.p90) us, p99 \(service.p99) us, max \(service.max) us")
        // Generous for a loaded debug build (~100 us here): a service that only answered on its
        // 20 ms poll timeout, not on the event, would show a median of 10 ms or more.
        XCTAssertLessThan(p50, 5000, "median fault latency \(p50) us: over 5 ms means the service is broken, not slow")
    }

    func testHandshakeDecodingAcceptsBothPageSizeNames() throws {
        let new = try GuestMemoryMapping.decodeList(Array(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#.utf8))
        let old = try GuestMemoryMapping.decodeList(Array(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096,"x":[1]}]"#.utf8))
        let oldest = try GuestMemoryMapping.decodeList(Array(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#.utf8))
        XCTAssertEqual(new, old)
        XCTAssertEqual(new, oldest)
        XCTAssertEqual(new.first?.pageSize, 4096)
        XCTAssertThrowsError(try GuestMemoryMapping.decodeList(Array(#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":1000}]"#.utf8)))
        XCTAssertThrowsError(try GuestMemoryMapping.decodeList(Array("{}".utf8)))
        // Round trip writes both names.
        let encoded = String(decoding: GuestMemoryMapping.encodeList(new), as: UTF8.self)
        XCTAssertTrue(encoded.contains("\"page_size\":4096") && encoded.contains("\"page_size_kib\":4096"), encoded)
        XCTAssertEqual(new.locate(4096 + 5000)?.fileOffset, 5000)
        XCTAssertNil(new.locate(4096 + 8192))
    }
}
