#!/usr/bin/env bash
# URing's loopback TCP throughput beside iperf3's, in the same run, and their ratio, compared with the
# goal (Ferry / iperf3 >= 0.80): "-> met" or "-> BELOW GOAL". Exit 0 either way: a benchmark measures.
# Usage: scripts/bench-uring.sh [SECONDS]   (builds ferry-bench in release first)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
command -v iperf3 >/dev/null || { echo "iperf3 is missing: apt-get install iperf3" >&2; exit 1; }
swift build -c release --product ferry-bench >/dev/null
bench=$(swift build -c release --show-bin-path)/ferry-bench

port=$((20000 + RANDOM % 20000))
iperf3 -s -1 -B 127.0.0.1 -p "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 0.5
iperf_bps=$(iperf3 -c 127.0.0.1 -p "$port" -t "$seconds" -J | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])')
ferry_bps=$("$bench" uring-loopback --seconds "$seconds" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["bits_per_second"])')

/usr/bin/python3 - "$ferry_bps" "$iperf_bps" <<'PY'
import sys
ferry, iperf = float(sys.argv[1]), float(sys.argv[2])
print(f"{'loopback TCP, one stream':28} {'Gbit/s':>8}")
print(f"{'iperf3':28} {iperf/1e9:8.2f}")
print(f"{'Ferry URing':28} {ferry/1e9:8.2f}")
ratio = ferry / iperf
print(f"ratio Ferry / iperf3: {ratio:.2f}")
print(f"goal: Ferry / iperf3 >= 0.80, measured {ratio:.2f} -> {'met' if ratio >= 0.80 else 'BELOW GOAL'}")
PY
