import FerryTestSupport
import Foundation
@testable import MigrationEngine
import Wire
import XCTest

/// The destination's `O_DIRECT` image writes (``DirectImageWriter`` inside ``DiskApplier``): random
/// runs of rounds applied to a real image on this machine's filesystems end with exactly the bytes
/// and hashes of a model, whatever mix of aligned data (direct, several in flight), misaligned
/// data (page cache), zero runs (holes) and rewrites of ranges still in flight they contain.
final class DirectWriteTests: XCTestCase {
    /// Where the images go: the build's filesystem (ext4 here) and tmpfs.
    private let directories = [NSTemporaryDirectory(), "/dev/shm"]

    func testRandomRoundsEndWithTheModelsBytesAndHashes() throws {
        for directory in directories {
            for (blockSize, seed) in [(4096, UInt64(1)), (65536, 2), (512, 3)] {
                try runRandomRounds(in: directory, blockSize: blockSize, seed: seed)
            }
        }
    }

    func testAWriteInFlightIsNeverOvertakenByALaterCopyOfItsRange() throws {
        let path = NSTemporaryDirectory() + "direct-overlap-\(getpid()).img"
        defer { unlink(path) }
        let layout = DiskLayout(diskID: 0, sizeBytes: 8 << 20, blockSize: 4096, name: "d")
        let image = try DiskImage(path: path, layout: layout)
        var applier = try DiskApplier(image: image, directWrites: true)
        XCTAssertTrue(applier.writesDirectly, "O_DIRECT refused on \(NSTemporaryDirectory())")
        var data = [UInt8](repeating: 0, count: 4 << 20)
        // The same 4 MiB (two staging slots) 40 times over, the buffer reused at once: the last one wins.
        for generation in 1...40 {
            data.withUnsafeMutableBytes { fillRandom($0, seed: UInt64(generation)) }
            try data.withUnsafeBytes { bytes in
                let extents = DiskExtents(diskID: 0, round: UInt32(generation), extents: ExtentList([Extent(offset: 1 << 20, length: UInt32(bytes.count))]),
                                          payload: Payload(bytes))
                try applier.apply(extents)
            }
        }
        try applier.drain()
        XCTAssertGreaterThanOrEqual(applier.overlapWaits, 39, "a copy of a range went out while an earlier one was in flight")
        let written = try XCTUnwrap(FileManager.default.contents(atPath: path))
        XCTAssertEqual(Array(written[(1 << 20)..<(5 << 20)]), data)
        XCTAssertTrue(written[..<(1 << 20)].allSatisfy { $0 == 0 })
    }

    /// One image, its model, and `rounds` random frames of extents; then the file and the hashes are compared.
    private func runRandomRounds(in directory: String, blockSize: Int, seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let blocks = 600
        let size = blocks * blockSize - (blockSize > 512 ? 100 : 0)   // a short last block where possible
        let path = directory + "/direct-random-\(getpid())-\(blockSize).img"
        defer { unlink(path) }
        let layout = DiskLayout(diskID: 0, sizeBytes: UInt64(size), blockSize: UInt32(blockSize), name: "d")
        let image = try DiskImage(path: path, layout: layout)
        var applier = try DiskApplier(image: image, directWrites: true)
        var model = [UInt8](repeating: 0, count: size)
        var payload = [UInt8](repeating: 0, count: 64 * blockSize)
        for round in 0..<60 {
            // A frame: a few runs of whole blocks, in order, each data or zero.
            var extents: [Extent] = []
            var payloadLength = 0
            var block = Int(random.next() % UInt64(blocks / 2))
            while block < blocks && extents.count < 6 {
                let count = 1 + Int(random.next() % 40)
                let end = min(block + count, blocks)
                let offset = block * blockSize
                let length = min(end * blockSize, size) - offset
                let isZero = random.next() % 4 == 0
                if !isZero && payloadLength + length > payload.count { break }
                extents.append(Extent(offset: UInt64(offset), length: UInt32(length), kind: isZero ? .zero : .data))
                let seed = random.next()
                model.withUnsafeMutableBytes { model in
                    let target = UnsafeMutableRawBufferPointer(rebasing: model[offset..<(offset + length)])
                    if isZero { target.initializeMemory(as: UInt8.self, repeating: 0) } else { fillRandom(target, seed: seed) }
                }
                if !isZero {
                    payload.withUnsafeMutableBytes { fillRandom(UnsafeMutableRawBufferPointer(rebasing: $0[payloadLength..<(payloadLength + length)]), seed: seed) }
                    payloadLength += length
                }
                block = end + Int(random.next() % 8)
            }
            try payload.withUnsafeBytes { bytes in
                let frame = DiskExtents(diskID: 0, round: UInt32(round), extents: ExtentList(extents),
                                        payload: Payload(UnsafeRawBufferPointer(rebasing: bytes[..<payloadLength])))
                try applier.apply(frame)
            }
            // The caller's buffer is reused at once: scribble on it.
            payload.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0xEE) }
        }
        try applier.flush()
        let label = "\(directory), \(blockSize)-byte blocks, direct \(applier.writesDirectly)"
        if blockSize >= DirectImageWriter.alignment && directory != "/dev/shm" {
            XCTAssertTrue(applier.writesDirectly, "O_DIRECT refused: \(label)")
        }
        let written = try XCTUnwrap(FileManager.default.contents(atPath: path), label)
        XCTAssertEqual(written.count, size, label)
        let same = written.withUnsafeBytes { written in model.withUnsafeBytes { memcmp(written.baseAddress!, $0.baseAddress!, size) == 0 } }
        XCTAssertTrue(same, "the image differs from the model: \(label)")
        let expected = BlockHashes(diskSize: UInt64(size), blockSize: blockSize)
        model.withUnsafeBytes { bytes in
            for index in 0..<expected.blockCount {
                let length = expected.length(ofBlock: index)
                expected.update(block: index, contents: UnsafeRawBufferPointer(rebasing: bytes[(index * blockSize)..<(index * blockSize + length)]))
            }
        }
        XCTAssertEqual(image.hashes.digest(), expected.digest(), "hashes: \(label)")
    }
}
