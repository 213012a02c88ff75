/// How a sealed frame's body is cut into records (docs/wire.md, "Sealing"): the body after the
/// 12-byte header (metadata ‖ payload) is sealed in records of ``recordBytes`` (the last one
/// shorter; an empty body is one empty record), each followed by its 16-byte tag, so a frame's
/// length on the wire is its body plus 16 bytes per record. Records let two cores seal or open
/// one large frame at once.
public enum SealedRecords {
    /// Plaintext bytes per record: 256 KiB.
    public static let recordBytes = 256 << 10
    /// Bytes of the tag after each record.
    public static let tagBytes = 16

    /// Records in a body of `bodyBytes`.
    public static func count(bodyBytes: Int) -> Int {
        bodyBytes == 0 ? 1 : (bodyBytes + recordBytes - 1) / recordBytes
    }

    /// The tags' bytes in a sealed body of `bodyBytes` plaintext bytes.
    public static func overhead(bodyBytes: Int) -> Int {
        count(bodyBytes: bodyBytes) * tagBytes
    }

    /// The records in a sealed body of `sealedBytes` on the wire, or nil when no body seals to that
    /// length (too short for its tags).
    public static func count(sealedBytes: Int) -> Int? {
        guard sealedBytes >= tagBytes else { return nil }
        let records = (sealedBytes + recordBytes + tagBytes - 1) / (recordBytes + tagBytes)
        let body = sealedBytes - records * tagBytes
        return body >= 0 && count(bodyBytes: body) == records ? records : nil
    }
}
