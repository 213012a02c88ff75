import ProcessMemory
import XCTest

/// `WorkloadPattern.interruptedFill`: a page cut at every store of `fill` is recognised with the generation being
/// written; anything else (two generations apart, new words after old ones, a wrong index) is not.
final class WorkloadPatternTests: XCTestCase {
    let index: UInt64 = 1894

    /// The page after `fill(from + 1)` over `fill(from)` stored its first `stores` words in fill's order.
    func cut(from: UInt64, stores: Int) -> [UInt64] {
        var old = [UInt64](repeating: 0, count: 512)
        var new = [UInt64](repeating: 0, count: 512)
        if from > 0 { old.withUnsafeMutableBytes { WorkloadPattern.fill($0.baseAddress!, index: index, generation: from) } }
        new.withUnsafeMutableBytes { WorkloadPattern.fill($0.baseAddress!, index: index, generation: from + 1) }
        let order = Array(2..<512) + [1, 0]
        var page = old
        for w in order.prefix(stores) { page[w] = new[w] }
        return page
    }

    func interrupted(_ page: [UInt64]) -> UInt64? {
        page.withUnsafeBytes { WorkloadPattern.interruptedFill($0.baseAddress!, index: index) }
    }

    func verdict(_ page: [UInt64]) -> WorkloadPattern.Verdict {
        page.withUnsafeBytes { WorkloadPattern.verify($0.baseAddress!, index: index) }
    }

    func testEveryCutOfAFillIsRecognised() {
        for from: UInt64 in [0, 1, 7] {
            for stores in 1...511 {
                let page = cut(from: from, stores: stores)
                if from > 0 && stores == 511 {
                    // Word 0 already held the index: the page is whole.
                    XCTAssertNil(interrupted(page))
                    XCTAssertEqual(verdict(page), .valid(generation: from + 1))
                    continue
                }
                XCTAssertEqual(interrupted(page), from + 1, "from \(from), \(stores) stores")
                if case .corrupt = verdict(page) {} else { XCTFail("from \(from), \(stores) stores: \(verdict(page))") }
            }
            // Nothing stored yet, or everything: a whole page, not an interrupted one.
            XCTAssertNil(interrupted(cut(from: from, stores: 0)), "from \(from)")
            XCTAssertNil(interrupted(cut(from: from, stores: 512)), "from \(from)")
            XCTAssertEqual(verdict(cut(from: from, stores: 512)), .valid(generation: from + 1))
        }
        // The first write of a page, cut before its last store (the index).
        XCTAssertEqual(interrupted(cut(from: 0, stores: 511)), 1)
    }

    func testOtherDamageIsNotMistakenForACut() {
        // Two generations apart.
        var page = cut(from: 3, stores: 100)
        var far = [UInt64](repeating: 0, count: 512)
        far.withUnsafeMutableBytes { WorkloadPattern.fill($0.baseAddress!, index: index, generation: 5) }
        page[300] = far[300]
        XCTAssertNil(interrupted(page))
        // A new word after an old one.
        page = cut(from: 3, stores: 100)
        let newer = cut(from: 3, stores: 510)
        page[400] = newer[400]
        XCTAssertNil(interrupted(page))
        // Another page's index, or one flipped bit.
        page = cut(from: 3, stores: 100)
        page[0] = index + 1
        XCTAssertNil(interrupted(page))
        page = cut(from: 3, stores: 100)
        page[200] ^= 1 << 17
        XCTAssertNil(interrupted(page))
        // A never-written page with a stray word past the new prefix.
        page = cut(from: 0, stores: 10)
        page[50] = 42
        XCTAssertNil(interrupted(page))
    }
}
