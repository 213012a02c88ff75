import Foundation
import Glibc
import Testing
import XCTest

/// The environment a test asked for and did not get: thrown instead of a skip when
/// `FERRY_REQUIRE_ALL=1` (CI), so the test fails with this reason.
public struct RequirementUnmet: Error, CustomStringConvertible {
    /// What was missing.
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { "required by FERRY_REQUIRE_ALL=1 but unavailable: \(reason)" }
}

/// Whether every test must run (`FERRY_REQUIRE_ALL=1`, set by CI): then a missing tool, permission
/// or kernel feature fails the test instead of skipping it.
public var requireAll: Bool { ProcessInfo.processInfo.environment["FERRY_REQUIRE_ALL"] == "1" }

/// Ends the running test because its environment lacks something. One behaviour everywhere:
/// prints the reason, then skips the test (XCTest: `XCTSkip`; Swift Testing: `Test.cancel`), or,
/// under `FERRY_REQUIRE_ALL=1`, throws ``RequirementUnmet`` so the test fails.
public func skipTest(_ reason: String, fileID: String = #fileID, filePath: String = #filePath,
                     line: Int = #line, column: Int = #column) throws -> Never {
    if requireAll {
        print("FAIL: \(reason) (\(fileID):\(line); FERRY_REQUIRE_ALL=1 forbids skipping)")
        throw RequirementUnmet(reason)
    }
    print("SKIP: \(reason) (\(fileID):\(line))")
    if Test.current != nil {
        try Test.cancel(Comment(rawValue: reason),
                        sourceLocation: SourceLocation(fileID: fileID, filePath: filePath, line: line, column: column))
    }
    throw XCTSkip(reason)
}

/// Skips (see ``skipTest(_:fileID:filePath:line:column:)``) unless `condition` holds.
public func require(_ condition: Bool, _ reason: @autoclosure () -> String, fileID: String = #fileID,
                    filePath: String = #filePath, line: Int = #line, column: Int = #column) throws {
    if !condition { try skipTest(reason(), fileID: fileID, filePath: filePath, line: line, column: column) }
}

/// Skips unless the executable `tool` exists (an absolute path, or a name looked up in /usr/bin
/// and /bin). `package` names the Debian package that provides it (scripts/setup.sh installs it).
@discardableResult
public func require(tool: String, package: String? = nil, fileID: String = #fileID, filePath: String = #filePath,
                    line: Int = #line, column: Int = #column) throws -> String {
    let candidates = tool.hasPrefix("/") ? [tool] : ["/usr/bin/" + tool, "/bin/" + tool, "/usr/sbin/" + tool]
    if let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) { return found }
    let from = package.map { " (Debian package \($0); scripts/setup.sh installs it)" } ?? " (scripts/setup.sh installs it)"
    try skipTest("\(tool) is not installed\(from)", fileID: fileID, filePath: filePath, line: line, column: column)
}

/// Skips unless the process runs as root (effective uid 0); `why` says what needs it.
public func require(root why: String, fileID: String = #fileID, filePath: String = #filePath,
                    line: Int = #line, column: Int = #column) throws {
    try require(geteuid() == 0, "\(why) needs root (effective uid is \(geteuid()))",
                fileID: fileID, filePath: filePath, line: line, column: column)
}

/// Skips unless the kernel offers `kernelFeature`; `available` is the probe's answer and `detail`
/// what the probe saw (an errno, the flags granted).
public func require(kernelFeature: String, available: Bool, detail: String = "", fileID: String = #fileID,
                    filePath: String = #filePath, line: Int = #line, column: Int = #column) throws {
    var uts = utsname()
    uname(&uts)
    let release = withUnsafeBytes(of: &uts.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    try require(available, "kernel \(release) lacks \(kernelFeature)" + (detail.isEmpty ? "" : ": \(detail)"),
                fileID: fileID, filePath: filePath, line: line, column: column)
}

/// Skips unless `device` (e.g. /dev/kvm) can be opened for reading and writing.
public func require(device: String, fileID: String = #fileID, filePath: String = #filePath,
                    line: Int = #line, column: Int = #column) throws {
    let ok = access(device, R_OK | W_OK) == 0
    let error = errno
    try require(ok, "\(device) is not accessible (errno \(error): \(String(cString: strerror(error))))",
                fileID: fileID, filePath: filePath, line: line, column: column)
}

/// Skips unless the directory or file at `path` exists (e.g. /dev/shm for tmpfs-backed tests).
public func require(path: String, fileID: String = #fileID, filePath: String = #filePath,
                    line: Int = #line, column: Int = #column) throws {
    try require(FileManager.default.fileExists(atPath: path), "\(path) does not exist",
                fileID: fileID, filePath: filePath, line: line, column: column)
}
