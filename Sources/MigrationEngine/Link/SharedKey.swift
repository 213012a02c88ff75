import Foundation
import Glibc
import Wire

/// The pre-shared key both agents prove they hold in the handshake and from which every
/// connection's sealing keys are derived (Wire's `AuthProof`, `SessionKeys`). At least 32 bytes of
/// key: raw bytes (`head -c 32 /dev/urandom > ferry.key`), or that many written as hex (64+ digits)
/// or base64. A text that is neither is a passphrase, and refused: a passphrase can be guessed
/// offline by anyone who records one handshake.
public struct SharedKey: Sendable {
    /// The key bytes.
    public let bytes: [UInt8]

    /// How to make a good key file, for error messages.
    public static let howToMake = "make one with: (umask 077; head -c 32 /dev/urandom > ferry.key)"

    /// A key from bytes already in memory. Throws for a key shorter than 32 bytes.
    public init(bytes: [UInt8]) throws(SetupError) {
        guard AuthProof.isAcceptableKey(bytes) else {
            throw SetupError("the shared key has \(bytes.count) bytes; at least \(AuthProof.minimumKeyLength) are needed (\(Self.howToMake))")
        }
        self.bytes = bytes
    }

    /// Reads the key file at `path`. Refuses a file that group or others may read (or others may
    /// write), one shorter than 32 bytes of key, and a passphrase.
    public init(contentsOf path: String) throws(SetupError) {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw SetupError("cannot read the key file \(path): \(String(cString: strerror(errno))) (\(Self.howToMake))")
        }
        if info.st_mode & 0o044 != 0 || info.st_mode & 0o002 != 0 {
            throw SetupError("the key file \(path) has mode \(String(info.st_mode & 0o777, radix: 8)): group or others may read it; "
                             + "run: chmod 600 \(path)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SetupError("cannot read the key file \(path) (missing or no permission)")
        }
        try self.init(fileContents: [UInt8](data), path: path)
    }

    /// The key in a key file's bytes (see the type's description).
    init(fileContents raw: [UInt8], path: String) throws(SetupError) {
        let printable = raw.allSatisfy { ($0 >= 0x20 && $0 < 0x7F) || $0 == 0x0A || $0 == 0x0D }
        guard printable else {
            try self.init(bytes: raw)   // raw key bytes, used exactly as they are
            return
        }
        let text = String(decoding: raw, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if let decoded = Hex.bytes(text) ?? Data(base64Encoded: text).map({ [UInt8]($0) }), decoded.count >= AuthProof.minimumKeyLength {
            try self.init(bytes: decoded)
            return
        }
        throw SetupError("the key file \(path) holds \(text.count) characters of text that is not \(AuthProof.minimumKeyLength) bytes "
                         + "of hex or base64: a passphrase, which anyone who records a handshake could guess offline; \(Self.howToMake)")
    }
}

/// A problem with how an agent was set up (options, files, permissions), said plainly.
public struct SetupError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
