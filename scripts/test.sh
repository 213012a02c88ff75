#!/usr/bin/env bash
# Sets up (Debian packages), builds Ferry and runs every test: unit tests, real-client NBD tests,
# kernel-mechanism tests and end-to-end agent tests, then the Wire fuzz harnesses for a bounded time
# (scripts/fuzz.sh: libFuzzer and the valgrind allocation check). Set FERRY_REQUIRE_ALL=1 (CI does)
# to turn any skip for a missing kernel feature, tool or permission into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build --build-tests
swift test --skip-build
bash scripts/fuzz.sh
