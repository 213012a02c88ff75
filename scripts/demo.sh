#!/usr/bin/env bash
# Ferry's default demo: a real Linux VM, with its disk, live-migrated across an emulated WAN on
# this host, and the VM's own verdict at the end.
#
# The VM is QEMU (TCG) running Debian's kernel and ferry-guest (scripts/guest/build.sh): 256 MiB of
# RAM in a shared memory backend, 64 MiB of it dirtied at 8 MB/s in a verifiable pattern, and a
# 256 MiB disk that source-agent serves over NBD to QEMU's own NBD client, written at 2 MB/s in
# step-stamped records. The guest checks every page and block it wrote on every sweep and prints
# its verdict on its serial console. One source-agent session moves RAM, disk and QEMU's device
# state (QMP, x-ignore-shared) across 200 Mbit/s with 40 ms RTT (two network namespaces) under ONE
# pause; dest-agent has started the destination QEMU at once, loads the state at switchover and
# runs it. The guest's console at the destination must show the same boot, going on, every page
# and block checked again, no FAIL (scripts/migrate-vm.sh). The guest's network follows it: a client
# on the source's side talks to its echo server every 10 ms through the whole migration, over the
# agents' sealed tunnel lane (docs/network.md; DEMO_NET=0 leaves the network out).
# DEMO_MODE=postcopy|hybrid picks the mode.
# Without root (no namespaces, ptrace or userfaultfd) only a disk migration runs, over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "demo: building the agents (release)"
swift build -c release --product source-agent >/dev/null
swift build -c release --product dest-agent >/dev/null
bin=$(swift build -c release --show-bin-path)

if [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null && ip netns list >/dev/null 2>&1; then
  mode=${DEMO_MODE:-precopy}
  net=(); [ "${DEMO_NET:-1}" = 1 ] && net=(--net)
  echo "demo: a real Linux VM (256 MiB RAM, 256 MiB disk on NBD${net:+, a NIC with open TCP connections}) migrated live ($mode) across an emulated WAN (200 Mbit/s, 40 ms RTT)"
  FERRY_BIN=$bin bash scripts/migrate-vm.sh --mode "$mode" --rate 200 --rtt 40 "${net[@]}"
  exit $?
fi

echo "demo: not root (no network namespaces): disk migration over loopback with a 5 MB/s writer"
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'kill ${fio_pid:-} ${dest_pid:-} 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom > "$work/key"; chmod 600 "$work/key"
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
