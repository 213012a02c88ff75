import CFerryShims
import Glibc
import ProcessMemory
import Wire

/// The destination's copy of the migrating memory: one anonymous mapping holding every region back
/// to back (in layout order), with lock-free page sets saying which pages have arrived, which are
/// zero, and which were requested. The link reader threads write pages in; the fault-service thread
/// copies them out into the resumed VM. Once the VM runs (``attachVM(uffd:)``), pages arriving in
/// post-copy are also installed into it at once with UFFDIO_COPY (EEXIST: the VM already has it).
///
/// File-backed (``init(layout:backingFile:)``, for a QEMU whose RAM backend is that tmpfs file):
/// the local copy IS the VM's RAM. Before the VM runs, pages are written straight into it (so a
/// pre-copy VM starts on it with nothing left to copy) and stale or zeroed pages are punched out.
/// Once it runs, this process never writes through its own mapping again: a page written there
/// would become visible to the VM half-copied, and a page the VM changed would be overwritten.
/// Pages then go in only by UFFDIO_COPY / UFFDIO_ZEROPAGE, which are atomic and never replace a
/// present page; pages never received are never read here (a read would allocate a zero page
/// in the file and hide the page from the VM's fault).
public final class GuestMemoryImage: @unchecked Sendable {
    public let layout: GuestMemoryLayout
    public let pageSize: Int
    /// Pages in all regions.
    public let totalPages: Int
    /// First global page of each region (layout order).
    let firstPage: [Int]
    /// The local copy: page g at `base + g * pageSize`.
    let base: UnsafeMutableRawPointer
    let byteCount: Int
    /// The RAM file's descriptor (file-backed), else -1.
    let backingFD: Int32
    /// The RAM file's path (file-backed), else nil.
    public let backingFile: String?
    /// Pages whose final content is here (data or zero).
    public let received: PageSet
    /// Pages known to be zero (never touched at the source, or zero content).
    public let zero: PageSet
    /// Pages with a request in flight.
    public let requested: PageSet
    /// Pages the resumed VM dropped (UFFD_EVENT_REMOVE, e.g. a balloon): they read as zero there
    /// from now on, so late pages for them are not installed (the local copy keeps them for the digest).
    public let removed: PageSet
    /// Data pages and zero pages applied (all rounds; a page may count more than once).
    public let dataPagesApplied = SharedCounter()
    /// The hash of every page as applied, for the digest compared before the VM starts.
    public let hashes: PageHashes
    public let zeroPagesApplied = SharedCounter()
    /// The VM's userfaultfd once it runs here (-1 before).
    private let vmUffd = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
    /// Host address of each region in the resumed VM (from its handshake; layout's by default).
    private var vmAddress: [UInt64]

