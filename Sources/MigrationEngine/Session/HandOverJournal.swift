import Foundation
import Glibc
import Wire

/// The destination's record that the VM runs here, written and synced to its work directory
/// BEFORE it tells the source (`resumed`). A dest-agent restarted after hand-over (systemd
/// `Restart=`) reads it and answers the source's reconnect with `resumed` and the digests that
/// were verified at hand-over, instead of "unknown session" (which would make the source resume
/// a stale copy). It also says which images to serve again.
public struct HandOverJournal: Codable, Sendable, Equatable {
    /// The session, as hex.
    public var session: String
    /// The digests both sides agreed on at hand-over, per stream ("disk 1", "memory"), as hex.
    public var digests: [String: String]
    /// Each disk: its id, image and NBD endpoint, to serve again after a restart.
    public var disks: [Disk]
    /// Whether the memory was still being pulled (post-copy): a restarted agent takes the VM's
    /// userfaultfd back and pulls again what it lost.
    public var memoryPostcopy: Bool
    /// The VM's PID (the process that handed over its userfaultfd).
    public var vmPID: Int32? = nil
    /// The memory layout as the source announced it: page size and regions.
    public var pageSize: UInt32? = nil
    public var regions: [Region]? = nil
    /// The VM's guest-memory mappings from its UFFD handshake.
    public var vmMappings: [Mapping]? = nil

    /// One memory region of the layout.
    public struct Region: Codable, Sendable, Equatable {
        public var id: UInt32
        public var guestAddress: UInt64
        public var hostAddress: UInt64
        public var size: UInt64
        public var fileOffset: UInt64
    }

    /// One of the VM's mappings (Firecracker's handshake fields).
    public struct Mapping: Codable, Sendable, Equatable {
        public var base: UInt64
        public var size: UInt64
        public var offset: UInt64
        public var pageSize: UInt64
    }

    /// One disk the destination serves.
    public struct Disk: Codable, Sendable, Equatable {
        public var id: UInt32
        public var image: String
        public var nbd: String
        /// Handed over in post-copy: the image may still miss blocks, so it is not served as it is.
        public var postcopy: Bool? = nil
    }

    /// The journal's file in a work directory.
    public static func path(in directory: String) -> String { directory + "/handover.json" }

    /// Reads the journal in `directory`, if there is one.
    public static func read(from directory: String) throws -> HandOverJournal? {
        let path = path(in: directory)
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        do {
            return try JSONDecoder().decode(HandOverJournal.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            throw SetupError("the hand-over journal \(path) is unreadable: \(error); move it away only if no VM runs here")
        }
    }

    /// Writes it durably: a temporary file, fsync, rename over the journal, fsync of the directory.
    /// The corresponding C functions are `write`, `fsync` and `rename`.
    public func write(to directory: String) throws {
        let final = Self.path(in: directory)
        let temporary = final + ".new"
        let data = try JSONEncoder().encode(self)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SetupError("cannot write the hand-over journal \(temporary): errno \(errno)") }
        let written = data.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd)
        close(fd)
        guard written == data.count, synced == 0 else { throw SetupError("cannot write the hand-over journal \(temporary): errno \(errno)") }
        guard rename(temporary, final) == 0 else { throw SetupError("cannot rename the hand-over journal into \(final): errno \(errno)") }
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { _ = fsync(dir); close(dir) }
    }

    /// Removes it (the migration is over and settled).
    public static func remove(from directory: String) { unlink(path(in: directory)) }
}
