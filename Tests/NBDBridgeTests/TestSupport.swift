import Foundation
import XCTest
@testable import NBDBridge

/// A fresh temp directory with a sparse image and a running in-process server on a Unix socket.
final class ServerFixture {
    let directory: URL
    let imagePath: String
    let socketPath: String
    let server: NBDServer
    let store: FileBlockStore
    var uri: String { "nbd+unix:///?socket=\(socketPath)" }

    init(size: UInt64 = 64 << 20, options: NBDServer.Options = .init(), readOnly: Bool = false,
         inMemory: Bool = false, fill: ((String) throws -> Void)? = nil) throws {
        let base = inMemory ? URL(fileURLWithPath: "/dev/shm") : FileManager.default.temporaryDirectory
        directory = base.appendingPathComponent("ferry-nbd-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        imagePath = directory.appendingPathComponent("disk.img").path
        socketPath = directory.appendingPathComponent("nbd.sock").path
        FileManager.default.createFile(atPath: imagePath, contents: nil)
        XCTAssertEqual(truncate(imagePath, off_t(size)), 0)
        try fill?(imagePath)
        store = try FileBlockStore(path: imagePath, readOnly: readOnly)
        server = try NBDServer(store: store, options: options)
        try server.listen(NBDEndpoint.parse("unix:" + socketPath))
        server.start()
    }

    func stop() {
        server.shutdown(drain: true)
        try? FileManager.default.removeItem(at: directory)
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
}

struct ToolResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

enum Tools {
    static var requireAll: Bool { ProcessInfo.processInfo.environment["FERRY_REQUIRE_ALL"] == "1" }

    /// Skips (with a printed reason) when `tool` is missing; fails instead under FERRY_REQUIRE_ALL=1.
    static func require(_ tools: String...) throws {
        for tool in tools where !FileManager.default.isExecutableFile(atPath: tool) {
            let reason = "\(tool) is not installed"
            if requireAll {
                XCTFail("FERRY_REQUIRE_ALL=1 and \(reason)")
                throw XCTSkip(reason)
            }
            print("SKIP: \(reason)")
            throw XCTSkip(reason)
        }
    }

    /// Runs `path` with `arguments`, killing it after `timeout` seconds.
    @discardableResult
    static func run(_ path: String, _ arguments: [String], stdin: String? = nil, timeout: TimeInterval = 30) throws -> ToolResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        let input = Pipe()
        process.standardInput = input
        try process.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try? input.fileHandleForWriting.close()
        let group = DispatchGroup()
        nonisolated(unsafe) var outData = Data(), errData = Data()
        group.enter()
        DispatchQueue.global().async { outData = out.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        group.enter()
        DispatchQueue.global().async { errData = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(5000) }
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
            _ = group.wait(timeout: .now() + 5)
            XCTFail("\(path) \(arguments.joined(separator: " ")) timed out after \(timeout) s")
            return ToolResult(status: -1, stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData, as: UTF8.self))
        }
        process.waitUntilExit()
        _ = group.wait(timeout: .now() + 5)
        return ToolResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                          stderr: String(decoding: errData, as: UTF8.self))
    }

    /// Runs a Python script with libnbd's module (`/usr/bin/python3`), URI in argv[1]; asserts it exits 0.
    static func python(_ script: String, uri: String, file: StaticString = #filePath, line: UInt = #line) throws -> ToolResult {
        try require("/usr/bin/python3")
        let result = try run("/usr/bin/python3", ["-c", script, uri], timeout: 60)
        XCTAssertEqual(result.status, 0, "python failed:\n\(result.stdout)\n\(result.stderr)", file: file, line: line)
        return result
    }

    static func sha256(_ path: String) throws -> String {
        let r = try run("/usr/bin/sha256sum", [path])
        return String(r.stdout.prefix(64))
    }

    /// Writes `count` bytes of a deterministic pattern (seeded) at `offset` of the file at `path`.
    static func fillPattern(_ path: String, offset: UInt64, count: Int, seed: UInt64) throws {
        var bytes = [UInt8](repeating: 0, count: count)
        var x = seed | 1
        for i in 0..<count { x ^= x << 13; x ^= x >> 7; x ^= x << 17; bytes[i] = UInt8(truncatingIfNeeded: x) }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.seek(toOffset: offset)
        try handle.write(contentsOf: bytes)
        try handle.close()
    }
}
