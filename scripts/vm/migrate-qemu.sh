#!/usr/bin/env bash
# The same live migration as scripts/migrate-vm.sh, of the same guest over the same emulated WAN,
# done by QEMU's OWN live migration the way libvirt does `virsh migrate --live --copy-storage-all`
# (and `--postcopy`): the yardstick Ferry is measured against.
#
#   scripts/vm/migrate-qemu.sh [--mode precopy|postcopy] [--rate MBIT] [--rtt MS] [--mem MIB]
#                              [--dirty MBS] [--disk-rate MBS] [--sync-writes] [--quiet]
#
# The VM: the test guest of migrate-vm.sh (scripts/vm/common.sh: vm_guest, vm_qemu_base) with --mem
# MiB of plain anonymous RAM (QEMU moves it itself) and a LOCAL 256 MiB raw disk (zeroed, sparse) on
# each host: src.img at the source, dst.img at the destination.
#
# The link: scripts/wan/wan-link.sh (--rate Mbit/s, default 200; --rtt ms, default 40). The source
# QEMU runs in NAME-src; the destination QEMU in NAME-dst, started with -S and
# `-incoming tcp:127.0.0.1:PORT`, reached through wan-link's relay; its NBD server (for the disk
# mirror) is reached through a second delay relay in NAME-dst, so RAM and disk cross the same link.
#
# The QMP sequence is libvirt's (scripts/vm/qmp.py has it step by step): the destination exports its
# disk over NBD; the source mirrors its disk into that export (blockdev-mirror, sync full) until
# READY; then `migrate` with pause-before-switchover (libvirt always sets it on the source, and
# late-block-activate on the destination); at pre-switchover, with the source VM stopped, the READY
# mirror is cancelled (which completes it consistently) and migrate-continue lets QEMU switch over;
# the destination gets nbd-server-stop and `cont` (post-copy: as soon as the source is
# postcopy-active). Post-copy: postcopy-ram on both sides, migrate-start-postcopy after the first
# pass (as `virsh migrate --postcopy-after-precopy`). Disks are never post-copied, only RAM.
# Tuning as libvirt's defaults: downtime-limit left at QEMU's 300 ms (libvirt sets none unless
# asked: virsh migrate-setmaxdowntime), max-bandwidth unlimited (libvirt's default; QEMU's own
# default is 32 MiB/s), no auto-converge, no multifd, no compression.
# The mirror runs in QEMU's default copy-mode, background (libvirt's default): guest writes only
# dirty a bitmap that the mirror copies behind them. It turns READY only at an instant with nothing
# dirty and nothing in flight; a guest that writes its disk steadily (this one: 2 MB/s in 32 KiB
# writes, one every ~16 ms) across a 40 ms round trip seldom leaves such an instant (at 300 Mbit/s,
# 40 ms: READY after 269 s once, not within 300 s twice), and libvirt waits for READY without a limit.
# --sync-writes is `virsh migrate --copy-storage-synchronous-writes` (libvirt >= 8.0): copy-mode
# write-blocking, each guest write also written to the destination before it completes (the guest's
# writes pay the round trip; the mirror is READY in 1-2 s).
# A migration that has not completed 300 s after the mirror started (FERRY_QEMU_TIMEOUT=S to change)
# is cancelled (migrate_cancel; the mirror force-cancelled) and reported as status=timeout, whether
# the mirror never got READY or QEMU's pre-copy never converged.
#
# Prints one line `result key=value ...` as migrate-vm.sh does, with engine=qemu (and the same as
# JSON in $FERRY_RESULT_JSON if set): downtime_ms and total_ms are QEMU's (query-migrate at the end;
# total_ms is the RAM migration's, the mirror before it is mirror_ms), rounds is ram dirty-sync-count,
# wire_bytes is ram transferred + the mirror job's bytes (ram_bytes + disk_bytes; QEMU counts every
# byte the mirror processed, the zeroes of the sparse disk included), link_bytes the veth's tx bytes
# at the source, pause_ms the source's STOP to the destination's RESUME (QEMU's event times), mirror
# the copy-mode. state_bytes, which QEMU does not report, is left empty; vm is where the VM runs
# (destination, source, or empty when neither runs). The verdict is the guest's own, on the
# destination's console (scripts/vm/common.sh: vm_check_guest), and the source QEMU must be paused.
# Exits 0 only if the verdict is ok. Needs root. FERRY_KEEP_LOGS=DIR keeps logs, consoles, the QMP
# log and the report there.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=precopy rate=200 rtt=40 mem=256 dirty=8 disk_rate=2 quiet=0 copy_mode=background
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --rtt) rtt=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --dirty) dirty=$2; shift 2 ;;
    --disk-rate) disk_rate=$2; shift 2 ;;
    --sync-writes) copy_mode=write-blocking; shift ;;
    --quiet) quiet=1; shift ;;
    *) echo "migrate-qemu: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$mode" in precopy|postcopy) ;; *) echo "migrate-qemu: --mode precopy|postcopy" >&2; exit 2 ;; esac
