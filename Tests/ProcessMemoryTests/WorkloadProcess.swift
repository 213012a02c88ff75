import FerryTestSupport
import Foundation
import Glibc
import ProcessMemory
import XCTest

/// A running `ferry-workload` child (FerryTestSupport's ``ChildProcess``: posix_spawn, so no
/// Foundation.Process SIGCHLD handling races the tracker's ptrace waitpid), speaking JSON lines.
final class WorkloadProcess {
    let child: ChildProcess
    var pid: pid_t { child.pid }
    /// The first region line: start address and size.
    private(set) var regionStart: UInt64 = 0
    private(set) var regionSize: UInt64 = 0

    /// The ferry-workload binary next to the test bundle (the build products directory).
    static var binary: String {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var dir = exe.deletingLastPathComponent()
        // The bundle may be a directory (…/X.xctest/…) on some layouts: walk up to the products directory.
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("ferry-workload").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return exe.deletingLastPathComponent().appendingPathComponent("ferry-workload").path
    }

    /// Starts the workload and waits for its "region" and "ready" lines (unless `waitReady` is false).
    init(_ arguments: [String], waitReady: Bool = true) throws {
        let path = Self.binary
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw ProcessMemoryError("ferry-workload not built at \(path): build the product 'ferry-workload' first")
        }
        child = try ChildProcess(path, arguments, stdout: .pipe, stderr: .inherit)
        if waitReady {
            let region = try waitFor("region", timeout: 60)
            regionStart = try XCTUnwrap((region["start"] as? NSNumber)?.uint64Value, "region line without start: \(region)")
            regionSize = try XCTUnwrap((region["size"] as? NSNumber)?.uint64Value, "region line without size: \(region)")
            _ = try waitFor("ready", timeout: 60)
        }
    }

    deinit { stop() }

    var region: AddressRange { AddressRange(start: regionStart, length: regionSize) }

    func send(_ command: String) { child.send(command) }

    /// The next JSON line, or nil after `timeout` seconds (0: only what is already there).
    func nextLine(timeout: Double) throws -> [String: Any]? { try child.nextJSON(timeout: timeout) }

    /// Waits for a line with this "event", failing on an "error" or "corrupt" event.
    func waitFor(_ event: String, timeout: Double) throws -> [String: Any] {
        try child.waitFor(event: event, timeout: timeout)
    }

    /// Sends a command and waits for the reply event.
    @discardableResult
    func command(_ text: String, expect event: String, timeout: Double = 60) throws -> [String: Any] {
        send(text)
        return try waitFor(event, timeout: timeout)
    }

    /// Rewrites exactly these pages (page indexes within the workload's memory).
    func write(pages: [Int], file: StaticString = #filePath, line: UInt = #line) throws {
        for chunk in stride(from: 0, to: pages.count, by: 512) {
            let part = pages[chunk..<min(pages.count, chunk + 512)]
            let reply = try command("write " + part.map(String.init).joined(separator: " "), expect: "written")
            XCTAssertEqual((reply["count"] as? NSNumber)?.intValue, part.count, "\(reply)", file: file, line: line)
            XCTAssertEqual((reply["corrupt"] as? NSNumber)?.intValue, 0, "\(reply)", file: file, line: line)
        }
    }

    /// Asks the workload to quit; kills it if it does not within 10 s. Returns its exit status.
    @discardableResult
    func stop() -> Int32 { child.stop(quitCommand: "quit", grace: 10) }
}
