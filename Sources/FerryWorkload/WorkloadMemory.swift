import Glibc
import ProcessMemory

/// The workload's memory: one or more mappings, pages numbered globally across them in order, each page holding
/// `WorkloadPattern` content. Every write of a page first verifies it (a read-modify-write), so every page the
/// workload touches is checked.
final class WorkloadMemory {
    struct Region { let base: UInt64; let pages: Int; let firstPage: Int }
    let regions: [Region]
    let pageSize = 4096
    let totalPages: Int
    var pagesWritten = 0
    var pagesVerified = 0
    var corrupt = 0
    /// Resume mode: a page found stopped inside its rewrite (`WorkloadPattern.interruptedFill`) is the write the
    /// source's pause interrupted; finish it, as a vCPU running on would, once. Any other such page is corrupt.
    var finishesInterruptedWrite = false
    /// Interrupted writes finished (at most 1).
    var interruptedWrites = 0
    var firstCorrupt: [(page: Int, word: Int)] = []

    init(regions: [(base: UInt64, size: UInt64)]) {
        var list: [Region] = []
        var first = 0
        for r in regions {
            let pages = Int(r.size) / 4096
            list.append(Region(base: r.base, pages: pages, firstPage: first))
            first += pages
        }
        self.regions = list
        totalPages = first
    }

    @inline(__always)
    func pointer(_ page: Int) -> UnsafeMutableRawPointer {
        var i = regions.count - 1
        while regions[i].firstPage > page { i -= 1 }
        let r = regions[i]
        return UnsafeMutableRawPointer(bitPattern: UInt(r.base) + UInt((page - r.firstPage) * pageSize))!
    }

    /// Verifies a page; records and reports corruption. Returns its generation (0 when untouched or corrupt).
    @inline(__always)
    func check(_ page: Int) -> UInt64 {
        pagesVerified += 1
        switch WorkloadPattern.verify(pointer(page), index: UInt64(page), pageSize: pageSize) {
        case .untouched: return 0
        case .valid(let g): return g
        case .corrupt(let word):
            if finishesInterruptedWrite && interruptedWrites == 0,
               let g = WorkloadPattern.interruptedFill(pointer(page), index: UInt64(page), pageSize: pageSize) {
                WorkloadPattern.fill(pointer(page), index: UInt64(page), generation: g, pageSize: pageSize)
                interruptedWrites += 1
                Output.line("{\"event\":\"interrupted_write_finished\",\"page\":\(page),\"generation\":\(g)}")
                return g
            }
            corrupt += 1
            if firstCorrupt.count < 16 {
                firstCorrupt.append((page, word))
                Output.line("{\"event\":\"corrupt\",\"page\":\(page),\"word\":\(word)}")
            }
            return 0
        }
    }

    /// Verifies then rewrites a page at the next generation; returns that generation.
    @inline(__always) @discardableResult
    func dirty(_ page: Int) -> UInt64 {
        let g = check(page) + 1
        WorkloadPattern.fill(pointer(page), index: UInt64(page), generation: g, pageSize: pageSize)
        pagesWritten += 1
        return g
    }

    /// What a page holds, without counting or reporting (the disk check compares generations with it).
    @inline(__always)
    func verdict(_ page: Int) -> WorkloadPattern.Verdict {
        WorkloadPattern.verify(pointer(page), index: UInt64(page), pageSize: pageSize)
    }

    /// Writes pages [0, count) at generation 1.
    func fill(pages count: Int) {
        for p in 0..<min(count, totalPages) {
            WorkloadPattern.fill(pointer(p), index: UInt64(p), generation: 1, pageSize: pageSize)
        }
    }

    struct VerifyReport { var valid = 0, untouched = 0, corrupt = 0; var touchNanos: [UInt64] = [] }

    /// Touches and verifies every page, timing the first load of each (a fault, in resume mode).
    func verifyAll() -> VerifyReport {
        var report = VerifyReport()
        report.touchNanos.reserveCapacity(totalPages)
        let before = corrupt
        var ts = timespec()
        for p in 0..<totalPages {
            clock_gettime(CLOCK_MONOTONIC, &ts)
            let t0 = UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
            let word = pointer(p).load(fromByteOffset: 8, as: UInt64.self)
            clock_gettime(CLOCK_MONOTONIC, &ts)
            let t1 = UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
            report.touchNanos.append(t1 &- t0)
            _ = word
            if check(p) == 0 {
                if corrupt == before + report.corrupt { report.untouched += 1 } else { report.corrupt += 1 }
            } else {
                report.valid += 1
            }
        }
        return report
    }

    /// SHA-256 of all regions in order (MemoryDigest, the same digest the agents compute).
    func digest() -> String {
        var d = MemoryDigest()
        for r in regions {
            d.update(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(r.base)), count: r.pages * pageSize))
        }
        return d.finalizeHex()
    }
}

/// JSON lines on stdout, flushed at once (stdout is usually a pipe to a test or an agent).
enum Output {
    static func line(_ s: String) {
        print(s)
        fflush(nil)
    }

    static func error(_ s: String) -> Never {
        line("{\"event\":\"error\",\"message\":\"\(String(s.map { $0 == "\"" ? "'" : $0 }))\"}")
        FileHandleStderr.write("ferry-workload: \(s)\n")
        exit(2)
    }
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var s = s
        s.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }
}

/// Parses sizes such as 512M, 1G, 64K, 4096.
func parseSize(_ text: String) -> UInt64? {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30]
    var t = text
    if t.hasSuffix("iB") || t.hasSuffix("B") { t = String(t.dropLast(t.hasSuffix("iB") ? 2 : 1)) }
    if let last = t.last, let mult = units[last] { return UInt64(t.dropLast()).map { $0 * mult } }
    return UInt64(t)
}

func percentile(_ sorted: [UInt64], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let i = min(sorted.count - 1, Int(Double(sorted.count - 1) * p + 0.5))
    return Double(sorted[i]) / 1000
}
