import FerryTestSupport
import Foundation
import Glibc
import XCTest

/// A real Linux VM (QEMU under TCG: Debian's kernel and ferry-guest, which checks every page and
/// disk block it wrote and prints its verdict on the serial console) migrated whole by the agents
/// across the emulated WAN (scripts/wan/wan-link.sh, 40 ms RTT): QEMU's own NBD client on
/// source-agent's disk, RAM in a shared backend moved by the agents, the device state by QMP, the
/// destination QEMU started before switchover by dest-agent (`--vmm qemu`). scripts/migrate-vm.sh
/// does one migration and judges it by the guest's own verdict at the destination (same boot, a
/// full memory sweep and a full disk sweep checked there, no FAIL); these tests run it across the
/// matrix the real-VM issue asks for and read its result line.
///
/// What each proves:
/// - pre-copy at 1 Gbit/s, 300 Mbit/s and 100 Mbit/s with several dirty rounds (rounds >= 2 is
///   asserted: a single round would not exercise the dirty tracking below QEMU);
/// - post-copy and hybrid at the same speeds (the destination QEMU knows nothing of Ferry: its
///   missing pages fault into an injected userfaultfd);
/// - dest-agent killed during the bulk copy: the source reports the failure and the guest runs on
///   at the source, intact (its disk still served), its network connection undisturbed.
/// - with --net, the VM's network follows it (issue 12): a client on the source's side exchanges a
///   message every 10 ms with the guest's echo server through a whole pre-copy and a whole
///   post-copy migration across 200 Mbit/s and 40 ms, over the agents' tunnel lane: never reset,
///   nothing lost, duplicated or corrupted; a new connection afterwards; the hook ran with the VM's
///   address; and a capture of the agents' link holds no echo message in the clear (the client's
///   own port, the control, does). The longest gap between replies is printed beside its goal,
///   downtime + 2 RTT.
/// The guest's checks are shown able to fail by scripts/guest/smoke.sh (run by testGuestChecksCanFail).
final class RealVMTests: XCTestCase {
    private var repositoryRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }

    /// Runs scripts/migrate-vm.sh with `arguments`; returns its `result` line's fields.
    private func migrate(_ arguments: [String]) throws -> [String: String] {
        try require(tool: "/usr/bin/qemu-system-x86_64", package: "qemu-system-x86")
        try require(tool: "/usr/sbin/ip", package: "iproute2")
        try require(root: "network namespaces, ptrace and userfaultfd of QEMU")
        var environment = ProcessInfo.processInfo.environment
        environment["FERRY_BIN"] = E2E.Agent.productsDirectory.path
        let run = try runTool("/bin/bash", [repositoryRoot + "/scripts/migrate-vm.sh", "--quiet"] + arguments,
                              environment: environment, timeout: 600)
        let line = run.stdout.split(separator: "\n").last { $0.hasPrefix("result ") } ?? ""
        print("real VM \(arguments.joined(separator: " ")): \(line)")
        XCTAssertEqual(run.status, 0, "migrate-vm.sh \(arguments) failed:\n\(run.stdout)\n\(run.stderr.suffix(4000))")
        var fields: [String: String] = [:]
        for pair in line.dropFirst("result ".count).split(separator: " ") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
        }
        XCTAssertEqual(fields["verdict"], "ok", "the guest's verdict: \(line)\n\(run.stderr.suffix(2000))")
        return fields
    }

    private func precopy(rate: Int) throws {
        let result = try migrate(["--mode", "precopy", "--rate", "\(rate)", "--rtt", "40"])
        XCTAssertEqual(result["status"], "completed")
        XCTAssertGreaterThanOrEqual(Int(result["rounds"] ?? "") ?? 0, 2, "pre-copy must need several dirty rounds: \(result)")
    }

    func testPrecopyAt1Gbit() throws { try precopy(rate: 1000) }
    func testPrecopyAt300Mbit() throws { try precopy(rate: 300) }
    func testPrecopyAt100Mbit() throws { try precopy(rate: 100) }

    func testPostcopyAt1Gbit() throws { XCTAssertEqual(try migrate(["--mode", "postcopy", "--rate", "1000"])["status"], "completed") }
    func testPostcopyAt300Mbit() throws { XCTAssertEqual(try migrate(["--mode", "postcopy", "--rate", "300"])["status"], "completed") }
    func testPostcopyAt100Mbit() throws { XCTAssertEqual(try migrate(["--mode", "postcopy", "--rate", "100"])["status"], "completed") }

    func testHybridAt1Gbit() throws { XCTAssertEqual(try migrate(["--mode", "hybrid", "--rate", "1000"])["status"], "completed") }
    func testHybridAt300Mbit() throws { XCTAssertEqual(try migrate(["--mode", "hybrid", "--rate", "300"])["status"], "completed") }
    func testHybridAt100Mbit() throws { XCTAssertEqual(try migrate(["--mode", "hybrid", "--rate", "100"])["status"], "completed") }

    /// With its network (--net): the client's connection to the guest at the source goes on
    /// undisturbed, nothing crossed the tunnel, and the hook did not run.
    func testDestinationKilledBeforeSwitchoverLeavesTheGuestRunningAtTheSource() throws {
        let result = try migrate(["--mode", "precopy", "--rate", "100", "--kill-dest-before-switchover", "--net"])
        XCTAssertEqual(result["status"], "failed")
        XCTAssertEqual(result["vm"], "source")
        XCTAssertEqual(result["echo"], "ok", "the guest's connection at the source: \(result)")
        XCTAssertEqual(result["new_connection"], "ok")
        XCTAssertEqual(result["tunnel_frames_to_vm"], "0", "traffic went to a destination that never took the VM")
    }

    /// A QEMU whose RAM Ferry cannot move below it is refused before anything moves, with the
    /// options to use: plain `-m` (RAM in no backend) and a backend with share=off.
    func testQEMUWithoutSharedRAMIsRefusedWithTheOptionsToUse() throws {
        try require(tool: "/usr/bin/qemu-system-x86_64", package: "qemu-system-x86")
        try require(root: "ptrace of QEMU")
        let dir = TemporaryDirectory(prefix: "ferry-qemu-refuse")
        try writeKeyFile(at: dir.file("key"))
        for (name, ram) in [("no backend", ["-m", "64"]),
                            ("share=off", ["-m", "64", "-object", "memory-backend-memfd,id=ram,size=64M,share=off", "-machine", "pc,memory-backend=ram"])] {
            let qmp = dir.file("qmp-\(name.hashValue & 0xffff).sock")
            let qemu = try ChildProcess("/usr/bin/qemu-system-x86_64", ["-S", "-accel", "tcg", "-nodefaults", "-display", "none",
                                                                         "-qmp", "unix:\(qmp),server=on,wait=off"] + ram,
                                        stdout: .discard, stderr: .discard)
            defer { qemu.kill(SIGKILL); _ = qemu.wait(timeout: 10) }
            let run = try runTool(E2E.Agent.productsDirectory.appendingPathComponent("source-agent").path,
                                  ["--vmm", "qemu", "--qmp", "unix:\(qmp)", "--dest", "127.0.0.1:9", "--key-file", dir.file("key"), "--vm-wait", "20"],
                                  timeout: 60)
            XCTAssertNotEqual(run.status, 0, "\(name): source-agent accepted a QEMU whose RAM it cannot move: \(run)")
            XCTAssertTrue(run.stderr.contains("memory-backend-memfd,id=ram,size=<RAM>,share=on"), "\(name): the refusal does not name the options: \(run.stderr)")
            XCTAssertTrue(qemu.isRunning, "\(name): the refused QEMU must be left alone")
        }
    }

    func testNetworkFollowsTheVMInPrecopy() throws { try network(mode: "precopy") }
    func testNetworkFollowsTheVMInPostcopy() throws { try network(mode: "postcopy") }

    private func network(mode: String) throws {
        let result = try migrate(["--net", "--mode", mode, "--rate", "200", "--rtt", "40"])
        XCTAssertEqual(result["status"], "completed")
        XCTAssertEqual(result["echo"], "ok", "the echo connection: \(result)")
        XCTAssertEqual(result["new_connection"], "ok")
        XCTAssertEqual(result["link_plaintext_frames"], "0", "echo messages in the clear on the agents' link")
        XCTAssertGreaterThan(Int(result["control_plaintext_frames"] ?? "") ?? 0, 0, "the capture finds nothing even where it must")
        XCTAssertGreaterThan(Int(result["tunnel_frames_to_vm"] ?? "") ?? 0, 0, "nothing went through the tunnel")
        print("network, \(mode): longest gap between replies \(result["echo_max_gap_ms"] ?? "?") ms; goal (downtime + 2 RTT) \(result["gap_goal_ms"] ?? "?") ms; "
              + "downtime \(result["downtime_ms"] ?? "?") ms; the client's TCP retransmitted \(result["client_retransmits"] ?? "?") segments")
    }

    /// The verdict these tests rely on can fail: stale, partly stale, lost, torn, future and
    /// misplaced pages and blocks planted from the host are each reported, exactly once.
    func testGuestChecksCanFail() throws {
        try require(tool: "/usr/bin/qemu-system-x86_64", package: "qemu-system-x86")
        let run = try runTool("/bin/bash", [repositoryRoot + "/scripts/guest/smoke.sh"], timeout: 600)
        XCTAssertEqual(run.status, 0, "scripts/guest/smoke.sh:\n\(run.stdout)\n\(run.stderr.suffix(3000))")
    }
}
