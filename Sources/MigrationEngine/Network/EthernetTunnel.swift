import CFerryShims
import Foundation
import Glibc
import Logging
import Synchronization
import Wire

/// What a tunnel carried, for the report.
public struct TunnelCounters: Sendable, Codable, Equatable {
    /// Frames (and their bytes) carried toward the VM: from the old host's segment to the new host.
    public var framesToVM: UInt64 = 0
    public var bytesToVM: UInt64 = 0
    /// Frames (and their bytes) the VM sent that were carried back to the old host's segment.
    public var framesFromVM: UInt64 = 0
    public var bytesFromVM: UInt64 = 0
    /// Frames dropped: no lane at that moment, the hold queue full, or not the VM's traffic.
    public var dropped: UInt64 = 0
    /// Frames held at the destination until the VM ran there (the most at once).
    public var heldMax: UInt64 = 0
    /// Tunnel lanes opened (1 + reconnects).
    public var lanes: UInt64 = 0
    public init() {}
}

/// Carries the VM's Ethernet traffic between the old and the new host over the session's tunnel
/// lane, so that its connections survive the move (Bradford et al. 2007; docs/network.md). Each
/// agent has a port on the bridge the VM's NIC is on (``TapDevice``).
///
/// Source (the old host), from ``takeOver()`` just before the pause on: it claims the VM's MAC on
/// its bridge — a static, sticky forwarding entry to its port, which the VM's own last frames from
/// its NIC cannot move back, and a RARP from the VM's address through the port, as QEMU's
/// `announce-self` sends, for the switches beyond — so that what arrives for the VM comes to this
/// port and none of it is left in the paused VM's queue, and sends it over the lane: frames to the
/// VM's MAC, ARP broadcasts for the VM's addresses, IPv6 multicast. What the lane brings (the VM's
/// own frames, and only those) goes into the bridge. ``handBack()`` releases the MAC when the
/// migration fails before hand-over and the VM runs on here.
///
/// Destination (the new host): what the lane brings for the VM is held until ``vmRunning()``, then
/// written into the bridge in order, and from then on at once; the VM's own frames that reach this
/// port (for the old segment's machines, learned behind it, or broadcasts) go over the lane.
///
/// The source opens the lane before the pause (its handshake is no downtime) and reopens it after
/// any drop, during and after the migration, until ``stop()``; each lane is sealed with its own
/// keys like every connection of the session. Frames in flight on a lane that drops are lost, as
/// on any Ethernet: the VM's TCP retransmits them.
public final class EthernetTunnel: @unchecked Sendable {
    /// Which end of the tunnel this is.
    public enum Side: String, Sendable { case source, destination }

    public let side: Side
    private let tap: TapDevice
    private let logger: Logger
    private let mac = Atomic<UInt64>(0)
    /// Source: the VM's traffic goes over the lane. Destination: the VM runs here, frames go into the bridge at once.
    private let forwarding = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(false)
    private let lane = Mutex<PeerLink?>(nil)
    private let held = Mutex<(frames: [[UInt8]], bytes: Int)>(([], 0))
    private let counts = Mutex(TunnelCounters())
    private let addresses = Mutex<Set<UInt32>>([])
    private let readerDone = Atomic<Bool>(false)
    /// Destination: when the VM began to run here, and when its first frame after that reached this port (monotonic ns).
    private let runningAt = Atomic<UInt64>(0)
    private let firstFrameAt = Atomic<UInt64>(0)
    /// The VM's MAC is pinned to this port (source, from the takeover).
    private let pinned = Atomic<Bool>(false)
    /// At most this much is held for a VM that does not run yet (a few round trips of a busy VM).
    private static let heldBytesMax = 4 << 20

    /// A tunnel end on `tap`. The source knows the VM's MAC; the destination may learn it from the
    /// first batch of the lane. `addresses` are the VM's IPv4 addresses when the operator knows them
    /// (more are learned from the VM's own frames).
    public init(side: Side, tap: TapDevice, vmMAC: MACAddress?, addresses: [UInt32] = [], logger: Logger) {
        self.side = side
        self.tap = tap
        self.logger = logger
        if let vmMAC { mac.store(vmMAC.rawValue, ordering: .relaxed) }
        self.addresses.withLock { $0.formUnion(addresses) }
    }

    /// This end's port and the bridge it is on.
    public var tapName: String { tap.name }
    public var tapBridge: String { tap.bridge }