say() { [ "$quiet" = 1 ] || echo "migrate-qemu: $*"; }

source scripts/vm/common.sh
vm_guest

tmp=$(mktemp -d /tmp/ferry-qemu.XXXXXX)
chmod 755 "$tmp"
link="fq$$"
pids=()
cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
  pkill -9 -f -- "-name ferry-vm-$$ " 2>/dev/null
  bash scripts/wan/wan-link.sh down "$link" >/dev/null 2>&1
  rm -f /dev/shm/ferry-vm-$$-* 2>/dev/null
  if [ -n "${FERRY_KEEP_LOGS:-}" ]; then mkdir -p "$FERRY_KEEP_LOGS/$link"; cp "$tmp"/*.log "$tmp"/*.json "$FERRY_KEEP_LOGS/$link/" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s 256M "$tmp/src.img" "$tmp/dst.img"
dest_port=$((20000 + $$ % 20000)); relay_port=$((dest_port + 1)); nbd_port=$((dest_port + 2)); nbd_relay_port=$((dest_port + 3))
relay=$(bash scripts/wan/wan-link.sh up "$link" "$rate" "$rtt" "$dest_port" "$relay_port" | tail -n 1)
dst_ip=${relay%:*}
# The disk mirror's own relay, beside wan-link's, with the same delay.
ip netns exec "$link-dst" "$(bash scripts/wan/wan-link.sh relay-bin)" "$dst_ip" "$nbd_relay_port" 127.0.0.1 "$nbd_port" \
  "$(awk "BEGIN{print $rtt/2}")" </dev/null >"$tmp/nbd-relay.log" 2>&1 &
pids+=("$!"); disown   # (killed at cleanup, without bash's "Killed" notices)
for _ in $(seq 50); do ip netns exec "$link-dst" ss -Hltn "sport = :$nbd_relay_port" | grep -q . && break; sleep 0.1; done
say "link $rate Mbit/s, $rtt ms RTT; migration via $relay, disk mirror via $dst_ip:$nbd_relay_port"

# Both QEMUs: the same command line but for disk file, monitor, console and the incoming flags.
qemu_common=$(vm_qemu_base "ferry-vm-$$" "$mem" "$dirty" "$disk_rate")
disk() { printf '%s' "-blockdev driver=file,filename=$1,node-name=f0 -blockdev driver=raw,file=f0,node-name=d0"; }

eval "exec ip netns exec $link-src $qemu_common $(disk "$tmp/src.img") \
  -qmp unix:$tmp/qmp-src.sock,server=on,wait=off -serial file:$tmp/console-src.log" >"$tmp/qemu-src.log" 2>&1 &
src_qemu_pid=$!; pids+=("$src_qemu_pid"); disown
vm_wait_for 180 "$tmp/console-src.log" "ferry-guest: verdict" || { echo "migrate-qemu: the guest never finished a memory sweep at the source" >&2; tail -n 20 "$tmp/console-src.log" "$tmp/qemu-src.log" >&2; exit 1; }
boot=$(grep -m1 -o 'status boot=[0-9a-f]*' "$tmp/console-src.log" | cut -d= -f2)
say "guest boot=$boot is running at the source: $(grep 'status boot' "$tmp/console-src.log" | tail -n 1 | cut -c14-)"

eval "exec ip netns exec $link-dst $qemu_common $(disk "$tmp/dst.img") \
  -qmp unix:$tmp/qmp-dst.sock,server=on,wait=off -serial file:$tmp/console-dst.log \
  -S -incoming tcp:127.0.0.1:$dest_port" >"$tmp/qemu-dst.log" 2>&1 &
dst_qemu_pid=$!; pids+=("$dst_qemu_pid"); disown
for _ in $(seq 100); do [ -S "$tmp/qmp-dst.sock" ] && break; sleep 0.1; done
[ -S "$tmp/qmp-dst.sock" ] || { echo "migrate-qemu: the destination QEMU did not start" >&2; cat "$tmp/qemu-dst.log" >&2; exit 1; }

link_before=$(vm_link_bytes "$link-src" "$link-a")
say "migrating ($mode): disk mirror ($copy_mode), then RAM"
limit=${FERRY_QEMU_TIMEOUT:-300}
timeout $((limit + 240)) python3 scripts/vm/qmp.py migrate --src "$tmp/qmp-src.sock" --dst "$tmp/qmp-dst.sock" --mode "$mode" \
  --uri "tcp:$relay" --nbd-listen "127.0.0.1:$nbd_port" --nbd-connect "$dst_ip:$nbd_relay_port" \
  --report "$tmp/qemu.json" --copy-mode "$copy_mode" --timeout "$limit" 2>"$tmp/qmp.log" || true
link_bytes=$(( $(vm_link_bytes "$link-src" "$link-a") - link_before ))
if [ ! -s "$tmp/qemu.json" ]; then echo "migrate-qemu: the QMP driver wrote no report" >&2; tail -n 20 "$tmp/qmp.log" >&2; exit 1; fi
field() { vm_field "$tmp/qemu.json" "$1"; }
status=$(field status); downtime=$(field downtime_ms); total=$(field total_ms); rounds=$(field rounds)
ram_bytes=$(field ram_bytes); disk_bytes=$(field disk_bytes); mirror_ms=$(field mirror_ready_ms); pause_ms=$(field pause_ms)
wire=""; [ -n "$ram_bytes" ] && wire=$((ram_bytes + ${disk_bytes:-0}))
say "QEMU says: $status $(field reason) (source $(field src_status), destination $(field dst_status))"

# The guest's own verdict where the VM now runs (as migrate-vm.sh): a full memory sweep and a full
# disk sweep checked after the migration, the same boot, no FAIL; and the source must stay paused.
if [ "$status" = completed ]; then
  console=$tmp/console-dst.log; where=destination
else
  console=$tmp/console-src.log; where=source
fi
# (|| true: their `$(vm_status_value ...)` fails under pipefail while the console has no status line,
# e.g. after the guest panicked and rebooted; they judge that themselves.)
vm_mark "$console" || true
vm_check_guest "$console" "$boot" 90 || true
vm_last=${vm_last%$'\r'}   # (the serial console's CR)
# A guest kernel that died says why on its console: keep the first lines of it.
panic=$(grep -m4 -E 'BUG:|kernel BUG|corruption|Oops|general protection|RIP:|Kernel panic' "$console" 2>/dev/null | sed 's/^\[ *[0-9.]*\] //' | tr '\n' ';' || true)
[ -n "$panic" ] && [ "$vm_verdict" = ok ] && { vm_verdict=FAIL vm_why="the guest kernel failed"; }
[ -n "$panic" ] && vm_why="$vm_why; console: $panic"
if [ "$status" != completed ]; then
  # Not migrated: a failure whatever the guest says; what it says at the source goes into `why`.
  vm_why="migration $status: $(field reason); the guest at the source: $vm_verdict${vm_why:+ ($vm_why)}"
  vm_verdict=FAIL
elif [ "$vm_verdict" = ok ]; then
  src_pass=$(vm_status_value "$tmp/console-src.log" mem_pass || true)
  dst_first=$(grep -m1 'ferry-guest: status' "$console" | grep -o 'mem_pass=[0-9]*' | cut -d= -f2 || true)
  [ "${dst_first:-0}" -ge "${src_pass:-0}" ] || { vm_verdict=FAIL vm_why="the destination's first pass $dst_first is behind the source's last $src_pass"; }
  src_state=$(timeout 10 python3 scripts/vm/qmp.py status "$tmp/qmp-src.sock" 2>/dev/null || echo "gone")
  case "$src_state" in postmigrate|paused|finish-migrate|gone) ;; *) vm_verdict=FAIL vm_why="the source QEMU is $src_state after the hand-over" ;; esac
fi
[ "$status" = completed ] || where=$(field src_status | grep -q running && echo source || echo "")
result="engine=qemu mode=$mode rate_mbit=$rate rtt_ms=$rtt status=${status:-none} vm=$where downtime_ms=$downtime total_ms=$total wire_bytes=$wire link_bytes=$link_bytes rounds=$rounds state_bytes= ram_bytes=$ram_bytes disk_bytes=$disk_bytes mirror_ms=$mirror_ms pause_ms=$pause_ms mirror=$copy_mode verdict=$vm_verdict"
echo "result $result"
say "guest where it runs now: $vm_last"
[ "$vm_verdict" = ok ] && say "$mode migration $status: downtime ${downtime} ms, total ${total} ms (+ mirror ${mirror_ms} ms), $((link_bytes / 1000000)) MB on the link, $rounds dirty rounds; the guest's own verdict: ok"
[ "$vm_verdict" = ok ] || echo "migrate-qemu: FAIL: $vm_why" >&2
if [ -n "${FERRY_RESULT_JSON:-}" ]; then
  python3 -c "import json,sys; print(json.dumps(dict(kv.split('=',1) for kv in sys.argv[1].split()) | {'why': sys.argv[2], 'guest': sys.argv[3]}))" "$result" "$vm_why" "$vm_last" >> "$FERRY_RESULT_JSON"
fi
[ "$vm_verdict" = ok ]
