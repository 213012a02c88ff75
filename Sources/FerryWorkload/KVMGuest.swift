/// KVM mode: not yet implemented (see the report).
enum KVMGuest {
    static func run(memory: UInt64, seconds: Double?, reportInterval: Double) -> Int32 {
        Output.line("{\"event\":\"error\",\"message\":\"--kvm is not implemented yet\"}")
        return 2
    }
}