    /// The VM's MAC, once known.
    public var vmMAC: MACAddress? {
        let raw = mac.load(ordering: .relaxed)
        return raw == 0 ? nil : MACAddress(rawValue: raw)
    }

    /// The VM's IPv4 addresses: given, and seen in its frames.
    public var vmAddresses: [String] {
        addresses.withLock { $0.sorted() }.map { address in
            (0..<4).map { String(address >> (24 - 8 * UInt32($0)) & 0xff) }.joined(separator: ".")
        }
    }

    /// Destination: milliseconds from the VM's start here to its first frame on this bridge (nil before).
    public var firstFrameAfterStartMs: Double? {
        let (start, first) = (runningAt.load(ordering: .relaxed), firstFrameAt.load(ordering: .relaxed))
        return start == 0 || first == 0 ? nil : Double(first &- start) / 1e6
    }

    /// What it carried so far.
    public var counters: TunnelCounters { counts.withLock { $0 } }

    /// Starts reading the tap.
    public func start() {
        let thread = Thread { [self] in readTap() }
        thread.name = "ferry-tunnel-tap"
        thread.start()
    }

    /// Ends the tunnel: the lane closes, the tap is no longer read.
    public func stop() {
        stopped.store(true, ordering: .relaxed)
        unpin()
        lane.withLock { $0?.close(); $0 = nil }
        for _ in 0..<50 where !readerDone.load(ordering: .relaxed) { usleep(10_000) }
    }

    // MARK: - Moments of the migration

    /// Source, right before the pause: the VM's traffic on this segment comes to this port and over
    /// the lane (frames that arrive before the VM stops are delivered at the destination instead).
    public func takeOver() {
        guard side == .source, let vm = vmMAC else { return }
        forwarding.store(true, ordering: .releasing)
        let rc = tap.pin(vm, true)
        if rc != 0 {
            logger.warning("tunnel: cannot pin the VM's MAC to this port (a frame the VM sends before it stops may pull its traffic back)",
                           metadata: ["error": "\(String(cString: strerror(-rc)))"])
        }
        pinned.store(rc == 0, ordering: .relaxed)
        announce(vm)
        logger.info("tunnel: traffic for the VM now goes to the new host", metadata: ["vm_mac": "\(vm)", "port": "\(tap.name)"])
    }

    /// Source: the migration failed before hand-over; the VM runs on here (its VMM announces it again).
    public func handBack() {
        guard side == .source, forwarding.exchange(false, ordering: .acquiringAndReleasing) else { return }
        unpin()
        logger.info("tunnel: the VM runs on here; its traffic stays on this segment")
    }

    /// Destination: the VM runs here. Frames held for it go into the bridge, in order; later ones at once.
    public func vmRunning() {
        guard side == .destination else { return }
        held.withLock { held in
            for frame in held.frames { frame.withUnsafeBytes { _ = tap.write($0) } }
            held = ([], 0)
            runningAt.store(ferry_monotonic_ns(), ordering: .relaxed)
            forwarding.store(true, ordering: .releasing)
        }
    }

    private func unpin() {
        guard pinned.exchange(false, ordering: .relaxed), let vm = vmMAC else { return }
        let rc = tap.pin(vm, false)
        if rc != 0 { logger.warning("tunnel: cannot unpin the VM's MAC", metadata: ["error": "\(String(cString: strerror(-rc)))"]) }
    }

    /// A RARP from `vm` through this port, as QEMU's `announce-self` sends: the bridge learns that
    /// the VM's MAC is behind this port (and so does every switch the broadcast reaches).
    private func announce(_ vm: MACAddress) {
        var frame = [UInt8](repeating: 0, count: 60)
        frame.withUnsafeMutableBytes { raw in
            let p = raw.baseAddress!
            MACAddress.broadcast.write(to: p)
            vm.write(to: p + 6)
            let fields: [UInt8] = [0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3]   // RARP: Ethernet, IPv4, reverse request
            raw.baseAddress!.advanced(by: 12).copyMemory(from: fields, byteCount: fields.count)
            vm.write(to: p + 22)        // sender hardware address
            vm.write(to: p + 32)        // target hardware address
        }
        frame.withUnsafeBytes { _ = tap.write($0) }
    }

    // MARK: - Lanes

