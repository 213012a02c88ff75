import ArgumentParser
import CLibCrypto
import Crypto
import Foundation
import MigrationEngine
import Wire

/// Seals frames of one size again and again, the way the link does (one key schedule per connection,
/// no allocation, records of a large frame on two threads), with each AEAD Ferry could use
/// (``FrameCipher``: BoringSSL as vendored by swift-crypto), and beside them, on one core, OpenSSL's EVP AES-256-GCM (Debian's libcrypto, what the link
/// used before) and swift-crypto's allocating `AES.GCM.seal`: the measurement behind the default
/// cipher suite and its library.
struct SealThroughput: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seal",
        abstract: "AEAD throughput: the link's AES-256-GCM and ChaCha20-Poly1305 (BoringSSL) beside OpenSSL EVP and swift-crypto's AES.GCM.seal.",
        discussion: "Example: ferry-bench seal --frame-kib 1024 --seconds 1"
    )

    @Option(name: .customLong("frame-kib"), help: "Payload bytes per frame, in KiB.")
    var frameKiB: Int = 1024

    @Option(help: "Seconds per measurement.")
    var seconds: Double = 1

    func run() throws {
        let size = frameKiB << 10
        let payload = UnsafeMutableRawBufferPointer.allocate(byteCount: size + 64, alignment: 64)
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: size + SealedRecords.overhead(bodyBytes: size) + 64, alignment: 64)
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

        print("sealing \(frameKiB) KiB frames: the link's AEAD in \(SealedRecords.recordBytes >> 10) KiB records, two threads per frame when it has two records or more; the others on one core")
        var results: [(String, Double)] = []
        let sealedBytes = size + SealedRecords.overhead(bodyBytes: size)
        for suite in [CipherSuite.aes256gcm, .chacha20poly1305] {
            for parallel in [true, false] {
                let cipher = try FrameCipher(suite: suite, key: key, parallel: parallel)
                let rate = measure("\(suite) seal (link: BoringSSL\(parallel ? "" : ", one thread"))") {
                    _ = cipher.seal(header: UnsafeRawPointer(header.baseAddress!), metadata: UnsafeMutableRawBufferPointer(rebasing: header[12..<12]),
                                    payload: UnsafeRawBufferPointer(rebasing: payload[..<size]), payloadOutput: output.baseAddress!)
                }
                results.append(("\(suite)\(parallel ? "" : " one thread")", rate))
            }
        }
        // Opening: seal `count` frames in a row, then open them in order with one opener per pass.
        let count = 16
        let sealer = try FrameCipher(suite: .aes256gcm, key: key)
        let sealedFrames = UnsafeMutableRawBufferPointer.allocate(byteCount: sealedBytes * count, alignment: 64)
        defer { sealedFrames.deallocate() }
        for frame in 0..<count {
            _ = sealer.seal(header: UnsafeRawPointer(header.baseAddress!), metadata: UnsafeMutableRawBufferPointer(rebasing: header[12..<12]),
                            payload: UnsafeRawBufferPointer(rebasing: payload[..<size]), payloadOutput: sealedFrames.baseAddress! + frame * sealedBytes)
        }
        var opener = try FrameCipher(suite: .aes256gcm, key: key)
        var next = 0
        let records = SealedRecords.count(bodyBytes: size)
        let openRate = try measure("aes-256-gcm open (link: BoringSSL)") {
            if next == count { opener = try FrameCipher(suite: .aes256gcm, key: key); next = 0 }
            precondition(opener.open(header: UnsafeRawPointer(header.baseAddress!),
                                     sealed: UnsafeRawBufferPointer(rebasing: sealedFrames[(next * sealedBytes)..<((next + 1) * sealedBytes)]),
                                     records: records, into: output.baseAddress!))
            next += 1
        }
        results.append(("aes-256-gcm open", openRate))
        // OpenSSL 3 (Debian's libcrypto), the link's library until BoringSSL's VAES code measured faster.
        let context = EVP_CIPHER_CTX_new()!
        defer { EVP_CIPHER_CTX_free(context) }
        var iv = [UInt8](repeating: 0, count: 12)
        _ = key.withUnsafeBufferPointer { EVP_EncryptInit_ex(context, EVP_aes_256_gcm(), nil, $0.baseAddress, nil) }
        let openSSLRate = measure("aes-256-gcm seal (OpenSSL 3 EVP, no allocation)") {
            iv[4] &+= 1
            var written: Int32 = 0
            _ = EVP_EncryptInit_ex(context, nil, nil, nil, iv)
            _ = EVP_EncryptUpdate(context, nil, &written, header.baseAddress!.assumingMemoryBound(to: UInt8.self), 12)
            _ = EVP_EncryptUpdate(context, output.baseAddress!.assumingMemoryBound(to: UInt8.self), &written,
                                  payload.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(size))
            _ = EVP_EncryptFinal_ex(context, output.baseAddress!.assumingMemoryBound(to: UInt8.self) + size, &written)
            _ = EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_AEAD_GET_TAG, 16, output.baseAddress! + size)
        }
        results.append(("OpenSSL aes-256-gcm", openSSLRate))
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
