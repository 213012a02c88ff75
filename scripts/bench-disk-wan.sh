#!/usr/bin/env bash
# Disk migration over an emulated WAN, with iperf3 on the same link in the same run.
#
#   scripts/bench-disk-wan.sh [IMAGE_MIB] [RATE_MBIT] [RTT_MS] [WRITER_MBPS]
#
# Migrates an IMAGE_MIB image of random data (default 1024) from source-agent to dest-agent across
# two network namespaces joined by a RATE_MBIT link (default 200) with RTT_MS of round trip
# (default 40), while fio writes 4 KiB blocks at random through the source's NBD server at
# WRITER_MBPS MB/s (default 5). Prints downtime, total time, wire bytes / image size, goodput /
# link rate and iperf3's rate on the same link, then the goal (goodput / link rate >= 0.95) as
# "-> met" or "-> BELOW GOAL" (a goal missed does not change the exit status; a failed migration or
# unequal images do). Needs root (network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
image_mib=${1:-1024}; rate=${2:-200}; rtt=${3:-40}; writer=${4:-5}
config=${FERRY_BUILD_CONFIG:-release}
swift build -c "$config" --product source-agent >/dev/null
swift build -c "$config" --product dest-agent >/dev/null
bin=$(swift build -c "$config" --show-bin-path)
wan=scripts/wan/wan-link.sh
name=fbench
work=$(mktemp -d /tmp/ferry-bench-disk.XXXXXX)
cleanup() { kill "${fio_pid:-}" 2>/dev/null || true; bash "$wan" down "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

head -c 32 /dev/urandom > "$work/key"; chmod 600 "$work/key"
echo "bench: writing a ${image_mib} MiB image of random data"
head -c $((image_mib << 20)) /dev/urandom > "$work/src.img"

# iperf3 on the very link the agents will use (through the same relay).
relay=$(bash "$wan" up "$name" "$rate" "$rtt" 5201 6201)
bash "$wan" dst "$name" iperf3 -s -1 -B 127.0.0.1 -p 5201 >/dev/null 2>&1 &
sleep 0.5
iperf_bps=$(bash "$wan" src "$name" iperf3 -c "${relay%:*}" -p "${relay#*:}" -t 8 -J | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])')
bash "$wan" down "$name" >/dev/null

relay=$(bash "$wan" up "$name" "$rate" "$rtt" 7071 6202)
bash "$wan" dst "$name" "$bin/dest-agent" --listen 127.0.0.1:7071 --key-file "$work/key" --disk "$work/dst.img" \
  --nbd "unix:$work/dst.sock" --report "$work/dst.json" --exit-after-migration 2> "$work/dest.log" &
sleep 0.5
bash "$wan" src "$name" "$bin/source-agent" --disk "$work/src.img" --nbd "unix:$work/src.sock" --dest "$relay" \
  --key-file "$work/key" --block-size 4096 --report "$work/src.json" --exit-after-migration 2> "$work/src.log" &
source_pid=$!
for _ in $(seq 100); do [ -S "$work/src.sock" ] && break; sleep 0.05; done
fio --name=writer --ioengine=nbd --uri="nbd+unix:///?socket=$work/src.sock" --rw=randwrite --bs=4k \
  --rate="${writer}m" --time_based --runtime=600 --size="${image_mib}m" --output-format=json > "$work/fio.json" 2> "$work/fio.err" &
fio_pid=$!
status=0
wait "$source_pid" || status=$?
sha_src=$(sha256sum "$work/src.img" | cut -d' ' -f1)
wait %1 2>/dev/null || true
sha_dst=$(sha256sum "$work/dst.img" | cut -d' ' -f1)
kill "$fio_pid" 2>/dev/null || true

/usr/bin/python3 - "$work/src.json" "$iperf_bps" "$rate" "$image_mib" "$sha_src" "$sha_dst" <<'PY'
import json, sys
report = json.load(open(sys.argv[1])); iperf = float(sys.argv[2]); rate = float(sys.argv[3]) * 1e6
image = int(sys.argv[4]) << 20; equal = sys.argv[5] == sys.argv[6]
disk = report["disk"]
goodput = report["mbps"] * 1e6
print(f"disk migration over {sys.argv[3]} Mbit/s with a {sys.argv[4]} MiB image and a writer at work")
print(f"  status                 {report['status']}  {report['reason']}")
print(f"  downtime               {report['downtime_ms']:.1f} ms")
print(f"  total time             {report['total_time_ms']/1000:.1f} s")
print(f"  rounds                 {disk['rounds']}  blocks per round {disk['blocks_per_round']}")
print(f"  throttle               {disk['throttle_seconds']:.1f} s, {disk['throttled_writes']} writes delayed")
print(f"  wire bytes / image     {report['wire_bytes']/image:.3f}")
print(f"  goodput / link rate    {goodput/rate:.3f}   (goal >= 0.95)")
print(f"  iperf3 on the link     {iperf/1e6:.1f} Mbit/s   Ferry goodput / iperf3 {goodput/iperf:.3f}")
print(f"  images equal (sha256)  {equal}   digests agree {report['digests_agree']}")
print(f"  goal: goodput / link rate >= 0.95, measured {goodput/rate:.3f} -> {'met' if goodput / rate >= 0.95 else 'BELOW GOAL'}")
sys.exit(0 if report["status"] == "completed" and equal else 1)
PY
