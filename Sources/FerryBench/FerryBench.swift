import ArgumentParser

/// Ferry's benchmarks: each prints its figures so a script can set them beside a peer's.
/// Timings live here, never in unit tests.
@main
struct FerryBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry-bench",
        abstract: "Benchmarks of Ferry's building blocks (run through scripts/bench-*.sh to compare with peers).",
        subcommands: [URingLoopback.self, SealThroughput.self]
    )
}
