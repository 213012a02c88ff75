import Crypto
import Foundation
@testable import MigrationEngine
import Wire
import XCTest

/// The source's record of what the destination holds (``HeldHashes``), without sockets: which
/// blocks it may leave out, and which frames it refuses.
final class HeldHashesTests: XCTestCase {
    private let blocks = (0..<8).map { randomBlock(seed: UInt8($0)) }

    private static func randomBlock(seed: UInt8) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: Int($0) &* 31 &+ Int(seed) &* 7) } }

    /// Payload memory of the frames made, freed after each test.
    private var payloads: [UnsafeMutableRawBufferPointer] = []

    override func tearDown() {
        payloads.forEach { $0.deallocate() }
        payloads = []
    }

    /// A `diskHeld` frame for blocks `first ..< first + hashes.count` (nil: not held).
    private func frame(first: Int, _ hashes: [[UInt8]?]) -> DiskHeld {
        var bytes: [UInt8] = []
        for hash in hashes { bytes += hash ?? [UInt8](repeating: 0, count: 32) }
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 16)
        payloads.append(memory)
        memory.copyBytes(from: bytes)
        return DiskHeld(diskID: 1, firstBlock: UInt64(first), count: hashes.count,
                        hashes: Payload(UnsafeRawBufferPointer(rebasing: memory[..<bytes.count])))
    }

    private func sha(_ block: [UInt8]) -> [UInt8] { Array(SHA256.hash(data: block)) }

    private func holds(_ held: HeldHashes, _ index: Int, _ content: [UInt8]) -> Bool {
        content.withUnsafeBytes { held.holds(block: index, contents: $0) }
    }

    func testOnlyReportedBlocksWithTheSameContentAreHeldAndNeverOnceSent() throws {
        let held = HeldHashes(diskID: 1, blockCount: 8)
        XCTAssertFalse(holds(held, 0, blocks[0]), "nothing is held before a report")
        try held.record(frame(first: 0, [sha(blocks[0]), nil, sha(blocks[2])]))
        XCTAssertEqual(held.frontier, 3)
        XCTAssertTrue(holds(held, 0, blocks[0]))
        XCTAssertFalse(holds(held, 0, blocks[1]), "another content is not held")
        XCTAssertFalse(holds(held, 1, blocks[1]), "a block reported as not held")
        XCTAssertFalse(holds(held, 3, blocks[3]), "a block past the frontier")
        // A frame after a gap (one lost with a link): the skipped blocks are not held.
        try held.record(frame(first: 5, [sha(blocks[5])]))
        XCTAssertEqual(held.frontier, 6)
        XCTAssertFalse(holds(held, 4, blocks[4]))
        XCTAssertTrue(holds(held, 5, blocks[5]))
        // A repeated frame changes nothing already reported.
        try held.record(frame(first: 0, [sha(blocks[7])]))
        XCTAssertTrue(holds(held, 0, blocks[0]))
        // Sent as data once: never left out again, even with the content the destination reported.
        held.markSent(2)
        XCTAssertFalse(holds(held, 2, blocks[2]))
        XCTAssertTrue(holds(held, 0, blocks[0]))
        // The end of the report.
        try held.record(DiskHeld(diskID: 1, firstBlock: 8, count: 0, hashes: .empty))
        XCTAssertTrue(held.isComplete)
    }

    func testAFramePastTheDiskIsAProtocolViolation() throws {
        let held = HeldHashes(diskID: 1, blockCount: 8)
        for first in [7, 9] {
            XCTAssertThrowsError(try held.record(frame(first: first, [nil, nil]))) { error in
                guard case .local(let code, let reason)? = error as? LinkError else { return XCTFail("\(error)") }
                XCTAssertEqual(code, .protocolViolation)
                XCTAssertTrue(reason.contains("which has 8 blocks"), reason)
            }
        }
        XCTAssertEqual(held.frontier, 0)
    }
}
