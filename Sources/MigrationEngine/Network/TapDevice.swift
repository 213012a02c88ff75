import CFerryShims
import Glibc

/// This agent's own port on the VM's bridge: a tap device it creates and attaches to the bridge the
/// VM's NIC is on. What the bridge sends to the port (frames for addresses learned behind it,
/// broadcasts, unknown destinations) is read here; what is written here enters the bridge as if it
/// came from a machine on that port. The device goes away with its descriptor, so no way this
/// agent ends leaves a port behind. Non-blocking: a reader waits with ``waitReadable(milliseconds:)``.
public final class TapDevice: @unchecked Sendable {
    /// The device's name (e.g. `ferry12345`).
    public let name: String
    /// The bridge it is a port of.
    public let bridge: String
    private let fd: Int32

    /// Creates tap `name` (empty: the kernel picks one), makes it a port of `bridge` and sets it up.
    /// Needs CAP_NET_ADMIN in the network namespace of the bridge.
    public init(name: String, bridge: String) throws(SetupError) {
        var actual = [CChar](repeating: 0, count: 16)
        let fd = ferry_tap_open(name, &actual)
        guard fd >= 0 else {
            throw SetupError("cannot create the tap device \(name.isEmpty ? "" : "\(name) ")for the tunnel: \(String(cString: strerror(-fd)))"
                             + (fd == -EPERM ? " (needs CAP_NET_ADMIN)" : fd == -ENOENT ? " (no /dev/net/tun: load the tun module)" : ""))
        }
        self.fd = fd
        self.name = String(decoding: actual.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.bridge = bridge
        var rc = ferry_bridge_add_port(bridge, self.name)
        if rc != 0 {
            close(fd)
            throw SetupError("cannot add the tunnel's tap \(self.name) to bridge \(bridge): \(String(cString: strerror(-rc)))"
                             + (rc == -ENODEV ? " (no such device: create the bridge the VM's NIC is on, e.g. `ip link add \(bridge) type bridge`)" : "")
                             + (rc == -EOPNOTSUPP || rc == -EINVAL ? " (\(bridge) is not a bridge)" : ""))
        }
        rc = ferry_link_set_up(self.name)
        if rc != 0 {
            close(fd)
            throw SetupError("cannot set the tunnel's tap \(self.name) up: \(String(cString: strerror(-rc)))")
        }
    }

    deinit { close(fd) }

    /// Pins `mac` to this port in the bridge (a static, sticky forwarding entry: frames from that MAC
    /// on another port do not move it), or unpins it. 0 or -errno.
    public func pin(_ mac: MACAddress, _ on: Bool) -> Int32 {
        ferry_bridge_pin_mac(name, mac.rawValue, on ? 1 : 0)
    }

    /// Waits up to `milliseconds` for a frame to read; false on timeout.
    public func waitReadable(milliseconds: Int32) -> Bool {
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, milliseconds) > 0
    }

    /// Reads one frame into `buffer`: its length, 0 when none is waiting, -errno on failure.
    public func read(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
        if n >= 0 { return n }
        return errno == EAGAIN || errno == EINTR ? 0 : -Int(errno)
    }

    /// Writes one frame into the bridge; false when the kernel refused it (counted as dropped).
    @discardableResult
    public func write(_ frame: UnsafeRawBufferPointer) -> Bool {
        Glibc.write(fd, frame.baseAddress, frame.count) == frame.count
    }
}
