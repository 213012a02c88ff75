/// An Ethernet (MAC) address, held in the low 48 bits of a `UInt64`, first byte on the wire most
/// significant: the form `tunnelFrames` carries it in.
public struct MACAddress: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64

    /// An address from its 48-bit value; nil when bits above 48 are set.
    public init?(rawValue: UInt64) {
        guard rawValue >> 48 == 0 else { return nil }
        self.rawValue = rawValue
    }

    /// Parses `52:54:00:12:34:56` (or with `-`); nil when it is not six hex bytes.
    public init?(parsing text: String) {
        let parts = text.split(whereSeparator: { $0 == ":" || $0 == "-" })
        guard parts.count == 6 else { return nil }
        var value: UInt64 = 0
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            value = value << 8 | UInt64(byte)
        }
        rawValue = value
    }

    /// The six bytes at `bytes`.
    init(bytes: UnsafeRawPointer) {
        var value: UInt64 = 0
        for index in 0..<6 { value = value << 8 | UInt64(bytes.load(fromByteOffset: index, as: UInt8.self)) }
        rawValue = value
    }

    /// Writes the six bytes at `bytes`.
    func write(to bytes: UnsafeMutableRawPointer) {
        for index in 0..<6 { bytes.storeBytes(of: UInt8(truncatingIfNeeded: rawValue >> (40 - 8 * UInt64(index))), toByteOffset: index, as: UInt8.self) }
    }

    /// ff:ff:ff:ff:ff:ff.
    public static let broadcast = MACAddress(rawValue: 0xffff_ffff_ffff)!

    /// Whether this is a group (broadcast or multicast) address: the low bit of the first byte.
    public var isGroup: Bool { rawValue >> 40 & 1 == 1 }

    public var description: String {
        (0..<6).map { index in
            let byte = UInt8(truncatingIfNeeded: rawValue >> (40 - 8 * UInt64(index)))
            return (byte < 16 ? "0" : "") + String(byte, radix: 16)
        }.joined(separator: ":")
    }
}
