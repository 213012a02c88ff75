#!/usr/bin/env bash
# Ferry's default demo: real live migrations on this host, disk and memory.
#
# 1. Disk: a 512 MiB image is served by source-agent over NBD while fio writes to it at 5 MB/s, as a
#    VM would; it migrates to dest-agent across an emulated WAN (200 Mbit/s, 40 ms round trip, two
#    network namespaces). Both images are compared at the end.
# 2. Memory: a running process (ferry-workload, 256 MiB, dirtying 5 MB/s in a verifiable pattern) is
#    migrated across the same kind of link, pre-copy then post-copy; at the destination it resumes
#    under dest-agent's fault service and verifies every page it touches.
# Without root (no namespaces, ptrace or userfaultfd) only the disk part runs, over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "demo: building the agents (release)"
swift build -c release --product source-agent >/dev/null
swift build -c release --product dest-agent >/dev/null
bin=$(swift build -c release --show-bin-path)

if [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null && ip netns list >/dev/null 2>&1; then
  echo "demo: 1/2 disk migration across an emulated WAN (200 Mbit/s, 40 ms RTT) with a 5 MB/s writer"
  FERRY_BUILD_CONFIG=release bash scripts/bench-disk-wan.sh 512 200 40 5
  echo
  echo "demo: 2/2 memory migration of a running process across an emulated WAN (200 Mbit/s, 40 ms RTT)"
  FERRY_BUILD_CONFIG=release bash scripts/bench-memory.sh 256 200 40 5
  exit $?
fi

echo "demo: not root (no network namespaces): disk migration over loopback with a 5 MB/s writer"
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'kill ${fio_pid:-} ${dest_pid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom > "$work/key"
truncate -s 512M "$work/src.img"
head -c $((256 << 20)) /dev/urandom | dd of="$work/src.img" conv=notrunc status=none
"$bin/dest-agent" --listen 127.0.0.1:17071 --key-file "$work/key" --disk "$work/dst.img" --nbd "unix:$work/dst.sock" \
  --report "$work/dst.json" --exit-after-migration &
dest_pid=$!
sleep 0.3
"$bin/source-agent" --disk "$work/src.img" --nbd "unix:$work/src.sock" --dest 127.0.0.1:17071 --key-file "$work/key" \
  --block-size 4096 --report "$work/src.json" --exit-after-migration &
source_pid=$!
for _ in $(seq 100); do [ -S "$work/src.sock" ] && break; sleep 0.05; done
fio --name=writer --ioengine=nbd --uri="nbd+unix:///?socket=$work/src.sock" --rw=randwrite --bs=4k --rate=5m \
  --time_based --runtime=600 --size=512m >/dev/null 2>&1 &
fio_pid=$!
wait "$source_pid"
wait "$dest_pid" || true
cat "$work/src.json"
if cmp -s "$work/src.img" "$work/dst.img"; then echo "demo: the destination image equals the source image at pause"; else echo "demo: IMAGES DIFFER"; exit 1; fi
