import FerryTestSupport
import Foundation
import Glibc
import ProcessMemory
import XCTest

/// UFFD_EVENT_REMOVE: the resumed process drops pages (MADV_DONTNEED, as a balloon does); the handler gets REMOVE
/// events and answers later faults on those pages with zero pages (Firecracker's handler does the same).
final class FaultServerRemoveTests: XCTestCase {
    /// Serves faults (copy from `source`, zero pages for `removed` and pages ≡ 0 mod 4) until the workload prints
    /// `event`; returns that line. REMOVE events add their pages to `removed`.
    func serve(_ server: inout FaultServer, _ w: WorkloadProcess, source: UnsafeRawBufferPointer, removed: inout Set<Int>,
               removeEvents: inout Int, faults: inout Int, until event: String) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline {
            let events = try server.nextEvents(timeoutMilliseconds: 20)
            for e in events {
                switch e.kind {
                case .remove:
                    removeEvents += 1
                    var a = e.address
                    while a < e.end { removed.insert(Int((a - server.mappings[0].baseHostVirtAddr) / 4096)); a += 4096 }
                case .pageFault:
                    guard let (_, offset) = server.mappings.locate(e.address) else { XCTFail("fault outside mappings"); continue }
                    let page = Int(offset / 4096)
                    faults += 1
                    if page % 4 == 0 || removed.contains(page) {
                        try server.zero(range: AddressRange(start: e.address, length: 4096))
                    } else {
                        try server.copy(page: UnsafeRawBufferPointer(rebasing: source[(page * 4096)..<((page + 1) * 4096)]), to: e.address)
                    }
                default:
                    break
                }
            }
            if events.isEmpty, let line = try w.nextLine(timeout: 0) {
                if line["event"] as? String == event { return line }
                if line["event"] as? String == "corrupt" || line["event"] as? String == "error" { throw ProcessMemoryError("workload: \(line)") }
            }
        }
        throw ProcessMemoryError("no '\(event)' from the resumed workload within 120 s")
    }

    func testRemovedPagesAreServedAsZeroPages() throws {
        let dir = TemporaryDirectory(prefix: "ferry-mem")
        let socketPath = dir.file("uffd.sock")
        let layoutPath = dir.file("layout.json")
        let size = 4 << 20, pages = size / 4096
        let base: UInt64 = 0x3d00_0000_0000
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { source.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 0)
        for p in 0..<pages where p % 4 != 0 { WorkloadPattern.fill(source.baseAddress! + p * 4096, index: UInt64(p), generation: 1) }
        let layout = String(decoding: GuestMemoryMapping.encodeList([GuestMemoryMapping(baseHostVirtAddr: base, size: UInt64(size), offset: 0)]), as: UTF8.self)
        try layout.write(toFile: layoutPath, atomically: true, encoding: .utf8)

        let listener = try UFFDHandshakeListener(path: socketPath)
        let w = try WorkloadProcess(["--resume", "--uffd-socket", socketPath, "--layout", layoutPath], waitReady: false)
        defer { w.stop() }
        var server = FaultServer(handshake: try listener.accept(timeoutMilliseconds: 60_000))
        _ = try w.waitFor("ready", timeout: 60)
        var removed = Set<Int>(), removeEvents = 0, faults = 0
        let src = UnsafeRawBufferPointer(source)

        w.send("verify")
        var v = try serve(&server, w, source: src, removed: &removed, removeEvents: &removeEvents, faults: &faults, until: "verified")
        let validBefore = try XCTUnwrap((v["valid"] as? NSNumber)?.intValue, "verified line without valid: \(v)")
        XCTAssertEqual(validBefore, pages - pages / 4)
        XCTAssertEqual(faults, pages)

        // Drop three served pattern pages: the madvise waits until the handler has read the REMOVE event.
        let dropped = try { () throws -> [String: Any] in
            w.send("drop 5 6 7")
            return try serve(&server, w, source: src, removed: &removed, removeEvents: &removeEvents, faults: &faults, until: "dropped")
        }()
        XCTAssertEqual((dropped["count"] as? NSNumber)?.intValue, 3)
        XCTAssertGreaterThanOrEqual(removeEvents, 1)
        XCTAssertEqual(removed, [5, 6, 7])

        // Touching them again faults again; they are answered with zero pages and verify as untouched.
        w.send("verify")
        v = try serve(&server, w, source: src, removed: &removed, removeEvents: &removeEvents, faults: &faults, until: "verified")
        XCTAssertEqual(faults, pages + 3, "exactly the dropped pages fault again")
        XCTAssertEqual((v["valid"] as? NSNumber)?.intValue, validBefore - 3)
        XCTAssertEqual((v["corrupt"] as? NSNumber)?.intValue, 0)
    }
}
