import Foundation
import Glibc
import Synchronization
import XCTest

/// Support for the end-to-end tests that run the agents.
enum E2E {
    /// A running agent executable (source-agent or dest-agent) from the build products directory, with
    /// its standard error captured to a file the test can search.
    final class Agent {
        let process = Process()
        let logPath: String

        /// The products directory: where the test runner and the executables were built.
        static var productsDirectory: URL {
            URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        }

        /// Starts `name` with `arguments`; its standard error goes to `logPath`.
        /// `name` is an executable of the products directory, or (with `absolute`) a path.
        init(_ name: String, _ arguments: [String], logPath: String, absolute: Bool = false) throws {
            let path = absolute ? name : Self.productsDirectory.appendingPathComponent(name).path
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw NSError(domain: "AgentTests", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(name) is not built at \(path): run swift build first"])
            }
            self.logPath = logPath
            FileManager.default.createFile(atPath: logPath, contents: nil)
            process.executableURL = URL(fileURLWithPath: path)
            process.arguments = arguments
            process.standardError = FileHandle(forWritingAtPath: logPath)
            process.standardOutput = FileHandle.nullDevice
            try process.run()
        }

        /// The log so far.
        var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

        /// Waits until the log contains `text`, up to `timeout` seconds.
        func waitForLog(_ text: String, timeout: Double) -> Bool {
            let deadline = Date(timeIntervalSinceNow: timeout)
            while Date() < deadline {
                if log.contains(text) { return true }
                if !process.isRunning { return log.contains(text) }
                usleep(20_000)
            }
            return false
        }

        /// Waits for the process to exit, up to `timeout` seconds; returns its status or nil.
        @discardableResult
        func waitForExit(timeout: Double) -> Int32? {
            let deadline = Date(timeIntervalSinceNow: timeout)
            while process.isRunning && Date() < deadline { usleep(20_000) }
            return process.isRunning ? nil : process.terminationStatus
        }

        func signal(_ signal: Int32) { if process.isRunning { kill(process.processIdentifier, signal) } }

        deinit {
            if process.isRunning {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
            }
        }
    }

    /// A temporary directory for one test, removed afterwards.
    final class Scratch {
        let path: String
        init() {
            path = NSTemporaryDirectory() + "ferry-agent-" + UUID().uuidString.prefix(8)
            try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        func file(_ name: String) -> String { path + "/" + name }
        deinit { try? FileManager.default.removeItem(atPath: path) }
    }

    /// Runs a command to completion and returns its status and output.
    @discardableResult
    static func run(_ executable: String, _ arguments: [String], timeout: Double = 60) -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        // Debian's python3 (the one with the nbd module) before any other on PATH.
        var environment = ProcessInfo.processInfo.environment
        environment["PATH"] = "/usr/bin:/bin:" + (environment["PATH"] ?? "")
        process.environment = environment
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        do { try process.run() } catch { return (-1, "cannot run \(executable): \(error)") }
        let deadline = Date(timeIntervalSinceNow: timeout)
        let collected = Mutex<Data?>(nil)
        let reader = Thread {
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            collected.withLock { $0 = data }
        }
        reader.start()
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        for _ in 0..<200 where collected.withLock({ $0 == nil }) { usleep(10_000) }
        return (process.terminationStatus, String(decoding: collected.withLock { $0 } ?? Data(), as: UTF8.self))
    }

    /// The SHA-256 of a file, by sha256sum.
    static func sha256(_ path: String) -> String {
        String(run("/usr/bin/sha256sum", [path]).output.prefix(64))
    }

    /// A free TCP port on 127.0.0.1 (bound and released).
    static func freePort() -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return UInt16(bigEndian: address.sin_port)
    }

    /// Skips with a printed reason, or fails under FERRY_REQUIRE_ALL=1 (CI).
    static func requireTool(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws {
        guard !FileManager.default.isExecutableFile(atPath: path) else { return }
        let reason = "\(path) is not installed (scripts/setup.sh installs it)"
        if ProcessInfo.processInfo.environment["FERRY_REQUIRE_ALL"] == "1" {
            XCTFail("required by FERRY_REQUIRE_ALL=1: \(reason)", file: file, line: line)
        }
        print("skipping: \(reason)")
        throw XCTSkip(reason)
    }

}
