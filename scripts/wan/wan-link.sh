#!/usr/bin/env bash
# An emulated WAN on one machine: two network namespaces joined by a veth pair, bandwidth shaped
# with tc tbf on both ends, and round-trip time added by a userspace relay (this kernel has no
# netem): ferry-delay-relay, built with the agents. Only the agents' traffic crosses it. Needs root.
#
#   wan-link.sh up NAME RATE_MBIT RTT_MS TARGET_PORT RELAY_PORT
#       creates namespaces NAME-src (10.77.X.1) and NAME-dst (10.77.X.2); inside NAME-dst a relay
#       listens on 10.77.X.2:RELAY_PORT and forwards to 127.0.0.1:TARGET_PORT after RTT/2 each way.
#       Prints the relay's address.
#   FERRY_WAN_PRIORITY_BANDS=1 adds a priority FIFO inside the bucket (SO_PRIORITY 6 goes first).
#   wan-link.sh down NAME          removes both namespaces and the relay.
#   wan-link.sh cut NAME [SECONDS] drops the link: kills the relay (every connection through it is
#       closed, as a middlebox or a peer's crash would), waits SECONDS (default 2; nothing can connect
#       meanwhile), then starts the relay again with the same delay. For drills (scripts/drill/).
#   wan-link.sh src NAME CMD...    runs CMD in the source namespace.
#   wan-link.sh dst NAME CMD...    runs CMD in the destination namespace.
#   wan-link.sh relay-bin          prints the delay relay's path (for another relay beside this one).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
action=${1:?usage: wan-link.sh up|down|src|dst NAME ... | relay-bin}
# The delay relay: ferry-delay-relay (Sources/FerryDelayRelay, C: epoll and a timerfd): $FERRY_DELAY_RELAY, else
# $FERRY_BIN's, else the newer of this checkout's release and debug builds.
delay_relay() {
  local found=${FERRY_DELAY_RELAY:-}
  if [ -z "$found" ] && [ -n "${FERRY_BIN:-}" ] && [ -x "$FERRY_BIN/ferry-delay-relay" ]; then found=$FERRY_BIN/ferry-delay-relay; fi
  if [ -z "$found" ]; then
    local candidate
    for candidate in "$here/../../.build/release/ferry-delay-relay" "$here/../../.build/debug/ferry-delay-relay"; do
      [ -x "$candidate" ] && { [ -z "$found" ] || [ "$candidate" -nt "$found" ]; } && found=$candidate
    done
  fi
  [ -n "$found" ] && [ -x "$found" ] || { echo "wan-link.sh: ferry-delay-relay is not built (swift build --product ferry-delay-relay)" >&2; exit 1; }
  echo "$found"
}

if [ "$action" = relay-bin ]; then delay_relay; exit 0; fi
name=${2:?missing NAME}
src="$name-src"; dst="$name-dst"
# A /24 per link name, so several links can coexist.
subnet=$(( $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 200 + 20 ))
src_ip="10.77.$subnet.1"; dst_ip="10.77.$subnet.2"
pidfile="/run/ferry-wan-$name.relay.pid"
argsfile="/run/ferry-wan-$name.relay.args"

# start_relay: the delay relay in NAME-dst, with the arguments (and the relay binary) `up` saved in $argsfile.
start_relay() {
  local r_ip r_port r_target r_delay r_bin
  read -r r_ip r_port r_target r_delay r_bin < "$argsfile"
  # The relay outlives this script: it must hold none of the caller's descriptors (a caller that
  # waits for a pipe or a status descriptor to close would wait for ever), so close all above 2.
  (
    for fd in $(ls /proc/$BASHPID/fd); do [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null; done
    exec ip netns exec "$dst" setsid "$r_bin" "$r_ip" "$r_port" 127.0.0.1 "$r_target" "$r_delay" </dev/null >/dev/null 2>&1
  ) &
  echo $! > "$pidfile"
}

case "$action" in
up)
  rate=${3:?missing RATE_MBIT}; rtt=${4:?missing RTT_MS}; target=${5:?missing TARGET_PORT}; relay=${6:?missing RELAY_PORT}
  "$0" down "$name" 2>/dev/null || true
  relay_bin=$(delay_relay)
  ip netns add "$src"; ip netns add "$dst"
  ip link add "$name-a" type veth peer name "$name-b"
  ip link set "$name-a" netns "$src"; ip link set "$name-b" netns "$dst"
  ip -n "$src" addr add "$src_ip/24" dev "$name-a"; ip -n "$dst" addr add "$dst_ip/24" dev "$name-b"
  for ns in "$src" "$dst"; do ip -n "$ns" link set lo up; done
  ip -n "$src" link set "$name-a" up; ip -n "$dst" link set "$name-b" up
  # Bandwidth: a token bucket on both ends. Its queue holds one bandwidth-delay product plus some.
  burst=$(( rate * 1000000 / 8 / 250 )); [ "$burst" -lt 32768 ] && burst=32768
  for pair in "$src:$name-a" "$dst:$name-b"; do
    ip netns exec "${pair%%:*}" tc qdisc add dev "${pair#*:}" root tbf rate "${rate}mbit" burst "$burst" latency 200ms
  done
  # Opt-in (FERRY_WAN_PRIORITY_BANDS=1): a 3-band priority FIFO inside the token bucket, so packets
  # of sockets with SO_PRIORITY 6 (the agents' urgent lane) leave before queued bulk packets, as on a
  # WAN with an expedited class. Without it the bucket's single FIFO is shared.
  if [ "${FERRY_WAN_PRIORITY_BANDS:-0}" = 1 ]; then
    for pair in "$src:$name-a" "$dst:$name-b"; do
      ip netns exec "${pair%%:*}" tc qdisc replace dev "${pair#*:}" root handle 1: tbf rate "${rate}mbit" burst "$burst" latency 200ms
      ip netns exec "${pair%%:*}" tc qdisc add dev "${pair#*:}" parent 1:1 pfifo_fast
    done
  fi
  echo "$dst_ip $relay $target $(awk "BEGIN{print $rtt/2}") $relay_bin" > "$argsfile"
  start_relay
  for _ in $(seq 50); do ip netns exec "$dst" bash -c "exec 3<>/dev/tcp/$dst_ip/$relay" 2>/dev/null && break; sleep 0.1; done
  echo "$dst_ip:$relay"
  ;;
down)
  if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  rm -f "$argsfile"
  ip netns pids "$dst" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns pids "$src" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$src" 2>/dev/null || true
  ip netns del "$dst" 2>/dev/null || true
  ;;
cut)
  seconds=${3:-2}
  [ -f "$pidfile" ] && [ -f "$argsfile" ] || { echo "wan-link: no link $name is up" >&2; exit 1; }
  read -r r_ip r_port _ < "$argsfile"
  relay_pid=$(cat "$pidfile")
  kill "$relay_pid"
  for _ in $(seq 50); do kill -0 "$relay_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$relay_pid" 2>/dev/null || true
  sleep "$seconds"
  start_relay
  for _ in $(seq 50); do ip netns exec "$dst" bash -c "exec 3<>/dev/tcp/$r_ip/$r_port" 2>/dev/null && break; sleep 0.1; done
  echo "cut $name for $seconds s; relay $r_ip:$r_port again"
  ;;
src) shift 2; exec ip netns exec "$src" "$@" ;;
dst) shift 2; exec ip netns exec "$dst" "$@" ;;
*) echo "unknown action $action" >&2; exit 2 ;;
esac
