import Foundation
import Glibc
import ProcessMemory
import FerryTestSupport
import XCTest

/// `ferry-workload --disk-nbd`: a small VM with a disk. Every K-th page is mirrored to an NBD disk served by a real
/// nbdkit; the tests check the consistency invariant between memory and disk at pauses, torn disks made on purpose,
/// a miniature migration (memory and disk taken at one instant, resumed under userfaultfd), a disk too small, and a
/// disk server that dies: reconnected with --disk-reconnect (and the invariant kept), fatal without.
final class WorkloadDiskTests: XCTestCase {
    static let nbdkit = "/usr/bin/nbdkit"
    static let python = "/usr/bin/python3"

    /// The workload dirties at 4 MB/s with every 2nd page mirrored, then flat out. Stopped (SIGSTOP) at random
    /// moments, its memory and its disk (read by this test, not by the workload) satisfy the invariant; at rate 0
    /// they are equal; its own `verify` agrees; quit exits 0.
    func testMirroredDiskStaysConsistentWhileDirtying() throws {
        try requireNBDKit()
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        let dir = URL(fileURLWithPath: temp.path)
        let image = try makeImage(dir, "disk.img", size: 16 << 20)
        let server = try NBDKitServer(image: image, socketPath: dir.appendingPathComponent("disk.sock").path)
        defer { server.stop() }

        let w = try WorkloadProcess(["--memory", "16M", "--dirty-rate", "4M", "--report-interval", "0.2",
                                     "--disk-nbd", "unix:" + server.socketPath, "--disk-every", "2"])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        XCTAssertEqual(pages, 4096)
        let blocks = pages / 2
        var reports = 0
        let deadline = Date().addingTimeInterval(30)
        while reports < 2 && Date() < deadline {
            let r = try w.waitFor("report", timeout: 10)
            if int(r, "disk_writes") > 0 { reports += 1 }
        }
        XCTAssertEqual(reports, 2, "two reports with disk_writes > 0")

        // Pauses: SIGSTOP, let nbdkit finish what it received, read memory and disk, check the invariant. Dirtying
        // flat out, so that most pauses land inside a mirrored write (memory written, disk write sent or not): a
        // disk written before memory would show up as a block ahead.
        _ = try w.command("rate 256M", expect: "rate")
        let reader = try ProcessMemoryReader(pid: w.pid)
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        defer { memory.deallocate() }
        let disk = UnsafeMutableRawBufferPointer.allocate(byteCount: blocks * 4096, alignment: 4096)
        defer { disk.deallocate() }
        var laggingSeen = 0
        let pauses = 12
        for _ in 0..<pauses {
            XCTAssertEqual(kill(w.pid, SIGSTOP), 0)
            try waitStopped(w.pid)
            usleep(50_000)
            XCTAssertEqual(try readRegion(reader, w.region, into: memory), pages * 4096)
            try readFile(image, into: disk)
            XCTAssertEqual(kill(w.pid, SIGCONT), 0)
            let c = DiskCheck(memory: UnsafeRawBufferPointer(memory), disk: UnsafeRawBufferPointer(disk), pages: pages, every: 2)
            XCTAssertEqual(c.torn, [], "torn blocks at a pause (pages)")
            XCTAssertLessThanOrEqual(c.lagging.count, 1, "at most one write in flight: \(c.lagging)")
            XCTAssertEqual(c.equal + c.lagging.count + c.torn.count, blocks)
            XCTAssertGreaterThan(c.maxGeneration, 1, "the disk follows the dirtying")
            laggingSeen += c.lagging.count
            usleep(UInt32.random(in: 20_000...80_000))
        }
        print("pauses: \(pauses), the disk one write behind at \(laggingSeen) of them")

        // Stopped dirtying (the rate reply comes after the loop's last write): memory and disk are equal.
        _ = try w.command("rate 0", expect: "rate")
        XCTAssertEqual(try readRegion(reader, w.region, into: memory), pages * 4096)
        try readFile(image, into: disk)
        let still = DiskCheck(memory: UnsafeRawBufferPointer(memory), disk: UnsafeRawBufferPointer(disk), pages: pages, every: 2)
        XCTAssertEqual(still.equal, blocks, "lagging \(still.lagging), torn \(still.torn)")

        let v = try w.command("verify", expect: "verified")
        XCTAssertEqual(int(v, "corrupt"), 0)
        XCTAssertEqual(int(v, "disk_blocks"), blocks)
        XCTAssertEqual(int(v, "disk_torn"), 0)
        XCTAssertLessThanOrEqual(int(v, "disk_lagging"), 1)
        XCTAssertGreaterThanOrEqual(int(v, "disk_equal"), blocks - 1)
        XCTAssertNil(v["disk_first_torn"])
        XCTAssertEqual(exitCode(w.stop()), 0)
    }

