#!/usr/bin/env bash
# Ferry against QEMU's own live migration, side by side: the same Linux guest (scripts/vm/common.sh)
# migrated over the same emulated WAN by scripts/migrate-vm.sh (Ferry's agents) and by
# scripts/vm/migrate-qemu.sh (QEMU, driven as libvirt's `virsh migrate --live --copy-storage-all`),
# one migration at a time, every rate x mode x engine; then a markdown table.
#
#   scripts/bench-vm-qemu.sh [--rates "1000 300 100"] [--rtt 40] [--modes "precopy postcopy"]
#                            [--engines "ferry qemu qemu-sync"] [--out FILE.jsonl] [-- ARGS...]
#
# Engines: ferry (migrate-vm.sh), qemu (migrate-qemu.sh: libvirt's defaults, the disk mirror in
# background copy-mode), qemu-sync (migrate-qemu.sh --sync-writes: libvirt's
# --copy-storage-synchronous-writes, the mirror in write-blocking mode). With this guest's steady
# disk writes over 40 ms the background mirror seldom becomes READY, so a `qemu` row mostly costs
# the full 300 s limit (status=timeout); `--engines "ferry qemu-sync"` skips them.
# ARGS after `--` go to both scripts (e.g. -- --mem 256 --dirty 8 --disk-rate 2).
# Each migration appends its JSON line to --out (default /tmp/ferry-bench-vm-qemu-DATE.jsonl); a run
# that dies without one gets a row with status=error. A failing row never stops the others; the
# exit status is 0 only if every row's verdict is ok. FERRY_BIN and FERRY_KEEP_LOGS pass through
# (FERRY_BIN unset: migrate-vm.sh builds the agents). Needs root. Takes about a minute a row
# (5 to 7 minutes a `qemu` row).
set -euo pipefail
cd "$(dirname "$0")/.."
rates="1000 300 100" rtt=40 modes="precopy postcopy" engines="ferry qemu qemu-sync" out="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates=$2; shift 2 ;;
    --rtt) rtt=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --engines) engines=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "bench-vm-qemu: unknown argument $1" >&2; exit 2 ;;
  esac
done
for e in $engines; do case "$e" in ferry|qemu|qemu-sync) ;; *) echo "bench-vm-qemu: unknown engine $e (ferry|qemu|qemu-sync)" >&2; exit 2 ;; esac; done
for m in $modes; do case "$m" in precopy|postcopy) ;; *) echo "bench-vm-qemu: unknown mode $m (precopy|postcopy)" >&2; exit 2 ;; esac; done
out=${out:-/tmp/ferry-bench-vm-qemu-$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$out")"; touch "$out"
trap 'echo "bench-vm-qemu: interrupted; results so far in $out" >&2; exit 130' INT TERM

for rate in $rates; do
  for mode in $modes; do
    for engine in $engines; do
      case "$engine" in
        ferry) cmd=(bash scripts/migrate-vm.sh) ;;
        qemu) cmd=(bash scripts/vm/migrate-qemu.sh) ;;
        qemu-sync) cmd=(bash scripts/vm/migrate-qemu.sh --sync-writes) ;;
      esac
      echo "bench-vm-qemu: $engine $mode at $rate Mbit/s, $rtt ms RTT" >&2
      before=$(wc -l < "$out")
      start=$SECONDS rc=0
      FERRY_RESULT_JSON=$out "${cmd[@]}" --mode "$mode" --rate "$rate" --rtt "$rtt" --quiet "${extra[@]}" \
        > "$out.run.log" 2>&1 || rc=$?
      grep '^result ' "$out.run.log" >&2 || tail -n 5 "$out.run.log" >&2
      # Every row gets the engine's name as the table shows it; a run that wrote nothing gets one.
      python3 - "$out" "$before" "$engine" "$mode" "$rate" "$rtt" "$rc" "$((SECONDS - start))" "$out.run.log" <<'PY'
import json, sys
path, before, engine, mode, rate, rtt, rc, secs, log = sys.argv[1:]
lines = open(path).read().splitlines()
head, new = lines[:int(before)], lines[int(before):]
rows = [json.loads(l) for l in new if l.strip()]
if not rows:
    tail = open(log, errors="replace").read().strip().splitlines()[-3:]
    rows = [{"engine": engine, "mode": mode, "rate_mbit": rate, "rtt_ms": rtt, "status": "error", "verdict": "FAIL",
             "why": f"exit {rc} without a result: " + " | ".join(tail)}]
for r in rows:
    r["bench_engine"], r["run_s"] = engine, int(secs)
with open(path, "w") as f:
    f.write("".join(l + "\n" for l in head) + "".join(json.dumps(r) + "\n" for r in rows))
PY
    done
  done
done
rm -f "$out.run.log"

status=0
python3 - "$out" <<'PY' || status=$?
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def engine(r):
    if r.get("bench_engine"): return r["bench_engine"]
    return "qemu-sync" if r.get("engine") == "qemu" and r.get("mirror") == "write-blocking" else r.get("engine", "")
def num(r, k, div=1, fmt="{:.0f}"):
    v = r.get(k, "")
    try: return fmt.format(float(v) / div)
    except (TypeError, ValueError): return ""
print("| rate Mbit/s | mode | engine | status | downtime ms | total s | mirror s | wire MB | link MB | rounds | verdict |")
print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    print(f"| {r.get('rate_mbit', '')} | {r.get('mode', '')} | {engine(r)} | {r.get('status', '')} "
          f"| {num(r, 'downtime_ms')} | {num(r, 'total_ms', 1000, '{:.1f}')} | {num(r, 'mirror_ms', 1000, '{:.1f}')} | {num(r, 'wire_bytes', 1e6)} | {num(r, 'link_bytes', 1e6)} "
          f"| {r.get('rounds', '')} | {r.get('verdict', '')} |")
notes = [r for r in rows if r.get("verdict") != "ok" or r.get("why")]
if notes:
    print()
    for r in notes:
        print(f"- {r.get('rate_mbit')} {r.get('mode')} {engine(r)}: {r.get('status')}, {r.get('verdict')}: {r.get('why', '')[:400]}")
print()
print("QEMU rows: total s is QEMU's RAM migration only; mirror s is the disk mirror's time to READY, before it; wire MB is QEMU's own count "
      "(ram transferred + every byte the mirror processed, the sparse disk's zeroes included); link MB is what crossed the link.")
sys.exit(0 if rows and all(r.get("verdict") == "ok" for r in rows) else 1)
PY
echo "results: $out"
exit "$status"
