import CFerryShims

/// Keeps post-copy's push stream from filling the bottleneck's queue, so that urgent page replies
/// (on their own connection, but through the same link) do not wait behind bulk pages: a
/// delay-based window in the manner of LEDBAT (RFC 6817). The destination acknowledges every push
/// frame; the round trip of each frame, less the smallest seen, is the queueing delay; the window
/// of unacknowledged push bytes grows while that delay is under `targetNanoseconds` and shrinks in
/// proportion when it is over. Not thread-safe: use it under the link's lock.
struct PushPacer {
    /// The memory stream id of the destination's per-frame push acknowledgements (offset = frames applied).
    static let ackStreamID: UInt32 = 1
    /// Queueing delay to aim at.
    var targetNanoseconds: Double
    /// Unacknowledged push bytes allowed now.
    private(set) var window: Double
    let minimumWindow: Double
    let maximumWindow: Double
    private var baseRTT: UInt64 = .max
    /// Per frame (ring by frame number): send time and cumulative bytes sent when it was sent.
    private let sentAt: UnsafeMutablePointer<UInt64>
    private let sentBytes: UnsafeMutablePointer<UInt64>
    private static let slots = 1 << 16
    private(set) var framesSent: UInt64 = 0
    private(set) var bytesSent: UInt64 = 0
    private(set) var framesAcked: UInt64 = 0
    private(set) var bytesAcked: UInt64 = 0

    init(targetNanoseconds: Double, initialWindow: Double = 1_048_576, minimumWindow: Double = 131_072,
         maximumWindow: Double = 67_108_864) {
        self.targetNanoseconds = targetNanoseconds
        window = initialWindow
        self.minimumWindow = minimumWindow
        self.maximumWindow = maximumWindow
        sentAt = .allocate(capacity: Self.slots)
        sentBytes = .allocate(capacity: Self.slots)
    }

    func deallocate() {
        sentAt.deallocate()
        sentBytes.deallocate()
    }

    /// Whether another frame may go now.
    var maySend: Bool { Double(bytesSent - bytesAcked) < window && framesSent - framesAcked < UInt64(Self.slots / 2) }

    /// Records a frame of `bytes` sent now.
    mutating func sent(bytes: UInt64) {
        framesSent += 1
        bytesSent += bytes
        let slot = Int(framesSent & UInt64(Self.slots - 1))
        sentAt[slot] = ferry_monotonic_ns()
        sentBytes[slot] = bytesSent
    }

    /// The destination has applied frames up to `frame`: adjust the window by their delays.
    mutating func acknowledged(upTo frame: UInt64) {
        guard frame > framesAcked, frame <= framesSent else { return }
        let now = ferry_monotonic_ns()
        let slot = Int(frame & UInt64(Self.slots - 1))
        let rtt = now &- sentAt[slot]
        baseRTT = min(baseRTT, rtt)
        let newlyAcked = Double(sentBytes[slot] - bytesAcked)
        framesAcked = frame
        bytesAcked = sentBytes[slot]
        let queueing = Double(rtt - baseRTT)
        let offTarget = (targetNanoseconds - queueing) / targetNanoseconds
        // LEDBAT: window += gain × off_target × bytes_acked × MSS / window, with a 64 KiB "segment".
        window += max(-1, offTarget) * newlyAcked * 65536 / window
        window = min(maximumWindow, max(minimumWindow, window))
    }

    /// After a reconnect: the destination applied `applied` push frames in all; the frames after
    /// it are lost (their pages go again), so the count restarts there.
    mutating func restart(at applied: UInt64) {
        framesSent = max(framesAcked, min(applied, framesSent))
        framesAcked = framesSent
        if framesSent > 0 { bytesAcked = sentBytes[Int(framesSent & UInt64(Self.slots - 1))] }
        bytesSent = bytesAcked
    }
}
