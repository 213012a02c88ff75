import Logging

/// Where the VM's network is on this host, when its traffic is to follow it (docs/network.md).
public struct TunnelOptions: Sendable {
    /// The bridge the VM's NIC is on here (the operator's; the agent adds its own port to it).
    public var bridge: String
    /// The name of the agent's port (a tap device it creates); `ferry%d` lets the kernel number it.
    public var port: String = "ferry%d"
    /// The VM's MAC. The source needs it (given, or its QEMU's NIC); the destination learns it from the lane.
    public var vmMAC: MACAddress?
    /// The VM's IPv4 addresses, when known (more are learned from its frames).
    public var addresses: [UInt32] = []

    public init(bridge: String) { self.bridge = bridge }

    /// The options of an agent's command line (`--vm-bridge`, `--vm-mac`, `--vm-address`,
    /// `--tunnel-port`), checked; nil without a bridge.
    public static func parse(bridge: String?, mac: String?, addresses: [String], port: String?) throws(SetupError) -> TunnelOptions? {
        guard let bridge else {
            if mac != nil || !addresses.isEmpty || port != nil { throw SetupError("--vm-mac, --vm-address and --tunnel-port need --vm-bridge") }
            return nil
        }
        var options = TunnelOptions(bridge: bridge)
        if let mac {
            guard let parsed = MACAddress(parsing: mac), !parsed.isGroup, parsed.rawValue != 0 else {
                throw SetupError("--vm-mac \(mac) is not a unicast MAC address (like 52:54:00:12:34:56)")
            }
            options.vmMAC = parsed
        }
        for text in addresses {
            guard let address = ipv4(text) else { throw SetupError("--vm-address \(text) is not an IPv4 address") }
            options.addresses.append(address)
        }
        if let port {
            guard !port.isEmpty, port.utf8.count < 16, !port.contains("/"), !port.contains(" ") else {
                throw SetupError("--tunnel-port \(port): a network device name is 1 to 15 characters, no '/' or space")
            }
            options.port = port
        }
        return options
    }

    /// Parses a dotted IPv4 address into its 32-bit value (most significant byte first).
    public static func ipv4(_ text: String) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard let byte = UInt8(part) else { return nil }
            value = value << 8 | UInt32(byte)
        }
        return value
    }
}

extension EthernetTunnel {
    /// The tunnel end on `options`' bridge: the port is created and joined now, so a missing bridge
    /// or permission fails the agent before anything is sent.
    public static func make(side: Side, options: TunnelOptions, logger: Logger) throws(SetupError) -> EthernetTunnel {
        let tap = try TapDevice(name: options.port, bridge: options.bridge)
        logger.info("tunnel port ready", metadata: ["bridge": "\(options.bridge)", "port": "\(tap.name)",
                                                    "vm_mac": "\(options.vmMAC.map { "\($0)" } ?? "from the lane")"])
        return EthernetTunnel(side: side, tap: tap, vmMAC: options.vmMAC, addresses: options.addresses, logger: logger)
    }

    /// The report's network part: where, for whom, and what was carried in `seconds` since the hand-over.
    public func report(seconds: Double, hook: String = "") -> MigrationReport.NetworkReport {
        var report = MigrationReport.NetworkReport()
        report.bridge = tapBridge
        report.port = tapName
        report.vmMac = vmMAC.map { "\($0)" } ?? ""
        report.vmAddresses = vmAddresses
        report.tunnel = counters
        report.tunnelSeconds = seconds
        report.hook = hook
        report.firstFrameMs = firstFrameAfterStartMs
        return report
    }
}
