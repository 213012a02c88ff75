import Foundation
import Glibc

/// A directory only this user can enter (mode 0700), for files that may hold secrets (the VM-state
/// blob, the layout, the hand-over journal). Made with `mkdtemp` under the system's temporary
/// directory, or at a path the operator chose (created 0700, or tightened to 0700 if it exists).
public struct PrivateDirectory: Sendable {
    /// Its path.
    public let path: String
    /// Whether this value created it (and so removes it in ``remove()``).
    public let created: Bool

    /// A fresh directory `<tmp>/<prefix>-XXXXXX`. The corresponding C function is `mkdtemp`.
    public init(prefix: String) throws {
        var template = Array((NSTemporaryDirectory() + "/\(prefix)-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else {
            throw SetupError("cannot make a private directory under \(NSTemporaryDirectory()): errno \(errno)")
        }
        path = String(cString: made)
        created = true
    }

    /// The operator's directory at `path`, created if missing, and set to mode 0700 either way.
    public init(at path: String) throws {
        var isDirectory: ObjCBool = false
        let existed = FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory)
        if !existed {
            guard mkdir(path, 0o700) == 0 else { throw SetupError("cannot create the work directory \(path): errno \(errno)") }
        } else if !isDirectory.boolValue {
            throw SetupError("the work directory \(path) exists and is not a directory")
        }
        guard chmod(path, 0o700) == 0 else { throw SetupError("cannot make \(path) private (chmod 0700): errno \(errno)") }
        self.path = path
        self.created = !existed
    }

    /// Removes the directory and what it holds (only if this value created it, or `force`).
    public func remove(force: Bool = false) {
        guard created || force else { return }
        try? FileManager.default.removeItem(atPath: path)
    }
}