    /// Refuses a layout this destination cannot hold, before anything is mapped: regions that are
    /// empty, not whole pages, overflowing 2^64 (or `off_t` in the memory file), overlapping
    /// another region (guest, host or file range) or sharing its id are protocol violations; a
    /// total larger than this host's RAM is `outOfSpace`. Every sum is overflow-checked.
    public static func check(_ layout: GuestMemoryLayout) throws(LinkError) {
        let pageSize = UInt64(layout.pageSize)   // the decoder checked it: a power of two, 4 KiB ... 1 GiB
        var total: UInt64 = 0
        for region in layout.regions {
            let name = "memory region \(region.id) of \(region.size) bytes"
            guard region.size > 0, region.size % pageSize == 0 else {
                throw .local(.protocolViolation, reason: "\(name): not a positive multiple of the \(pageSize)-byte page")
            }
            for (what, start) in [("guest address", region.guestAddress), ("host address", region.hostAddress), ("file offset", region.fileOffset)]
            where start.addingReportingOverflow(region.size).overflow {
                throw .local(.protocolViolation, reason: "\(name) at \(what) \(start): its end overflows 2^64")
            }
            guard region.fileOffset + region.size <= UInt64(Int64.max) else {
                throw .local(.protocolViolation, reason: "\(name) at file offset \(region.fileOffset): beyond the largest file size (2^63 - 1)")
            }
            let (sum, overflow) = total.addingReportingOverflow(region.size)
            guard !overflow else { throw .local(.protocolViolation, reason: "memory regions of more than 2^64 bytes in all") }
            total = sum
        }
        guard total <= HostMemory.physicalBytes else {
            throw .local(.outOfSpace, reason: "memory of \(total) bytes in \(layout.regions.count) region(s): more than this host's \(HostMemory.physicalBytes) bytes of RAM")
        }
        var ids = Set<UInt32>()
        for region in layout.regions where !ids.insert(region.id).inserted {
            throw .local(.protocolViolation, reason: "memory region id \(region.id) given twice")
        }
        for (what, start) in [("guest", \Wire.MemoryRegion.guestAddress), ("host", \Wire.MemoryRegion.hostAddress), ("file", \Wire.MemoryRegion.fileOffset)] {
            let sorted = layout.regions.sorted { $0[keyPath: start] < $1[keyPath: start] }
            for (a, b) in zip(sorted, sorted.dropFirst()) where a[keyPath: start] + a.size > b[keyPath: start] {
                throw .local(.protocolViolation, reason: "memory regions \(a.id) and \(b.id) overlap in their \(what) ranges "
                             + "(\(a[keyPath: start])+\(a.size) and \(b[keyPath: start])+\(b.size))")
            }
        }
    }

