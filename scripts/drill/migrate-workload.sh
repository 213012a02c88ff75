#!/usr/bin/env bash
# One live migration of ferry-workload (memory and a disk) across the emulated WAN: the drill's cell
# where no QEMU is at hand. The same agents and link as scripts/bench-vm-wan.sh's "combined" run
# (one session: disk + memory + state, one pause) and scripts/bench-memory.sh's modes, for ONE mode
# and with a result line as scripts/migrate-vm.sh prints.
#
#   scripts/drill/migrate-workload.sh [--mode precopy|postcopy|hybrid] [--rate MBIT] [--rtt MS]
#                                     [--mem MIB] [--dirty MBS] [--disk-rate MBS] [--quiet]
#
# The "VM": ferry-workload with --mem MiB (default 64) dirtied at --dirty MB/s (default 8); every
# K-th page it writes is mirrored synchronously to its disk (an NBD export of source-agent), K =
# dirty / disk-rate (so the disk is written at about --disk-rate MB/s; --disk-rate 0: K=64). The
# link: scripts/wan/wan-link.sh NAME=fw$$ (--rate Mbit/s, default 200; --rtt ms, default 40).
# Afterwards the resumed workload at the destination runs on, stops dirtying, verifies every page and
# every mirrored block: the verdict is ok only if the migration completed, both digests agree, and
# the verify found no corrupt page and no torn block.
#
# Prints `result key=value ...` (engine=ferry backend=workload) and appends it as JSON to
# $FERRY_RESULT_JSON if set; exits 0 only if the verdict is ok. FERRY_BIN=DIR (required: this script
# builds nothing), FERRY_SOURCE_ARGS / FERRY_DEST_ARGS add agent options, FERRY_KEEP_LOGS=DIR keeps
# logs, reports and the workload's JSON lines (source.jsonl, resumed.jsonl, start.count: how many
# report lines the source workload had printed when the migration started). Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=precopy rate=200 rtt=40 mem=64 dirty=8 disk_rate=2 quiet=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --rtt) rtt=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --dirty) dirty=$2; shift 2 ;;
    --disk-rate) disk_rate=$2; shift 2 ;;
    --quiet) quiet=1; shift ;;
    *) echo "migrate-workload: unknown argument $1" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" = 1 ] || echo "migrate-workload: $*"; }
bin=${FERRY_BIN:?set FERRY_BIN to the directory of source-agent, dest-agent and ferry-workload}
k=$(/usr/bin/python3 -c "import sys; d, w = float(sys.argv[1]), float(sys.argv[2]); print(64 if w <= 0 else max(1, min(64, round(d / w))))" "$dirty" "$disk_rate")

