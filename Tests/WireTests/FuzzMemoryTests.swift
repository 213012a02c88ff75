import FerryTestSupport
import Glibc
import Wire
import XCTest

/// The decoder's memory under fuzzing: after a warm-up, hundreds of thousands of mutated frames
/// leave the heap where it was. An XCTest case on purpose: XCTest runs its tests one at a time on
/// the main thread, in a process of its own (`swift test` runs the Swift Testing suites afterwards,
/// separately), so no parallel suite allocates while this one measures; and `mallinfo2` counts the
/// main thread's arena exactly, where a whole-process RSS figure is coarse.
final class FuzzMemoryTests: XCTestCase {
    private func heapInUse() -> Int { Int(heapBytesInUse()) }

    /// Resident set size of this process, from /proc/self/statm.
    private func residentBytes() throws -> Int {
        let text = try String(contentsOfFile: "/proc/self/statm", encoding: .utf8)
        let fields = text.split(separator: " ")
        guard fields.count >= 2, let pages = Int(fields[1]) else { throw SupportError("cannot parse /proc/self/statm: \(text)") }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    func testDecodingMutatedFramesDoesNotGrowTheHeap() throws {
        XCTAssertTrue(Thread.isMainThread, "mallinfo2 measures the main arena: run on the main thread")
        let warmUp = 50_000, measured = Int(envInt("FERRY_WIRE_FUZZ_MEMORY_ITERATIONS") ?? 300_000)
        var rng = SplitMix64(seed: 0x3E3_0125)
        let payloads = SamplePayloads()
        let small = Buffer(count: 4096 * 2)
        let templates = try fuzzTemplates(keepAlive: payloads, small: small)
        let capacity = templates.map(\.count).max()! + 4096
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        defer { scratch.deallocate() }
        let reencode = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity * 2, alignment: 16)
        defer { reencode.deallocate() }
        let decoder = FrameDecoder(maxFrameSize: 1 << 20)
        var violations = 0
        func run(_ count: Int) {
            for _ in 0..<count {
                let n = mutate(into: scratch, templates: templates, rng: &rng)
                if fuzzOne(UnsafeRawBufferPointer(rebasing: scratch[0..<n]), decoder: decoder, reencode: reencode).violation != nil {
                    violations += 1
                }
            }
        }
        run(warmUp)
        let heapBefore = heapInUse(), rssBefore = try residentBytes()
        run(measured)
        let heapGrowth = heapInUse() - heapBefore, rssGrowth = try residentBytes() - rssBefore
        print("wire fuzz memory: \(measured) frames after \(warmUp) of warm-up: heap in use \(heapGrowth >= 0 ? "+" : "")\(heapGrowth) bytes, RSS \(rssGrowth >> 10) KiB")
        XCTAssertEqual(violations, 0, "frames answered wrongly (see FuzzTests for the details)")
        // A leak of 4 bytes a frame would be 1.2 MB here.
        XCTAssertLessThan(heapGrowth, 256 << 10, "heap in use grew by \(heapGrowth) bytes over \(measured) frames")
        XCTAssertLessThan(rssGrowth, 16 << 20, "resident memory grew by \(rssGrowth) bytes over \(measured) frames")
        withExtendedLifetime((payloads, small)) {}
    }
}
