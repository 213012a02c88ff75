import Glibc

/// `--pidfile PATH`: the workload's PID (decimal and a newline) written to PATH once it is ready, atomically
/// (PATH.tmp written, then renamed over PATH), as QEMU's `-pidfile` does, so that whoever waits for the file (a
/// source agent learning the VM's PID) never reads it half written. The path is checked at startup, before any setup:
/// an unwritable one is refused with a JSON error and exit status 2. The file is left in place at exit.
struct Pidfile {
    let path: String
    var temporary: String { path + ".tmp" }

    /// Checks that PATH is not a directory and that PATH.tmp can be created (then removes it again); exits with a
    /// JSON error (status 2) otherwise.
    init(checking path: String) {
        guard !path.isEmpty else { Output.error("--pidfile: empty path") }
        self.path = path
        var st = stat()
        if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR { Output.error("--pidfile \(path) is a directory") }
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { Output.error("--pidfile \(path): cannot create \(temporary): \(Self.errnoText())") }
        Glibc.close(fd)
        unlink(temporary)
    }

    /// Writes the PID to PATH.tmp and renames it to PATH; exits with a JSON error (status 2) when either fails.
    func write() {
        var text = "\(getpid())\n"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { Output.error("--pidfile \(path): cannot create \(temporary): \(Self.errnoText())") }
        let written = text.withUTF8 { Glibc.write(fd, $0.baseAddress, $0.count) }
        let expected = text.utf8.count
        guard written == expected else {
            let e = written < 0 ? Self.errnoText() : "\(written) of \(expected) bytes"
            Glibc.close(fd)
            unlink(temporary)
            Output.error("--pidfile \(path): cannot write \(temporary): \(e)")
        }
        Glibc.close(fd)
        guard rename(temporary, path) == 0 else {
            let e = Self.errnoText()
            unlink(temporary)
            Output.error("--pidfile \(path): cannot rename \(temporary) to it: \(e)")
        }
    }

    static func errnoText() -> String {
        let e = errno
        return "\(String(cString: strerror(e))) (errno \(e))"
    }
}
