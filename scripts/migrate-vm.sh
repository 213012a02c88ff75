#!/usr/bin/env bash
# Migrates a real Linux VM live across an emulated WAN and checks it with its own eyes.
#
#   scripts/migrate-vm.sh [--mode precopy|postcopy|hybrid] [--rate MBIT] [--rtt MS] [--mem MIB]
#                         [--dirty MBS] [--disk-rate MBS] [--kill-dest-before-switchover] [--quiet]
#
# The VM: QEMU (TCG) running Debian's kernel and Ferry's test guest (scripts/guest/build.sh), with
# --mem MiB of RAM (default 256) in a shared memory backend and a 256 MiB disk that source-agent
# serves over NBD (QEMU's own NBD client, export name "vda"). Inside, ferry-guest dirties 64 MiB of
# memory at --dirty MB/s (default 8) and writes its disk at --disk-rate MB/s (default 2), checking
# every page and block it wrote and printing its verdict on the serial console.
#
# The link: scripts/wan/wan-link.sh (two network namespaces, --rate Mbit/s, default 200, and --rtt
# ms, default 40). source-agent runs in the source namespace beside the source QEMU; dest-agent in
# the destination namespace starts the destination QEMU at once (-incoming defer) and, at
# switchover, loads its device state and runs it. The migration starts once the guest has swept its
# memory once; afterwards the destination's console must show the same boot, counters that went on,
# a full memory sweep and a full disk sweep checked there, and no FAIL.
#
# With --kill-dest-before-switchover, dest-agent (and its QEMU) is killed during the bulk copy: the
# source must report the failure, keep the VM running, and the guest must go on, intact.
#
# With --net the guest has a NIC (virtio-net on a tap on bridge fbr at each host, scripts/net/vm-net.sh)
# and a TCP echo server; a client in a third namespace on the source's side exchanges a message every
# 10 ms with it through the whole migration (scripts/net/echo-client.py), the agents carry the VM's
# traffic over their sealed tunnel lane (--vm-bridge), and afterwards: the connection was never
# reset, no message lost, duplicated or corrupted, the longest gap between replies is printed beside
# downtime + 2 RTT, a new connection succeeds, --on-network-moved ran with the VM's address, and a
# capture of the agents' link holds none of the echo messages in the clear (the client's own port, the
# control, does).
#
# Prints one line `result key=value ...` (and the same as JSON in $FERRY_RESULT_JSON if set); exits 0
# only if the guest's verdict holds. FERRY_SOURCE_ARGS and FERRY_DEST_ARGS add agent options. Needs root. FERRY_BIN=DIR takes the agents from DIR (default:
# the debug build, built if needed); FERRY_KEEP_LOGS=DIR keeps logs and consoles there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
mode=precopy rate=200 rtt=40 mem=256 dirty=8 disk_rate=2 kill_dest=0 quiet=0 net=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --rtt) rtt=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --dirty) dirty=$2; shift 2 ;;
    --disk-rate) disk_rate=$2; shift 2 ;;
    --kill-dest-before-switchover) kill_dest=1; shift ;;
    --quiet) quiet=1; shift ;;
    --net) net=1; shift ;;
    *) echo "migrate-vm: unknown argument $1" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" = 1 ] || echo "migrate-vm: $*"; }

if [ -z "${FERRY_BIN:-}" ]; then
  swift build --product source-agent >/dev/null && swift build --product dest-agent >/dev/null
  FERRY_BIN=$(swift build --show-bin-path)
fi
source scripts/vm/common.sh
vm_guest

