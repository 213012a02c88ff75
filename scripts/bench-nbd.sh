#!/usr/bin/env bash
# Benchmark: Ferry's NBD server vs nbdkit (file plugin) vs qemu-nbd, one run, same image.
# Figures: nbdcopy 1 GiB read and write (seconds), fio 4k randread iodepth 1 (median completion
# latency, us), fio 4k randwrite iodepth 32 (IOPS); each with its ratio to nbdkit.
# Usage: scripts/bench-nbd.sh [IMAGE_DIR] (default /dev/shm). Env: RUNTIME (fio seconds, default 10),
# SIZE_MIB (image size, default 1024), SKIP_BUILD=1 to reuse the release build, RUNS (default 1: the
# whole comparison this many times, then the median of each figure and ratio over the runs; the
# machine is noisy), SERVERS (default "ferry nbdkit qemu-nbd"; nbdkit is the reference and is always run).
# Each run also prints the load average before it. Ends with each goal against the figures (the
# medians when RUNS > 1): "goal: ... measured ... -> met" or "-> BELOW GOAL". Exit 0 either way.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(mktemp -d "${1:-/dev/shm}/ferry-bench-nbd.XXXXXX")
RUNTIME=${RUNTIME:-10}
SIZE_MIB=${SIZE_MIB:-1024}
IMG=$DIR/disk.img
SRC=$DIR/source.img
SOCK=$DIR/nbd.sock
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  swift build -c release --scratch-path .build-nbd-release --product ferry-nbd-serve >&2
fi
FERRY=$(swift build -c release --scratch-path .build-nbd-release --show-bin-path)/ferry-nbd-serve

echo "preparing ${SIZE_MIB} MiB images in $DIR" >&2
head -c $((SIZE_MIB << 20)) /dev/urandom > "$SRC"
cp "$SRC" "$IMG"

wait_socket() { for _ in $(seq 200); do [ -S "$SOCK" ] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "server did not come up" >&2; exit 1; }

start_server() {
  rm -f "$SOCK"
  case $1 in
    ferry)   "$FERRY" "$IMG" "unix:$SOCK" >/dev/null & PID=$! ;;
    nbdkit)  nbdkit --foreground -U "$SOCK" file "$IMG" & PID=$! ;;
    qemu-nbd) qemu-nbd -t -k "$SOCK" -f raw --cache=writeback --aio=threads -e 4 "$IMG" & PID=$! ;;
  esac
  wait_socket
}
stop_server() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

seconds() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }

fio_json() { # rw iodepth -> json file
  local out=$DIR/fio.json
  fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$1" --bs=4k --iodepth="$2" \
      --size=$((SIZE_MIB << 20)) --runtime="$RUNTIME" --time_based --randrepeat=0 --norandommap \
      --lat_percentiles=1 --output-format=json --output="$out" >/dev/null 2>&1
  echo "$out"
}

