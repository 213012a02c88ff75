#!/usr/bin/env bash
# Sets up (Debian packages), builds Ferry and runs every test: unit tests, real-client NBD tests,
# kernel-mechanism tests and end-to-end agent tests, then the Wire fuzz harnesses for a bounded time
# (scripts/fuzz.sh: libFuzzer and the valgrind allocation check), then deploy/'s lint and its test over real ssh
# (scripts/deploy/test.sh), then a quick migration drill (scripts/drill/run.py --quick). Set FERRY_REQUIRE_ALL=1 (CI does)
# to turn any skip for a missing kernel feature, tool or permission into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build --build-tests
swift test --skip-build
bash scripts/fuzz.sh
# deploy/: ansible-lint (production profile), then the playbooks for real over ssh between two namespace hosts.
(cd deploy && ansible-lint --offline)
if [ "$(id -u)" -eq 0 ]; then
  FERRY_BIN_DIR="$(swift build --show-bin-path)" timeout 900 bash scripts/deploy/test.sh
elif [ "${FERRY_REQUIRE_ALL:-0}" = 1 ]; then
  echo "test.sh: the deploy test needs root" >&2; exit 1
else
  echo "test.sh: SKIP the deploy test: it needs root"
fi
# A quick WAN migration drill (docs/drills.md): a reduced matrix on the real guest, a link cut, QEMU's own
# migration beside Ferry; results.json, results.csv and plots; fails if any cell's verdict fails.
if [ "$(id -u)" -eq 0 ]; then
  FERRY_BIN="$(swift build --show-bin-path)" timeout 900 /usr/bin/python3 scripts/drill/run.py --quick \
    --out "${FERRY_DRILL_OUT:-$(mktemp -d /tmp/ferry-drill.XXXXXX)}"
elif [ "${FERRY_REQUIRE_ALL:-0}" = 1 ]; then
  echo "test.sh: the drill needs root" >&2; exit 1
else
  echo "test.sh: SKIP the quick drill: it needs root"
fi
