#!/usr/bin/env bash
# Whole-VM migration over an emulated WAN: one session (disk + memory under one pause) against
# today's sequence (the disk migrated first, then the memory), on the same link, in the same run.
#
#   scripts/bench-vm-wan.sh [MEM_MIB] [DISK_MIB] [RATE_MBIT] [RTT_MS] [MEM_DIRTY_MBPS]
#
# The "VM" is ferry-workload with MEM_MIB of memory (default 256) dirtying MEM_DIRTY_MBPS MiB/s
# (default 10) and a DISK_MIB disk (default 1024) of random data; the link is RATE_MBIT (default
# 200) with RTT_MS of round trip (default 40) (scripts/wan/wan-link.sh).
#
# 1. Combined: source-agent serves the disk over NBD, the workload mirrors every other page to it
#    (--disk-every 2: the disk is written at half the memory's dirty rate, in its first MEM_MIB/2),
#    and one pre-copy session moves disk and memory with ONE pause. dest-agent starts the resumed
#    workload on its own disk; that workload is then told `rate 0` and `verify` through a FIFO on
#    its stdin and must report "corrupt":0 and "disk_torn":0 (memory and disk of one instant).
# 2. Sequence (today's way): a disk-only migration, then a memory-only one, each with its own agents.
#    The workload cannot write the disk through the source's NBD socket across two agent runs (the
#    disk-only source-agent exits after its migration), so here the workload runs memory-only and
#    fio is the disk's writer during the disk step, at the same rate (half the memory's dirty rate,
#    4 KiB random writes over the same first MEM_MIB/2 of the disk). The sequence pauses the disk at
#    its own switchover and the memory at its own: two pauses, and disk and memory at the
#    destination from different instants, which is exactly what the combined session fixes. Its
#    resumed workload verifies memory only.
#
# Prints a side-by-side table (downtime, total time, wire bytes / (touched memory + disk size),
# completion, digests, the resumed workload's verify), then each goal as "goal: ... measured ... ->
# met" or "-> BELOW GOAL": combined downtime <= the sequence's summed downtime; combined total time
# <= 1.1 x the sequence's; combined wire / data <= the sequence's. A goal missed does not change the
# exit status; a failed or corrupt migration does. Needs root (network namespaces, ptrace,
# userfaultfd). FERRY_SCRATCH=DIR builds into that scratch path.
set -euo pipefail
cd "$(dirname "$0")/.."
mem=${1:-256}; disk_mib=${2:-1024}; rate=${3:-200}; rtt=${4:-40}; dirty=${5:-10}
if [ $((mem / 2)) -gt "$disk_mib" ]; then echo "the disk must hold MEM_MIB/2 = $((mem / 2)) MiB (every other page)" >&2; exit 2; fi
config=${FERRY_BUILD_CONFIG:-release}
scratch=()
[ -n "${FERRY_SCRATCH:-}" ] && scratch=(--scratch-path "$FERRY_SCRATCH")
for product in source-agent dest-agent ferry-workload; do swift build -c "$config" "${scratch[@]}" --product "$product" >/dev/null; done
bin=$(swift build -c "$config" "${scratch[@]}" --show-bin-path)
wan=scripts/wan/wan-link.sh
name=fvm
work=$(mktemp -d /tmp/ferry-bench-vm.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  bash "$wan" down "$name" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
head -c 32 /dev/urandom > "$work/key"; chmod 600 "$work/key"
echo "bench: writing a ${disk_mib} MiB disk image of random data"
head -c $((disk_mib << 20)) /dev/urandom > "$work/base.img"
# The VM-state blob both ways carry (a few bytes: the pause is what is measured, not the blob).
state_cmd='printf "state of %s" $FERRY_PID > "$FERRY_STATE_FILE"'
# The VM's RAM at a fixed address, named to source-agent with --region: its default choice (every
# writable anonymous mapping of at least 1 MiB) would also take the workload's 1 MiB NBD buffer,
# which the resumed workload would then check as RAM (and count as corrupt and torn).
ram_start=0x600000000000
ram_region=$(printf '%x-%x' $((ram_start)) $((ram_start + (mem << 20))))
failed=0

# Waits until FILE has at least N lines matching PATTERN (up to SECONDS); fails otherwise.
wait_lines() {
  local file=$1 pattern=$2 n=$3 seconds=$4 i
  for i in $(seq $((seconds * 10))); do
    [ "$(grep -c -- "$pattern" "$file" 2>/dev/null || true)" -ge "$n" ] && return 0
    sleep 0.1
  done
  return 1
}

# Waits for PID (a child of this shell) up to SECONDS, then SIGTERM, then SIGKILL; its exit status
# goes to $waited (not printed: `wait` needs this shell, not a command substitution's subshell).
wait_pid() {
  local pid=$1 seconds=$2 i
  waited=0
  for i in $(seq $((seconds * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "bench: PID $pid still running after $seconds s, stopping it" >&2
    kill "$pid" 2>/dev/null || true; sleep 5; kill -9 "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || waited=$?
}

# The resumed workload at the destination: it must run on (a report after ready), then stop
# dirtying, verify every page (and, with a disk, every mirrored block) and quit.
verify_resumed() {
  local dir=$1 fd=$2
  if ! wait_lines "$dir/resumed.jsonl" '"event":"ready"' 1 60; then
    echo "bench: the resumed workload never became ready:"; tail -5 "$dir/resumed.jsonl" 2>/dev/null || true; return 1
  fi
  wait_lines "$dir/resumed.jsonl" '"event":"report"' 2 30 || echo "bench: the resumed workload did not report twice"
  echo "rate 0" >&"$fd"
  wait_lines "$dir/resumed.jsonl" '"event":"rate"' 1 30 || true
  echo verify >&"$fd"
  if ! wait_lines "$dir/resumed.jsonl" '"event":"verified"' 1 180; then
    echo "bench: no verify result:"; tail -5 "$dir/resumed.jsonl"; return 1
  fi
  echo quit >&"$fd"
  wait_lines "$dir/resumed.jsonl" '"event":"exit"' 1 30 || echo "bench: the resumed workload did not quit"
}

# --- 1. Combined: one session, disk + memory + state, one pause. ---------------------------------
run_combined() {
  local dir="$work/combined"; mkdir -p "$dir"
  cp "$work/base.img" "$dir/src.img"
  mkfifo "$dir/resumed.in"
  exec {cmd_fd}<>"$dir/resumed.in"
  local relay; relay=$(bash "$wan" up "$name" "$rate" "$rtt" 7281 6281)
  bash "$wan" dst "$name" "$bin/dest-agent" --listen 127.0.0.1:7281 --key-file "$work/key" \
    --disk "$dir/dst.img" --nbd "unix:$dir/dst.sock" --uffd-socket "$dir/uffd.sock" \
    --on-switchover "$bin/ferry-workload --resume --uffd-socket \"\$FERRY_UFFD_SOCKET\" --layout \"\$FERRY_LAYOUT_FILE\" --disk-nbd \"unix:\$FERRY_NBD_SOCKET\" --disk-every 2 --disk-reconnect 30 --dirty-rate ${dirty}M --report-interval 1 < $dir/resumed.in > $dir/resumed.jsonl 2>&1 &" \
    --work-dir "$dir/dest" --report "$dir/dst.json" 2> "$dir/dest.log" &
  local dpid=$!; pids+=("$dpid")
  sleep 0.5
  bash "$wan" src "$name" "$bin/source-agent" --disk "$dir/src.img" --nbd "unix:$dir/src.sock" --vm-pidfile "$dir/vm.pid" \
    --vm-wait 600 --dest "$relay" --key-file "$work/key" --mode precopy --region "$ram_region" --block-size 4096 --state-cmd "$state_cmd" \
    --report "$dir/src.json" --exit-after-migration 2> "$dir/src.log" &
  local spid=$!; pids+=("$spid")
  for _ in $(seq 200); do [ -S "$dir/src.sock" ] && break; sleep 0.05; done
  # The VM: its disk is the source's NBD export; it writes its pidfile once ready (memory filled
  # and every mirrored block written), and the migration starts then.
  "$bin/ferry-workload" --memory "${mem}M" --address "$ram_start" --dirty-rate "${dirty}M" --disk-nbd "unix:$dir/src.sock" --disk-every 2 \
    --pidfile "$dir/vm.pid" --report-interval 1 < /dev/null > "$dir/source.jsonl" 2>&1 &
  local wpid=$!; pids+=("$wpid")
  echo "bench: combined: migrating ${mem} MiB of memory and a ${disk_mib} MiB disk in one session"
  wait_pid "$spid" 1800
  if [ "$waited" -ne 0 ]; then
    echo "bench: combined: source-agent failed (status $waited):"; tail -5 "$dir/src.log"; tail -5 "$dir/dest.log"; failed=1
  elif ! verify_resumed "$dir" "$cmd_fd"; then
    failed=1
  fi
  kill "$dpid" 2>/dev/null || true; wait_pid "$dpid" 30
  kill -9 "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true
  exec {cmd_fd}>&-
  bash "$wan" down "$name" >/dev/null
  rm -f "$dir/src.img" "$dir/dst.img"
}

# --- 2. Sequence: the disk (disk-only agents), then the memory (memory-only agents). ------------
run_sequence() {
  local dir="$work/sequence"; mkdir -p "$dir"
  cp "$work/base.img" "$dir/src.img"
  # The VM's memory, running (and dirtying) through both steps.
  "$bin/ferry-workload" --memory "${mem}M" --address "$ram_start" --dirty-rate "${dirty}M" --report-interval 1 < /dev/null > "$dir/source.jsonl" 2>&1 &
  local wpid=$!; pids+=("$wpid")
  wait_lines "$dir/source.jsonl" '"event":"ready"' 1 120 || { echo "bench: sequence: the workload never became ready"; failed=1; return; }
  sleep 1

  # Step 1: the disk, with fio writing it through the source's NBD server.
  echo "bench: sequence, step 1: migrating the ${disk_mib} MiB disk"
  local relay; relay=$(bash "$wan" up "$name" "$rate" "$rtt" 7282 6282)
  bash "$wan" dst "$name" "$bin/dest-agent" --listen 127.0.0.1:7282 --key-file "$work/key" \
    --disk "$dir/dst.img" --nbd "unix:$dir/dst.sock" --report "$dir/disk-dst.json" --exit-after-migration 2> "$dir/disk-dest.log" &
  local dpid=$!; pids+=("$dpid")
  sleep 0.5
  bash "$wan" src "$name" "$bin/source-agent" --disk "$dir/src.img" --nbd "unix:$dir/src.sock" --dest "$relay" \
    --key-file "$work/key" --block-size 4096 --report "$dir/disk-src.json" --exit-after-migration 2> "$dir/disk-src.log" &
  local spid=$!; pids+=("$spid")
  for _ in $(seq 200); do [ -S "$dir/src.sock" ] && break; sleep 0.05; done
  fio --name=writer --ioengine=nbd --uri="nbd+unix:///?socket=$dir/src.sock" --rw=randwrite --bs=4k \
    --rate=$(( (dirty << 20) / 2 )) --time_based --runtime=600 --size="$((mem / 2))m" --output-format=json \
    > "$dir/fio.json" 2> "$dir/fio.err" &
  local fpid=$!; pids+=("$fpid")
  wait_pid "$spid" 1800
  local status=$waited
  wait_pid "$dpid" 60
  kill "$fpid" 2>/dev/null || true; wait_pid "$fpid" 10
  bash "$wan" down "$name" >/dev/null
  if [ "$status" -ne 0 ]; then
    echo "bench: sequence: disk source-agent failed (status $status):"; tail -5 "$dir/disk-src.log"; tail -5 "$dir/disk-dest.log"; failed=1
    return
  fi
  # The source's image is final (its agent has exited): the destination's must equal it.
  if [ "$(sha256sum < "$dir/src.img")" = "$(sha256sum < "$dir/dst.img")" ]; then echo true > "$dir/images-equal"; else echo false > "$dir/images-equal"; failed=1; fi
  rm -f "$dir/src.img" "$dir/dst.img"

  # Step 2: the memory.
  echo "bench: sequence, step 2: migrating ${mem} MiB of memory"
  mkfifo "$dir/resumed.in"
  exec {cmd_fd}<>"$dir/resumed.in"
  relay=$(bash "$wan" up "$name" "$rate" "$rtt" 7283 6283)
  bash "$wan" dst "$name" "$bin/dest-agent" --listen 127.0.0.1:7283 --key-file "$work/key" --uffd-socket "$dir/uffd.sock" \
    --on-switchover "$bin/ferry-workload --resume --uffd-socket \"\$FERRY_UFFD_SOCKET\" --layout \"\$FERRY_LAYOUT_FILE\" --dirty-rate ${dirty}M --report-interval 1 < $dir/resumed.in > $dir/resumed.jsonl 2>&1 &" \
    --work-dir "$dir/dest" --report "$dir/mem-dst.json" 2> "$dir/mem-dest.log" &
  dpid=$!; pids+=("$dpid")
  sleep 0.5
  status=0
  timeout 1800 bash "$wan" src "$name" "$bin/source-agent" --vm "$wpid" --dest "$relay" --key-file "$work/key" --mode precopy \
    --region "$ram_region" --state-cmd "$state_cmd" --report "$dir/mem-src.json" 2> "$dir/mem-src.log" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "bench: sequence: memory source-agent failed (status $status):"; tail -5 "$dir/mem-src.log"; tail -5 "$dir/mem-dest.log"; failed=1
  elif ! verify_resumed "$dir" "$cmd_fd"; then
    failed=1
  fi
  kill "$dpid" 2>/dev/null || true; wait_pid "$dpid" 30
  kill -9 "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true
  exec {cmd_fd}>&-
  bash "$wan" down "$name" >/dev/null
}

run_combined
run_sequence

status=0
/usr/bin/python3 - "$work" "$mem" "$disk_mib" "$rate" "$rtt" "$dirty" <<'PY' || status=$?
import json, os, sys
work, mem, disk_mib, rate, rtt, dirty = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
def load(path):
    try: return json.load(open(os.path.join(work, path)))
    except (OSError, ValueError): return {}
def verified(path):
    try:
        for line in open(os.path.join(work, path)):
            try: event = json.loads(line)
            except ValueError: continue
            if event.get("event") == "verified": return event
    except OSError: pass
    return {}
def count(path, text):
    try: return open(os.path.join(work, path)).read().count(text)
    except OSError: return 0
c_src, c_dst = load("combined/src.json"), load("combined/dst.json")
d_src, d_dst = load("sequence/disk-src.json"), load("sequence/disk-dst.json")
m_src, m_dst = load("sequence/mem-src.json"), load("sequence/mem-dst.json")
c_ver, m_ver = verified("combined/resumed.jsonl"), verified("sequence/resumed.jsonl")
try: images_equal = open(os.path.join(work, "sequence/images-equal")).read().strip() == "true"
except OSError: images_equal = False

def ok(src, dst): return src.get("status") == "completed" and src.get("digests_agree") is True and dst.get("digests_agree") is True
def num(report, *keys):
    for key in keys: report = (report or {}).get(key, {})
    return float(report) if isinstance(report, (int, float)) else 0.0
c_ok, d_ok, m_ok = ok(c_src, c_dst), ok(d_src, d_dst), ok(m_src, m_dst)
c_verify_ok = c_ver.get("corrupt") == 0 and c_ver.get("disk_torn") == 0
m_verify_ok = m_ver.get("corrupt") == 0

c_down = num(c_src, "downtime_ms")
d_down, m_down = num(d_src, "downtime_ms"), num(m_src, "downtime_ms")
s_down = d_down + m_down
c_total = num(c_src, "total_time_ms") / 1000
d_total, m_total = num(d_src, "total_time_ms") / 1000, num(m_src, "total_time_ms") / 1000
s_total = d_total + m_total
c_data = num(c_src, "memory", "touched") + num(c_src, "disk", "total")
s_data = num(m_src, "memory", "touched") + num(d_src, "disk", "total")
c_wire = num(c_src, "wire_bytes") / c_data if c_data else float("inf")
d_wire, m_wire = num(d_src, "wire_bytes"), num(m_src, "wire_bytes")
s_wire = (d_wire + m_wire) / s_data if s_data else float("inf")
mib = lambda b: int(b) >> 20

print(f"whole-VM migration: {mem} MiB memory dirtying {dirty} MiB/s, {disk_mib} MiB disk written at {float(dirty)/2:g} MiB/s, "
      f"over {rate} Mbit/s, RTT {rtt} ms")
rows = [
    ("", "combined (one session)", "sequence (disk, then memory)"),
    ("status", f"{c_src.get('status', 'no report')}",
     f"disk {d_src.get('status', 'no report')}, memory {m_src.get('status', 'no report')}"),
    ("digests agree", f"{c_src.get('digests_agree')}/{c_dst.get('digests_agree')} (src/dst)",
     f"disk {d_src.get('digests_agree')}/{d_dst.get('digests_agree')}, memory {m_src.get('digests_agree')}/{m_dst.get('digests_agree')}"),
    ("pauses (source log)", f"{count('combined/src.log', 'VM paused')} (disk + memory together)",
     f"2 (disk writes; then the VM: {count('sequence/mem-src.log', 'VM paused')})"),
    ("downtime", f"{c_down:.1f} ms", f"{s_down:.1f} ms (disk {d_down:.1f} + memory {m_down:.1f})"),
    ("total time", f"{c_total:.1f} s", f"{s_total:.1f} s (disk {d_total:.1f} + memory {m_total:.1f})"),
    ("wire / (touched + disk)", f"{c_wire:.3f} ({mib(num(c_src, 'wire_bytes'))} MiB / {mib(c_data)} MiB)",
     f"{s_wire:.3f} ({mib(d_wire)} + {mib(m_wire)} MiB / {mib(s_data)} MiB)"),
    ("memory touched, rounds", f"{mib(num(c_src, 'memory', 'touched'))} MiB, {len(c_src.get('memory', {}).get('pages_per_round', []))} page rounds, "
     f"{c_src.get('disk', {}).get('rounds', '?')} disk rounds",
     f"{mib(num(m_src, 'memory', 'touched'))} MiB, {len(m_src.get('memory', {}).get('pages_per_round', []))} page rounds, "
     f"{d_src.get('disk', {}).get('rounds', '?')} disk rounds"),
    ("disk images equal", "(checked by the resumed verify)", f"{images_equal} (sha256, disk step)"),
    ("resumed verify", f"corrupt {c_ver.get('corrupt')} disk_torn {c_ver.get('disk_torn')} "
     f"({c_ver.get('valid')} valid, {c_ver.get('disk_equal')}/{c_ver.get('disk_blocks')} equal)",
     f"corrupt {m_ver.get('corrupt')} (valid {m_ver.get('valid')}; memory only)"),
]
for label, a, b in rows:
    print(f"  {label:<24} {a:<48} {b}")

def goal(what, target, measured, met):
    print(f"  goal: {what} {target}, measured {measured} -> {'met' if met else 'BELOW GOAL'}")
goal("combined downtime", f"<= sequence's summed downtime {s_down:.1f} ms", f"{c_down:.1f} ms", c_ok and d_ok and m_ok and c_down <= s_down)
goal("combined total time", f"<= 1.1 x sequence's {s_total:.1f} s = {1.1 * s_total:.1f} s", f"{c_total:.1f} s",
     c_ok and d_ok and m_ok and c_total <= 1.1 * s_total)
goal("combined wire / data", f"<= sequence's {s_wire:.3f}", f"{c_wire:.3f}", c_ok and d_ok and m_ok and c_wire <= s_wire)
sys.exit(0 if c_ok and d_ok and m_ok and c_verify_ok and m_verify_ok and images_equal else 1)
PY
[ "$failed" -ne 0 ] && status=1
exit "$status"