    /// Torn on purpose through the NBD socket while the workload idles: one block zeroed (one generation behind, the
    /// legitimate in-flight write, completed by `verify`), two zeroed (two cannot both be in flight: torn), an older
    /// generation, another page's pattern, a newer generation: each is found, with the first torn page; quit exits 3.
    func testTornDiskIsFoundAndFailsTheExitStatus() throws {
        try requireNBDKit()
        try requirePythonNBD()
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        let dir = URL(fileURLWithPath: temp.path)
        let image = try makeImage(dir, "disk.img", size: 16 << 20)
        let server = try NBDKitServer(image: image, socketPath: dir.appendingPathComponent("disk.sock").path)
        defer { server.stop() }
        // The URI form of the endpoint this time.
        let w = try WorkloadProcess(["--memory", "16M", "--dirty-rate", "0", "--disk-nbd", server.uri, "--disk-every", "2"])
        defer { w.stop() }
        let blocks = 2048
        let scratch = dir.appendingPathComponent("block.bin").path

        /// Writes `page`'s pattern at `generation` (0: zeros) for `pattern` into the block of `page`, from outside.
        func tamper(page: Int, pattern: Int? = nil, generation: UInt64) throws {
            var bytes = [UInt8](repeating: 0, count: 4096)
            if generation > 0 {
                bytes.withUnsafeMutableBytes { WorkloadPattern.fill($0.baseAddress!, index: UInt64(pattern ?? page), generation: generation) }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: scratch))
            try pwriteNBD(uri: server.uri, file: scratch, offset: (page / 2) * 4096, log: dir.appendingPathComponent("python.log").path)
        }
        func verify() throws -> [String: Any] {
            let v = try w.command("verify", expect: "verified")
            XCTAssertEqual(int(v, "corrupt"), 0, "memory is untouched by the tampering")
            XCTAssertEqual(int(v, "disk_blocks"), blocks)
            XCTAssertEqual(int(v, "disk_equal") + int(v, "disk_lagging") + int(v, "disk_torn"), blocks)
            return v
        }

        var v = try verify()
        XCTAssertEqual(int(v, "disk_equal"), blocks)

        // One block one generation behind (page 74 at 1, its block zeros): the one write a pause may interrupt.
        try tamper(page: 74, generation: 0)
        v = try verify()
        XCTAssertEqual(int(v, "disk_lagging"), 1)
        XCTAssertEqual(int(v, "disk_torn"), 0)
        XCTAssertNil(v["disk_first_torn"])
        // verify completed that write: the disk is level again.
        v = try verify()
        XCTAssertEqual(int(v, "disk_equal"), blocks)

        // Two blocks one behind: only one write can be in flight, so both are torn.
        try tamper(page: 40, generation: 0)
        try tamper(page: 20, generation: 0)
        v = try verify()
        XCTAssertEqual(int(v, "disk_torn"), 2)
        XCTAssertEqual(int(v, "disk_lagging"), 0)
        XCTAssertEqual(int(v, "disk_first_torn"), 20)

        // Rewriting the pages (memory, then disk) brings them level.
        try w.write(pages: [20, 40, 100, 100])
        v = try verify()
        XCTAssertEqual(int(v, "disk_equal"), blocks)

