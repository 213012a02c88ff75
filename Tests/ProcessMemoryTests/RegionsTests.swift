import FerryTestSupport
import Glibc
import ProcessMemory
import SystemPackage
import XCTest

/// /proc/PID/maps parsing and the choice of guest-memory regions, against a real ferry-workload process.
final class RegionsTests: XCTestCase {
    func testWorkloadRegionIsFoundAndChosen() throws {
        let w = try WorkloadProcess(["--memory", "48M", "--fill-pages", "16"])
        defer { w.stop() }
        let regions = try ProcessRegions(pid: w.pid)
        XCTAssertFalse(regions.all.isEmpty)
        let guest = regions.guestMemory()
        // The workload's 48 MiB mapping is covered by one chosen anonymous region, and it is the largest.
        let holder = guest.first { $0.range.start <= w.regionStart && $0.range.end >= w.regionStart + w.regionSize }
        XCTAssertNotNil(holder, "workload region \(w.region) not among chosen regions \(guest)")
        XCTAssertEqual(holder?.kind, .anonymous)
        XCTAssertEqual(guest.first?.range, holder?.range, "largest first")
        for pair in zip(guest, guest.dropFirst()) { XCTAssertGreaterThanOrEqual(pair.0.range.length, pair.1.range.length) }
        // Never the stack, vdso, vvar or file mappings.
        XCTAssertFalse(guest.contains { ["[stack]", "[vdso]", "[vvar]"].contains($0.path) || $0.kind == .file })
        XCTAssertTrue(regions.all.contains { $0.path == "[stack]" })
        XCTAssertTrue(regions.all.contains { $0.kind == .file && $0.executable })

        // Explicit selection (--region START-END) of exactly the workload's range.
        let text = "\(String(w.regionStart, radix: 16))-\(String(w.regionStart + w.regionSize, radix: 16))"
        let chosen = try regions.select(ranges: [try AddressRange(parsing: text)])
        XCTAssertEqual(chosen.count, 1)
        XCTAssertEqual(chosen[0].range, w.region)
        XCTAssertEqual(chosen[0].kind, .anonymous)
        // An unmapped range is refused with a clear error.
        XCTAssertThrowsError(try regions.select(ranges: [AddressRange(start: 0x1000, length: 0x2000)])) { error in
            XCTAssertTrue("\(error)".contains("not mapped in process \(w.pid)"), "\(error)")
        }
    }

    func testMapsLineParsing() throws {
        let anon = try MemoryRegion(mapsLine: "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 ")
        XCTAssertEqual(anon.kind, .anonymous)
        XCTAssertTrue(anon.isGuestMemoryCandidate)
        XCTAssertEqual(anon.range.length, 0x400000)
        let memfd = try MemoryRegion(mapsLine: "7f1000000000-7f1000200000 rw-s 00000000 00:01 1234   /memfd:guest-ram (deleted)")
        XCTAssertEqual(memfd.kind, .shmem)
        XCTAssertTrue(memfd.isGuestMemoryCandidate)
        XCTAssertEqual(memfd.path, "/memfd:guest-ram (deleted)")
        let lib = try MemoryRegion(mapsLine: "7f2000000000-7f2000010000 rw-p 0001a000 08:01 99 /usr/lib/libc.so.6")
        XCTAssertEqual(lib.kind, .file)
        XCTAssertFalse(lib.isGuestMemoryCandidate)
        let stack = try MemoryRegion(mapsLine: "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]")
        XCTAssertEqual(stack.kind, .special)
        XCTAssertFalse(stack.isGuestMemoryCandidate)
        XCTAssertThrowsError(try MemoryRegion(mapsLine: "garbage"))
        XCTAssertThrowsError(try AddressRange(parsing: "2000-1000"))
    }

    func testWrongPIDGivesNoSuchProcess() throws {
        let pid = unusedPID()
        XCTAssertThrowsError(try ProcessRegions(pid: pid)) { error in
            let e = error as? ProcessMemoryError
            XCTAssertEqual(e?.errno, .noSuchProcess)
            XCTAssertTrue(e?.message.hasPrefix("no process \(pid)") ?? false, "\(error)")
        }
        expectError({ _ = try ProcessMemoryReader(pid: pid) }) { error in
            XCTAssertEqual((error as? ProcessMemoryError)?.errno, .noSuchProcess)
        }
        expectError({ _ = try DirtyTracker(pid: pid, regions: [try MemoryRegion(mapsLine: "7f0000000000-7f0000400000 rw-p 00000000 00:00 0")]) }) { error in
            XCTAssertEqual((error as? ProcessMemoryError)?.errno, .noSuchProcess, "\(error)")
        }
    }

    /// ferry-workload --probe-pid runs the same calls as an unprivileged user (it drops to nobody first).
    func testMissingPermissionGivesClearError() throws {
        try require(root: "dropping privileges to test EPERM/EACCES")
        let target = try WorkloadProcess(["--memory", "8M", "--fill-pages", "1"])
        defer { target.stop() }
        let probe = try WorkloadProcess(["--probe-pid", String(target.pid), "--as-user", "65534"], waitReady: false)
        defer { probe.stop() }
        let result = try probe.waitFor("probe", timeout: 20)
        for key in ["regions", "reader", "tracker"] {
            let entry = result[key] as? [String: Any]
            let errno = (entry?["errno"] as? NSNumber)?.int32Value
            XCTAssertTrue(errno == EPERM || errno == EACCES, "\(key): expected EPERM/EACCES, got \(String(describing: entry))")
            let message = entry?["message"] as? String ?? ""
            XCTAssertTrue(message.contains("\(target.pid)"), "\(key) message names the pid: \(message)")
        }
    }
}