    /// Maps room for every region of `layout`: anonymous memory, or (with `backingFile`) a new file
    /// of that size, shared with the VMM that uses it as its RAM (regions back to back, at their
    /// file offsets). The corresponding system calls are `open`, `ftruncate` and `mmap`.
    public init(layout: GuestMemoryLayout, backingFile: String? = nil) throws {
        self.layout = layout
        pageSize = Int(layout.pageSize)
        var first: [Int] = []
        var pages = 0
        for region in layout.regions {
            guard region.size % UInt64(layout.pageSize) == 0 else {
                throw SetupError("region \(region.id) of \(region.size) bytes is not a multiple of the \(layout.pageSize)-byte page")
            }
            first.append(pages)
            pages += Int(region.size / UInt64(layout.pageSize))
        }
        firstPage = first
        totalPages = pages
        byteCount = max(pages * pageSize, pageSize)
        self.backingFile = backingFile
        if let backingFile {
            let fd = open(backingFile, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw SetupError("cannot create the RAM file \(backingFile): \(String(cString: strerror(errno)))") }
            guard ftruncate(fd, off_t(byteCount)) == 0,
                  let mapped = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
                let error = String(cString: strerror(errno))
                close(fd)
                unlink(backingFile)
                throw SetupError("cannot size or map the \(byteCount)-byte RAM file \(backingFile): \(error)")
            }
            backingFD = fd
            base = mapped
        } else {
            let address: UInt64
            do { address = try AnonymousMemory.map(length: UInt64(byteCount)) } catch {
                throw SetupError("cannot map \(byteCount) bytes for the received memory: \(error)")
            }
            madvise(UnsafeMutableRawPointer(bitPattern: UInt(address)), byteCount, 14) // MADV_HUGEPAGE: fewer faults here
            base = UnsafeMutableRawPointer(bitPattern: UInt(address))!
            backingFD = -1
        }
        received = PageSet(pageCount: pages)
        hashes = PageHashes(pageCount: pages, pageSize: pageSize)
        zero = PageSet(pageCount: pages)
        requested = PageSet(pageCount: pages)
        removed = PageSet(pageCount: pages)
        vmUffd.initialize(to: -1)
        vmAddress = layout.regions.map(\.hostAddress)
    }

    deinit {
        munmap(base, byteCount)
        if backingFD >= 0 { close(backingFD) }
        vmUffd.deallocate()
    }

    /// Whether the local copy is the VM's RAM file.
    public var isFileBacked: Bool { backingFD >= 0 }

    /// File-backed: drops pages `first..<first+count` (global) from the RAM file, so they read as
    /// zero before the VM runs and fault once it runs. The corresponding call is `fallocate(PUNCH_HOLE)`.
    func punch(first: Int, count: Int) {
        guard backingFD >= 0, count > 0 else { return }
        _ = ferry_punch_hole(backingFD, UInt64(first * pageSize), UInt64(count * pageSize))
    }

    /// File-backed, before the VM runs: punches out every page that has not arrived (a VMM may have
    /// touched its RAM while starting), so that each one faults and is fetched. Returns the pages punched.
    @discardableResult
    public func punchMissing() -> Int {
        guard backingFD >= 0 else { return 0 }
        var punched = 0
        var page = 0
        while page < totalPages {
            guard !received.contains(page) else { page += 1; continue }
            var end = page + 1
            while end < totalPages && !received.contains(end) { end += 1 }
            punch(first: page, count: end - page)
            punched += end - page
            page = end
        }
        return punched
    }

    /// Region index of a region id.
    @inline(__always) func regionIndex(_ id: UInt32) -> Int? {
        if Int(id) < layout.regions.count && layout.regions[Int(id)].id == id { return Int(id) }
        return layout.regions.firstIndex { $0.id == id }
    }

    /// Number of pages received so far.
    public var receivedCount: Int { received.count }

    /// From now on, pages that arrive are also installed into the VM through `uffd`, at the VM's
    /// region addresses `addresses` (layout order).
    public func attachVM(uffd: Int32, addresses: [UInt64]) {
        vmAddress = addresses
        ferry_store_i32_release(vmUffd, uffd)
    }

    /// The VM's address of global page `g`.
    @inline(__always) func vmAddress(ofGlobal g: Int, region: Int) -> UInt64 {
        vmAddress[region] + UInt64((g - firstPage[region]) * pageSize)
    }

    /// The local copy of global page `g`.
    @inline(__always) func pointer(_ g: Int) -> UnsafeMutableRawPointer { base + g * pageSize }

    /// Applies a batch: data pages copied in, zero runs recorded (and zeroed here if they held data).
    /// With `install`, pages go into the running VM too (data by UFFDIO_COPY; zero pages by
    /// UFFDIO_ZEROPAGE only when `installZeros`, i.e. for a reply some fault waits for).
    /// Returns the pages that were new (not received before).
    @discardableResult
    public func apply(_ batch: PageBatch, installZeros: Bool = false) throws -> Int {
        guard let index = regionIndex(batch.regionID) else {
            throw LinkError.local(.protocolViolation, reason: "pageBatch for unknown region \(batch.regionID)")
        }
        guard Int(batch.pageShift) == pageSize.trailingZeroBitCount else {
            throw LinkError.local(.protocolViolation, reason: "pageBatch with page shift \(batch.pageShift), layout page \(pageSize)")
        }
        let regionPages = Int(layout.regions[index].size / UInt64(pageSize))
        guard batch.firstPage <= UInt64(regionPages), batch.pageCount <= UInt64(regionPages) - batch.firstPage else {
            throw LinkError.local(.protocolViolation, reason: "pageBatch pages \(batch.firstPage)+\(batch.pageCount) beyond region \(batch.regionID) of \(regionPages) pages")
        }
        let uffd = ferry_load_i32_acquire(vmUffd)
        var g = firstPage[index] + Int(batch.firstPage)
        var payloadOffset = 0
        let payload = batch.payload.bytes
        var fresh = 0
        // File-backed and the VM runs: its RAM takes pages only by UFFDIO_COPY/ZEROPAGE (see the type's comment).
        let vmOwnsFile = backingFD >= 0 && uffd >= 0
        for run in batch.runs {
            let n = Int(run.count)
            if run.isZero {
                for page in g..<(g + n) {
                    if !zero.contains(page) {
                        if received.contains(page) && !vmOwnsFile {
                            if backingFD >= 0 { punch(first: page, count: 1) } else { memset(pointer(page), 0, pageSize) }
                        }
                        zero.insert(page)
                    }
                    if !received.insert(page) { fresh += 1 }
                    hashes.recordZero(page: page)
                    if uffd >= 0 && installZeros && !removed.contains(page) {
                        install(zeroAt: vmAddress(ofGlobal: page, region: index), uffd: uffd)
                    }
                }
                zeroPagesApplied.add(UInt64(n))
            } else if vmOwnsFile {
                for page in g..<(g + n) {
                    let contents = UnsafeRawBufferPointer(start: payload.baseAddress! + payloadOffset + (page - g) * pageSize, count: pageSize)
                    if !removed.contains(page) { install(copying: contents, at: vmAddress(ofGlobal: page, region: index), uffd: uffd) }
                    zero.remove(page)
                    if !received.insert(page) { fresh += 1 }
                    hashes.record(page: page, contents: contents)
                }
                payloadOffset += n * pageSize
                dataPagesApplied.add(UInt64(n))
            } else {
                pointer(g).copyMemory(from: payload.baseAddress! + payloadOffset, byteCount: n * pageSize)
                for page in g..<(g + n) {
                    zero.remove(page)
                    if !received.insert(page) { fresh += 1 }
                    hashes.record(page: page, contents: UnsafeRawBufferPointer(start: pointer(page), count: pageSize))
                }
                if uffd >= 0 {
                    for page in g..<(g + n) where !removed.contains(page) {
                        install(copyOf: page, at: vmAddress(ofGlobal: page, region: index), uffd: uffd)
                    }
                }
                payloadOffset += n * pageSize
                dataPagesApplied.add(UInt64(n))
            }
            g += n
        }
        return fresh
    }

    /// Hybrid: forgets pages whose copies here are stale.
    public func discard(_ range: PageRange) throws {
        guard let index = regionIndex(range.regionID) else {
            throw LinkError.local(.protocolViolation, reason: "pageDiscard for unknown region \(range.regionID)")
        }
        let regionPages = Int(layout.regions[index].size / UInt64(pageSize))
        guard range.pageIndex <= UInt64(regionPages), UInt64(range.count) <= UInt64(regionPages) - range.pageIndex else {
            throw LinkError.local(.protocolViolation, reason: "pageDiscard \(range.pageIndex)+\(range.count) beyond region \(range.regionID)")
        }
        let first = firstPage[index] + Int(range.pageIndex)
        let vmOwnsFile = backingFD >= 0 && ferry_load_i32_acquire(vmUffd) >= 0
        for page in first..<(first + Int(range.count)) {
            // The local copy must not keep the stale bytes: a later zero push only zeroes pages
            // it knows hold data, and the digest is taken over this copy. A RAM file drops them, so
            // the VM faults on them. A page that never arrived holds zeros already: it is not
            // touched (a hostile discard of every page must not make this copy resident).
            let holdsData = received.contains(page) && !zero.contains(page)
            received.remove(page)
            requested.remove(page)
            if holdsData && backingFD < 0 { memset(pointer(page), 0, pageSize) }
        }
        if backingFD >= 0 && !vmOwnsFile { punch(first: first, count: Int(range.count)) }
    }

    /// UFFDIO_COPY of a received page into the VM. EEXIST: the VM has it already. EAGAIN (a REMOVE
    /// event is queued for the fault thread): retried briefly, else left for the fault path.
    @inline(__always) func install(copyOf page: Int, at address: UInt64, uffd: Int32) {
        install(copying: UnsafeRawBufferPointer(start: pointer(page), count: pageSize), at: address, uffd: uffd)
    }

    /// UFFDIO_COPY of one page's `contents` into the VM (same rules as ``install(copyOf:at:uffd:)``).
    @inline(__always) func install(copying contents: UnsafeRawBufferPointer, at address: UInt64, uffd: Int32) {
        var copied: Int64 = 0
        for _ in 0..<100 {
            let r = ferry_uffdio_copy(uffd, address, UnsafeMutableRawPointer(mutating: contents.baseAddress!), UInt64(pageSize), 0, &copied)
            if r != -EAGAIN { return }
            usleep(20)
        }
    }

    /// UFFDIO_ZEROPAGE into the VM (same rules as ``install(copyOf:at:uffd:)``).
    @inline(__always) func install(zeroAt address: UInt64, uffd: Int32) {
        var zeroed: Int64 = 0
        for _ in 0..<100 {
            let r = ferry_uffdio_zeropage(uffd, address, UInt64(pageSize), 0, &zeroed)
            if r != -EAGAIN { return }
            usleep(20)
        }
    }

    /// Installs every received page into the running VM (data pages by UFFDIO_COPY, zero pages by
    /// UFFDIO_ZEROPAGE; pages the VM dropped are skipped; EEXIST means the VM has the page
    /// already), so that once it returns the VM no longer needs this process for them: a VM whose
    /// agent dies after this keeps running. Stops early when `stop()` says so. Returns the pages done.
    public func installAll(stop: () -> Bool) -> Int {
        let uffd = ferry_load_i32_acquire(vmUffd)
        guard uffd >= 0 else { return 0 }
        var done = 0
        for (index, region) in layout.regions.enumerated() {
            let first = firstPage[index]
            for page in first..<(first + Int(region.size) / pageSize) {
                if page & 1023 == 0 && stop() { return done }
                guard received.contains(page), !removed.contains(page) else { continue }
                // A RAM file holds every data page already; only its zero pages are holes.
                if backingFD >= 0 && !zero.contains(page) { continue }
                let address = vmAddress(ofGlobal: page, region: index)
                if zero.contains(page) { install(zeroAt: address, uffd: uffd) } else { install(copyOf: page, at: address, uffd: uffd) }
                done += 1
            }
        }
        return done
    }

    /// Locates a VM address: (region index, global page), or nil outside every region.
    @inline(__always) func locate(vmAddress address: UInt64) -> (region: Int, page: Int)? {
        for i in 0..<vmAddress.count {
            let start = vmAddress[i]
            if address >= start && address < start + layout.regions[i].size {
                return (i, firstPage[i] + Int((address - start) / UInt64(pageSize)))
            }
        }
        return nil
    }

    /// The digest of the copy: SHA-256 over the per-page hashes kept as pages were applied
    /// (``PageHashes``), as the source computes it over what it sent.
    public func digest() -> Digest { hashes.digest() }

    /// Writes Firecracker's memory file: each region at its `fileOffset`; zero pages stay holes.
    public func write(memoryFile path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SetupError("cannot create --mem-out \(path): errno \(errno)") }
        defer { close(fd) }
        let end = layout.regions.map { $0.fileOffset + $0.size }.max() ?? 0
        guard ftruncate(fd, off_t(end)) == 0 else { throw SetupError("ftruncate of \(path) to \(end) bytes failed: errno \(errno)") }
        for (i, region) in layout.regions.enumerated() {
            let pages = Int(region.size) / pageSize
            var p = 0
            while p < pages {
                let g = firstPage[i] + p
                if zero.contains(g) { p += 1; continue }
                var n = 1
                while p + n < pages && !zero.contains(g + n) && n < 4096 { n += 1 }
                var done = 0
                let bytes = n * pageSize
                while done < bytes {
                    let w = pwrite(fd, pointer(g) + done, bytes - done, off_t(region.fileOffset) + off_t(p * pageSize + done))
                    guard w > 0 else { throw SetupError("pwrite to \(path) at \(region.fileOffset + UInt64(p * pageSize)) failed: errno \(errno)") }
                    done += w
                }
                p += n
            }
        }
    }
}