tmp=$(mktemp -d /tmp/ferry-vm.XXXXXX)
chmod 755 "$tmp"
link="fv$$"
src_ram=/dev/shm/ferry-vm-$$-src
ram_dir=$(mktemp -d /dev/shm/ferry-vm-ram.XXXXXX)   # dest-agent's RAM file: it must be gone once QEMU has it
pids=()
cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
  pkill -9 -f -- "-name ferry-vm-$$ " 2>/dev/null
  [ "$net" = 1 ] && bash scripts/net/vm-net.sh down "$link" >/dev/null 2>&1
  bash scripts/wan/wan-link.sh down "$link" >/dev/null 2>&1
  rm -f "$src_ram" 2>/dev/null; rm -rf "$ram_dir"
  if [ -n "${FERRY_KEEP_LOGS:-}" ]; then mkdir -p "$FERRY_KEEP_LOGS/$link"; cp "$tmp"/*.log "$tmp"/*.json "$FERRY_KEEP_LOGS/$link/" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

head -c 32 /dev/urandom > "$tmp/key"; chmod 600 "$tmp/key"
truncate -s 256M "$tmp/src.img"
dest_port=$((20000 + $$ % 20000)); relay_port=$((dest_port + 1))
relay=$(bash scripts/wan/wan-link.sh up "$link" "$rate" "$rtt" "$dest_port" "$relay_port" | tail -n 1)
say "link $rate Mbit/s, $rtt ms RTT; relay $relay"

# Both QEMUs share everything but RAM file, monitor, disk socket, console and the incoming flag.
echo_port=7777
if [ "$net" = 1 ]; then
  eval "$(bash scripts/net/vm-net.sh up "$link")"   # vm_ip, client_ip, vm_mac
  say "VM network: bridge fbr at each host, VM $vm_ip ($vm_mac), client $client_ip on the source's side"
  qemu_common="$(vm_qemu_base "ferry-vm-$$" "$mem" "$dirty" "$disk_rate" "ferry.ip=$vm_ip ferry.echo=$echo_port") \
$(bash scripts/net/vm-net.sh qemu-args "$link") -machine pc,memory-backend=ram"
  net_source_args="--vm-bridge fbr --tunnel-linger 900"   # until the end of this script
  net_dest_args=(--vm-bridge fbr --on-network-moved "env | grep ^FERRY_ | sort > $tmp/network-moved.env")
else
  qemu_common="$(vm_qemu_base "ferry-vm-$$" "$mem" "$dirty" "$disk_rate") -machine pc,memory-backend=ram"
  net_source_args=""
  net_dest_args=()
fi

# Source: source-agent serves the disk, QEMU runs on it; the migration waits for SIGUSR2.
ip netns exec "$link-src" "$FERRY_BIN/source-agent" --disk "$tmp/src.img" --nbd "unix:$tmp/src.sock" \
  --vmm qemu --qmp "unix:$tmp/qmp-src.sock" --dest "$relay" --key-file "$tmp/key" --mode "$mode" \
  --migrate-on-signal --report "$tmp/src.json" --link-timeout 20 $net_source_args ${FERRY_SOURCE_ARGS:-} > "$tmp/source.log" 2>&1 &
source_pid=$!; pids+=("$source_pid"); disown "$source_pid"   # killed at cleanup, without a "Killed" line
for _ in $(seq 100); do [ -S "$tmp/src.sock" ] && break; sleep 0.05; done
eval "ip netns exec $link-src $qemu_common \
  -object memory-backend-file,id=ram,size=${mem}M,mem-path=$src_ram,share=on \
  -blockdev driver=nbd,server.type=unix,server.path=$tmp/src.sock,export=vda,node-name=d0 \
  -qmp unix:$tmp/qmp-src.sock,server=on,wait=off -serial file:$tmp/console-src.log \
  -daemonize -pidfile $tmp/src.qemu.pid"

for _ in $(seq 100); do [ -s "$tmp/src.qemu.pid" ] && break; sleep 0.05; done
src_qemu_pid=$(cat "$tmp/src.qemu.pid")   # QEMU removes the file when it exits
vm_wait_for 180 "$tmp/console-src.log" "ferry-guest: verdict" || { echo "migrate-vm: the guest never finished a memory sweep at the source" >&2; tail -n 20 "$tmp/console-src.log" >&2; exit 1; }
boot=$(grep -m1 -o 'status boot=[0-9a-f]*' "$tmp/console-src.log" | cut -d= -f2)
say "guest boot=$boot is running at the source: $(grep 'status boot' "$tmp/console-src.log" | tail -n 1 | cut -c14-)"

# Destination: dest-agent starts QEMU as soon as the migration begins.
dest_qemu="exec $qemu_common -S -incoming defer \
  -object memory-backend-file,id=ram,size=\$FERRY_RAM_SIZE,mem-path=\$FERRY_RAM_FILE,share=on \
  -blockdev driver=nbd,server.type=unix,server.path=\$FERRY_NBD_SOCKET,export=vda,node-name=d0 \
  -qmp unix:\$FERRY_QMP_SOCKET,server=on,wait=off -serial file:$tmp/console-dst.log"
ip netns exec "$link-dst" "$FERRY_BIN/dest-agent" --listen "127.0.0.1:$dest_port" --key-file "$tmp/key" \
  --disk "$tmp/dst.img" --nbd "unix:$tmp/dst.sock" --vmm qemu --vm-command "$dest_qemu" --ram-dir "$ram_dir" \
  --work-dir "$tmp/dest-work" --report "$tmp/dst.json" --accept-timeout 120 "${net_dest_args[@]}" ${FERRY_DEST_ARGS:-} > "$tmp/dest.log" 2>&1 &
dest_pid=$!; pids+=("$dest_pid"); disown "$dest_pid"
sleep 0.3
link_before=$(vm_link_bytes "$link-src" "$link-a")
if [ "$net" = 1 ]; then
  vm_wait_for 30 "$tmp/console-src.log" "echo listening" || { echo "migrate-vm: the guest's echo server never came up" >&2; exit 1; }
  # The captures: the agents' link (the tunnel must be sealed) and the client's port (the control).
  ip netns exec "$link-src" python3 scripts/net/sniff.py "$link-a" "$tmp/stop-sniff" "$tmp/sniff-link.json" & pids+=($!)
  ip netns exec "$link-src" python3 scripts/net/sniff.py vcli "$tmp/stop-sniff" "$tmp/sniff-client.json" & pids+=($!)
  bash scripts/net/vm-net.sh cli "$link" python3 scripts/net/echo-client.py stream "${vm_ip%/*}" "$echo_port" \
    --interval-ms 10 --until-file "$tmp/stop-echo" --json "$tmp/echo.json" > "$tmp/echo.log" 2>&1 & echo_pid=$!; pids+=("$echo_pid")
  sleep 1
  retrans_before=$(bash scripts/net/vm-net.sh cli "$link" cat /proc/net/snmp | awk '/^Tcp:/ { n++; if (n == 2) print $13 }')
fi
kill -USR2 "$source_pid"
say "migrating ($mode)"

if [ "$kill_dest" = 1 ]; then
  vm_wait_for 60 "$tmp/dest.log" "QEMU waits for the migration" || { echo "migrate-vm: the destination QEMU never started" >&2; exit 1; }
  sleep 0.5
  grep -q "switchover" "$tmp/dest.log" && { echo "migrate-vm: switchover came before the kill; use a slower --rate" >&2; exit 1; }
  dest_qemu_pid=$(grep -o 'pid=[0-9]*' "$tmp/dest.log" | grep -m1 -o '[0-9]*' || true)
  kill -9 "$dest_pid"; [ -n "$dest_qemu_pid" ] && kill -9 "$dest_qemu_pid" 2>/dev/null || true
  say "killed dest-agent (and its QEMU $dest_qemu_pid) during the bulk copy"
fi

# The source-agent writes its report when the migration ends; after a completed one it exits, after
# a failed one it serves on (the VM still runs here, on its disk).
for _ in $(seq 1200); do [ -s "$tmp/src.json" ] && break; kill -0 "$source_pid" 2>/dev/null || break; sleep 0.25; done
if [ ! -s "$tmp/src.json" ]; then echo "migrate-vm: the migration did not end within 300 s" >&2; tail -n 20 "$tmp/source.log" >&2; exit 1; fi
status=$(vm_field "$tmp/src.json" status); where=$(vm_field "$tmp/src.json" vm_location)
downtime=$(vm_field "$tmp/src.json" downtime_ms); total=$(vm_field "$tmp/src.json" total_time_ms); wire=$(vm_field "$tmp/src.json" wire_bytes)
rounds=$(vm_field "$tmp/src.json" memory.dirty_sync_count); state_bytes=$(vm_field "$tmp/src.json" memory.vm_state_bytes)

link_bytes=$(( $(vm_link_bytes "$link-src" "$link-a") - link_before ))

# The guest's own verdict where the VM now runs: a full memory sweep and a full disk sweep checked
# after the migration, the same boot, no FAIL.
if [ "$kill_dest" = 1 ]; then console=$tmp/console-src.log; else console=$tmp/console-dst.log; fi
vm_mark "$console"
if [ "$kill_dest" = 1 ] && { [ "$status" = completed ] || [ "$where" != source ]; }; then
  vm_verdict=FAIL vm_why="source reports status=$status vm=$where after the destination died"
elif [ "$kill_dest" = 0 ] && [ "$status" != completed ]; then
  vm_verdict=FAIL vm_why="migration $status: $(vm_field "$tmp/src.json" reason)"
else
  vm_check_guest "$console" "$boot" 90
  if [ "$kill_dest" = 0 ] && [ "$vm_verdict" = ok ]; then
    src_pass=$(vm_status_value "$tmp/console-src.log" mem_pass)
    dst_first=$(grep -m1 'ferry-guest: status' "$console" | grep -o 'mem_pass=[0-9]*' | cut -d= -f2)
    [ "${dst_first:-0}" -ge "${src_pass:-0}" ] || { vm_verdict=FAIL vm_why="the destination's first pass $dst_first is behind the source's last $src_pass"; }
    if kill -0 "$src_qemu_pid" 2>/dev/null; then vm_verdict=FAIL vm_why="the source QEMU still runs after the hand-over"; fi
  fi
fi
# The VM's connections: the echo stream ran through the whole migration, a new connection works now.
net_result=""
if [ "$net" = 1 ]; then
  sleep 2
  touch "$tmp/stop-echo"
  echo_status=0; wait "$echo_pid" 2>/dev/null || echo_status=$?
  new_conn=FAIL
  bash scripts/net/vm-net.sh cli "$link" python3 scripts/net/echo-client.py once "${vm_ip%/*}" "$echo_port" --timeout 10 > "$tmp/echo-once.log" 2>&1 && new_conn=ok
  touch "$tmp/stop-sniff"; sleep 0.5
  retrans=$(( $(bash scripts/net/vm-net.sh cli "$link" cat /proc/net/snmp | awk '/^Tcp:/ { n++; if (n == 2) print $13 }') - retrans_before ))
  gap=$(vm_field "$tmp/echo.json" max_gap_ms); echo_verdict=$(vm_field "$tmp/echo.json" verdict)
  goal=$(python3 -c "print(round(float('${downtime:-0}' or 0) + 2 * $rtt, 1))")
  leaks=$(vm_field "$tmp/sniff-link.json" plaintext_frames); control=$(vm_field "$tmp/sniff-client.json" plaintext_frames)
  tunnel_to=$(vm_field "$tmp/src.json" network.tunnel.frames_to_vm); tunnel_from=$(vm_field "$tmp/dst.json" network.tunnel.frames_from_vm)
  say "echo stream: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('sent %d received %d lost %d dup %d reset %s; RTT p50 %.1f p99 %.1f ms; longest gap %.1f ms' % (d['sent'], d['received'], d['lost'], d['duplicated'], d['reset'], d['rtt_ms']['p50'] or 0, d['rtt_ms']['p99'] or 0, d['max_gap_ms']))" "$tmp/echo.json" 2>/dev/null || cat "$tmp/echo.log")"
  say "longest gap between replies ${gap} ms; goal: under downtime + 2 RTT = ${goal} ms; new connection: $new_conn; tunnel frames to the VM $tunnel_to, from it $tunnel_from; the client's TCP retransmitted $retrans segments"
  say "capture of the agents' link: ${leaks:-?} frames with an echo message in the clear (the client's port, the control: ${control:-?})"
  net_result="echo=${echo_verdict:-none} echo_max_gap_ms=$gap gap_goal_ms=$goal new_connection=$new_conn link_plaintext_frames=$leaks control_plaintext_frames=$control tunnel_frames_to_vm=$tunnel_to tunnel_frames_from_vm=$tunnel_from client_retransmits=$retrans"
  if [ "$vm_verdict" = ok ]; then
    if [ "$echo_status" != 0 ] || [ "$echo_verdict" != ok ]; then vm_verdict=FAIL vm_why="the echo connection broke: $(cat "$tmp/echo.log" | tail -n 3)"
    elif [ "$new_conn" != ok ]; then vm_verdict=FAIL vm_why="a new connection to the VM failed: $(tail -n 2 "$tmp/echo-once.log")"
    elif [ "${leaks:-1}" != 0 ]; then vm_verdict=FAIL vm_why="the agents' link carried $leaks frames with echo messages in the clear"
    elif [ "${control:-0}" = 0 ]; then vm_verdict=FAIL vm_why="the capture found no echo message even on the client's port: it proves nothing"
    elif [ "$kill_dest" = 0 ] && ! grep -q "FERRY_VM_ADDRESSES=.*${vm_ip%/*}" "$tmp/network-moved.env" 2>/dev/null; then
      vm_verdict=FAIL vm_why="--on-network-moved did not run with the VM's address"
    elif [ "$kill_dest" = 1 ] && [ -e "$tmp/network-moved.env" ]; then
      vm_verdict=FAIL vm_why="--on-network-moved ran for a migration that failed"
    fi
  fi
fi
# The guest's RAM never outlives QEMU in the tmpfs: dest-agent unlinks its file once QEMU maps it.
if [ "$vm_verdict" = ok ] && [ -n "$(ls -A "$ram_dir")" ]; then
  vm_verdict=FAIL vm_why="dest-agent left its RAM file in the tmpfs: $(ls "$ram_dir")"
fi
result="engine=ferry mode=$mode rate_mbit=$rate rtt_ms=$rtt status=${status:-none} vm=$where downtime_ms=$downtime total_ms=$total wire_bytes=$wire link_bytes=$link_bytes rounds=$rounds state_bytes=$state_bytes $net_result verdict=$vm_verdict"
echo "result $result"
say "guest where it runs now: $vm_last"
[ "$vm_verdict" = ok ] && say "$mode migration $status: downtime ${downtime%.*} ms, total ${total%.*} ms, $((link_bytes / 1000000)) MB on the link, $rounds dirty rounds; the guest's own verdict: ok"
[ "$vm_verdict" = ok ] || echo "migrate-vm: FAIL: $vm_why" >&2
if [ -n "${FERRY_RESULT_JSON:-}" ]; then
  python3 -c "import json,sys; print(json.dumps(dict(kv.split('=',1) for kv in sys.argv[1].split()) | {'why': sys.argv[2], 'guest': sys.argv[3]}))" "$result" "$vm_why" "$vm_last" >> "$FERRY_RESULT_JSON"
fi
# dest-agent serves the destination QEMU's disk until told to stop.
kill -TERM "$dest_pid" 2>/dev/null || true
[ "$vm_verdict" = ok ]
