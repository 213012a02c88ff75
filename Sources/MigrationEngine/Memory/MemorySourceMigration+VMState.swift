import CFerryShims
import Foundation
import Glibc
import Logging
import ProcessMemory
import Wire

/// The opaque VM-state blob: made by `--state-cmd` at pause, sent as `vmState` chunks.
extension MemorySourceMigration {
    // MARK: - VM state

    /// Runs `--state-cmd` (if any) and returns the blob. The command gets FERRY_STATE_FILE (a path it
    /// may write) and FERRY_PID; if the last line it prints names an existing file, that file is the
    /// blob instead.
    func vmState() throws -> [UInt8] {
        guard let command = options.stateCommand else { return [] }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-state-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).bin").path
        defer { unlink(path) }
        let output = try ShellCommand.run(command, environment: ["FERRY_STATE_FILE": path, "FERRY_PID": "\(options.pid)"])
        var file = path
        if let last = output.split(separator: "\n").last.map({ $0.trimmingCharacters(in: .whitespaces) }),
           !last.isEmpty, FileManager.default.fileExists(atPath: last) {
            file = last
        }
        guard let data = FileManager.default.contents(atPath: file) else {
            throw SetupError("--state-cmd produced no state file (wrote nothing to FERRY_STATE_FILE and printed no existing path)")
        }
        return [UInt8](data)
    }

    func sendState(_ state: [UInt8], link: PeerLink) throws {
        guard !state.isEmpty else { return }
        let chunk = 1 << 20
        try state.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = min(chunk, raw.count - offset)
                try link.sender.send(.vmState(VMStateChunk(totalLength: UInt64(raw.count), offset: UInt64(offset),
                                                           payload: Payload(UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + n)])))))
                offset += n
            }
        }
    }
}
