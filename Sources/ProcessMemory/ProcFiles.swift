import SystemPackage

/// Small helpers to open and read files under /proc/PID with errors that name the process.
enum ProcFiles {
    /// Opens /proc/PID/<name>, turning ENOENT into "no process PID" (ESRCH) and EACCES/EPERM into a permission error.
    static func open(pid: Int32, _ name: String, _ mode: FileDescriptor.AccessMode = .readOnly) throws(ProcessMemoryError) -> FileDescriptor {
        let path = "/proc/\(pid)/\(name)"
        do {
            return try FileDescriptor.open(FilePath(path), mode, options: [.closeOnExec])
        } catch {
            throw translate(error, pid: pid, what: "open \(path)")
        }
    }

    static func translate(_ error: any Error, pid: Int32, what: String) -> ProcessMemoryError {
        guard let errno = error as? Errno else { return ProcessMemoryError("\(what): \(error)") }
        switch errno {
        case .noSuchFileOrDirectory, .noSuchProcess:
            return ProcessMemoryError("no process \(pid) (\(what))", errno: .noSuchProcess)
        case .permissionDenied, .notPermitted:
            return ProcessMemoryError("no permission to inspect process \(pid) (\(what)); run as root or with CAP_SYS_PTRACE", errno: errno)
        default:
            return ProcessMemoryError("\(what) failed for process \(pid)", errno: errno)
        }
    }

    /// Reads a whole /proc text file (maps, status): small, not a hot path.
    static func readText(pid: Int32, _ name: String) throws(ProcessMemoryError) -> String {
        let fd = try open(pid: pid, name)
        defer { try? fd.close() }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n: Int
            do {
                n = try chunk.withUnsafeMutableBytes { try fd.read(into: $0, retryOnInterrupt: true) }
            } catch {
                throw translate(error, pid: pid, what: "read /proc/\(pid)/\(name)")
            }
            if n == 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
