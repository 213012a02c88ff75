import ArgumentParser
import MigrationEngine

/// `source-agent --vm-bridge ...`: the VM's network here, so that its traffic follows it (docs/network.md).
struct NetworkOptions: ParsableArguments {
    @Option(name: .customLong("vm-bridge"), help: ArgumentHelp("The bridge the VM's NIC is on here. From the pause on, what arrives for the VM is carried to the destination over a sealed tunnel lane (and its replies back), so its connections survive the move; this agent adds its own port (a tap) to the bridge.", valueName: "BRIDGE"))
    var vmBridge: String?

    @Option(name: .customLong("vm-mac"), help: ArgumentHelp("The MAC of the VM's NIC on --vm-bridge (default with --vmm qemu: its one NIC's).", valueName: "MAC"))
    var vmMAC: String?

    @Option(name: .customLong("vm-address"), help: ArgumentHelp("An IPv4 address of the VM (repeatable): only ARP requests for these cross the tunnel (default: learned from the VM's own frames; until then every ARP request).", valueName: "IP"))
    var vmAddresses: [String] = []

    @Option(name: .customLong("tunnel-port"), help: ArgumentHelp("The name of this agent's port on --vm-bridge (a tap it creates and removes).", valueName: "NAME"))
    var tunnelPort: String?

    @Option(name: .customLong("tunnel-linger"), help: "After the hand-over, carry the VM's traffic for this many seconds (SIGTERM ends it sooner): time for the --on-network-moved hook's DNS or route change to reach every client.")
    var tunnelLinger: Double = 600

    func tunnelOptions() throws -> TunnelOptions? {
        try TunnelOptions.parse(bridge: vmBridge, mac: vmMAC, addresses: vmAddresses, port: tunnelPort)
    }
}
