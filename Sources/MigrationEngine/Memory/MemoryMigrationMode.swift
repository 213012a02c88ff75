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
