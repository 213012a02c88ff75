import Foundation
import Glibc

/// Writes a pre-shared key file for the agents' `--key-file`: `count` bytes (32 by default) from
/// SplitMix64 seeded with `seed` (reproducible) or from the system generator (seed nil), mode 0600.
/// Returns the key bytes.
@discardableResult
public func writeKeyFile(at path: String, count: Int = 32, seed: UInt64? = nil) throws -> [UInt8] {
    var key = [UInt8](repeating: 0, count: count)
    if let seed {
        var generator = SplitMix64(seed: seed)
        for i in 0..<count { key[i] = UInt8(truncatingIfNeeded: generator.next()) }
    } else {
        var generator = SystemRandomNumberGenerator()
        for i in 0..<count { key[i] = UInt8.random(in: 0...255, using: &generator) }
    }
    guard FileManager.default.createFile(atPath: path, contents: Data(key), attributes: [.posixPermissions: 0o600]) else {
        throw SupportError("cannot write key file \(path) (\(count) bytes)")
    }
    return key
}