RUNS=${RUNS:-1}
SERVERS=${SERVERS:-"ferry nbdkit qemu-nbd"}
case " $SERVERS " in *" nbdkit "*) ;; *) SERVERS="$SERVERS nbdkit" ;; esac
declare -A READ WRITE LAT TLAT IOPS
ratio() { echo "scale=2; $1 / $2" | bc -l; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
header() { printf "%-10s %14s %8s %14s %8s %16s %8s %16s %8s %14s %8s\n" server "nbdcopy-read" ratio "nbdcopy-write" ratio "rr-qd1-clat-p50" ratio "rr-qd1-lat-p50" ratio "randwrite-qd32" ratio; }
row() { # server read rread write rwrite clat rclat lat rlat iops riops
  printf "%-10s %12.3f s %8s %12.3f s %8s %13.1f us %8s %13.1f us %8s %10.0f IOPS %8s\n" "$@"; }

for run in $(seq "$RUNS"); do
  LOADAVG[$run]=$(cut -d' ' -f1-3 /proc/loadavg)
  for server in $SERVERS; do
    echo "== run $run/$RUNS: $server (load average ${LOADAVG[$run]})" >&2
    start_server $server
    U="nbd+unix:///?socket=$SOCK"
    READ[$server,$run]=$(seconds nbdcopy "$U" null:)
    WRITE[$server,$run]=$(seconds nbdcopy "$SRC" "$U")
    j=$(fio_json randread 1)
    LAT[$server,$run]=$(/usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['jobs'][0]['read']['clat_ns']['percentile']['50.000000']/1000)" "$j")
    # Total latency (submission + completion): with a fast server part of the round trip happens
    # while fio is still submitting, so clat alone understates it.
    TLAT[$server,$run]=$(/usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['jobs'][0]['read']['lat_ns']['percentile']['50.000000']/1000)" "$j")
    j=$(fio_json randwrite 32)
    IOPS[$server,$run]=$(/usr/bin/python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['iops']))" "$j")
    stop_server
  done
  echo
  echo "run $run of $RUNS (load average before: ${LOADAVG[$run]})"
  header
  for server in $SERVERS; do
    row $server \
      "${READ[$server,$run]}" "$(ratio "${READ[$server,$run]}" "${READ[nbdkit,$run]}")" \
      "${WRITE[$server,$run]}" "$(ratio "${WRITE[$server,$run]}" "${WRITE[nbdkit,$run]}")" \
      "${LAT[$server,$run]}" "$(ratio "${LAT[$server,$run]}" "${LAT[nbdkit,$run]}")" \
      "${TLAT[$server,$run]}" "$(ratio "${TLAT[$server,$run]}" "${TLAT[nbdkit,$run]}")" \
      "${IOPS[$server,$run]}" "$(ratio "${IOPS[$server,$run]}" "${IOPS[nbdkit,$run]}")"
  done
done

if [ "$RUNS" -gt 1 ]; then
  # Median over the runs of each figure, and median of the per-run ratios (each ratio compares
  # servers measured minutes apart under the same load, so it is the steadier number).
  echo
  echo "median of $RUNS runs (load averages before each run: $(printf '[%s] ' "${LOADAVG[@]}"))"
  header
  for server in $SERVERS; do
    cols=()
    for metric in READ WRITE LAT TLAT IOPS; do
      declare -n m=$metric
      values=(); ratios=()
      for run in $(seq "$RUNS"); do
        values+=("${m[$server,$run]}")
        ratios+=("$(ratio "${m[$server,$run]}" "${m[nbdkit,$run]}")")
      done
      cols+=("$(median "${values[@]}")" "$(median "${ratios[@]}")")
      unset -n m
    done
    row $server "${cols[@]}"
  done
fi
# The goals, against Ferry's ratios to nbdkit (per run, or their median over the runs).
ferry_ratio() { # METRIC -> Ferry's ratio to nbdkit (median over the runs)
  declare -n m=$1
  local ratios=()
  for run in $(seq "$RUNS"); do ratios+=("$(ratio "${m[ferry,$run]}" "${m[nbdkit,$run]}")"); done
  unset -n m
  median "${ratios[@]}"
}
goal() { # description operator target measured
  awk -v what="$1" -v op="$2" -v t="$3" -v m="$4" 'BEGIN {
    met = (op == ">=" ? m >= t : m <= t)
    printf "goal: %s %s %s, measured %.2f -> %s\n", what, op, t, m, (met ? "met" : "BELOW GOAL") }'
}
echo
case " $SERVERS " in
  *" ferry "*)
    label=$([ "$RUNS" -gt 1 ] && echo "median of $RUNS runs" || echo "one run")
    echo "goals ($label; ratios to nbdkit, time ratios: lower is better)"
    # Issue 15's goals: 1.5x nbdkit's write IOPS at iodepth 32, nbdcopy reading no slower than from nbdkit.
    goal "Ferry randwrite-qd32 IOPS / nbdkit" ">=" 1.5 "$(ferry_ratio IOPS)"
    goal "Ferry nbdcopy 1 GiB read time / nbdkit" "<=" 1.0 "$(ferry_ratio READ)"
    goal "Ferry randread-qd1 p50 latency (submission + completion) / nbdkit" "<=" 1.1 "$(ferry_ratio TLAT)"
    goal "Ferry randread-qd1 p50 completion latency / nbdkit" "<=" 1.1 "$(ferry_ratio LAT)"
    ;;
  *) echo "goals: not compared (SERVERS has no ferry)" ;;
esac
