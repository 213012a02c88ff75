import FerryTestSupport
import Foundation
import Glibc
import XCTest
@testable import NBDBridge

/// A fresh temporary directory (on disk, or tmpfs with `inMemory`) with a sparse image and a
/// running in-process server on a Unix socket. The directory goes when the fixture does.
final class ServerFixture {
    let directory: TemporaryDirectory
    let imagePath: String
    let socketPath: String
    let server: NBDServer
    let store: FileBlockStore
    var uri: String { "nbd+unix:///?socket=\(socketPath)" }

    init(size: UInt64 = 64 << 20, options: NBDServer.Options = .init(), readOnly: Bool = false,
         inMemory: Bool = false, fill: ((String) throws -> Void)? = nil) throws {
        directory = TemporaryDirectory(prefix: "ferry-nbd", base: inMemory ? "/dev/shm" : nil)
        imagePath = try directory.sparseFile("disk.img", size: size)
        socketPath = directory.file("nbd.sock")
        try fill?(imagePath)
        store = try FileBlockStore(path: imagePath, readOnly: readOnly)
        server = try NBDServer(store: store, options: options)
        try server.listen(NBDEndpoint.parse("unix:" + socketPath))
        try server.start()
    }

    func stop() { server.shutdown(drain: true) }

    func path(_ name: String) -> String { directory.file(name) }

    /// `count` bytes of the image at `offset`, read from the file (not through the server).
    func imageBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        let fd = open(imagePath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SupportError("open \(imagePath): errno \(errno)") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        guard n == count else { throw SupportError("pread of \(count) bytes at \(offset) of \(imagePath) returned \(n), errno \(errno)") }
        return bytes
    }
}

/// Writes `count` bytes of SplitMix64 data from `seed` at `offset` of the file at `path`.
func fillPattern(_ path: String, offset: UInt64, count: Int, seed: UInt64) throws {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SupportError("open \(path): errno \(errno)") }
    defer { close(fd) }
    let bytes = randomBytes(count: count, seed: seed)
    let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, count, off_t(offset)) }
    guard n == count else { throw SupportError("pwrite of \(count) bytes at \(offset) of \(path) returned \(n), errno \(errno)") }
}

/// Skips unless the kernel reports page-cache state (cachestat(2), Linux 6.5+) and the fixture's
/// image is on a file system whose flush writes to a device (not tmpfs, where nothing is ever clean).
func requirePageCacheState(_ f: ServerFixture) throws {
    try require(kernelFeature: "cachestat(2)", available: PageCacheState.isAvailable,
                detail: "needed to see whether a flush wrote the page cache back")
    try require(!f.store.memoryBacked, "the temporary directory \(f.directory.path) is on tmpfs: a flush there writes nothing back")
}
