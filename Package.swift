// swift-tools-version: 6.1
// Ferry: live migration of a running VM (or any process), disk and memory, across a WAN.
import PackageDescription

let swift6: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "Ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "source-agent", targets: ["SourceAgent"]),
        .executable(name: "dest-agent", targets: ["DestAgent"]),
        .executable(name: "ferry-bench", targets: ["FerryBench"]),
        .executable(name: "ferry-nbd-serve", targets: ["FerryNBDServe"]),
        .executable(name: "ferry-workload", targets: ["FerryWorkload"]),
        .executable(name: "ferry-delay-relay", targets: ["FerryDelayRelay"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
    ],
    targets: [
        // C: liburing and libnbd through pkg-config, plus the few kernel interfaces Swift cannot import.
        .systemLibrary(name: "CURing", pkgConfig: "liburing",
                       providers: [.apt(["liburing-dev"])]),
        .systemLibrary(name: "CNBD", pkgConfig: "libnbd",
                       providers: [.apt(["libnbd-dev"])]),
        .systemLibrary(name: "CXXHash", pkgConfig: "libxxhash",
                       providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CLibCrypto", pkgConfig: "libcrypto",
                       providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        .target(name: "CFerryShims"),
        // Frame sealing through the BoringSSL that swift-crypto vendors (its C API: no allocation per frame).
        .target(name: "CFerryAEAD", dependencies: [.product(name: "Crypto", package: "swift-crypto")]),

        // io_uring: an owned ring, typed operations, completions by tag.
        .target(name: "URing",
                dependencies: ["CURing", "CFerryShims",
                               .product(name: "SystemPackage", package: "swift-system")],
                swiftSettings: swift6),
        // The migration protocol: frames, messages, a pure decoder and encoder.
        .target(name: "Wire",
                dependencies: [.product(name: "Crypto", package: "swift-crypto")],
                swiftSettings: swift6),
        // The NBD server and the block store behind it (dirty bitmap, write throttle).
        .target(name: "NBDBridge",
                dependencies: ["URing", "CFerryShims",
                               .product(name: "SystemPackage", package: "swift-system"),
                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: swift6),
        // Another process's memory: regions, reading, kernel dirty tracking; userfaultfd fault service.
        .target(name: "ProcessMemory",
                dependencies: ["CFerryShims",
                               .product(name: "SystemPackage", package: "swift-system"),
                               .product(name: "Crypto", package: "swift-crypto")],
                swiftSettings: swift6),
        // A test/demo process: memory dirtied at a set rate in a verifiable pattern; resume mode under userfaultfd.
        .executableTarget(name: "FerryWorkload",
                          dependencies: ["ProcessMemory", "CFerryShims", "CNBD",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          swiftSettings: swift6),
        // A client of QEMU's machine protocol (QMP).
        .target(name: "QMP", dependencies: ["CFerryShims"], swiftSettings: swift6),
        // The migration engine shared by both agents: link, sessions, phases.
        .target(name: "MigrationEngine",
                dependencies: ["Wire", "URing", "NBDBridge", "ProcessMemory", "QMP", "CXXHash", "CFerryShims", "CFerryAEAD", "CZstd",
                               .product(name: "SystemPackage", package: "swift-system"),
                               .product(name: "Logging", package: "swift-log"),
                               .product(name: "Crypto", package: "swift-crypto"),
                               .product(name: "Metrics", package: "swift-metrics"),
                               .product(name: "Prometheus", package: "swift-prometheus")],
                swiftSettings: swift6),
        .executableTarget(name: "SourceAgent",
                          dependencies: ["MigrationEngine", "NBDBridge",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                         .product(name: "Logging", package: "swift-log")],
                          swiftSettings: swift6),
        .executableTarget(name: "DestAgent",
                          dependencies: ["MigrationEngine", "NBDBridge",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                         .product(name: "Logging", package: "swift-log")],
                          swiftSettings: swift6),
        // The emulated WAN's delay relay (scripts/wan/wan-link.sh): C, epoll and a timerfd, no Swift runtime.
        .executableTarget(name: "FerryDelayRelay", path: "Sources/FerryDelayRelay"),
        // Benchmarks: figures side by side with a peer, never timed unit tests.
        .executableTarget(name: "FerryBench",
                          dependencies: ["URing", "Wire", "MigrationEngine", "CLibCrypto",
                                         .product(name: "Crypto", package: "swift-crypto"),
                                         .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          swiftSettings: swift6),

        // Serves a disk image over NBD until SIGTERM: benchmarks and manual checks (scripts/bench-nbd.sh).
        .executableTarget(name: "FerryNBDServe", dependencies: ["NBDBridge"], swiftSettings: swift6),

        // Shared by every test target: the one skip helper (skip, or fail under FERRY_REQUIRE_ALL=1) and
        // its require(...) checks, child processes and their JSON lines, temporary directories, free
        // ports, key files, SplitMix64, SHA-256, per-thread CPU time, page-cache state.
        .target(name: "CFerryTestShims", path: "Tests/CFerryTestShims"),
        .target(name: "FerryTestSupport",
                dependencies: ["CFerryTestShims", .product(name: "Crypto", package: "swift-crypto")],
                path: "Tests/FerryTestSupport", swiftSettings: swift6),

        .testTarget(name: "URingTests", dependencies: ["URing", "FerryTestSupport", .product(name: "Crypto", package: "swift-crypto")], swiftSettings: swift6),
        .testTarget(name: "WireTests", dependencies: ["Wire", "FerryTestSupport"], swiftSettings: swift6),
        .testTarget(name: "NBDBridgeTests", dependencies: ["NBDBridge", "CNBD", "FerryTestSupport"], swiftSettings: swift6),
        .testTarget(name: "ProcessMemoryTests", dependencies: ["ProcessMemory", "FerryWorkload", "FerryTestSupport"], swiftSettings: swift6),
        .testTarget(name: "AgentTests", dependencies: ["MigrationEngine", "Wire", "ProcessMemory", "SourceAgent", "DestAgent", "FerryTestSupport", "CZstd"], swiftSettings: swift6),
    ]
)
