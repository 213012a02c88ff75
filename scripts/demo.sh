#!/usr/bin/env bash
# Ferry's default demo: a whole "VM" live-migrated on this host, disk and memory under one pause.
#
# The VM is ferry-workload: 256 MiB of memory dirtied at 10 MB/s in a verifiable pattern, and a
# 512 MiB disk served by source-agent over NBD, to which it mirrors every other page it writes
# (memory first, then the disk, so memory and disk can be checked to come from one instant). One
# source-agent run migrates disk, memory and VM state in ONE session across an emulated WAN
# (200 Mbit/s, 40 ms round trip, two network namespaces) with ONE pause; dest-agent starts the
# resumed workload on the migrated disk and its page faults, and the workload verifies every page
# and every disk block. The same VM is then migrated the old way (the disk, then the memory, with
# two pauses) on the same link, and the figures are printed side by side (scripts/bench-vm-wan.sh).
# Without root (no namespaces, ptrace or userfaultfd) only a disk migration runs, over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "demo: building the agents (release)"
swift build -c release --product source-agent >/dev/null
swift build -c release --product dest-agent >/dev/null
bin=$(swift build -c release --show-bin-path)

if [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null && ip netns list >/dev/null 2>&1; then
  echo "demo: a whole VM (256 MiB of memory, 512 MiB disk) across an emulated WAN (200 Mbit/s, 40 ms RTT)"
  FERRY_BUILD_CONFIG=release bash scripts/bench-vm-wan.sh 256 512 200 40 10
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
