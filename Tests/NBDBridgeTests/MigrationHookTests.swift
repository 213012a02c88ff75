import FerryTestSupport
import Foundation
import XCTest
@testable import NBDBridge

/// What the migration engine relies on: the dirty bitmap sees every write, trim and zero; the
/// throttle really delays; quiesce holds writes until resume.
final class MigrationHookTests: XCTestCase {
    func testDirtyBitmapUnit() {
        let bitmap = DirtyBitmap(diskSize: 10 << 20, blockSize: 64 << 10)
        XCTAssertEqual(bitmap.blockCount, 160)
        bitmap.markDirty(offset: 0, length: 1)
        bitmap.markDirty(offset: (63 << 16) + 100, length: 3 << 16)   // blocks 63..66, across a word boundary
        bitmap.markDirty(offset: (10 << 20) - 1, length: 1)             // last block
        XCTAssertEqual(bitmap.dirtyCount, 6)
        XCTAssertEqual(bitmap.snapshotAndClearRuns(), [0..<1, 63..<67, 159..<160])
        XCTAssertEqual(bitmap.dirtyCount, 0)
        bitmap.markAll()
        var words = [UInt64](repeating: 0, count: bitmap.wordCount)
        let taken = words.withUnsafeMutableBufferPointer { bitmap.snapshotAndClear(into: $0) }
        XCTAssertEqual(taken, 160)
        XCTAssertEqual(words[0], ~0)
        XCTAssertEqual(words[2], (1 << 32) - 1)
    }

