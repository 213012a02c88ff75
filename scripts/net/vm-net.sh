#!/usr/bin/env bash
# The test VM's own network, on top of scripts/wan/wan-link.sh's two namespaces. Needs root.
#
#   vm-net.sh up NAME         after `wan-link.sh up NAME ...` (NAME-src and NAME-dst exist): in EACH of
#                             NAME-src and NAME-dst a bridge fbr (STP off, forward delay 0, no address)
#                             and a tap tapvm on it for that side's QEMU; a third namespace NAME-cli
#                             (the client, on the source's side) whose eth0 is a veth to NAME-src's fbr
#                             (its end there: vcli). Prints, one a line, for `eval`:
#                               vm_ip=10.78.S.10/24  client_ip=10.78.S.2  vm_mac=52:54:00:xx:xx:xx
#                             S is derived from NAME as wan-link.sh derives its 10.77.S.0/24; the MAC
#                             (locally administered) from NAME too: both stable across runs.
#   vm-net.sh down NAME       removes NAME-cli (and its processes), and fbr, tapvm, vcli from NAME-src and
#                             NAME-dst if those still exist. Idempotent.
#   vm-net.sh qemu-args NAME  the QEMU arguments of the guest's NIC, on tapvm: QEMU must run inside the
#                             namespace that holds it (ip netns exec NAME-src|NAME-dst ...).
#   vm-net.sh cli NAME CMD... runs CMD in NAME-cli.
#
# The guest (guest/init) takes the address from ferry.ip=$vm_ip; its echo server from ferry.echo=PORT.
# Only the destination's bridge is empty for now: nothing yet carries the guest's frames across the
# WAN, so after a migration the client reaches no one until something does.
# Touches nothing outside NAME-src, NAME-dst and NAME-cli (the veth is created inside them).
set -euo pipefail
action=${1:?usage: vm-net.sh up|down|qemu-args|cli NAME}
name=${2:?missing NAME}
src="$name-src"; dst="$name-dst"; cli="$name-cli"
# As wan-link.sh: one /24 per link name, here in 10.78 (wan-link's own is 10.77).
sum=$(printf '%s' "$name" | cksum | cut -d' ' -f1)
subnet=$(( sum % 200 + 20 ))
vm_ip="10.78.$subnet.10/24"; client_ip="10.78.$subnet.2"
# 52:54:00 (QEMU's prefix; 0x52 has the locally-administered bit) and three bytes of NAME's hash.
vm_mac=$(printf '%s' "$name" | sha256sum | sed -E 's/^(..)(..)(..).*/52:54:00:\1:\2:\3/')

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

down() {
  if ns_exists "$cli"; then
    local pids
    pids=$(ip netns pids "$cli" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      kill $pids 2>/dev/null || true
      for _ in $(seq 20); do [ -z "$(ip netns pids "$cli" 2>/dev/null)" ] && break; sleep 0.1; done
      pids=$(ip netns pids "$cli" 2>/dev/null || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$cli" 2>/dev/null || true
  fi
  for ns in "$src" "$dst"; do
    ns_exists "$ns" || continue
    for dev in vcli tapvm fbr; do
      ip -n "$ns" link show "$dev" >/dev/null 2>&1 && { ip -n "$ns" link del "$dev" 2>/dev/null || true; }
    done
  done
  return 0
}

quiet_v6() {  # no IPv6 on these links: no router solicitations or DAD frames in the measurements
  ip netns exec "$1" sysctl -qw "net.ipv6.conf.$2.disable_ipv6=1" 2>/dev/null || true
}

case "$action" in
up)
  for ns in "$src" "$dst"; do
    ns_exists "$ns" || { echo "vm-net: namespace $ns does not exist (run wan-link.sh up $name ... first)" >&2; exit 1; }
  done
  down
  for ns in "$src" "$dst"; do
    # forward_delay 0 and no STP: a new port forwards at once (the default would wait 15 s).
    ip -n "$ns" link add fbr type bridge forward_delay 0 stp_state 0
    ip -n "$ns" tuntap add dev tapvm mode tap
    ip -n "$ns" link set tapvm master fbr
    quiet_v6 "$ns" fbr; quiet_v6 "$ns" tapvm
    ip -n "$ns" link set fbr up
    ip -n "$ns" link set tapvm up
  done
  ip netns add "$cli"
  ip -n "$cli" link set lo up
  # Created inside NAME-cli with its peer placed in NAME-src: never in the caller's namespace.
  ip -n "$cli" link add eth0 type veth peer name vcli netns "$src"
  ip -n "$src" link set vcli master fbr
  quiet_v6 "$src" vcli; quiet_v6 "$cli" eth0
  ip -n "$src" link set vcli up
  ip -n "$cli" addr add "$client_ip/24" dev eth0
  ip -n "$cli" link set eth0 up
  echo "vm_ip=$vm_ip"
  echo "client_ip=$client_ip"
  echo "vm_mac=$vm_mac"
  ;;
down) down ;;
qemu-args)
  echo "-netdev tap,id=n0,ifname=tapvm,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=$vm_mac"
  ;;
cli) shift 2; exec ip netns exec "$cli" "$@" ;;
*) echo "vm-net: unknown action $action" >&2; exit 2 ;;
esac
