import Foundation
import Glibc

/// A CPU-time limit on a process through its cgroup: QEMU's auto-converge, which sleeps the vCPUs for
/// a share of each 10 ms, done from outside by the kernel's CFS bandwidth control.
///
/// - cgroup v2 (`cpu.max` in the process's own cgroup, i.e. its parent enabled the cpu controller, as
///   systemd does for a VM's scope): the limit is written there and the old value written back at
///   ``release()``.
/// - cgroup v1 (a `cpu` hierarchy, as on this project's CI machine): the process moves into a child
///   cgroup `ferry-throttle-PID` of its own, whose `cpu.cfs_quota_us` is the limit; ``release()``
///   moves it back and removes the child. A child left by an agent that was killed is found and
///   undone the next time (the process's cgroup path ends in that name).
///
/// The limit is in CPUs (0.25: a quarter of one CPU's time per period of 100 ms).
final class CPUQuota {
    private enum Layout {
        case v2(directory: String, saved: String)
        case v1(child: String, original: String)
    }

    let pid: Int32
    private let layout: Layout
    private let periodMicroseconds = 100_000
    /// The limit now, in CPUs.
    private(set) var cpus: Double = 0
    private var released = false
    /// A cgroup file system this throttle mounted itself (unmounted at release).
    private var privateMount: String?

    /// Finds the process's cpu cgroup and prepares the limit (nothing is limited until ``limit(cpus:)``).
    init(pid: Int32) throws {
        self.pid = pid
        let lines = try String(contentsOfFile: "/proc/\(pid)/cgroup", encoding: .utf8).split(separator: "\n")
        // The cgroup file systems as this process sees them; where the one needed is not mounted
        // (`ip netns exec` gives its command a fresh /sys without them), it is mounted privately for
        // the throttle's life.
        var v1Mount: String?, v2Mount: String?
        for line in ((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "").split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 4 else { continue }
            if f[2] == "cgroup" && f[3].split(separator: ",").contains("cpu") { v1Mount = String(f[1]) }
            if f[2] == "cgroup2" { v2Mount = String(f[1]) }
        }
        // The v1 hierarchy the cpu controller is in, named by its controllers ("cpu" or "cpu,cpuacct"):
        // a second mount of it must name the same ones.
        let v1Controllers = lines.lazy.map { $0.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false) }
            .first { $0.count == 3 && $0[1].split(separator: ",").contains("cpu") }.map { String($0[1]) }
        let usesV1 = v1Controllers != nil
        var mounted: String?
        if let v1Controllers, v1Mount == nil {
            mounted = try Self.mountPrivately(type: "cgroup", options: v1Controllers)
            v1Mount = mounted
        } else if !usesV1 && v2Mount == nil {
            mounted = try Self.mountPrivately(type: "cgroup2", options: nil)
            v2Mount = mounted
        }
        var found: Layout?
        for line in lines {
            let f = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard f.count == 3 else { continue }
            let path = String(f[2])
            if f[0] == "0" && f[1].isEmpty, let v2Mount {
                let directory = v2Mount + path
                if let saved = try? String(contentsOfFile: directory + "/cpu.max", encoding: .utf8) {
                    found = .v2(directory: directory, saved: saved.trimmingCharacters(in: .whitespacesAndNewlines))
                    break
                }
            } else if f[1].split(separator: ",").contains("cpu"), let v1Mount {
                let mine = "ferry-throttle-\(pid)"
                var originalPath = path
                if (path as NSString).lastPathComponent == mine { originalPath = (path as NSString).deletingLastPathComponent }
                let original = v1Mount + (originalPath == "/" ? "" : originalPath)
                found = .v1(child: original + "/" + mine, original: original)
            }
        }
        guard let found else {
            Self.unmount(mounted)
            throw SetupError("process \(pid) has no cgroup with the cpu controller (cgroup v2: cpu.max in its cgroup, enabled by its parent's cgroup.subtree_control; v1: a cpu hierarchy); use --memory-throttle wp")
        }
        layout = found
        if case .v1(let child, _) = found {
            do {
                if mkdir(child, 0o755) != 0 && errno != EEXIST {
                    throw SetupError("cannot create cgroup \(child): errno \(errno) (the cpu throttle needs root)")
                }
                try Self.write("\(periodMicroseconds)", to: child + "/cpu.cfs_period_us")
                try Self.write("-1", to: child + "/cpu.cfs_quota_us")
                try Self.write("\(pid)", to: child + "/cgroup.procs")
            } catch {
                rmdir(child)
                Self.unmount(mounted)
                throw error
            }
        }
        privateMount = mounted
    }

    /// Mounts a cgroup file system at a new directory under /tmp; returns the directory.
    private static func mountPrivately(type: String, options: String?) throws -> String {
        var template = Array("/tmp/ferry-cgroup.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw SetupError("cannot create a directory to mount \(type) on: errno \(errno)") }
        let directory = String(cString: made)
        let rc = options.map { o in o.withCString { mount(type, directory, type, 0, $0) } } ?? mount(type, directory, type, 0, nil)
        guard rc == 0 else {
            let code = errno
            rmdir(directory)
            throw SetupError("the \(type) file system is not mounted here and mounting it failed: errno \(code) (the cpu throttle needs root)")
        }
        return directory
    }

    deinit { release() }

    /// Limits the process to `cpus` CPUs' time (at least 1 % of one).
    func limit(cpus: Double) throws {
        let quota = max(1000, Int(cpus * Double(periodMicroseconds)))
        switch layout {
        case .v2(let directory, _): try Self.write("\(quota) \(periodMicroseconds)", to: directory + "/cpu.max")
        case .v1(let child, _): try Self.write("\(quota)", to: child + "/cpu.cfs_quota_us")
        }
        self.cpus = Double(quota) / Double(periodMicroseconds)
    }

    /// Time the process's threads were held by the limit, in seconds (cpu.stat's throttled time).
    var throttledSeconds: Double {
        let file: String
        switch layout {
        case .v2(let directory, _): file = directory + "/cpu.stat"
        case .v1(let child, _): file = child + "/cpu.stat"
        }
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count == 2, let value = Double(f[1]) else { continue }
            if f[0] == "throttled_usec" { return value / 1e6 }
            if f[0] == "throttled_time" { return value / 1e9 }
        }
        return 0
    }

    /// Lifts the limit: v2 writes the old `cpu.max` back; v1 moves the process back and removes the child.
    func release() {
        guard !released else { return }
        released = true
        switch layout {
        case .v2(let directory, let saved):
            try? Self.write(saved, to: directory + "/cpu.max")
        case .v1(let child, let original):
            try? Self.write("-1", to: child + "/cpu.cfs_quota_us")
            try? Self.write("\(pid)", to: original + "/cgroup.procs")
            rmdir(child)
        }
        Self.unmount(privateMount)
        privateMount = nil
    }

    /// Unmounts and removes a file system this throttle mounted (nil: nothing).
    private static func unmount(_ directory: String?) {
        guard let directory else { return }
        umount2(directory, Int32(MNT_DETACH))
        rmdir(directory)
    }

    private static func write(_ text: String, to path: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SetupError("cannot open \(path): errno \(errno)") }
        defer { close(fd) }
        let n = text.withCString { Glibc.write(fd, $0, strlen($0)) }
        guard n >= 0 else { throw SetupError("cannot write \"\(text)\" to \(path): errno \(errno)") }
    }
}
