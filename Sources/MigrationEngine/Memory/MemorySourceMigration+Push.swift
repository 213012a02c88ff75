import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Wire

/// Post-copy's background push stream, paced and steered by the latest faults.
extension MemorySourceMigration {
    /// Post-copy's background stream: every page still needed, in batches, jumping to the latest
    /// fault whenever a new one arrives. Pages already delivered on the urgent lane are skipped.
    func push(needed: [PageSet], regions: [SourceRegion], server: PageRequestServer, pauser: ProcessPause,
                      builder: inout PageBatchBuilder, link: PeerLink) throws -> UInt64 {
        let residents = try regions.map { try residency(of: $0) }
        var regionIndex = 0, cursor = 0
        var lastHint = UInt64.max
        var pushed: UInt64 = 0
        var left = needed.reduce(0) { $0 + $1.count }
        // Small frames: a reply never queues behind more than one of them at the bottleneck.
        let pushBatchPages = min(builder.batchPages, 16)
        let pacing = options.pushDelayTarget > 0
        link.publish { pacer.targetNanoseconds = options.pushDelayTarget * 1e9 }
        defer { logger.info("push done", metadata: ["pages": "\(pushed)", "final_window_bytes": "\(Int(link.publish { pacer.window }))"]) }
        while left > 0 {
            if let failure = link.failureSeen { throw failure }
            let hint = server.latestFault.load(ordering: .acquiring)
            if hint != lastHint && hint != UInt64.max {
                lastHint = hint
                regionIndex = Int(hint >> 40)
                cursor = Int(hint & ((1 << 40) - 1))
            }
            let set = needed[regionIndex]
            guard let first = set.firstMember(from: cursor) else {
                // This region is done from the cursor on: next region, or wrap around.
                cursor = 0
                regionIndex = (regionIndex + 1) % regions.count
                left = needed.reduce(0) { $0 + $1.count }
                continue
            }
            let region = regions[regionIndex]
            let delivered = server.delivered[regionIndex]
            var end = first
            while end < region.pageCount && end - first < pushBatchPages && set.contains(end) && !delivered.contains(end) { end += 1 }
            if end == first {
                // Delivered by a reply already.
                set.remove(first)
                cursor = first + 1
                left -= 1
                continue
            }
            let resident = residents[regionIndex]
            // Wait for room in the pacer's window (the destination acknowledges every push frame).
            if pacing { try link.wait(timeout: options.receiveTimeout, during: "post-copy push") { pacer.maySend } }
            try builder.withBatch(regionID: region.id, hostAddress: region.range.start, first: first, count: end - first,
                                  mayHoldData: { resident.contains($0) }) { batch in
                // Recorded before sending: the acknowledgement may come back before send returns.
                let message = Message.pageBatch(batch)
                let bytes = UInt64(try FrameEncoder.frameSize(of: message))
                link.publish { pacer.sent(bytes: bytes) }
                try link.sender.send(message)
            }
            for p in first..<end { set.remove(p) }
            pushed += UInt64(end - first)
            left -= end - first
            cursor = end
        }
        return pushed
    }
}
