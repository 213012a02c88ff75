// Hot-path allocation check: encodes and decodes a 256 KiB pageBatch (array-backed runs, payload
// copied into a send slot), writes a diskExtents prefix for scatter-gather, and an ack, N times.
// alloc-check.sh runs it under valgrind for two values of N: the heap allocation counts must be
// equal, i.e. no allocation per frame once warmed.
#if canImport(Glibc)
import Glibc
#endif

@main
struct AllocCheck {
    static func main() {
        let n = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1])! : 200_000
        let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 4096, alignment: 4096)
        for i in 0..<pages.count { pages[i] = UInt8(truncatingIfNeeded: i) }
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        let runs: [PageRun] = [.data(32), .zero(100), .data(32)]
        let extents: [Extent] = [Extent(offset: 0, length: 65536), Extent(offset: 65536, length: 1 << 20, kind: .zero),
                                 Extent(offset: 2 << 20, length: 65536)]
        let decoder = FrameDecoder()

        func once(_ i: Int) -> Int {
            let batch = PageBatch(regionID: 0, pageShift: 12, firstPage: UInt64(i), runs: PageRunList(runs),
                                  payload: Payload(UnsafeRawBufferPointer(pages)))
            let n = try! FrameEncoder.encode(.pageBatch(batch), sequence: UInt32(truncatingIfNeeded: i), into: out)
            let f = try! decoder.decode(UnsafeRawBufferPointer(rebasing: out[0..<n]))!
            var sum = 0
            if case .pageBatch(let b) = f.message {
                for r in b.runs { sum += Int(r.count) }
                sum += b.payload.count
            }
            let d = DiskExtents(diskID: 1, round: 2, extents: ExtentList(extents),
                                payload: Payload(UnsafeRawBufferPointer(rebasing: pages[0..<131072])))
            let prefix = try! FrameEncoder.encodePrefix(.diskExtents(d), sequence: 1, into: out)
            let a = try! FrameEncoder.encode(.ack(Ack(stream: .disk, streamID: 1, sequence: UInt64(i), offset: 0)), into: out)
            let h = try! decoder.decode(UnsafeRawBufferPointer(rebasing: out[0..<a]))!
            return sum + prefix + h.consumed
        }

        var total = 0
        for i in 0..<1000 { total &+= once(i) }  // warm-up
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        for i in 0..<n { total &+= once(i) }
        clock_gettime(CLOCK_MONOTONIC, &t1)
        let ns = Double(t1.tv_sec - t0.tv_sec) * 1e9 + Double(t1.tv_nsec - t0.tv_nsec)
        print("\(n) iterations, \(Int(ns / Double(n))) ns each (checksum \(total))")
    }
}