    /// Source: keeps a lane open, reconnecting after a drop, until ``stop()``. `connect` opens a
    /// sealed lane of the session.
    public func keepLaneOpen(connect: @escaping @Sendable () throws -> PeerLink) {
        let thread = Thread { [self] in
            var delay = 0.05
            while !stopped.load(ordering: .relaxed) {
                let current = lane.withLock { $0 }
                if let current, current.failureSeen == nil {
                    usleep(20_000)
                    continue
                }
                do {
                    attach(try connect())
                    delay = 0.05
                } catch {
                    if stopped.load(ordering: .relaxed) { break }
                    logger.debug("tunnel lane: connect failed", metadata: ["error": "\(error)", "retry_in_s": "\(delay)"])
                    usleep(UInt32(delay * 1e6))
                    delay = min(delay * 2, 1)
                }
            }
        }
        thread.name = "ferry-tunnel-lane"
        thread.start()
    }

    /// A lane is up (the source opened it, or the destination accepted it): it replaces the one
    /// before. The source announces the VM's MAC on it at once.
    public func attach(_ link: PeerLink) {
        if stopped.load(ordering: .relaxed) { link.close(); return }
        link.setPriority(PeerLink.interactivePriority)
        let old = lane.withLock { lane in
            let old = lane
            lane = link
            return old
        }
        old?.close()
        counts.withLock { $0.lanes += 1 }
        link.startReader(name: "ferry-tunnel-lane") { [self] (frame: DecodedFrame) throws(LinkError) in
            switch frame.message {
            case .tunnelFrames(let batch): try received(batch)
            case .keepalive: break
            default: throw .unexpected(frame.header.type, expecting: "tunnelFrames on the tunnel lane")
            }
        }
        link.startKeepalive(every: 1)
        if side == .source, let vm = vmMAC {
            let empty = TunnelFrames(vmMAC: vm.rawValue, frameCount: 0, payload: .empty)
            try? link.send(.tunnelFrames(empty))
        }
    }

    /// A batch from the lane: checked (whose it is, that each frame is the VM's traffic) and
    /// written into the bridge, or held until the VM runs here.
    private func received(_ batch: TunnelFrames) throws(LinkError) {
        let known = mac.load(ordering: .relaxed)
        if known == 0 && side == .destination {
            mac.store(batch.vmMAC, ordering: .relaxed)
            logger.info("tunnel: lane up", metadata: ["vm_mac": "\(MACAddress(rawValue: batch.vmMAC)!)"])
        } else if batch.vmMAC != known {
            throw .local(.protocolViolation, reason: "tunnelFrames for VM \(MACAddress(rawValue: batch.vmMAC)!), this tunnel carries \(MACAddress(rawValue: known).map { "\($0)" } ?? "none")")
        }
        guard batch.frameCount > 0 else { return }
        var written: UInt64 = 0, bytes: UInt64 = 0, dropped: UInt64 = 0, heldNow: UInt64 = 0
        batch.forEachFrame { frame in
            let destination = MACAddress(bytes: frame.baseAddress!), source = MACAddress(bytes: frame.baseAddress! + 6)
            // Only the VM's traffic crosses: to the VM (or a group address) toward the new host, from the VM toward the old.
            let belongs = side == .destination ? (destination.rawValue == batch.vmMAC || destination.isGroup) : source.rawValue == batch.vmMAC
            guard belongs else { dropped += 1; return }
            if side == .destination {
                let delivered: Bool? = held.withLock { held in
                    if forwarding.load(ordering: .acquiring) { return nil }
                    guard held.bytes + frame.count <= Self.heldBytesMax else { return false }
                    held.frames.append([UInt8](frame))
                    held.bytes += frame.count
                    heldNow = UInt64(held.frames.count)
                    return true
                }
                if delivered == false { dropped += 1; return }
                if delivered == nil && !tap.write(frame) { dropped += 1; return }
            } else if !tap.write(frame) {
                dropped += 1
                return
            }
            written += 1
            bytes += UInt64(frame.count)
        }
        counts.withLock { counts in
            if side == .destination { counts.framesToVM += written; counts.bytesToVM += bytes } else { counts.framesFromVM += written; counts.bytesFromVM += bytes }
            counts.dropped += dropped
            counts.heldMax = max(counts.heldMax, heldNow)
        }
    }

    // MARK: - The tap

