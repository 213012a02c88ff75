import Foundation
import Glibc

/// A fresh directory (`mkdtemp`) removed with everything in it when the value is released.
/// `base` picks the file system: the default temporary directory (a disk), or /dev/shm (tmpfs).
public final class TemporaryDirectory: @unchecked Sendable {
    /// The directory's absolute path.
    public let path: String

    public init(prefix: String = "ferry-test", base: String? = nil) {
        let parent = base ?? (ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp")
        var template = Array("\(parent)/\(prefix)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp in \(parent) failed: errno \(errno)")
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The path of `name` inside the directory.
    public func file(_ name: String) -> String { path + "/" + name }

    /// Creates (or truncates) `name` as a sparse file of `size` bytes and returns its path.
    @discardableResult
    public func sparseFile(_ name: String, size: UInt64) throws -> String {
        let p = file(name)
        let fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SupportError("open \(p) failed: errno \(errno)") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw SupportError("ftruncate \(p) to \(size) bytes failed: errno \(errno)") }
        return p
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A failure inside the test support code, saying what failed.
public struct SupportError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