        // Page 100 is at generation 3: a block two generations old is torn.
        try tamper(page: 100, generation: 1)
        v = try verify()
        XCTAssertEqual(int(v, "disk_torn"), 1)
        XCTAssertEqual(int(v, "disk_first_torn"), 100)

        // Another page's pattern (page 122's in page 120's block), and a generation ahead of memory (page 60 at 5).
        try tamper(page: 120, pattern: 122, generation: 1)
        try tamper(page: 60, generation: 5)
        v = try verify()
        XCTAssertEqual(int(v, "disk_torn"), 3)
        XCTAssertEqual(int(v, "disk_first_torn"), 60)
        XCTAssertEqual(int(v, "disk_lagging"), 0)

        XCTAssertEqual(exitCode(w.stop()), 3, "a torn disk fails the exit status")
    }

    /// A migration in miniature: the source dirties at 8 MB/s, is stopped, its memory and its disk image are taken at
    /// that instant, and a `--resume` workload gets the memory through userfaultfd faults served here and the disk
    /// copy through another nbdkit. Its verify finds both from one instant; it keeps running on the new disk.
    func testResumedWorkloadFindsMemoryAndDiskFromOneInstant() throws {
        let v = try miniatureMigration(diskFromAnotherInstant: false) { w in
            // It keeps dirtying on the destination's disk, then finds memory and disk level.
            _ = try w.command("rate 8M", expect: "rate")
            var writes = 0
            let deadline = Date().addingTimeInterval(20)
            while writes == 0 && Date() < deadline { writes = int(try w.waitFor("report", timeout: 10), "disk_writes") }
            XCTAssertGreaterThan(writes, 0)
            _ = try w.command("rate 0", expect: "rate")
            let again = try w.command("verify", expect: "verified")
            XCTAssertEqual(int(again, "corrupt"), 0)
            XCTAssertEqual(int(again, "disk_torn"), 0)
            XCTAssertEqual(int(again, "disk_lagging"), 0)
            XCTAssertEqual(int(again, "disk_equal"), 2048)
            XCTAssertEqual(exitCode(w.stop()), 0)
        }
        XCTAssertEqual(int(v, "corrupt"), 0)
        XCTAssertEqual(int(v, "disk_blocks"), 2048)
        XCTAssertEqual(int(v, "disk_torn"), 0, "first torn page: \(v["disk_first_torn"] ?? "none")")
        XCTAssertLessThanOrEqual(int(v, "disk_lagging"), 1)
        XCTAssertGreaterThanOrEqual(int(v, "disk_equal"), 2047)
    }

    /// The same with the disk copied half a second before the memory: the resumed workload finds the disk torn.
    func testResumedWorkloadFindsADiskFromAnotherInstantTorn() throws {
        let v = try miniatureMigration(diskFromAnotherInstant: true) { w in
            XCTAssertEqual(exitCode(w.stop()), 3)
        }
        XCTAssertEqual(int(v, "corrupt"), 0, "memory alone is fine")
        XCTAssertGreaterThan(int(v, "disk_torn"), 0)
        XCTAssertNotNil(v["disk_first_torn"])
    }

    /// A disk one block short of ceil(pages / K) blocks is refused with the sizes; exactly that many is accepted.
    func testDiskTooSmallIsRefused() throws {
        try requireNBDKit()
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        let dir = URL(fileURLWithPath: temp.path)
        let small = try makeImage(dir, "small.img", size: (8 << 20) - 4096)
        let smallServer = try NBDKitServer(image: small, socketPath: dir.appendingPathComponent("small.sock").path)
        defer { smallServer.stop() }
        let w = try WorkloadProcess(["--memory", "16M", "--disk-nbd", "unix:" + smallServer.socketPath, "--disk-every", "2"],
                                    waitReady: false)
        var error: [String: Any]?
        while error == nil, let line = try w.nextLine(timeout: 30) {
            XCTAssertNotEqual(line["event"] as? String, "ready")
            if line["event"] as? String == "error" { error = line }
        }
        let message = error?["message"] as? String ?? ""
        XCTAssertEqual(message, "disk 8188 KiB too small for 4096 pages mirrored every 2: needs 8 MiB")
        XCTAssertEqual(exitCode(w.stop()), 2)

        let exact = try makeImage(dir, "exact.img", size: 8 << 20)
        let exactServer = try NBDKitServer(image: exact, socketPath: dir.appendingPathComponent("exact.sock").path)
        defer { exactServer.stop() }
        let ok = try WorkloadProcess(["--memory", "16M", "--disk-nbd", "unix:" + exactServer.socketPath, "--disk-every", "2"])
        XCTAssertEqual(int(try ok.command("verify", expect: "verified"), "disk_equal"), 2048)
        XCTAssertEqual(exitCode(ok.stop()), 0)
    }

    /// The disk server dies (SIGKILL) while the workload dirties at 4 MB/s with `--disk-reconnect 20`; 2 s later a
    /// new nbdkit serves the same image on the same socket path. The workload, blocked in its synchronous write all
    /// along, reconnects, redoes the write and goes on; memory and disk are still from one instant (its verify, and
    /// this test's own read of both), the reconnect is counted, quit exits 0. With `--pidfile`: the child's PID, once
    /// ready. Without reconnect the workload would end with an error at the first write after the kill.
    func testDiskReconnectsWhenTheServerComesBack() throws {
        try requireNBDKit()
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        let dir = URL(fileURLWithPath: temp.path)
        let image = try makeImage(dir, "disk.img", size: 16 << 20)
        let socketPath = dir.appendingPathComponent("disk.sock").path
        var server = try NBDKitServer(image: image, socketPath: socketPath)
        defer { server.stop() }
        let pidfile = dir.appendingPathComponent("vm.pid").path

        let w = try WorkloadProcess(["--memory", "16M", "--dirty-rate", "4M", "--report-interval", "0.2",
                                     "--disk-nbd", "unix:" + socketPath, "--disk-every", "2",
                                     "--disk-reconnect", "20", "--pidfile", pidfile])
        defer { w.stop() }
        let pages = Int(w.regionSize / 4096)
        let blocks = pages / 2

        // The pidfile, written after the ready line: the PID and a newline, renamed into place.
        XCTAssertTrue(waitUntil(timeout: 10) { FileManager.default.fileExists(atPath: pidfile) }, "no pidfile \(pidfile)")
        XCTAssertEqual(try String(contentsOfFile: pidfile, encoding: .utf8), "\(w.pid)\n")
        XCTAssertFalse(FileManager.default.fileExists(atPath: pidfile + ".tmp"))

        var writesBefore = 0
        let deadline = Date().addingTimeInterval(30)
        while writesBefore == 0 && Date() < deadline { writesBefore = int(try w.waitFor("report", timeout: 10), "disk_writes") }
        XCTAssertGreaterThan(writesBefore, 0)

        // The server dies; its socket file stays behind (a new nbdkit would refuse it), so it goes too.
        server.kill()
        XCTAssertEqual(unlink(socketPath), 0)
        sleep(2)
        XCTAssertTrue(w.child.isRunning, "the workload waits for its disk instead of failing: \(w.child.collected.stdout)")
        server = try NBDKitServer(image: image, socketPath: socketPath)

        let reconnected = try w.waitFor("disk_reconnected", timeout: 20)
        XCTAssertGreaterThanOrEqual(int(reconnected, "after_ms"), 1500, "\(reconnected)")
        XCTAssertGreaterThanOrEqual(int(reconnected, "attempts"), 2, "\(reconnected)")
        // It goes on dirtying on the new connection.
        var report: [String: Any] = [:]
        while int(report, "disk_writes") <= writesBefore + 100 && Date() < deadline.addingTimeInterval(30) {
            report = try w.waitFor("report", timeout: 10)
        }
        XCTAssertGreaterThan(int(report, "disk_writes"), writesBefore + 100)
        XCTAssertEqual(int(report, "disk_reconnects"), 1)
        XCTAssertEqual(int(report, "corrupt"), 0)

        // Stopped dirtying: memory and disk from one instant, read by this test and by the workload.
        _ = try w.command("rate 0", expect: "rate")
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        defer { memory.deallocate() }
        let disk = UnsafeMutableRawBufferPointer.allocate(byteCount: blocks * 4096, alignment: 4096)
        defer { disk.deallocate() }
        XCTAssertEqual(try readRegion(ProcessMemoryReader(pid: w.pid), w.region, into: memory), pages * 4096)
        try readFile(image, into: disk)
        let c = DiskCheck(memory: UnsafeRawBufferPointer(memory), disk: UnsafeRawBufferPointer(disk), pages: pages, every: 2)
        XCTAssertEqual(c.torn, [], "torn blocks after the reconnect (pages)")
        XCTAssertLessThanOrEqual(c.lagging.count, 1, "\(c.lagging)")
        XCTAssertGreaterThan(c.maxGeneration, 1)

        let v = try w.command("verify", expect: "verified")
        XCTAssertEqual(int(v, "corrupt"), 0)
        XCTAssertEqual(int(v, "disk_blocks"), blocks)
        XCTAssertEqual(int(v, "disk_torn"), 0, "first torn page: \(v["disk_first_torn"] ?? "none")")
        XCTAssertLessThanOrEqual(int(v, "disk_lagging"), 1)
        XCTAssertGreaterThanOrEqual(int(v, "disk_equal"), blocks - 1)

        let exit = try w.command("quit", expect: "exit")
        XCTAssertEqual(int(exit, "disk_reconnects"), 1)
        XCTAssertEqual(int(exit, "disk_torn_seen"), 0)
        XCTAssertEqual(exitCode(w.stop()), 0)
    }

    /// Without `--disk-reconnect`, a disk server killed while the workload dirties ends the workload at its next
    /// mirrored write: a JSON error naming the write, exit status 2.
    func testLostDiskWithoutReconnectEndsTheWorkload() throws {
        try requireNBDKit()
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        let dir = URL(fileURLWithPath: temp.path)
        let image = try makeImage(dir, "disk.img", size: 16 << 20)
        let server = try NBDKitServer(image: image, socketPath: dir.appendingPathComponent("disk.sock").path)
        defer { server.stop() }
        let w = try WorkloadProcess(["--memory", "16M", "--dirty-rate", "4M", "--report-interval", "0.2",
                                     "--disk-nbd", "unix:" + server.socketPath, "--disk-every", "2"])
        defer { w.stop() }
        var writes = 0
        let deadline = Date().addingTimeInterval(30)
        while writes == 0 && Date() < deadline { writes = int(try w.waitFor("report", timeout: 10), "disk_writes") }
        XCTAssertGreaterThan(writes, 0)

        server.kill()
        var error: [String: Any]?
        let until = Date().addingTimeInterval(10)
        while error == nil && Date() < until, let line = try w.nextLine(timeout: 1) {
            XCTAssertNotEqual(line["event"] as? String, "disk_reconnected")
            if line["event"] as? String == "error" { error = line }
        }
        let message = error?["message"] as? String ?? ""
        XCTAssertTrue(message.hasPrefix("disk write of page "), message)
        XCTAssertFalse(message.contains("reconnect"), message)
        XCTAssertEqual(w.child.wait(timeout: 10), 2)
        XCTAssertEqual(exitCode(w.stop()), 2)
    }

    /// `--pidfile` in a directory that does not exist, or naming a directory, is refused before the workload starts.
    func testUnwritablePidfileIsRefused() throws {
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        for (path, expected) in [(temp.path + "/missing/vm.pid", "cannot create " + temp.path + "/missing/vm.pid.tmp"),
                                 (temp.path, "is a directory")] {
            let w = try WorkloadProcess(["--memory", "1M", "--pidfile", path], waitReady: false)
            var error: [String: Any]?
            while error == nil, let line = try w.nextLine(timeout: 30) {
                XCTAssertNotEqual(line["event"] as? String, "ready")
                if line["event"] as? String == "error" { error = line }
            }
            let message = error?["message"] as? String ?? ""
            XCTAssertTrue(message.hasPrefix("--pidfile \(path)") && message.contains(expected), message)
            XCTAssertEqual(exitCode(w.stop()), 2)
        }
    }

    // MARK: - The miniature migration

    /// Runs source and destination and returns the destination's first verify line; `then` gets the destination.
    func miniatureMigration(diskFromAnotherInstant: Bool, then: (WorkloadProcess) throws -> Void) throws -> [String: Any] {
        try requireNBDKit()
        let temp = TemporaryDirectory(prefix: "ferry-workload-disk")
        let dir = URL(fileURLWithPath: temp.path)
        let sourceImage = try makeImage(dir, "source.img", size: 16 << 20)
        let destImage = dir.appendingPathComponent("dest.img").path
        let layout = dir.appendingPathComponent("layout.json").path
        let sourceServer = try NBDKitServer(image: sourceImage, socketPath: dir.appendingPathComponent("source.sock").path)
        defer { sourceServer.stop() }

        let source = try WorkloadProcess(["--memory", "16M", "--dirty-rate", "8M", "--report-interval", "0.2",
                                          "--disk-nbd", "unix:" + sourceServer.socketPath, "--disk-every", "2",
                                          "--layout-out", layout])
        defer { source.stop() }
        let pages = Int(source.regionSize / 4096)
        var writes = 0
        let deadline = Date().addingTimeInterval(20)
        while writes < 500 && Date() < deadline { writes = int(try source.waitFor("report", timeout: 10), "disk_writes") }
        XCTAssertGreaterThanOrEqual(writes, 500)
        if diskFromAnotherInstant {
            try FileManager.default.copyItem(atPath: sourceImage, toPath: destImage)
            usleep(500_000)
        }
        // The pause: stopped, nbdkit has applied what it received; memory and disk taken now.
        XCTAssertEqual(kill(source.pid, SIGSTOP), 0)
        try waitStopped(source.pid)
        usleep(100_000)
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: pages * 4096, alignment: 4096)
        defer { memory.deallocate() }
        XCTAssertEqual(try readRegion(ProcessMemoryReader(pid: source.pid), source.region, into: memory), pages * 4096)
        if !diskFromAnotherInstant { try FileManager.default.copyItem(atPath: sourceImage, toPath: destImage) }
        kill(source.pid, SIGKILL) // switched over: the source never runs again
        source.stop()

        let destServer = try NBDKitServer(image: destImage, socketPath: dir.appendingPathComponent("dest.sock").path)
        defer { destServer.stop() }
        let uffdSocket = dir.appendingPathComponent("uffd.sock").path
        let listener = try UFFDHandshakeListener(path: uffdSocket)
        let dest = try WorkloadProcess(["--resume", "--uffd-socket", uffdSocket, "--layout", layout, "--dirty-rate", "0",
                                        "--disk-nbd", destServer.uri, "--disk-every", "2"], waitReady: false)
        defer { dest.stop() }
        var server = FaultServer(handshake: try listener.accept(timeoutMilliseconds: 20_000))
        _ = try dest.waitFor("ready", timeout: 20)

        // Serve every fault from the memory taken at the pause until the verify line comes.
        dest.send("verify")
        var verified: [String: Any]?
        var faults = 0
        let until = Date().addingTimeInterval(120)
        while verified == nil && Date() < until {
            for e in try server.nextEvents(timeoutMilliseconds: 20) where e.kind == .pageFault {
                guard let (_, offset) = server.mappings.locate(e.address) else {
                    XCTFail("fault at 0x\(String(e.address, radix: 16)) outside the mappings"); continue
                }
                let page = Int(offset / 4096)
                _ = try server.copy(page: UnsafeRawBufferPointer(rebasing: memory[(page * 4096)..<((page + 1) * 4096)]),
                                    to: e.address & ~4095)
                faults += 1
            }
            while verified == nil, let line = try dest.nextLine(timeout: 0) {
                let event = line["event"] as? String
                if event == "verified" { verified = line }
                if event == "error" || event == "corrupt" { XCTFail("destination workload: \(line)") }
            }
        }
        XCTAssertEqual(faults, pages, "one fault per page")
        guard let verified else { throw ProcessMemoryError("no verify result from the resumed workload") }
        print("resumed (disk \(diskFromAnotherInstant ? "from another instant" : "from the pause")): \(verified)")
        try then(dest)
        return verified
    }

    // MARK: - Tools

    func requireNBDKit() throws {
        try require(FileManager.default.isExecutableFile(atPath: Self.nbdkit), "\(Self.nbdkit) is not installed (scripts/setup.sh)")
    }

    func requirePythonNBD() throws {
        let has = FileManager.default.isExecutableFile(atPath: Self.python)
            && (try? runTool(Self.python, ["-c", "import nbd"], log: "/dev/null")) == 0
        try require(has, "\(Self.python) with libnbd's nbd module is not installed (python3-libnbd)")
    }

    /// Writes the file's bytes at `offset` of the export, as a second NBD client (libnbd's Python binding).
    func pwriteNBD(uri: String, file: String, offset: Int, log: String) throws {
        let script = """
        import nbd, sys
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        h.pwrite(open(sys.argv[2], 'rb').read(), int(sys.argv[3]))
        if h.can_flush(): h.flush()
        h.shutdown()
        """
        let status = try runTool(Self.python, ["-c", script, uri, file, String(offset)], log: log)
        XCTAssertEqual(status, 0, "nbd pwrite failed: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    }
}

/// Memory and disk compared block by block, independently of the workload's own check: equal generations, the disk
/// one behind (pages), or torn (pages). A pause (SIGSTOP) can also land inside the memory half of a mirrored write,
/// while `WorkloadPattern.fill` rewrites the page: that page reads as neither generation, its block still holds the
/// previous one. It is the one write in flight, with its disk half not sent yet, and counts as lagging.
private struct DiskCheck {
    var equal = 0
    var lagging: [Int] = []
    var torn: [Int] = []
    var maxGeneration: UInt64 = 0

    init(memory: UnsafeRawBufferPointer, disk: UnsafeRawBufferPointer, pages: Int, every: Int) {
        func generation(_ v: WorkloadPattern.Verdict) -> UInt64? {
            switch v {
            case .untouched: return 0
            case .valid(let g): return g
            case .corrupt: return nil
            }
        }
        for block in 0..<((pages + every - 1) / every) {
            let page = block * every
            let m = generation(WorkloadPattern.verify(memory.baseAddress! + page * 4096, index: UInt64(page)))
            let d = generation(WorkloadPattern.verify(disk.baseAddress! + block * 4096, index: UInt64(page)))
            guard let d else { torn.append(page); continue }
            guard let m else {
                if Self.midFill(memory.baseAddress! + page * 4096, page: page, from: d) { lagging.append(page) } else { torn.append(page) }
                continue
            }
            maxGeneration = max(maxGeneration, d)
            if d == m { equal += 1 } else if m >= 1 && d == m - 1 { lagging.append(page) } else { torn.append(page) }
        }
    }

    /// Whether `memory` is page `page` stopped inside its rewrite from generation `from` to `from + 1`.
    static func midFill(_ memory: UnsafeRawPointer, page: Int, from: UInt64) -> Bool {
        WorkloadPattern.interruptedFill(memory, index: UInt64(page)) == from + 1
    }
}

/// nbdkit's file plugin serving an image on a Unix socket, spawned with posix_spawn (no Foundation.Process, whose
/// child reaping could take the workload's exit status) and ended by its pid.
private final class NBDKitServer {
    let pid: pid_t
    let socketPath: String
    var uri: String { "nbd+unix:///?socket=\(socketPath)" }
    private var stopped = false

    init(image: String, socketPath: String) throws {
        self.socketPath = socketPath
        let log = socketPath + ".log"
        pid = try spawnTool(WorkloadDiskTests.nbdkit, ["--exit-with-parent", "-U", socketPath, "file", image], log: log)
        let deadline = Date().addingTimeInterval(10)
        var st = stat()
        while stat(socketPath, &st) != 0 {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                stopped = true
                throw ProcessMemoryError("nbdkit exited (status \(status)): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
            }
            if Date() > deadline { stop(); throw ProcessMemoryError("nbdkit did not create \(socketPath) within 10 s") }
            usleep(10_000)
        }
    }

    deinit { stop() }

    func stop() { end(SIGTERM) }

    /// Kills the server at once (SIGKILL), as a crash: connections reset, the socket file left behind.
    func kill() { end(SIGKILL) }

    private func end(_ signal: Int32) {
        guard !stopped else { return }
        stopped = true
        Glibc.kill(pid, signal)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
    }
}

/// Starts `path` with stdin from /dev/null and stdout and stderr to `log`.
private func spawnTool(_ path: String, _ arguments: [String], log: String) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    let argv = ([path] + arguments).map { strdup($0) } + [nil]
    defer { for a in argv { free(a) } }
    var pid: pid_t = 0
    let r = posix_spawn(&pid, path, &actions, nil, argv, environ)
    guard r == 0 else { throw ProcessMemoryError("posix_spawn of \(path) failed", errno: .init(rawValue: r)) }
    return pid
}