    func testDirtyBitmapLosesNothingUnderConcurrentSnapshots() {
        let bitmap = DirtyBitmap(diskSize: 1 << 30, blockSize: 4096)
        let seen = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: bitmap.wordCount)
        seen.initialize(repeating: 0)
        defer { seen.deallocate() }
        let scratch = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: bitmap.wordCount)
        defer { scratch.deallocate() }
        let writers = 2, perWriter = 200_000
        let group = DispatchGroup()
        for w in 0..<writers {
            DispatchQueue.global().async(group: group) {
                for i in 0..<perWriter { bitmap.markDirty(offset: UInt64((i * writers + w) % 262_144) * 4096, length: 4096) }
            }
        }
        var rounds = 0
        while group.wait(timeout: .now()) == .timedOut {
            bitmap.snapshotAndClear(into: scratch)
            for i in 0..<bitmap.wordCount { seen[i] |= scratch[i] }
            rounds += 1
        }
        bitmap.snapshotAndClear(into: scratch)
        for i in 0..<bitmap.wordCount { seen[i] |= scratch[i] }
        XCTAssertEqual(seen.reduce(0) { $0 + $1.nonzeroBitCount }, 262_144, "a mark was lost across \(rounds) snapshots")
    }

    func testEveryWriteTrimAndZeroMarksTheBitmap() throws {
        let f = try ServerFixture(size: 64 << 20, options: .init(dirtyBlockSize: 64 << 10))
        defer { f.stop() }
        let bitmap = f.server.dirtyBitmap
        XCTAssertEqual(bitmap.snapshotAndClearRuns(), [])
        let r = try PythonNBD.run(#"""
import nbd, sys, random
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pread(1 << 20, 40 << 20)                    # reads never dirty
h.pwrite(b"a" * 4096, 0)                      # block 0
h.pwrite(b"b" * 200000, (1 << 20) + 100)      # blocks 16..19
h.trim(65536, 10 << 20)                       # block 160
h.zero(131072, 20 << 20)                      # blocks 320, 321
h.zero(4096, 25 << 20, nbd.CMD_FLAG_NO_HOLE)  # block 400
h.pwrite(b"c" * 2, (30 << 20) - 1, nbd.CMD_FLAG_FUA)  # blocks 479, 480
random.seed(7)
blocks = set()
for i in range(300):
    off = random.randrange(0, (64 << 20) - 8192) & ~511
    length = random.choice([512, 4096, 8192])
    h.aio_pwrite(bytes(length), off)
    blocks.update(range(off >> 16, (off + length - 1 >> 16) + 1))
while h.aio_in_flight() > 0:
    h.poll(-1)
print(" ".join(str(b) for b in sorted(blocks)))
h.shutdown()
"""#, uri: f.uri)
        var expected = Set([0, 16, 17, 18, 19, 160, 320, 321, 400, 479, 480])
        let randomBlocks = r.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int($0) }
        XCTAssertGreaterThan(randomBlocks.count, 200, r.stdout + r.stderr)
        expected.formUnion(randomBlocks)
        var marked = Set<Int>()
        for run in bitmap.snapshotAndClearRuns() { marked.formUnion(run) }
        XCTAssertEqual(marked.subtracting(expected), [], "blocks marked that nothing wrote")
        XCTAssertEqual(expected.subtracting(marked), [], "writes escaped the dirty bitmap")
        XCTAssertEqual(bitmap.dirtyCount, 0)
    }

    func testThrottleDelaysWritesWhenEnabledOnly() throws {
        let f = try ServerFixture(size: 16 << 20)
        defer { f.stop() }
        // 20 writes of distinct bytes to distinct blocks; the client times them itself.
        let script = #"""
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t = time.monotonic()
for i in range(20):
    h.pwrite(bytes([0x40 + i]) * 4096, i * 65536)
print("%.6f" % (time.monotonic() - t))
h.shutdown()
"""#
        func seconds(_ r: ToolResult) throws -> Double {
            try XCTUnwrap(Double(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "no time printed: \(r)")
        }
        try PythonNBD.run(script, uri: f.uri)
        XCTAssertEqual(f.server.throttle.writesDelayed, 0, "a throttle that was never enabled delayed a write")
        XCTAssertEqual(f.server.throttle.totalDelayNanoseconds, 0, "a throttle that was never enabled held a write")

        // Any dirtying counts as too fast (1 B/s): every write is held 25 ms before it is issued.
        // totalDelayNanoseconds is measured (monotonic clock, timeout armed -> expired), so a
        // throttle that counted writes but let them through would show ~0 here.
        f.server.throttle.enable(.init(bytesPerSecond: 1, delayNanoseconds: 25_000_000))
        let slowSeconds = try seconds(try PythonNBD.run(script, uri: f.uri))
        XCTAssertEqual(f.server.throttle.writesDelayed, 20)
        let held = f.server.throttle.totalDelayNanoseconds
        XCTAssertGreaterThanOrEqual(held, 20 * 25_000_000, "20 throttled writes were held \(held) ns in all, less than 20 × 25 ms")
        // The client waited at least as long (a lower bound only: load can only make it slower).
        XCTAssertGreaterThanOrEqual(slowSeconds, 20 * 0.025, "20 throttled writes took the client \(slowSeconds) s")
        // Delayed, never dropped: every write is in the image.
        for i in 0..<20 {
            XCTAssertEqual(try f.imageBytes(at: UInt64(i) * 65536, count: 4096), [UInt8](repeating: UInt8(0x40 + i), count: 4096),
                           "throttled write \(i) is not in the image")
        }

        // Hot block only: a generous disk-wide limit, but one block rewritten more than 5 times per window.
        f.server.throttle.enable(.init(bytesPerSecond: 1 << 40, delayNanoseconds: 20_000_000,
                                       windowNanoseconds: 10_000_000_000, hotBlockWrites: 5))
        let hot = try PythonNBD.run(#"""
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t = time.monotonic()
for i in range(15):
    h.pwrite(b"h" * 4096, 1 << 20)
print("%.6f" % (time.monotonic() - t))
h.shutdown()
"""#, uri: f.uri)
        let hotSeconds = try seconds(hot)
        XCTAssertEqual(f.server.throttle.writesDelayed, 30, "10 of 15 rewrites of one block are over the limit of 5")
        let hotHeld = f.server.throttle.totalDelayNanoseconds - held
        XCTAssertGreaterThanOrEqual(hotHeld, 10 * 20_000_000, "10 hot-block writes were held \(hotHeld) ns in all, less than 10 × 20 ms")
        XCTAssertGreaterThanOrEqual(hotSeconds, 10 * 0.020)

        f.server.throttle.disable()
        let heldBefore = f.server.throttle.totalDelayNanoseconds
        try PythonNBD.run(script, uri: f.uri)
        XCTAssertEqual(f.server.throttle.writesDelayed, 30, "a disabled throttle delayed a write")
        XCTAssertEqual(f.server.throttle.totalDelayNanoseconds, heldBefore, "a disabled throttle held a write")
    }

    /// While quiesced, a write that has reached the server (its request counted) is neither
    /// performed (image and bitmap untouched) nor answered (the client is still waiting); resume
    /// lets it through.
    func testQuiesceHoldsWritesUntilResume() throws {
        let f = try ServerFixture(size: 8 << 20)
        defer { f.stop() }
        XCTAssertTrue(f.server.quiesce(timeoutNanoseconds: 1_000_000_000))
        let client = try PythonNBD.start(#"""
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(4096, 0) == bytes(4096)   # reads still work while quiesced
print("read")
h.pwrite(b"q" * 4096, 0)
print("written")
h.shutdown()
"""#, uri: f.uri)
        try client.waitFor(line: "read", timeout: 60)
        // The read was request 1; the write is held once the server has parsed request 2.
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.stats.snapshot.requests >= 2 },
                      "the write never reached the server: \(f.server.stats.snapshot)")
        XCTAssertEqual(try f.imageBytes(at: 0, count: 4096), [UInt8](repeating: 0, count: 4096), "a write went through while quiesced")
        XCTAssertEqual(f.server.dirtyBitmap.dirtyCount, 0, "a held write marked the bitmap")
        XCTAssertEqual(f.server.gate.writesInFlight, 0, "a held write is counted past the gate")
        XCTAssertNil(try client.nextLine(timeout: 0), "the held write was answered while quiesced")
        XCTAssertTrue(client.isRunning, "the client stopped waiting for its held write")

        f.server.resume()
        try client.waitFor(line: "written", timeout: 60)
        XCTAssertEqual(client.wait(timeout: 60), 0, "client: \(client.collected)")
        XCTAssertEqual(try f.imageBytes(at: 0, count: 4096), [UInt8](repeating: UInt8(ascii: "q"), count: 4096))
        XCTAssertEqual(f.server.dirtyBitmap.dirtyCount, 1)
    }

    func testShutdownWhileQuiescedRefusesHeldWritesWithESHUTDOWN() throws {
        let f = try ServerFixture(size: 8 << 20)
        defer { f.stop() }
        XCTAssertTrue(f.server.quiesce(timeoutNanoseconds: 1_000_000_000))
        let client = try PythonNBD.start(#"""
import nbd, sys, errno
h = nbd.NBD(); h.connect_uri(sys.argv[1])
print("connected")
try:
    h.pwrite(b"s" * 4096, 0)
    print("written")
except nbd.Error as e:
    # libnbd gives the errno as a number or by name: print the name.
    print("refused", errno.errorcode[e.errno] if isinstance(e.errno, int) else e.errno)
"""#, uri: f.uri)
        try client.waitFor(line: "connected", timeout: 60)
        // The write is held once the server has parsed it (its first request).
        XCTAssertTrue(waitUntil(timeout: 60) { f.server.stats.snapshot.requests >= 1 },
                      "the write never reached the server: \(f.server.stats.snapshot)")
        XCTAssertTrue(client.isRunning, "the client stopped waiting for its held write")
        f.server.shutdown(drain: true)
        let answer = try XCTUnwrap(try client.nextLine(timeout: 60), "no answer to the held write after shutdown")
        XCTAssertEqual(answer, "refused ESHUTDOWN", "the held write's answer")
        XCTAssertEqual(client.wait(timeout: 60), 0, "client: \(client.collected)")
        XCTAssertEqual(try f.imageBytes(at: 0, count: 4096), [UInt8](repeating: 0, count: 4096), "a held write reached the disk after shutdown")
        XCTAssertEqual(f.server.dirtyBitmap.dirtyCount, 0)
    }

    func testShutdownDrainsAndFlushes() throws {
        let f = try ServerFixture(size: 8 << 20)
        let r = try PythonNBD.run(#"""
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(32):
    h.aio_pwrite(bytes([i + 1]) * 65536, i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"))
        // The 2 MiB written sit in the page cache, dirty; shutdown must write them back (fdatasync).
        try requirePageCacheState(f)
        let before = try PageCacheState(path: f.imagePath, offset: 0, length: 32 * 65536)
        XCTAssertGreaterThan(before.dirty, 0, "precondition: the writes left no dirty pages (\(before)); something synced the disk")
        let start = Date()
        f.server.shutdown(drain: true)
        XCTAssertLessThan(Date().timeIntervalSince(start), 30, "shutdown took over 30 s")
        XCTAssertEqual(f.server.stats.snapshot.connectionsOpen, 0)
        let after = try PageCacheState(path: f.imagePath, offset: 0, length: 32 * 65536)
        XCTAssertEqual(after.dirty + after.writeback, 0, "shutdown left the writes unflushed: \(after)")
        let data = try Data(contentsOf: URL(fileURLWithPath: f.imagePath))
        for i in 0..<32 { XCTAssertEqual(data[(i * 65536)..<((i + 1) * 65536)], Data(repeating: UInt8(i + 1), count: 65536), "write \(i)") }
        XCTAssertNotEqual(connectUnix(f.socketPath), 0, "the listener must be gone after shutdown")
        f.stop()
    }

    private func connectUnix(_ path: String) -> Int32 {
        (try? RawClient(path: path)).map { $0.close(); return 0 } ?? -1
    }
}
