import ProcessMemory
import URing

/// How memory moves: all before the pause (pre-copy), all after it (post-copy), or some rounds
/// before and the rest after (hybrid).
public enum MemoryMigrationMode: String, Sendable, CaseIterable {
    /// Rounds of dirty pages until converged, then pause, final set, resume at the destination.
    case precopy
    /// Pause at once; the destination resumes and pulls missing pages while the rest is pushed.
    case postcopy
    /// `precopyRounds` rounds of pre-copy, then post-copy for what is still dirty.
    case hybrid

    /// Whether the destination resumes before every page has arrived.
    public var isPostcopy: Bool { self != .precopy }
}

/// What `source-agent --vm PID` migrates and how.
public struct MemorySourceOptions: Sendable {
    /// The dest-agent.
    public var destination: SocketAddress
    /// The shared key both agents hold.
    public var key: SharedKey
    /// The process whose memory moves (a VMM, or any process).
    public var pid: Int32
    /// Pre-copy, post-copy or hybrid.
    public var mode: MemoryMigrationMode = .precopy
    /// Explicit regions (`--region START-END`); empty: the process's guest-memory candidates, largest first.
    public var regions: [AddressRange] = []
    /// Regions smaller than this are left out of the default choice.
    public var minimumRegionSize: UInt64 = 1 << 20
    /// When to stop pre-copy rounds.
    public var policy = ConvergencePolicy()
    /// Hybrid: dirty rounds before switching to post-copy.
    public var precopyRounds: Int = 2
    /// Shell command that pauses the VM (default: SIGSTOP to `pid`).
    public var pauseCommand: String?
    /// Shell command that resumes the VM at the source after a failure (default: SIGCONT).
    public var resumeCommand: String?
    /// Shell command that produces the opaque VM-state blob at pause (see ``VMStateCommand``).
    public var stateCommand: String?
    /// Post-copy push pacing: the queueing delay (seconds) the push may add at the bottleneck
    /// (``PushPacer``); 0 pushes as fast as the link takes it (for links that prioritise the urgent lane).
    public var pushDelayTarget: Double = 0.002
    /// SO_PRIORITY of the urgent lane's socket (6, TC_PRIO_INTERACTIVE; 0 leaves it alone).
    public var urgentPriority: Int32 = PeerLink.interactivePriority
    /// Track dirty pages by content hashing even where the kernel method works (`--tracking hash`).
    public var contentHashTracking = false
    /// Pages per `pageBatch` frame.
    public var batchPages: Int = 256
    /// A receive that sees nothing for this long (seconds) counts as a dropped link.
    public var receiveTimeout: Double = 30

    public init(destination: SocketAddress, key: SharedKey, pid: Int32) {
        self.destination = destination
        self.key = key
        self.pid = pid
    }

    /// Sets ``regions`` from `--region START-END` texts (hex); throws on a malformed one.
    public mutating func setRegions(parsing texts: [String]) throws {
        regions = try texts.map { try AddressRange(parsing: $0) }
    }
}

/// How `dest-agent` receives memory and resumes the VM.
public struct MemoryDestinationOptions: Sendable {
    /// Where to accept the source's connections.
    public var listen: SocketAddress
    /// The shared key both agents hold.
    public var key: SharedKey
    /// Where the resumed VM connects for Firecracker's UFFD handshake; nil: no VM is resumed here.
    public var uffdSocket: String?
    /// Started at switchover with FERRY_STATE_FILE, FERRY_UFFD_SOCKET, FERRY_LAYOUT_FILE in its environment.
    public var onSwitchover: String?
    /// Also write the memory as a Firecracker memory file (regions at their offsets).
    public var memOut: String?
    /// Where the state and layout files go (a fresh directory by default).
    public var workDirectory: String?
    /// SO_PRIORITY of the urgent lane's socket (6, TC_PRIO_INTERACTIVE; 0 leaves it alone).
    public var urgentPriority: Int32 = PeerLink.interactivePriority
    /// Pages requested around a faulting page (pre-paging), the faulting page included.
    public var prepagingWindow: Int = 16
    /// A receive that sees nothing for this long (seconds) counts as a dropped link.
    public var receiveTimeout: Double = 30
    /// How long to wait for the first connection (seconds; 0 = for ever).
    public var acceptTimeout: Double = 0
    /// How long to wait for the resumed VM's UFFD handshake after starting it (seconds).
    public var handshakeTimeout: Double = 30

    public init(listen: SocketAddress, key: SharedKey) {
        self.listen = listen
        self.key = key
    }
}
