import Foundation
import Wire

/// The pre-shared key both agents prove they hold in the hello exchange (HMAC-SHA256 over both
/// nonces, the session id and the role; see Wire's `AuthProof`). Loaded from a file: its raw bytes,
/// at least 16 of them (a hex or base64 text is used as is, as bytes).
public struct SharedKey: Sendable {
    /// The key bytes.
    public let bytes: [UInt8]

    /// A key from bytes already in memory. Throws for a key shorter than 16 bytes.
    public init(bytes: [UInt8]) throws(SetupError) {
        guard AuthProof.isAcceptableKey(bytes) else {
            throw SetupError("the shared key has \(bytes.count) bytes; at least \(AuthProof.minimumKeyLength) are needed (make one with: head -c 32 /dev/urandom > ferry.key)")
        }
        self.bytes = bytes
    }

    /// Reads the key file at `path`; a trailing newline is not part of the key.
    public init(contentsOf path: String) throws(SetupError) {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SetupError("cannot read the key file \(path) (missing or no permission)")
        }
        var bytes = [UInt8](data)
        while let last = bytes.last, last == 0x0A || last == 0x0D { bytes.removeLast() }
        try self.init(bytes: bytes)
    }
}

/// A problem with how an agent was set up (options, files, permissions), said plainly.
public struct SetupError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
