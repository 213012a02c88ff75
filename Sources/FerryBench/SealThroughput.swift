import ArgumentParser
import Crypto
import Foundation
import MigrationEngine
import Wire

/// Seals frames of one size again and again on one core, the way the link does (in place, one key
/// schedule per connection), with each AEAD Ferry could use, and swift-crypto's allocating
/// `AES.GCM.seal` beside them: the measurement behind the default cipher suite.
struct SealThroughput: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seal",
        abstract: "AEAD sealing throughput per core: AES-256-GCM and ChaCha20-Poly1305 (OpenSSL EVP, in place) and swift-crypto's AES.GCM.seal.",
        discussion: "Example: ferry-bench seal --frame-kib 1024 --seconds 1"
    )

    @Option(name: .customLong("frame-kib"), help: "Payload bytes per frame, in KiB.")
    var frameKiB: Int = 1024

    @Option(help: "Seconds per measurement.")
    var seconds: Double = 1

    func run() throws {
        let size = frameKiB << 10
        let payload = UnsafeMutableRawBufferPointer.allocate(byteCount: size + 64, alignment: 64)
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: size + 64, alignment: 64)
        defer { payload.deallocate(); output.deallocate() }
        for i in 0..<payload.count { payload[i] = UInt8(truncatingIfNeeded: i &* 31) }
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 64)
        defer { header.deallocate() }
        header.initializeMemory(as: UInt8.self, repeating: 7)
        let key = [UInt8](repeating: 0x42, count: 32)

        func measure(_ name: String, _ body: () throws -> Void) rethrows -> Double {
            let start = ContinuousClock.now
            var bytes = 0
            while ContinuousClock.now - start < .milliseconds(Int(seconds * 1000)) {
                for _ in 0..<8 { try body(); bytes += size }
            }
            let elapsed = ContinuousClock.now - start
            let rate = Double(bytes) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18) / 1e9
            print(String(format: "%-46@ %7.2f GB/s", name as NSString, rate))
            return rate
        }

        print("sealing \(frameKiB) KiB frames on one core")
        var results: [(String, Double)] = []
        for suite in [CipherSuite.aes256gcm, .chacha20poly1305] {
            let cipher = try FrameCipher(suite: suite, key: key, sealing: true)
            let rate = measure("\(suite) (OpenSSL EVP, in place, no allocation)") {
                _ = cipher.seal(header: UnsafeRawPointer(header.baseAddress!), metadata: UnsafeMutableRawBufferPointer(rebasing: header[12..<28]),
                                payload: UnsafeRawBufferPointer(rebasing: payload[..<size]), payloadOutput: output.baseAddress!,
                                tag: output.baseAddress! + size)
            }
            results.append(("\(suite)", rate))
        }
        let swiftKey = SymmetricKey(data: key)
        let source = Data(UnsafeRawBufferPointer(rebasing: payload[..<size]))
        let rate = try measure("aes-256-gcm (swift-crypto AES.GCM.seal, allocates)") {
            let box = try AES.GCM.seal(source, using: swiftKey, authenticating: Data(UnsafeRawBufferPointer(rebasing: header[..<12])))
            precondition(box.ciphertext.count == size)
        }
        results.append(("swift-crypto aes-256-gcm", rate))
        let best = results.max { $0.1 < $1.1 }!
        print("fastest: \(best.0); ratios to it: " + results.map { "\($0.0) \(String(format: "%.2f", $0.1 / best.1))" }.joined(separator: ", "))
    }
}