/// Runs `path` to completion (killed after `timeout` seconds); its exit code, or -1 when it did not exit normally.
private func runTool(_ path: String, _ arguments: [String], log: String, timeout: Double = 30) throws -> Int32 {
    let pid = try spawnTool(path, arguments, log: log)
    var status: Int32 = 0
    let deadline = Date().addingTimeInterval(timeout)
    while waitpid(pid, &status, WNOHANG) != pid {
        if Date() > deadline { kill(pid, SIGKILL); waitpid(pid, &status, 0); return -1 }
        usleep(5_000)
    }
    return exitCode(status) ?? -1
}

/// The exit code in a wait status, or nil when the process was killed by a signal.
/// The exit code ``ChildProcess`` reports (128 + signal when killed), or nil when it had to be killed at the deadline.
private func exitCode(_ code: Int32) -> Int32? {
    code >= 0 && code < 128 ? code : nil
}

/// A sparse image of `size` bytes in `dir`.
private func makeImage(_ dir: URL, _ name: String, size: Int) throws -> String {
    let path = dir.appendingPathComponent(name).path
    guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(size)) == 0 else {
        throw ProcessMemoryError("cannot create the \(size)-byte image \(path)", errno: .init(rawValue: errno))
    }
    return path
}

/// Reads a region of another process (process_vm_readv) into `buffer`; the bytes read.
private func readRegion(_ reader: borrowing ProcessMemoryReader, _ region: AddressRange, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
    try [region].withUnsafeBufferPointer { runs throws(ProcessMemoryError) in try reader.read(runs: runs, into: buffer) }
}

/// Reads the first `buffer.count` bytes of a file.
private func readFile(_ path: String, into buffer: UnsafeMutableRawBufferPointer) throws {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw ProcessMemoryError("open \(path)", errno: .init(rawValue: errno)) }
    defer { close(fd) }
    var done = 0
    while done < buffer.count {
        let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(done))
        guard n > 0 else { throw ProcessMemoryError("read of \(path) at \(done) ended (\(n))", errno: .init(rawValue: errno)) }
        done += n
    }
}

/// Waits until the process is in the stopped state (T in /proc/PID/stat).
private func waitStopped(_ pid: pid_t) throws {
    let deadline = Date().addingTimeInterval(5)
    while Date() < deadline {
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)] == "T" { return }
        usleep(1_000)
    }
    throw ProcessMemoryError("process \(pid) did not stop within 5 s")
}

/// An integer field of a JSON line (-1 when missing).
private func int(_ line: [String: Any], _ key: String) -> Int {
    (line[key] as? NSNumber)?.intValue ?? -1
}
