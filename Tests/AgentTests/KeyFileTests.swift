import FerryTestSupport
import Foundation
import Glibc
import MigrationEngine
import XCTest

/// Key files: at least 32 bytes of key, readable by the owner only; passphrases refused; the agents
/// refuse to start with a bad one and say how to make a good one.
final class KeyFileTests: XCTestCase {
    private func write(_ bytes: [UInt8], mode: mode_t = 0o600, in dir: TemporaryDirectory, name: String = "key") -> String {
        let path = dir.file(name)
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        chmod(path, mode)
        return path
    }

    private func refusal(_ path: String) -> String? {
        do { _ = try SharedKey(contentsOf: path); return nil } catch { return error.description }
    }

    func testGoodKeysAreRead() throws {
        let dir = TemporaryDirectory(prefix: "ferry-key")
        var raw = randomBytes(count: 32, seed: 1)
        raw[31] = 0x0A   // a random key may end in a newline byte: it stays part of the key
        raw[0] = 0x00
        XCTAssertEqual(try SharedKey(contentsOf: write(raw, in: dir)).bytes, raw)
        let hex = raw.map { String(format: "%02x", $0) }.joined()
        XCTAssertEqual(try SharedKey(contentsOf: write(Array((hex + "\n").utf8), in: dir, name: "hex")).bytes, raw)
        let base64 = Data(raw).base64EncodedString()
        XCTAssertEqual(try SharedKey(contentsOf: write(Array(base64.utf8), in: dir, name: "b64")).bytes, raw)
        XCTAssertEqual(try SharedKey(contentsOf: write(raw, mode: 0o400, in: dir, name: "ro")).bytes, raw)
    }

    func testWeakOrExposedKeysAreRefusedWithHowToMakeOne() throws {
        let dir = TemporaryDirectory(prefix: "ferry-key")
        let raw = randomBytes(count: 32, seed: 2)
        for mode: mode_t in [0o644, 0o640, 0o604, 0o602] {
            let message = refusal(write(raw, mode: mode, in: dir, name: "m\(mode)"))
            XCTAssertNotNil(message, "mode \(String(mode, radix: 8)) accepted")
            XCTAssertTrue(message?.contains("chmod 600") == true, message ?? "")
        }
        let short = refusal(write(Array(raw.prefix(31)), in: dir, name: "short"))
        XCTAssertTrue(short?.contains("at least 32") == true, short ?? "accepted")
        XCTAssertTrue(short?.contains("head -c 32 /dev/urandom") == true, short ?? "")
        for phrase in ["correct horse battery staple and more words\n", "0123456789abcdef0123456789abcde",   // 31 hex digits: odd
                       String(repeating: "ab", count: 31)] {
            let message = refusal(write(Array(phrase.utf8), in: dir, name: "phrase"))
            XCTAssertNotNil(message, "passphrase \(phrase) accepted")
        }
        XCTAssertTrue(refusal(dir.file("missing"))?.contains("cannot read the key file") == true)
    }

    func testAgentsRefuseAnExposedKeyFile() throws {
        let dir = TemporaryDirectory(prefix: "ferry-key")
        let path = write(randomBytes(count: 32, seed: 3), mode: 0o644, in: dir)
        let port = try freePort()
        let dest = try E2E.run(E2E.tool("dest-agent"), ["--listen", "127.0.0.1:\(port)", "--key-file", path, "--disk", dir.file("d.img"),
                                                        "--nbd", "unix:\(dir.file("d.sock"))"], timeout: 30)
        XCTAssertNotEqual(dest.status, 0)
        XCTAssertFalse(dest.timedOut)
        XCTAssertTrue(dest.stderr.contains("group or others may read it"), "\(dest)")
        let vm = try ChildProcess("/bin/sleep", ["60"])
        defer { vm.kill(SIGKILL); _ = vm.wait(timeout: 5) }
        let source = try E2E.run(E2E.tool("source-agent"), ["--vm", "\(vm.pid)", "--dest", "127.0.0.1:\(port)", "--key-file", path], timeout: 30)
        XCTAssertNotEqual(source.status, 0)
        XCTAssertTrue(source.stderr.contains("group or others may read it"), "\(source)")
    }
}
