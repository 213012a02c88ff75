#!/usr/bin/env bash
# Compression across an emulated WAN: a disk migration with --compression auto beside --compression off, in the
# same run, on a guest-like image (ext4 made with `mkfs.ext4 -d` from this machine's /usr/share, not random
# bytes) and on random data, where compression must switch itself off. Prints wire bytes / data, total time and
# the report's compression part for each, then the goals: the guest-like image crosses in fewer bytes and less
# time with compression, and random data costs no more than 2 % in bytes or time. Exit 0 unless a migration fails
# or the images differ. Then the same guest image after an update (a 32 MiB file written into it with debugfs),
# to a destination that holds the image before the update (`dest-agent --disk-base`) beside one that holds
# nothing: wire bytes / data when only the blocks the destination lacks cross. Needs root (network namespaces).
#
#   scripts/bench-compression.sh [RATE_MBIT] [RTT_MS] [RANDOM_MIB]     (defaults 200, 40, 256)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-200}; rtt=${2:-40}; random_mib=${3:-256}
config=${FERRY_BUILD_CONFIG:-release}
swift build -c "$config" --product source-agent >/dev/null
swift build -c "$config" --product dest-agent >/dev/null
bin=$(swift build -c "$config" --show-bin-path)
wan=scripts/wan/wan-link.sh
name=fzstd
work=$(mktemp -d /tmp/ferry-bench-zstd.XXXXXX)
cleanup() { bash "$wan" down "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
head -c 32 /dev/urandom > "$work/key"; chmod 600 "$work/key"

echo "bench: an ext4 image of /usr/share ($(du -sh /usr/share | cut -f1)), and $random_mib MiB of random bytes"
share_mib=$(( $(du -sm /usr/share | cut -f1) * 13 / 10 + 64 ))
truncate -s "${share_mib}M" "$work/guest.img"
mkfs.ext4 -q -F -d /usr/share "$work/guest.img"
head -c $((random_mib << 20)) /dev/urandom > "$work/random.img"
# The update: the same image with a new 32 MiB file of mixed content (half text from /usr/share, half random).
cp --sparse=always "$work/guest.img" "$work/updated.img"
{ find /usr/share -type f -name '*.txt' -size -200k -print0 2>/dev/null | xargs -0 cat 2>/dev/null | head -c $((16 << 20)); head -c $((16 << 20)) /dev/urandom; } > "$work/update.bin"
debugfs -w -R "write $work/update.bin update.bin" "$work/updated.img" >/dev/null 2>&1

# One disk migration of image $1 with --compression $2; its report goes to $3. With $4, the destination
# holds that image already (--disk-base).
migrate() {
  local image=$1 mode=$2 report=$3 base=${4:-}
  rm -f "$work/dst.img" "$work/src.sock" "$work/dst.sock"
  local relay
  relay=$(bash "$wan" up "$name" "$rate" "$rtt" 7072 6203 | tail -n 1)
  bash "$wan" dst "$name" "$bin/dest-agent" --listen 127.0.0.1:7072 --key-file "$work/key" --disk "$work/dst.img" \
    ${base:+--disk-base "$base"} --nbd "unix:$work/dst.sock" --report "$work/dst.json" --exit-after-migration 2> "$work/dest.log" &
  local dest_pid=$!
  for _ in $(seq 100); do grep -q "waiting for the source" "$work/dest.log" 2>/dev/null && break; sleep 0.05; done
  bash "$wan" src "$name" "$bin/source-agent" --disk "$image" --nbd "unix:$work/src.sock" --dest "$relay" \
    --key-file "$work/key" --report "$report" --compression "$mode" --exit-after-migration 2> "$work/src.log"
  wait "$dest_pid"
  cmp -s "$image" "$work/dst.img" || { echo "bench: $image arrived different" >&2; exit 1; }
  bash "$wan" down "$name" >/dev/null
}

for image in guest random; do
  for mode in auto off; do
    echo "bench: $image image, --compression $mode"
    migrate "$work/$image.img" "$mode" "$work/$image-$mode.json"
  done
done

echo "bench: the updated guest image, the destination holding the image before the update"
migrate "$work/updated.img" auto "$work/updated-base.json" "$work/guest.img"
echo "bench: the updated guest image, the destination holding nothing"
migrate "$work/updated.img" auto "$work/updated-none.json"

/usr/bin/python3 - "$work" "$rate" "$rtt" <<'PY'
import json, sys
work, rate, rtt = sys.argv[1], sys.argv[2], sys.argv[3]
r = {(i, m): json.load(open(f"{work}/{i}-{m}.json")) for i in ("guest", "random") for m in ("auto", "off")}
print(f"disk migration over {rate} Mbit/s, {rtt} ms RTT: --compression auto beside off")
print(f"{'image':8} {'mode':5} {'data MB':>8} {'wire MB':>8} {'wire/data':>9} {'total s':>8} {'frames zstd/raw':>16} {'zstd s':>7}")
for (image, mode), rep in r.items():
    data = rep["disk"]["transferred"]
    part = (rep.get("compression") or {}).get("disk") or {}
    frames = f"{part.get('frames_compressed', 0)}/{part.get('frames_raw', 0)}" if part else "-"
    print(f"{image:8} {mode:5} {data/1e6:8.1f} {rep['wire_bytes']/1e6:8.1f} {rep['wire_bytes']/max(1, data):9.3f} "
          f"{rep['total_time_ms']/1000:8.1f} {frames:>16} {part.get('compress_seconds', 0):7.2f}")
g_auto, g_off, x_auto, x_off = r["guest", "auto"], r["guest", "off"], r["random", "auto"], r["random", "off"]
bytes_ratio = g_auto["wire_bytes"] / g_off["wire_bytes"]
time_ratio = g_auto["total_time_ms"] / g_off["total_time_ms"]
print(f"guest-like image: wire bytes auto/off {bytes_ratio:.3f}, total time auto/off {time_ratio:.3f}")
print(f"goal: a guest-like image crosses in fewer bytes and less time, measured {bytes_ratio:.3f} and {time_ratio:.3f} -> "
      f"{'met' if bytes_ratio < 1 and time_ratio < 1 else 'BELOW GOAL'}")
rb = x_auto["wire_bytes"] / x_off["wire_bytes"]; rt = x_auto["total_time_ms"] / x_off["total_time_ms"]
b, n = json.load(open(f"{work}/updated-base.json")), json.load(open(f"{work}/updated-none.json"))
touched = b["disk"]["transferred"] + b["disk"]["held"]
print(f"updated guest image ({touched/1e6:.1f} MB of data), --compression auto: the destination holds the old image "
      f"(held {b['disk']['held']/1e6:.1f} MB, sent {b['disk']['transferred']/1e6:.1f} MB, wire {b['wire_bytes']/1e6:.1f} MB, "
      f"wire/data {b['wire_bytes']/max(1, touched):.3f}, {b['total_time_ms']/1000:.1f} s) beside nothing "
      f"(wire {n['wire_bytes']/1e6:.1f} MB, wire/data {n['wire_bytes']/max(1, touched):.3f}, {n['total_time_ms']/1000:.1f} s)")
print(f"goal: a destination that holds the image before the update is sent less than the update's 32 MiB plus metadata "
      f"(36 MB), measured {b['wire_bytes']/1e6:.1f} MB -> {'met' if b['wire_bytes'] < 36e6 else 'BELOW GOAL'}")
print(f"goal: random data costs at most 2 % more (compression switches itself off), measured bytes {rb:.3f}, time {rt:.3f} -> "
      f"{'met' if rb <= 1.02 and rt <= 1.02 else 'BELOW GOAL'}")
PY
