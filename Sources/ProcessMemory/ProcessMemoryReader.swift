import CFerryShims
import Glibc
import SystemPackage

/// Reads another process's memory in batches with `process_vm_readv`, and asks `/proc/PID/pagemap` which pages
/// are resident (present or swapped), so pages never touched need not be read or sent.
///
/// Owns two preallocated iovec arrays and a pagemap buffer: reading allocates nothing per call.
public struct ProcessMemoryReader: ~Copyable {
    public let pid: Int32
    public let pageSize: UInt64
    /// The most iovecs passed to one `process_vm_readv` (the kernel's IOV_MAX is 1024).
    public let maxIovecs: Int
    let local: UnsafeMutablePointer<iovec>
    let remote: UnsafeMutablePointer<iovec>
    let pagemap: FileDescriptor
    /// Entries of /proc/PID/pagemap read per pread.
    static let pagemapChunk = 4096
    let pagemapEntries: UnsafeMutablePointer<UInt64>

    /// Opens /proc/PID/pagemap and prepares the iovec arrays. Throws "no process PID" (ESRCH) or a permission error.
    public init(pid: Int32, pageSize: UInt64 = 4096, maxIovecs: Int = 1024) throws(ProcessMemoryError) {
        guard pid > 0 else { throw ProcessMemoryError("no process \(pid): a PID must be positive", errno: .noSuchProcess) }
        let fd = try ProcFiles.open(pid: pid, "pagemap")
        self.pid = pid
        self.pageSize = pageSize
        self.maxIovecs = max(1, min(maxIovecs, 1024))
        pagemap = fd
        local = .allocate(capacity: self.maxIovecs)
        remote = .allocate(capacity: self.maxIovecs)
        pagemapEntries = .allocate(capacity: Self.pagemapChunk)
    }

    deinit {
        local.deallocate()
        remote.deallocate()
        pagemapEntries.deallocate()
        try? pagemap.close()
    }

    /// Reads `buffer.count` bytes at `address` of the process. Returns the bytes read (short only at an unmapped end).
    /// The corresponding C function is `process_vm_readv`.
    public func read(from address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ProcessMemoryError) -> Int {
        local[0] = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        remote[0] = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address)), iov_len: buffer.count)
        let n = ferry_process_vm_readv(pid, local, 1, remote, 1)
        if n < 0 {
            throw ProcessMemoryError("process_vm_readv of \(hex(address))+\(buffer.count) in process \(pid) failed", negated: n)
        }
        return n
    }

    /// Reads the bytes of each run, in order, packed back to back into `buffer` (which must hold them all),
    /// batching up to `maxIovecs` runs per `process_vm_readv`. Returns the bytes read.
    /// The corresponding C function is `process_vm_readv`.
    public func read(runs: UnsafeBufferPointer<AddressRange>, into buffer: UnsafeMutableRawBufferPointer) throws(ProcessMemoryError) -> Int {
        var total = 0
        var i = 0
        while i < runs.count {
            var batch = 0
            var batchBytes = 0
            while i + batch < runs.count && batch < maxIovecs {
                let r = runs[i + batch]
                let len = Int(r.length)
                guard total + batchBytes + len <= buffer.count else {
                    throw ProcessMemoryError("runs need more than the \(buffer.count)-byte buffer (run \(r) at offset \(total + batchBytes))")
                }
                local[batch] = iovec(iov_base: buffer.baseAddress! + total + batchBytes, iov_len: len)
                remote[batch] = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(r.start)), iov_len: len)
                batchBytes += len
                batch += 1
            }
            let n = ferry_process_vm_readv(pid, local, UInt(batch), remote, UInt(batch))
            if n < 0 {
                throw ProcessMemoryError("process_vm_readv of \(batch) runs from \(runs[i]) in process \(pid) failed", negated: n)
            }
            if n != batchBytes {
                throw ProcessMemoryError("process_vm_readv of \(batch) runs from \(runs[i]) in process \(pid) read \(n) of \(batchBytes) bytes (a run is no longer mapped)",
                                         errno: .badAddress)
            }
            total += n
            i += batch
        }
        return total
    }

    /// Marks in `bitmap` (bit i = page `range.start + i*pageSize`) the pages of `range` that are present in RAM
    /// (pagemap bit 63) or swapped (bit 62); clears the others. Returns the number of resident pages.
    /// The corresponding interface is `pread` of `/proc/PID/pagemap` (8 bytes per page).
    @discardableResult
    public func residency(of range: AddressRange, into bitmap: borrowing PageBitmap) throws(ProcessMemoryError) -> Int {
        let pages = range.pageCount(pageSize: pageSize)
        guard bitmap.pageCount >= pages else {
            throw ProcessMemoryError("bitmap of \(bitmap.pageCount) pages too small for \(range) (\(pages) pages)")
        }
        bitmap.clearAll()
        var done = 0
        var resident = 0
        let raw = UnsafeMutableRawBufferPointer(start: pagemapEntries, count: Self.pagemapChunk * 8)
        while done < pages {
            let want = min(Self.pagemapChunk, pages - done)
            let offset = Int64((range.start / pageSize + UInt64(done)) * 8)
            let got: Int
            do {
                got = try pagemap.read(fromAbsoluteOffset: offset, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<(want * 8)]),
                                       retryOnInterrupt: true)
            } catch {
                throw ProcFiles.translate(error, pid: pid, what: "pread /proc/\(pid)/pagemap for \(range)")
            }
            let entries = got / 8
            if entries == 0 { throw ProcessMemoryError("short read of /proc/\(pid)/pagemap at page \(done) of \(range)", errno: .ioError) }
            for e in 0..<entries where pagemapEntries[e] & (3 << 62) != 0 {
                bitmap[done + e] = true
                resident += 1
            }
            done += entries
        }
        return resident
    }
}
