import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// What the end-to-end tests of the agents share beyond FerryTestSupport (children, temporary
/// directories, free ports, key files, skips and digests come from there): the agent executables of
/// the build, an agent whose standard error is a log file the test searches, the environment tools
/// run in, and JSON report fields that must be present.
enum E2E {
    /// A running agent executable (source-agent or dest-agent) from the build products directory, with
    /// its standard error (and output) appended to a file the test can search.
    final class Agent {
        let child: ChildProcess
        let logPath: String

        /// The products directory: where the test runner and the executables were built.
        static var productsDirectory: URL {
            URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        }

        /// Starts `name` with `arguments`; its standard output and error go to `logPath`.
        /// `name` is an executable of the products directory, or (with `absolute`) a path.
        init(_ name: String, _ arguments: [String], logPath: String, absolute: Bool = false,
             environment: [String: String]? = nil) throws {
            let path = absolute ? name : E2E.tool(name)
            self.logPath = logPath
            child = try ChildProcess(path, arguments, environment: environment, stdout: .file(logPath), stderr: .file(logPath))
        }

        var pid: pid_t { child.pid }

        /// The log so far.
        var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

        /// Whether it has not exited yet.
        var isRunning: Bool { child.isRunning }

        /// Waits until the log contains `text`, up to `timeout` seconds (less if the agent exits first).
        func waitForLog(_ text: String, timeout: Double) -> Bool {
            waitUntil(timeout: timeout, interval: 0.02) { log.contains(text) || !child.isRunning } && log.contains(text)
        }

        /// Waits for the process to exit, up to `timeout` seconds; returns its status or nil.
        @discardableResult
        func waitForExit(timeout: Double) -> Int32? { child.wait(timeout: timeout) }

        func signal(_ signal: Int32) { child.kill(signal) }
    }

    /// The path of a product of this build (source-agent, dest-agent, ferry-workload).
    static func tool(_ name: String) -> String { Agent.productsDirectory.appendingPathComponent(name).path }

    /// The environment external tools run in: Debian's python3 (the one with the nbd module, which
    /// nbdsh uses) ahead of any other on PATH.
    static var toolEnvironment: [String: String] {
        var environment = ProcessInfo.processInfo.environment
        environment["PATH"] = "/usr/bin:/bin:" + (environment["PATH"] ?? "")
        return environment
    }

    /// Runs an external tool to completion in ``toolEnvironment`` (FerryTestSupport's `runTool`:
    /// its exit status, its output, and whether it was killed at its deadline).
    static func run(_ path: String, _ arguments: [String], timeout: Double = 60) throws -> ToolResult {
        try runTool(path, arguments, environment: toolEnvironment, timeout: timeout)
    }

    /// A JSON object from a file (an agent's `--report`).
    static func readJSON(_ path: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw SupportError("\(path) is not a JSON object: \(String(decoding: data.prefix(500), as: UTF8.self))")
        }
        return object
    }

    /// An agent's report from `path`, or a failure that says what the agent logged instead.
    static func report(_ path: String, log: @autoclosure () -> String) throws -> [String: Any] {
        do { return try readJSON(path) } catch {
            throw SupportError("no report at \(path) (\(error)); the agent's log ends:\n\(String(log().suffix(4000)))")
        }
    }
}

/// Fields of an agent's JSON report that a test asserts on: a missing field (or one of another type)
/// fails the test with the field's name and the whole object, instead of defaulting to a value that
/// may pass the comparison.
extension Dictionary where Key == String, Value == Any {
    func number(_ key: String, file: StaticString = #filePath, line: UInt = #line) throws -> Double {
        try XCTUnwrap((self[key] as? NSNumber)?.doubleValue, "field \(key) is missing or not a number in \(self)", file: file, line: line)
    }

    func integer(_ key: String, file: StaticString = #filePath, line: UInt = #line) throws -> Int {
        try XCTUnwrap((self[key] as? NSNumber)?.intValue, "field \(key) is missing or not a number in \(self)", file: file, line: line)
    }

    func string(_ key: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        try XCTUnwrap(self[key] as? String, "field \(key) is missing or not a string in \(self)", file: file, line: line)
    }

    func object(_ key: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        try XCTUnwrap(self[key] as? [String: Any], "field \(key) is missing or not an object in \(self)", file: file, line: line)
    }

    func integers(_ key: String, file: StaticString = #filePath, line: UInt = #line) throws -> [Int] {
        let array = try XCTUnwrap(self[key] as? [Any], "field \(key) is missing or not an array in \(self)", file: file, line: line)
        return try array.map { try XCTUnwrap(($0 as? NSNumber)?.intValue, "\(key) holds a non-number: \(array)", file: file, line: line) }
    }
}
