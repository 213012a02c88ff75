// libFuzzer entry point for Ferry's wire decoder. Built together with the Wire sources as one
// module (see build.sh), without AuthProof.swift, the only file that needs swift-crypto.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWireDecoder(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    let input = UnsafeRawBufferPointer(start: data, count: size)
    let decoder = FrameDecoder(maxFrameSize: 1 << 20)
    var rest = input
    // Decode frame after frame, as a receiver would.
    while true {
        let frame: DecodedFrame?
        do { frame = try decoder.decode(rest) } catch { _ = error.description; return 0 }
        guard let frame else { return 0 }
        precondition(frame.consumed >= FrameHeader.size && frame.consumed <= rest.count)
        // Whatever decodes must re-encode to exactly the same bytes.
        let size = try! FrameEncoder.frameSize(of: frame.message)
        precondition(size == frame.consumed, "\(frame.header.type): size \(size) != consumed \(frame.consumed)")
        var out: [UInt8] = []
        try! FrameEncoder.encode(frame.message, sequence: frame.header.sequence,
                                 urgent: frame.header.flags.contains(.urgent), appendingTo: &out)
        precondition(out.elementsEqual(UnsafeRawBufferPointer(rebasing: rest[0..<frame.consumed])),
                     "\(frame.header.type) re-encodes differently")
        rest = UnsafeRawBufferPointer(rebasing: rest[frame.consumed...])
    }
}
