#!/usr/bin/env bash
# Smoke test of the test guest's network: the emulated WAN (wan-link.sh up fnet 200 40), the VM
# network on it (vm-net.sh up fnet), the guest under QEMU (TCG) in fnet-src on tapvm with
# ferry.ip and ferry.echo, then from fnet-cli: ping, a 5 s echo stream (echo-client.py stream) and
# one fresh connection (echo-client.py once); meanwhile the guest's memory and disk checker runs,
# and its first memory sweep must end in `verdict ok`. Prints the results; cleans everything up on
# exit. Exit 0 only if ping, the stream, the single exchange and the guest's verdict all succeed.
# Needs root.
#   bash scripts/net/smoke.sh      (FERRY_KEEP_LOGS=DIR keeps the console and the results there)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/vm/common.sh
say() { echo "net-smoke: $*"; }

link=fnet echo_port=7777
tmp=$(mktemp -d /tmp/ferry-net-smoke.XXXXXX)
qpid=""
cleanup() {
  set +e
  if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null; for _ in $(seq 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done; kill -9 "$qpid" 2>/dev/null; fi
  [ -s "$tmp/qemu.pid" ] && kill -9 "$(cat "$tmp/qemu.pid")" 2>/dev/null
  bash scripts/net/vm-net.sh down "$link" >/dev/null 2>&1
  bash scripts/wan/wan-link.sh down "$link" >/dev/null 2>&1
  if [ -n "${FERRY_KEEP_LOGS:-}" ]; then mkdir -p "$FERRY_KEEP_LOGS"; cp "$tmp"/* "$FERRY_KEEP_LOGS/" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

vm_guest
dest_port=$((20000 + $$ % 20000)); relay_port=$((dest_port + 1))
bash scripts/wan/wan-link.sh up "$link" 200 40 "$dest_port" "$relay_port" >/dev/null
eval "$(bash scripts/net/vm-net.sh up "$link")"
say "link $link up; vm_ip=$vm_ip client_ip=$client_ip vm_mac=$vm_mac"
ip -d -n "$link-src" link show fbr | grep -q 'forward_delay 0 .*stp_state 0' || { say "FAIL fbr is not forward_delay 0, stp_state 0"; exit 1; }

truncate -s 64M "$tmp/disk.img"
qemu="$(vm_qemu_base "ferry-net-smoke-$$" 256 8 2 "ferry.ip=$vm_ip ferry.echo=$echo_port") \
  -blockdev driver=file,filename=$tmp/disk.img,node-name=d0 $(bash scripts/net/vm-net.sh qemu-args "$link") \
  -serial file:$tmp/console.log -pidfile $tmp/qemu.pid -no-reboot"
# timeout bounds QEMU even if this script dies without its trap.
(eval "exec ip netns exec $link-src timeout --kill-after=5 600 $qemu" 2>"$tmp/qemu.err") &
qpid=$!
launched=$SECONDS
if ! vm_wait_for 180 "$tmp/console.log" "ferry-guest: echo listening on $echo_port"; then
  say "FAIL the guest's echo server did not start within 180 s; console:"; tail -n 20 "$tmp/console.log"; cat "$tmp/qemu.err"; exit 1
fi
say "guest up after $((SECONDS - launched)) s:"
grep -E "^ferry-(init|guest): (eth0|echo|error|start)" "$tmp/console.log" | sed 's/^/    /'

status=0
# iputils' ping where installed, else busybox's (busybox-static is there for the guest anyway).
if command -v ping >/dev/null; then ping=(ping); else ping=(busybox ping); fi
if ip netns exec "$link-cli" "${ping[@]}" -c 3 -i 0.3 -W 3 "${vm_ip%/*}" >"$tmp/ping.log" 2>&1; then
  say "ping ok: $(grep -E 'packets|rtt|round-trip' "$tmp/ping.log" | tr '\n' ' ')"
else
  say "FAIL ping:"; sed 's/^/    /' "$tmp/ping.log"; status=1
fi
if ip netns exec "$link-cli" python3 scripts/net/echo-client.py stream "${vm_ip%/*}" "$echo_port" --duration 5 \
    --json "$tmp/stream.json" >/dev/null; then
  say "stream ok: $(cat "$tmp/stream.json")"
else
  say "FAIL stream: $(cat "$tmp/stream.json" 2>/dev/null || echo 'no result')"; status=1
fi
if once=$(ip netns exec "$link-cli" python3 scripts/net/echo-client.py once "${vm_ip%/*}" "$echo_port" --timeout 10); then
  say "$once"
else
  say "FAIL $once"; status=1
fi
# The checker beside the echo server: its first memory sweep (64 MiB at 8 MB/s) must end in `verdict ok`.
vm_wait_for 60 "$tmp/console.log" "ferry-guest: verdict" || { say "FAIL no memory-sweep verdict from the guest within 60 s"; status=1; }
if grep -q "ferry-guest: verdict ok" "$tmp/console.log"; then say "guest checker: $(grep -m1 'ferry-guest: verdict' "$tmp/console.log" | cut -c14-)"; fi
if grep -q "FAIL\|ferry-guest: error\|ferry-init: error" "$tmp/console.log"; then
  say "FAIL the guest reported:"; grep "FAIL\|error" "$tmp/console.log" | head -5; status=1
fi
say "guest's echo log: $(grep -c 'ferry-guest: echo open' "$tmp/console.log") opened, $(grep -c 'ferry-guest: echo close' "$tmp/console.log") closed; last status: $(grep 'ferry-guest: status' "$tmp/console.log" | tail -n 1 | cut -c21-)"
[ "$status" = 0 ] && say "RESULT ok" || say "RESULT FAIL"
exit "$status"
