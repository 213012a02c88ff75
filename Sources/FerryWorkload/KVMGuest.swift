import CFerryShims
import Glibc
import ProcessMemory

/// `ferry-workload --kvm`: a real KVM virtual machine whose one vCPU, in real mode, increments the first word of
/// guest pages 1..15 (guest-physical 0x1000..0xF000) in a loop and does `out 0x10` after each pass, so the host
/// counts passes. Its guest RAM is an anonymous mapping of this process: `DirtyTracker` on that mapping sees exactly
/// the guest's writes, as it would for any KVM VMM. `verify` checks the QEMU-test property: all 15 counters equal
/// except for one step (a pass in progress).
enum KVMGuest {
    /// The guest program at guest-physical 0 (16-bit real mode).
    static let code: [UInt8] = [
        0xBB, 0x00, 0x10,       // 0:  mov bx, 0x1000
        0xFF, 0x07,             // 3:  inc word [bx]
        0x81, 0xC3, 0x00, 0x10, // 5:  add bx, 0x1000
        0x75, 0xF8,             // 9:  jnz 3          (until bx wraps past 0xF000)
        0xE6, 0x10,             // 11: out 0x10, al   (one exit per pass)
        0xEB, 0xF1,             // 13: jmp 0
    ]
    static let writtenPages = 1...15

    static func run(memory: UInt64, seconds: Double?, reportInterval: Double, pidfile: Pidfile? = nil) -> Int32 {
        let size = max((memory + 0xFFFF) & ~0xFFFF, 0x10000)
        let ram: UInt64
        do { ram = try AnonymousMemory.map(length: size) } catch { Output.error("kvm: \(error)") }
        madvise(UnsafeMutableRawPointer(bitPattern: UInt(ram)), Int(size), 15) // MADV_NOHUGEPAGE: 4 KiB dirty granularity
        let base = UnsafeMutableRawPointer(bitPattern: UInt(ram))!
        code.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        var guest = ferry_kvm_guest()
        let r = ferry_kvm_guest_open(ram, size, &guest)
        guard r == 0 else { Output.error("kvm: opening /dev/kvm and creating a VM with \(size) bytes failed: errno \(-r)") }
        defer { ferry_kvm_guest_close(&guest) }
        Output.line("{\"event\":\"region\",\"mode\":\"kvm\",\"pid\":\(getpid()),\"start\":\(ram),\"start_hex\":\"0x\(String(ram, radix: 16))\",\"size\":\(size),\"page_size\":4096,\"guest_written_pages\":[\(writtenPages.map(String.init).joined(separator: ","))]}")
        Output.line("{\"event\":\"ready\",\"pid\":\(getpid()),\"pages\":\(size / 4096)}")
        pidfile?.write()

        let start = WorkloadLoop.now()
        var lastReport = start
        var passes = 0, passesAtReport = 0, interrupted = 0
        var exitReason: UInt32 = 0
        var line: [UInt8] = []
        while true {
            let rr = ferry_kvm_guest_run(&guest, &exitReason)
            if rr == -EINTR || rr == -EAGAIN { interrupted += 1; continue } // e.g. a tracker's ptrace stop: retry, as VMMs do
            guard rr == 0 else { Output.error("kvm: KVM_RUN failed: errno \(-rr)") }
            guard exitReason == 2 else { Output.error("kvm: unexpected exit reason \(exitReason)") } // KVM_EXIT_IO
            passes += 1
            if passes & 63 != 0 { continue }
            let now = WorkloadLoop.now()
            if let seconds, now - start >= seconds { break }
            guard now - lastReport >= min(reportInterval, 0.1) else { continue }
            if now - lastReport >= reportInterval {
                let ops = Double((passes - passesAtReport) * writtenPages.count) / (now - lastReport)
                Output.line("{\"event\":\"report\",\"t\":\(fmt(now - start)),\"ops_per_sec\":\(fmt(ops)),\"passes\":\(passes),\"kvm_run_interrupted\":\(interrupted)}")
                lastReport = now
                passesAtReport = passes
            }
            // Commands (quit, verify), checked between runs.
            var p = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 0) > 0 {
                var buf = [UInt8](repeating: 0, count: 1024)
                let n = read(0, &buf, buf.count)
                if n <= 0 { continue }
                line.append(contentsOf: buf[0..<n])
                while let nl = line.firstIndex(of: UInt8(ascii: "\n")) {
                    let cmd = String(decoding: line[0..<nl], as: UTF8.self)
                    line.removeSubrange(0...nl)
                    if cmd == "quit" { Output.line("{\"event\":\"exit\",\"passes\":\(passes)}"); return 0 }
                    if cmd == "verify" {
                        // The vCPU is not running now (we are between KVM_RUN calls): a consistent view.
                        let counters = writtenPages.map { base.load(fromByteOffset: $0 * 4096, as: UInt16.self) }
                        let ok = (counters.max()! &- counters.min()!) <= 1
                        Output.line("{\"event\":\"verified\",\"ok\":\(ok),\"counters\":[\(counters.map(String.init).joined(separator: ","))],\"passes\":\(passes)}")
                    }
                }
            }
        }
        Output.line("{\"event\":\"exit\",\"passes\":\(passes)}")
        return 0
    }
}
