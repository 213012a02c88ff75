import FerryTestSupport
import Foundation
import XCTest

/// libnbd's Python binding (`/usr/bin/python3`, module `nbd`, Debian package python3-libnbd): the
/// reference client the protocol tests script. The URI is the script's argv[1].
enum PythonNBD {
    static let python = "/usr/bin/python3"

    /// Skips (or fails under FERRY_REQUIRE_ALL=1) unless python3 can import `nbd`.
    static func require() throws {
        try FerryTestSupport.require(tool: python, package: "python3")
        try FerryTestSupport.require(importProbe.ok, "python3 cannot import nbd (Debian package python3-libnbd): \(importProbe.detail)")
    }

    /// Whether `import nbd` works, asked once.
    private static let importProbe: (ok: Bool, detail: String) = {
        guard let probe = try? runTool(python, ["-c", "import nbd"], timeout: 60) else { return (false, "cannot run \(python)") }
        return (probe.status == 0, probe.stderr)
    }()

    /// Runs `script` to completion and asserts that it exits 0.
    @discardableResult
    static func run(_ script: String, uri: String, timeout: Double = 120,
                    file: StaticString = #filePath, line: UInt = #line) throws -> ToolResult {
        try require()
        let result = try runTool(python, ["-u", "-c", script, uri], timeout: timeout)
        XCTAssertEqual(result.status, 0, "python script failed: \(result)", file: file, line: line)
        return result
    }

    /// Starts `script` and returns it running, its standard input and output on pipes (unbuffered:
    /// each `print` arrives at once), for scripts that talk with the test step by step.
    static func start(_ script: String, uri: String) throws -> ChildProcess {
        try require()
        return try ChildProcess(python, ["-u", "-c", script, uri], stdout: .pipe, stderr: .pipe)
    }
}
