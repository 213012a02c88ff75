#!/bin/bash
# The test's "VM" on a host of scripts/deploy/test.sh: ferry-workload (64 MiB dirtied at a set
# rate in a verifiable pattern) reading commands from a FIFO, its JSON lines in $D/out.
#   vm-start.sh fresh            start it here (the first host)
#   vm-start.sh resume           dest-agent's --on-switchover: resume it from the migrated memory
#                                ($FERRY_UFFD_SOCKET, $FERRY_LAYOUT_FILE)
set -euo pipefail
D=$(cd "$(dirname "$0")" && pwd)
. "$D/vm.env"   # VM_PIDFILE, VM_MEMORY, VM_RATE, LD_LIBRARY_PATH
export LD_LIBRARY_PATH
[ -p "$D/cmd" ] || mkfifo -m 600 "$D/cmd"
# Something holds the FIFO open for writing, so the workload never reads EOF and commands can be
# written at any time without blocking.
if ! { [ -f "$D/holder.pid" ] && kill -0 "$(cat "$D/holder.pid")" 2>/dev/null; }; then
  setsid sleep 100000 3<>"$D/cmd" </dev/null >/dev/null 2>&1 &
  echo $! > "$D/holder.pid"
fi
rm -f "$D/out"
case "${1:?fresh|resume}" in
  fresh)
    setsid "$D/ferry-workload" --memory "$VM_MEMORY" --dirty-rate "$VM_RATE" --report-interval 0.5 \
      --pidfile "$VM_PIDFILE" <"$D/cmd" >"$D/out" 2>"$D/err" &
    ;;
  resume)
    setsid "$D/ferry-workload" --resume --uffd-socket "$FERRY_UFFD_SOCKET" --layout "$FERRY_LAYOUT_FILE" \
      --dirty-rate "$VM_RATE" --report-interval 0.5 --pidfile "$VM_PIDFILE" <"$D/cmd" >"$D/out" 2>"$D/err" &
    ;;
  *) echo "vm-start.sh: fresh or resume" >&2; exit 2 ;;
esac
echo "vm-start.sh: $1: pid $!"
