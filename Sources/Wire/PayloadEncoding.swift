/// How the data bytes of a `pageBatch` or `diskExtents` travel (docs/wire.md, "Compression"): as they are, or as
/// one zstd frame that expands to exactly the data bytes the frame's runs or extents describe. A compressed
/// payload is never empty and always shorter than what it expands to (a sender that gains nothing sends raw), so
/// a decoder bounds its work by the frame's own description, never by what the zstd frame claims.
public enum PayloadEncoding: UInt8, Sendable, CaseIterable {
    /// The data bytes themselves.
    case raw = 0
    /// One zstd frame of the data bytes.
    case zstd = 1

    /// Checks a payload of `actual` bytes that must carry `dataBytes` bytes of data; `at` is the encoding byte's
    /// offset in the frame (for the error).
    func check(payload actual: Int, dataBytes: UInt64, type: MessageType, at: Int) throws(WireError) {
        switch self {
        case .raw:
            if UInt64(actual) != dataBytes { throw .payloadLengthMismatch(type: type, expected: dataBytes, actual: actual) }
        case .zstd:
            // Compressed data is never empty and always shorter than what it expands to: a sender that gains
            // nothing sends raw, and no data at all has nothing to compress.
            if dataBytes == 0 || UInt64(actual) == dataBytes {
                throw .invalidValue(type: type, field: "encoding", offset: at, value: UInt64(rawValue))
            }
            if actual == 0 || UInt64(actual) > dataBytes {
                throw .payloadLengthMismatch(type: type, expected: dataBytes, actual: actual)
            }
        }
    }
}
