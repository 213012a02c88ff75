import Crypto
import FerryTestSupport
import Glibc
import SystemPackage
import Testing
@testable import URing

@Suite struct FileIOTests {
    /// Writes 64 MiB in 1 MiB pieces with many writes in flight, reads it back the same way
    /// (plain and registered buffers), and compares SHA-256 digests.
    @Test func writeThenReadRoundTripHasEqualChecksums() throws {
        let directory = TemporaryDirectory()
        let path = directory.file("image")
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        try #require(fd >= 0, "open \(path): errno \(errno)")
        defer { close(fd) }

        let size = 64 << 20, piece = 1 << 20
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { source.deallocate() }
        fillRandom(source, seed: 0xF3)
        let expected = SHA256.hash(data: UnsafeRawBufferPointer(source))

        var ring = try IORing(entries: 32)
        var queued = 0, completed = 0
        while completed < size / piece {
            while queued < size / piece {
                let chunk = UnsafeRawBufferPointer(rebasing: source[(queued * piece)..<((queued + 1) * piece)])
                do {
                    try ring.prepareWrite(fd, from: chunk, offset: UInt64(queued * piece), tag: UInt64(queued))
                    queued += 1
                } catch .submissionQueueFull { break }
            }
            try ring.submitAndWait(1)
            try ring.drainCompletions { (completion: Completion) throws(Errno) in
                #expect(try completion.get() == piece, "write \(completion.tag) was short")
                completed += 1
            }
        }

        // Read back: half through plain reads, half through a registered buffer.
        let readBack = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { readBack.deallocate() }
        try ring.registerBuffers([readBack])
        for index in 0..<(size / piece) {
            let target = UnsafeMutableRawBufferPointer(rebasing: readBack[(index * piece)..<((index + 1) * piece)])
            if index % 2 == 0 {
                try ring.prepareRead(fd, into: target, offset: UInt64(index * piece), tag: UInt64(index))
            } else {
                try ring.prepareReadFixed(fd, into: target, offset: UInt64(index * piece), bufferIndex: 0, tag: UInt64(index))
            }
            try ring.submitAndWait(1)
            try ring.drainCompletions { (completion: Completion) throws(Errno) in
                #expect(try completion.get() == piece)
            }
        }
        try ring.unregisterBuffers()
        #expect(SHA256.hash(data: UnsafeRawBufferPointer(readBack)) == expected, "read back through the ring")
        // And the file itself, read by the kernel's ordinary path, holds the bytes written.
        #expect(try SHA256Hex.of(file: path) == SHA256Hex.of(UnsafeRawBufferPointer(source)), "the file on disk")
        #expect(ring.inFlight == 0)
    }

    @Test func readOfBadDescriptorCarriesErrno() throws {
        var ring = try IORing(entries: 4)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
        defer { buffer.deallocate() }
        try ring.prepareRead(9_999, into: buffer, offset: 0, tag: 7)
        let completion = try ring.waitCompletion()
        #expect(completion.tag == 7)
        #expect(completion.errno == .badFileDescriptor)
        #expect(throws: Errno.badFileDescriptor) { try completion.get() }
    }
}
