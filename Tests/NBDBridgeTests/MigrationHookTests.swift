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
        let r = try Tools.python(#"""
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
        let script = #"""
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t = time.monotonic()
for i in range(20):
    h.pwrite(b"t" * 4096, i * 65536)
print("%.6f" % (time.monotonic() - t))
h.shutdown()
"""#
        let free = try Tools.python(script, uri: f.uri)
        let freeSeconds = try XCTUnwrap(Double(free.stdout.trimmingCharacters(in: .whitespacesAndNewlines)))
        XCTAssertEqual(f.server.throttle.writesDelayed, 0)

        // Any dirtying counts as too fast (1 B/s): every write waits 25 ms.
        f.server.throttle.enable(.init(bytesPerSecond: 1, delayNanoseconds: 25_000_000))
        let slow = try Tools.python(script, uri: f.uri)
        let slowSeconds = try XCTUnwrap(Double(slow.stdout.trimmingCharacters(in: .whitespacesAndNewlines)))
        XCTAssertGreaterThanOrEqual(slowSeconds, 20 * 0.025, "20 throttled writes took \(slowSeconds) s")
        XCTAssertGreaterThan(slowSeconds, freeSeconds + 0.4)
        XCTAssertEqual(f.server.throttle.writesDelayed, 20)
        XCTAssertEqual(f.server.throttle.totalDelayNanoseconds, 20 * 25_000_000)

        // Hot block only: a generous disk-wide limit, but one block rewritten more than 5 times per window.
        f.server.throttle.enable(.init(bytesPerSecond: 1 << 40, delayNanoseconds: 20_000_000,
                                       windowNanoseconds: 10_000_000_000, hotBlockWrites: 5))
        let hot = try Tools.python(#"""
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t = time.monotonic()
for i in range(15):
    h.pwrite(b"h" * 4096, 1 << 20)
print("%.6f" % (time.monotonic() - t))
h.shutdown()
"""#, uri: f.uri)
        let hotSeconds = try XCTUnwrap(Double(hot.stdout.trimmingCharacters(in: .whitespacesAndNewlines)))
        XCTAssertEqual(f.server.throttle.writesDelayed, 30, "10 of 15 rewrites of one block are over the limit of 5")
        XCTAssertGreaterThanOrEqual(hotSeconds, 10 * 0.020)

        f.server.throttle.disable()
        _ = try Tools.python(script, uri: f.uri)
        XCTAssertEqual(f.server.throttle.writesDelayed, 30, "a disabled throttle delayed a write")
    }

    func testQuiesceHoldsWritesUntilResume() throws {
        try Tools.require("/usr/bin/python3")
        let f = try ServerFixture(size: 8 << 20)
        defer { f.stop() }
        XCTAssertTrue(f.server.quiesce(timeoutNanoseconds: 1_000_000_000))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", #"""
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(4096, 0) == bytes(4096)   # reads still work while quiesced
h.pwrite(b"q" * 4096, 0)
h.shutdown()
"""#, f.uri]
        try process.run()
        usleep(500_000)
        XCTAssertTrue(process.isRunning, "the write should be held")
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: f.imagePath))
        XCTAssertEqual(try handle.read(upToCount: 4096), Data(count: 4096), "a write went through while quiesced")
        XCTAssertEqual(f.server.dirtyBitmap.dirtyCount, 0)
        f.server.resume()
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        XCTAssertFalse(process.isRunning)
        XCTAssertEqual(process.terminationStatus, 0)
        try handle.seek(toOffset: 0)
        XCTAssertEqual(try handle.read(upToCount: 4096), Data(repeating: UInt8(ascii: "q"), count: 4096))
        try handle.close()
        XCTAssertEqual(f.server.dirtyBitmap.dirtyCount, 1)
    }

    func testShutdownWhileQuiescedRefusesHeldWritesWithESHUTDOWN() throws {
        try Tools.require("/usr/bin/python3")
        let f = try ServerFixture(size: 8 << 20)
        XCTAssertTrue(f.server.quiesce(timeoutNanoseconds: 1_000_000_000))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        let out = Pipe()
        process.standardOutput = out
        process.arguments = ["-c", #"""
import nbd, sys, errno
h = nbd.NBD(); h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"s" * 4096, 0)
    print("written")
except nbd.Error as e:
    print("refused", e.errno)
"""#, f.uri]
        try process.run()
        usleep(300_000)
        XCTAssertTrue(process.isRunning, "the write should be held")
        f.server.shutdown(drain: true)
        process.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertTrue(text.contains("refused"), text)
        let head = try FileHandle(forReadingFrom: URL(fileURLWithPath: f.imagePath))
        XCTAssertEqual(try head.read(upToCount: 4096), Data(count: 4096), "a held write reached the disk after shutdown")
        try head.close()
        f.stop()
    }

    func testShutdownDrainsAndFlushes() throws {
        let f = try ServerFixture(size: 8 << 20)
        let r = try Tools.python(#"""
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(32):
    h.aio_pwrite(bytes([i + 1]) * 65536, i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"))
        let start = Date()
        f.server.shutdown(drain: true)
        XCTAssertLessThan(Date().timeIntervalSince(start), 5)
        XCTAssertEqual(f.server.stats.snapshot.connectionsOpen, 0)
        let data = try Data(contentsOf: URL(fileURLWithPath: f.imagePath))
        for i in 0..<32 { XCTAssertEqual(data[i * 65536], UInt8(i + 1)) }
        XCTAssertNotEqual(connectUnix(f.socketPath), 0, "the listener must be gone after shutdown")
        f.stop()
    }

    private func connectUnix(_ path: String) -> Int32 {
        (try? RawClient(path: path)).map { $0.close(); return 0 } ?? -1
    }
}