    /// Reads what the bridge sends to this port and sends the VM's traffic over the lane, a batch
    /// per wake-up (whatever is waiting, up to 64 KiB), so a lone frame is never held back.
    private func readTap() {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        defer { buffer.deallocate(); readerDone.store(true, ordering: .relaxed) }
        var batch = TunnelFrameBatch()
        var batchBytes: UInt64 = 0
        while !stopped.load(ordering: .relaxed) {
            guard tap.waitReadable(milliseconds: 100) else { continue }
            while true {
                let n = tap.read(into: buffer)
                if n < 0 {
                    logger.error("tunnel: reading tap \(tap.name) failed: \(String(cString: strerror(Int32(-n))))")
                    return
                }
                if n == 0 { break }
                let frame = UnsafeRawBufferPointer(rebasing: buffer[..<n])
                guard n >= TunnelFrames.minFrameLength, n <= TunnelFrames.maxFrameLength, wanted(frame) else { continue }
                if !batch.hasRoom(for: n) {
                    send(&batch, bytes: batchBytes)
                    batchBytes = 0
                }
                _ = batch.append(frame)
                batchBytes += UInt64(n)
            }
            if batch.frameCount > 0 {
                send(&batch, bytes: batchBytes)
                batchBytes = 0
            }
        }
    }

    /// Whether a frame from the bridge is the VM's traffic to carry (learning the VM's addresses on the way).
    private func wanted(_ frame: UnsafeRawBufferPointer) -> Bool {
        let vm = mac.load(ordering: .relaxed)
        guard vm != 0 else { return false }
        let destination = MACAddress(bytes: frame.baseAddress!), source = MACAddress(bytes: frame.baseAddress! + 6)
        if source.rawValue == vm { learnAddress(frame) }
        switch side {
        case .destination:
            // The VM's own first frame (its VMM's RARP announcements do not count).
            if source.rawValue == vm && etherType(frame) != 0x8035 && firstFrameAt.load(ordering: .relaxed) == 0 && runningAt.load(ordering: .relaxed) != 0 {
                firstFrameAt.store(ferry_monotonic_ns(), ordering: .relaxed)
                logger.info("tunnel: the VM's first frame here", metadata: ["after_start_ms": "\(String(format: "%.1f", firstFrameAfterStartMs ?? 0))"])
            }
            return source.rawValue == vm
        case .source:
            guard forwarding.load(ordering: .acquiring), source.rawValue != vm else { return false }
            if destination.rawValue == vm { return true }
            if destination.rawValue >> 16 == 0x3333 { return true }                 // IPv6 multicast (neighbour discovery)
            if destination == .broadcast, etherType(frame) == 0x0806, frame.count >= 42 {   // ARP: only asking for the VM
                let target = UInt32(bigEndianBytes: frame.baseAddress! + 38)
                return addresses.withLock { $0.isEmpty || $0.contains(target) }
            }
            return false
        }
    }

    private func etherType(_ frame: UnsafeRawBufferPointer) -> UInt16 { UInt16(frame[12]) << 8 | UInt16(frame[13]) }

    /// Notes the VM's IPv4 address from its ARP (sender address) or IPv4 (source address) frames.
    private func learnAddress(_ frame: UnsafeRawBufferPointer) {
        let type = etherType(frame)
        let address: UInt32
        if type == 0x0806, frame.count >= 32 { address = UInt32(bigEndianBytes: frame.baseAddress! + 28) }
        else if type == 0x0800, frame.count >= 34 { address = UInt32(bigEndianBytes: frame.baseAddress! + 26) }
        else { return }
        guard address != 0 else { return }
        _ = addresses.withLock { $0.insert(address) }
    }

    private func send(_ batch: inout TunnelFrameBatch, bytes: UInt64) {
        defer { batch.reset() }
        let frames = UInt64(batch.frameCount)
        guard let link = lane.withLock({ $0 }), let vm = vmMAC else {
            counts.withLock { $0.dropped += frames }
            return
        }
        do {
            try link.send(batch.message(vmMAC: vm.rawValue))
        } catch {
            counts.withLock { $0.dropped += frames }
            return
        }
        counts.withLock { counts in
            if side == .source { counts.framesToVM += frames; counts.bytesToVM += bytes } else { counts.framesFromVM += frames; counts.bytesFromVM += bytes }
        }
    }
}

extension UInt32 {
    /// Four bytes at `bytes`, most significant first (network order).
    init(bigEndianBytes bytes: UnsafeRawPointer) {
        self = UInt32(bytes.load(as: UInt8.self)) << 24 | UInt32(bytes.load(fromByteOffset: 1, as: UInt8.self)) << 16
            | UInt32(bytes.load(fromByteOffset: 2, as: UInt8.self)) << 8 | UInt32(bytes.load(fromByteOffset: 3, as: UInt8.self))
    }
}
