import ArgumentParser
import MigrationEngine

/// `dest-agent --vm-bridge ...`: the VM's network here, where its traffic arrives over the tunnel lane (docs/network.md).
struct NetworkOptions: ParsableArguments {
    @Option(name: .customLong("vm-bridge"), help: ArgumentHelp("The bridge the VM's NIC will be on here. What the source carries for the VM (from its pause on) is held until the VM runs here, then written into this bridge; the VM's frames for the old host's segment go back. This agent adds its own port (a tap) to the bridge.", valueName: "BRIDGE"))
    var vmBridge: String?

    @Option(name: .customLong("vm-address"), help: ArgumentHelp("An IPv4 address of the VM (repeatable), for --on-network-moved (default: learned from the VM's frames).", valueName: "IP"))
    var vmAddresses: [String] = []

    @Option(name: .customLong("tunnel-port"), help: ArgumentHelp("The name of this agent's port on --vm-bridge (a tap it creates and removes).", valueName: "NAME"))
    var tunnelPort: String?

    @Option(name: .customLong("on-network-moved"), help: ArgumentHelp("Shell command run once the VM runs here (after its NICs announced themselves), with FERRY_VM_MAC, FERRY_VM_ADDRESSES, FERRY_NEW_HOST, FERRY_OLD_HOST and FERRY_VM_BRIDGE: the place for a dynamic-DNS update or a route change, so new connections come here.", valueName: "CMD"))
    var onNetworkMoved: String?

    func apply(to options: inout DestinationOptions) throws {
        options.network = try TunnelOptions.parse(bridge: vmBridge, mac: nil, addresses: vmAddresses, port: tunnelPort)
        if onNetworkMoved != nil && options.network == nil { throw ValidationError("--on-network-moved needs --vm-bridge") }
        options.onNetworkMoved = onNetworkMoved
    }
}