wan=scripts/wan/wan-link.sh
link="fw$$"
tmp=$(mktemp -d /tmp/ferry-drill-wl.XXXXXX)
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  bash "$wan" down "$link" >/dev/null 2>&1
  if [ -n "${FERRY_KEEP_LOGS:-}" ]; then mkdir -p "$FERRY_KEEP_LOGS/$link"; cp "$tmp"/*.log "$tmp"/*.json "$tmp"/*.jsonl "$tmp"/start.count "$FERRY_KEEP_LOGS/$link/" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_lines() {  # FILE PATTERN N SECONDS
  local i
  for i in $(seq $(($4 * 10))); do [ "$(grep -c -- "$2" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0; sleep 0.1; done
  return 1
}

head -c 32 /dev/urandom > "$tmp/key"; chmod 600 "$tmp/key"
truncate -s "${mem}M" "$tmp/src.img"
ram_start=0x600000000000
ram_region=$(printf '%x-%x' $((ram_start)) $((ram_start + (mem << 20))))
state_cmd='printf "state of %s" $FERRY_PID > "$FERRY_STATE_FILE"'
port=$((20000 + $$ % 20000)); relay_port=$((port + 1))
relay=$(bash "$wan" up "$link" "$rate" "$rtt" "$port" "$relay_port" | tail -n 1)
say "link $rate Mbit/s, $rtt ms RTT; relay $relay; ${mem} MiB dirtied at ${dirty} MB/s, every ${k}th page mirrored to disk"

mkfifo "$tmp/resumed.in"
exec {cmd_fd}<>"$tmp/resumed.in"
bash "$wan" dst "$link" "$bin/dest-agent" --listen "127.0.0.1:$port" --key-file "$tmp/key" \
  --disk "$tmp/dst.img" --nbd "unix:$tmp/dst.sock" --uffd-socket "$tmp/uffd.sock" \
  --on-switchover "$bin/ferry-workload --resume --uffd-socket \"\$FERRY_UFFD_SOCKET\" --layout \"\$FERRY_LAYOUT_FILE\" --disk-nbd \"unix:\$FERRY_NBD_SOCKET\" --disk-every $k --disk-reconnect 30 --dirty-rate ${dirty}M --report-interval 0.5 < $tmp/resumed.in > $tmp/resumed.jsonl 2>&1 &" \
  --work-dir "$tmp/dest" --report "$tmp/dst.json" --accept-timeout 120 ${FERRY_DEST_ARGS:-} > "$tmp/dest.log" 2>&1 &
dest_pid=$!; pids+=("$dest_pid")
bash "$wan" src "$link" "$bin/source-agent" --disk "$tmp/src.img" --nbd "unix:$tmp/src.sock" --vm-pidfile "$tmp/vm.pid" \
  --vm-wait 120 --dest "$relay" --key-file "$tmp/key" --mode "$mode" --region "$ram_region" --block-size 4096 \
  --state-cmd "$state_cmd" --report "$tmp/src.json" --exit-after-migration --link-timeout 20 --migrate-on-signal \
  ${FERRY_SOURCE_ARGS:-} > "$tmp/source.log" 2>&1 &
source_pid=$!; pids+=("$source_pid")
for _ in $(seq 200); do [ -S "$tmp/src.sock" ] && break; sleep 0.05; done
"$bin/ferry-workload" --memory "${mem}M" --address "$ram_start" --dirty-rate "${dirty}M" --disk-nbd "unix:$tmp/src.sock" \
  --disk-every "$k" --pidfile "$tmp/vm.pid" --report-interval 0.5 < /dev/null > "$tmp/source.jsonl" 2>&1 &
wl_pid=$!; pids+=("$wl_pid")
wait_lines "$tmp/source.jsonl" '"event":"ready"' 1 120 || { echo "migrate-workload: the workload never became ready" >&2; tail -n 3 "$tmp/source.jsonl" >&2; exit 1; }
# Its pace before the migration: a few reports, then SIGUSR2 to source-agent (in its namespace).
wait_lines "$tmp/source.jsonl" '"event":"report"' 4 30 || true
grep -c '"event":"report"' "$tmp/source.jsonl" > "$tmp/start.count" || true
link_before=$(ip netns exec "$link-src" cat "/sys/class/net/$link-a/statistics/tx_bytes")
kill -USR2 "$source_pid"   # (wan-link.sh src and ip netns exec both exec: this is source-agent)
say "migrating ($mode)"

status=0
for _ in $(seq 2400); do kill -0 "$source_pid" 2>/dev/null || break; sleep 0.25; done
if kill -0 "$source_pid" 2>/dev/null; then echo "migrate-workload: the migration did not end within 600 s" >&2; tail -n 5 "$tmp/source.log" >&2; exit 1; fi
wait "$source_pid" || status=$?
link_bytes=$(( $(ip netns exec "$link-src" cat "/sys/class/net/$link-a/statistics/tx_bytes") - link_before ))
field() { /usr/bin/python3 -c "import json,sys
try: v=json.load(open(sys.argv[1]))
except (OSError, ValueError): v={}
for k in sys.argv[2].split('.'): v=v.get(k) if isinstance(v,dict) else None
print('' if v is None else v)" "$1" "$2"; }
st=$(field "$tmp/src.json" status); where=$(field "$tmp/src.json" vm_location)
verdict=ok why=""
if [ "$st" != completed ]; then
  verdict=FAIL why="migration ${st:-without a report} (source-agent exit $status): $(field "$tmp/src.json" reason)"
elif [ "$(field "$tmp/src.json" digests_agree)" != True ] || [ "$(field "$tmp/dst.json" digests_agree)" != True ]; then
  verdict=FAIL why="digests disagree (source $(field "$tmp/src.json" digests_agree), destination $(field "$tmp/dst.json" digests_agree))"
else
  # The resumed workload runs on, stops dirtying, checks every page and mirrored block, quits.
  if ! wait_lines "$tmp/resumed.jsonl" '"event":"ready"' 1 60; then verdict=FAIL why="the resumed workload never became ready: $(tail -n 2 "$tmp/resumed.jsonl" 2>/dev/null | tr '\n' ' ')"
  else
    wait_lines "$tmp/resumed.jsonl" '"event":"report"' 4 30 || true
    echo "rate 0" >&"$cmd_fd"; wait_lines "$tmp/resumed.jsonl" '"event":"rate"' 1 30 || true
    echo verify >&"$cmd_fd"
    if ! wait_lines "$tmp/resumed.jsonl" '"event":"verified"' 1 180; then verdict=FAIL why="no verify result from the resumed workload"
    else
      v=$(grep -m1 '"event":"verified"' "$tmp/resumed.jsonl")
      corrupt=$(/usr/bin/python3 -c "import json,sys; print(json.loads(sys.argv[1]).get('corrupt'))" "$v")
      torn=$(/usr/bin/python3 -c "import json,sys; print(json.loads(sys.argv[1]).get('disk_torn'))" "$v")
      [ "$corrupt" = 0 ] && [ "$torn" = 0 ] || { verdict=FAIL why="the resumed workload found $corrupt corrupt pages and $torn torn blocks"; }
    fi
    echo quit >&"$cmd_fd"; wait_lines "$tmp/resumed.jsonl" '"event":"exit"' 1 30 || true
  fi
fi
exec {cmd_fd}>&-
result="engine=ferry backend=workload mode=$mode rate_mbit=$rate rtt_ms=$rtt status=${st:-none} vm=$where downtime_ms=$(field "$tmp/src.json" downtime_ms) total_ms=$(field "$tmp/src.json" total_time_ms) wire_bytes=$(field "$tmp/src.json" wire_bytes) link_bytes=$link_bytes rounds=$(field "$tmp/src.json" memory.dirty_sync_count) state_bytes=$(field "$tmp/src.json" memory.vm_state_bytes) disk_every=$k verdict=$verdict"
echo "result $result"
[ "$verdict" = ok ] || echo "migrate-workload: FAIL: $why" >&2
if [ -n "${FERRY_RESULT_JSON:-}" ]; then
  /usr/bin/python3 -c "import json,sys; print(json.dumps(dict(kv.split('=',1) for kv in sys.argv[1].split()) | {'why': sys.argv[2]}))" "$result" "$why" >> "$FERRY_RESULT_JSON"
fi
[ "$verdict" = ok ]
