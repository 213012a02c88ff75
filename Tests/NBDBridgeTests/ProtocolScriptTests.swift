import FerryTestSupport
import Foundation
import XCTest
@testable import NBDBridge

/// libnbd's Python binding (`/usr/bin/python3`, module `nbd`) driving every command, flag and error
/// case; `set_strict_mode(0)` makes it send requests a careful client never would.
final class ProtocolScriptTests: XCTestCase {
    static let prelude = #"""
import nbd, sys, errno
uri = sys.argv[1]
def expect(err, f, what):
    try:
        f()
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        assert got == err, "%s: expected %s, got errno %s (%s)" % (what, errno.errorcode[err], e.errno, e.string)
        return
    raise AssertionError("%s: expected %s, got success" % (what, errno.errorcode[err]))

"""#

    func testEveryCommandAndFlagWithStructuredReplies() throws {
        let f = try ServerFixture(size: 128 << 20)
        defer { f.stop() }
        let r = try PythonNBD.run(Self.prelude + #"""
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df", "can_multi_conn"):
    assert getattr(h, flag)(), flag
size = h.get_size()
assert size == 128 << 20
h.pwrite(b"\xaa" * 65536, 0)
assert h.pread(65536, 0) == b"\xaa" * 65536
h.pwrite(b"\x55" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"\x55" * 4096
chunks = []
def chunk(sub, off, status, err):
    chunks.append((bytes(sub), off, status))
    return 0
assert h.pread_structured(4096, 8192, chunk, nbd.CMD_FLAG_DF) == b"\x55" * 4096
assert chunks == [(b"\x55" * 4096, 8192, nbd.READ_DATA)], chunks
h.flush()
exts = []
def cb(meta, off, entries, err):
    exts.append((meta, off, list(entries)))
    return 0
h.block_status(1 << 20, 0, cb)
assert exts[-1][0] == "base:allocation" and exts[-1][2][0:2] == [4096 * 16, 0] or exts[-1][2][1] == 0, exts
h.trim(65536, 0)
assert h.pread(65536, 0) == bytes(65536)
h.block_status(65536, 0, cb)
assert exts[-1][2] == [65536, 3], exts[-1]
h.pwrite(b"\x11" * (1 << 20), 1 << 20)
h.zero(1 << 20, 1 << 20)
assert h.pread(1 << 20, 1 << 20) == bytes(1 << 20)
h.pwrite(b"\x22" * 8192, 4 << 20)
h.zero(4096, 4 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4 << 20) == bytes(4096) + b"\x22" * 4096
h.zero(4096, 6 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.cache(1 << 20, 0)
h.block_status(size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(exts[-1][2]) == 2, exts[-1]
# The largest request (64 MiB, as nbdkit serves), written and read back whole.
largest = bytes(range(256)) * (1 << 18)
h.pwrite(largest, 48 << 20)
assert h.pread(64 << 20, 48 << 20) == largest
# A big read (larger than a slot buffer) and a big write.
big = bytes(range(256)) * (4 << 12)
h.pwrite(big, 8 << 20)
assert h.pread(len(big), 8 << 20) == big
# Error cases: the client breaks the rules on purpose.
h.set_strict_mode(0)
expect(errno.EINVAL, lambda: h.pread(4096, size), "read beyond the end")
expect(errno.EINVAL, lambda: h.pread(4096, size - 2048), "read straddling the end")
expect(errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size - 1), "write beyond the end")
expect(errno.ENOSPC, lambda: h.zero(8192, size - 4096), "zero beyond the end")
expect(errno.EINVAL, lambda: h.trim(4096, size), "trim beyond the end")
expect(errno.EINVAL, lambda: h.pread(0, 0), "zero-length read")
expect(errno.EINVAL, lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA), "read with FUA")
expect(errno.EINVAL, lambda: h.flush(nbd.CMD_FLAG_FUA), "flush with FUA")
expect(errno.EINVAL, lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE), "trim with NO_HOLE")
# Requests over the 64 MiB maximum: libnbd refuses to send them (its own limit is 64 MiB), so
# HostileClientTests.testRequestsOverTheMaximumAreRefusedAndTheConnectionGoesOn sends them raw.
expect(errno.EINVAL, lambda: h.block_status(4096, size, cb), "block status beyond the end")
# The connection is still in step after all that (the oversized payload was skipped).
assert h.pread(4096, (4 << 20) + 4096) == b"\x22" * 4096
assert h.pread(1, 0) == b"\x00"
h.shutdown()
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
        let stats = f.server.stats.snapshot
        XCTAssertEqual(stats.errorReplies, 10, "\(stats)")
        // One fdatasync each: the FUA write, the flush, the FUA zero.
        XCTAssertEqual(stats.syncs, 3, "FLUSH and FUA must each complete an fdatasync: \(stats)")
        XCTAssertEqual(stats.protocolViolations, 0, "\(stats)")
    }

    func testSimpleRepliesAndOldExportNameHandshake() throws {
        let f = try ServerFixture(size: 16 << 20, options: .init(exportName: "disk"))
        defer { f.stop() }
        let uri = "nbd+unix:///disk?socket=\(f.socketPath)"
        let r = try PythonNBD.run(Self.prelude + #"""
# Simple replies only.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
h.pwrite(b"\x33" * 4096, 4096)
assert h.pread(4096, 4096) == b"\x33" * 4096
h.set_strict_mode(0)
expect(errno.EINVAL, lambda: h.pread(33 << 20, 0), "oversized read without structured replies")
expect(errno.ENOSPC, lambda: h.pwrite(b"z" * 512, 16 << 20), "write at the end")
assert h.pread(4096, 4096) == b"\x33" * 4096
h.shutdown()
# Non-fixed newstyle, no NO_ZEROES: the client must use NBD_OPT_EXPORT_NAME and the server must
# send the 124 zero bytes, or the client would read them as a reply.
h = nbd.NBD()
h.set_handshake_flags(0)
h.connect_uri(uri)
assert h.pread(4096, 4096) == b"\x33" * 4096
h.shutdown()
h = nbd.NBD()
h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
h.connect_uri(uri)
assert h.pread(4096, 4096) == b"\x33" * 4096
h.shutdown()
print("ok")
"""#, uri: uri)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
    }

    func testOptionModeListInfoMetaContextAndUnknownExport() throws {
        let f = try ServerFixture(size: 16 << 20, options: .init(exportName: "disk", description: "test disk"))
        defer { f.stop() }
        let r = try PythonNBD.run(Self.prelude + #"""
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri("nbd+unix:///disk?socket=" + uri)
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert names == ["disk"], names
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
assert contexts == ["base:allocation"], contexts
h.set_export_name("nope")
expect(errno.ENOENT, lambda: h.opt_info(), "NBD_OPT_INFO of an unknown export")
h.set_export_name("disk")
h.opt_info()
assert h.get_size() == 16 << 20
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 << 20
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_export_description() == "test disk"
h.opt_go()
assert h.pread(512, 0) == bytes(512)
h.shutdown()
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri("nbd+unix:///disk?socket=" + uri)
h.opt_abort()
print("ok")
"""#, uri: f.socketPath)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
    }

    /// A server given no export name serves its one export under any name a client asks for (as
    /// nbdkit does), in NBD_OPT_GO and NBD_OPT_EXPORT_NAME alike: QEMU's `export=vda` and
    /// `nbd+unix:///NAME?socket=` just work. (With a name, others are refused: the test above.)
    func testUnnamedExportAnswersToAnyName() throws {
        let f = try ServerFixture(size: 8 << 20, options: .init(exportName: ""))
        defer { f.stop() }
        let r = try PythonNBD.run(Self.prelude + #"""
for name in ["vda", "disk0", "any/thing"]:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(uri)
    h.pwrite(name.encode().ljust(512, b"."), 0)
    assert h.pread(512, 0) == name.encode().ljust(512, b".")
    h.shutdown()
h = nbd.NBD()
h.set_handshake_flags(0)   # old NBD_OPT_EXPORT_NAME
h.set_export_name("vda")
h.connect_unix(uri)
assert h.get_size() == 8 << 20
h.shutdown()
print("ok")
"""#, uri: f.socketPath)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
    }

    func testReadOnlyExportRefusesWritesWithEPERM() throws {
        let f = try ServerFixture(size: 8 << 20, readOnly: true) { try fillPattern($0, offset: 0, count: 4096, seed: 5) }
        defer { f.stop() }
        let before = try SHA256Hex.of(file: f.imagePath)
        let r = try PythonNBD.run(Self.prelude + #"""
h = nbd.NBD()
h.connect_uri(uri)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
data = h.pread(4096, 0)
h.set_strict_mode(0)
expect(errno.EPERM, lambda: h.pwrite(b"w" * 4096, 0), "write to a read-only export")
expect(errno.EPERM, lambda: h.trim(4096, 0), "trim of a read-only export")
expect(errno.EPERM, lambda: h.zero(4096, 0), "zero of a read-only export")
h.flush()
assert h.pread(4096, 0) == data
h.shutdown()
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
        XCTAssertEqual(try SHA256Hex.of(file: f.imagePath), before)
    }

    func testMisalignedRequestsGetEINVALWithMinimumBlockSize() throws {
        let f = try ServerFixture(size: 8 << 20, options: .init(minimumBlockSize: 512))
        defer { f.stop() }
        let r = try PythonNBD.run(Self.prelude + #"""
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
h.pwrite(b"a" * 512, 512)
h.set_strict_mode(0)
expect(errno.EINVAL, lambda: h.pread(512, 1), "read at an unaligned offset")
expect(errno.EINVAL, lambda: h.pread(100, 0), "read of an unaligned length")
expect(errno.EINVAL, lambda: h.pwrite(b"b" * 100, 512), "write of an unaligned length")
assert h.pread(512, 512) == b"a" * 512
h.shutdown()
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
    }

    /// Multi-conn (proto.md, NBD_FLAG_CAN_MULTI_CONN): a FLUSH on connection B must make a write
    /// completed on connection A durable. Checked in the kernel: after A's write the range's pages
    /// are dirty in the page cache (cachestat); after B's FLUSH they are clean, and the server
    /// counted one completed fdatasync. (Reading back through B would pass with or without a flush:
    /// both connections share the page cache.)
    func testMultiConnFlushOnOneConnectionWritesBackWritesOfAnother() throws {
        let f = try ServerFixture(size: 8 << 20)
        defer { f.stop() }
        try requirePageCacheState(f)
        let client = try PythonNBD.start(#"""
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
assert a.can_multi_conn() and b.can_multi_conn()
print("connected")
for line in sys.stdin:
    cmd, arg = line.split()
    value = int(arg)
    if cmd == "write":     # on A, no FUA
        a.pwrite(bytes([value]) * 65536, 0)
        print("written")
    elif cmd == "flush":   # on B
        b.flush()
        print("flushed")
    elif cmd == "read":    # on B
        print("read", b.pread(65536, 0) == bytes([value]) * 65536)
a.shutdown(); b.shutdown()
"""#, uri: f.uri)
        try client.waitFor(line: "connected", timeout: 60)
        var dirty = PageCacheState?.none
        // Something outside the test (a sync(1)) could clean the pages before B flushes; write again then.
        for attempt in 1...3 {
            client.send("write \(0x70 + attempt)")
            try client.waitFor(line: "written", timeout: 60)
            let state = try PageCacheState(path: f.imagePath, offset: 0, length: 65536)
            if state.dirty > 0 { dirty = state; break }
            print("multi-conn flush: attempt \(attempt): the write left no dirty page (\(state)); writing again")
        }
        let before = try XCTUnwrap(dirty, "precondition: three writes on A never left a dirty page to flush")
        let syncsBefore = f.server.stats.snapshot.syncs
        client.send("flush 0")
        try client.waitFor(line: "flushed", timeout: 60)
        let after = try PageCacheState(path: f.imagePath, offset: 0, length: 65536)
        print("multi-conn flush: before B's FLUSH \(before); after \(after)")
        XCTAssertEqual(after.dirty + after.writeback, 0, "B's FLUSH left A's write in the page cache: \(after)")
        XCTAssertEqual(f.server.stats.snapshot.syncs, syncsBefore + 1, "B's FLUSH did not complete one fdatasync")
        client.closeInput()
        XCTAssertEqual(client.wait(timeout: 60), 0, "client: \(client.collected)")
    }

    /// Many writes in flight on two connections at once, a FLUSH on one, then every write reads
    /// back through the other.
    func testWritesOnOneConnectionReadBackThroughAnother() throws {
        let f = try ServerFixture(size: 8 << 20)
        defer { f.stop() }
        let r = try PythonNBD.run(Self.prelude + #"""
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
for i in range(64):
    a.aio_pwrite(bytes([i]) * 4096, i * 4096) if i % 2 == 0 else b.aio_pwrite(bytes([i]) * 4096, i * 4096)
while a.aio_in_flight() > 0 or b.aio_in_flight() > 0:
    if a.aio_in_flight() > 0: a.poll(-1)
    if b.aio_in_flight() > 0: b.poll(-1)
a.flush()
for i in range(64):
    assert b.pread(4096, i * 4096) == bytes([i]) * 4096, i
    assert a.pread(4096, i * 4096) == bytes([i]) * 4096, i
a.shutdown(); b.shutdown()
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
        for i in 0..<64 {
            XCTAssertEqual(try f.imageBytes(at: UInt64(i) * 4096, count: 4096), [UInt8](repeating: UInt8(i), count: 4096), "block \(i) in the image")
        }
    }

    /// tmpfs cannot fallocate(ZERO_RANGE): NO_HOLE zeroing falls back to writing zeroes, and with
    /// FAST_ZERO the server must refuse with ENOTSUP instead (proto.md, NBD_CMD_FLAG_FAST_ZERO).
    func testFastZeroRefusedWhenZeroingIsSlowOnTmpfs() throws {
        try require(path: "/dev/shm")
        let f = try ServerFixture(size: 8 << 20, inMemory: true)
        defer { f.stop() }
        XCTAssertTrue(f.store.memoryBacked)
        let r = try PythonNBD.run(Self.prelude + #"""
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\x99" * (3 << 20), 0)
expect(errno.ENOTSUP, lambda: h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO), "slow zero with FAST_ZERO")
assert h.pread(1 << 20, 0) == b"\x99" * (1 << 20)
h.zero((2 << 20) + 4096, 4096, nbd.CMD_FLAG_NO_HOLE)      # falls back to writing zeroes (over 1 MiB chunks)
assert h.pread(4096, 0) == b"\x99" * 4096
assert h.pread((2 << 20) + 4096, 4096) == bytes((2 << 20) + 4096)
h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)                # punching a hole is fast
assert h.pread(1 << 20, 0) == bytes(1 << 20)
h.shutdown()
print("ok")
"""#, uri: f.uri)
        XCTAssertTrue(r.stdout.contains("ok"), r.stdout + r.stderr)
    }
}
