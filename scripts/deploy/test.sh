#!/usr/bin/env bash
# End-to-end test of deploy/ (Ansible) over real ssh, as root:
#  - two "hosts": network namespaces, each running its own sshd (a throwaway host key and an
#    authorized key made per run) inside its own mount namespace, where private bind mounts over
#    /opt/ferry, /etc/ferry, /var/lib/ferry and /run/ferry give each host its own install, config,
#    key, work and runtime directories;
#  - a management link from the controller (this namespace) to each host for ssh, and an emulated
#    WAN between the hosts for the agents: a veth pair shaped with tc tbf at 200 Mbit/s on both ends;
#    no added delay by default. FERRY_DEPLOY_RTT_MS=N adds N ms of round trip to the agents' traffic
#    with scripts/wan/delay-relay.py (a per-port TCP forwarder, so not for ssh): each host's
#    dest-agent then listens on its loopback and the relay on its WAN address forwards to it;
#  - ansible-playbook install.yml twice (the second must report changed=0), the rendered units
#    checked with systemd-analyze verify and security --offline, the "VM" (ferry-workload) started
#    on host A, migrate.yml moves it to B (the VM runs there and verifies, reports say completed and
#    digests agree), and, as a separate step (FERRY_DEPLOY_BACK=0 skips it), migrates it back.
# Everything is removed at exit, even on failure (the logs are kept on failure, path printed).
#
# Environment: FERRY_BIN_DIR (default .build/debug), FERRY_DEPLOY_MODE (precopy|postcopy|hybrid,
# default precopy), FERRY_DEPLOY_BACK (1: also migrate back; default 1), FERRY_DEPLOY_KEEP=1 keeps
# the work directory, FERRY_DEPLOY_MAX_EXPOSURE (highest systemd-analyze security score, 5.0).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin_dir=${FERRY_BIN_DIR:-$repo/.build/debug}
mode=${FERRY_DEPLOY_MODE:-precopy}
back=${FERRY_DEPLOY_BACK:-1}
max_exposure=${FERRY_DEPLOY_MAX_EXPOSURE:-5.0}
rtt_ms=${FERRY_DEPLOY_RTT_MS:-0}
[ "$(id -u)" = 0 ] || { echo "deploy test: needs root (namespaces, sshd, ptrace)" >&2; exit 2; }
for tool in ansible-playbook sshd ssh ssh-keygen unshare nsenter ip tc systemd-analyze; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "deploy test: missing $tool" >&2; exit 2; }
done
for b in source-agent dest-agent ferry-workload; do
  [ -x "$bin_dir/$b" ] || { echo "deploy test: no $bin_dir/$b (swift build first)" >&2; exit 2; }
done

# One run at a time: runs share the mount points made (and removed) below, and the CPU.
exec 9>/run/lock/ferry-deploy-test.lock
flock -w 600 9 || { echo "deploy test: another run holds /run/lock/ferry-deploy-test.lock" >&2; exit 2; }

start_time=$(date +%s)
T=$(mktemp -d /tmp/ferry-deploy.XXXXXX)
chmod 755 "$T"
tag="fd$$"
nsa="$tag-a"; nsb="$tag-b"
o=$(( $$ % 250 + 1 ))
mgmt_root_a="10.231.$o.1"; mgmt_a="10.231.$o.2"
mgmt_root_b="10.231.$o.5"; mgmt_b="10.231.$o.6"
wan_a="10.232.$o.1"; wan_b="10.232.$o.2"
created_dirs=()
ok=0

log() { printf '[deploy-test %3ss] %s\n' "$(( $(date +%s) - start_time ))" "$*"; }

cleanup() {
  set +e
  for ns in "$nsa" "$nsb"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -TERM 2>/dev/null
  done
  for _ in $(seq 30); do
    [ -z "$(ip netns pids "$nsa" 2>/dev/null)$(ip netns pids "$nsb" 2>/dev/null)" ] && break
    sleep 0.2
  done
  for ns in "$nsa" "$nsb"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  ip link del "$tag-ma" 2>/dev/null; ip link del "$tag-mb" 2>/dev/null
  for d in "${created_dirs[@]}"; do rmdir "$d" 2>/dev/null; done
  if [ "$ok" = 1 ] && [ -z "${FERRY_DEPLOY_KEEP:-}" ]; then
    rm -rf "$T"
  else
    log "work directory kept: $T (logs: $T/*.log, agents: $T/{a,b}/var/log/)"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  log "FAIL: $*"
  for h in a b; do
    for f in "$T/$h"/var/log/*.log; do [ -f "$f" ] && { echo "--- host $h: ${f##*/} (tail)"; tail -n 25 "$f"; }; done
  done
  exit 1
}

# --- Two hosts: network namespaces, management links, the WAN --------------------------------
log "hosts $nsa ($mgmt_a, WAN $wan_a) and $nsb ($mgmt_b, WAN $wan_b)"
ip netns add "$nsa"; ip netns add "$nsb"
ip link add "$tag-ma" type veth peer name mgmt0 netns "$nsa"
ip link add "$tag-mb" type veth peer name mgmt0 netns "$nsb"
ip addr add "$mgmt_root_a/30" dev "$tag-ma"; ip link set "$tag-ma" up
ip addr add "$mgmt_root_b/30" dev "$tag-mb"; ip link set "$tag-mb" up
ip -n "$nsa" addr add "$mgmt_a/30" dev mgmt0
ip -n "$nsb" addr add "$mgmt_b/30" dev mgmt0
ip link add "$tag-wa" netns "$nsa" type veth peer name "$tag-wb" netns "$nsb"
ip -n "$nsa" link set "$tag-wa" name wan0; ip -n "$nsb" link set "$tag-wb" name wan0
ip -n "$nsa" addr add "$wan_a/24" dev wan0; ip -n "$nsb" addr add "$wan_b/24" dev wan0
for ns in "$nsa" "$nsb"; do
  ip -n "$ns" link set lo up; ip -n "$ns" link set mgmt0 up; ip -n "$ns" link set wan0 up
  # 200 Mbit/s each way; the queue holds ~4 ms at that rate.
  ip netns exec "$ns" tc qdisc add dev wan0 root tbf rate 200mbit burst 100000 latency 50ms
done
# The WAN carries traffic (nothing listens on port 9 there: refused, not unreachable) and traffic
# between the hosts goes only over it (no route via the controller).
reach() {  # the link takes a moment to come up: up to 5 s
  for _ in $(seq 50); do
    case "$(timeout 2 ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/9" 2>&1)" in *'Connection refused'*) return 0 ;; esac
    sleep 0.1
  done
  return 1
}
reach "$nsa" "$wan_b" && reach "$nsb" "$wan_a" || fail "the WAN does not carry traffic"
if timeout 5 ip netns exec "$nsa" bash -c "exec 3<>/dev/tcp/$mgmt_b/22" 2>/dev/null; then fail "host a reaches host b's management address"; fi

# --- Private directories per host, mount points ---------------------------------------------
for d in /opt/ferry /etc/ferry /var/lib/ferry /run/ferry; do
  if [ ! -e "$d" ]; then mkdir -p "$d"; created_dirs+=("$d"); fi
done
mkdir -p /run/sshd   # sshd's privilege separation directory (Debian's sshd makes it too; left in place)
for h in a b; do mkdir -p "$T/$h"/{opt,etc,var,run}; chmod 700 "$T/$h"/*; done

# --- sshd per host ----------------------------------------------------------------------------
mkdir -m 700 "$T/ssh"
ssh-keygen -q -t ed25519 -N '' -C ferry-deploy-test -f "$T/ssh/id"
cp "$T/ssh/id.pub" "$T/ssh/authorized_keys"
: > "$T/ssh/known_hosts"
for h in a b; do
  ssh-keygen -q -t ed25519 -N '' -C "host-$h" -f "$T/ssh/host_$h"
  addr=$([ $h = a ] && echo "$mgmt_a" || echo "$mgmt_b")
  echo "$addr $(cut -d' ' -f1,2 "$T/ssh/host_$h.pub")" >> "$T/ssh/known_hosts"
  cat > "$T/ssh/sshd_config_$h" <<CFG
ListenAddress $addr:22
HostKey $T/ssh/host_$h
AuthorizedKeysFile $T/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $T/$h/sshd.pid
Subsystem sftp /usr/lib/openssh/sftp-server
CFG
  /usr/sbin/sshd -t -f "$T/ssh/sshd_config_$h" || fail "sshd config of host $h"
  ns=$([ $h = a ] && echo "$nsa" || echo "$nsb")
  # The host's own mount namespace: private /opt/ferry, /etc/ferry, /var/lib/ferry, /run/ferry.
  ip netns exec "$ns" unshare --mount --propagation private -- /bin/sh -c "
    mount --bind '$T/$h/opt' /opt/ferry && mount --bind '$T/$h/etc' /etc/ferry &&
    mount --bind '$T/$h/var' /var/lib/ferry && mount --bind '$T/$h/run' /run/ferry &&
    exec /usr/sbin/sshd -D -e -f '$T/ssh/sshd_config_$h'" >"$T/sshd-$h.log" 2>&1 &
done
for h in a b; do
  addr=$([ $h = a ] && echo "$mgmt_a" || echo "$mgmt_b")
  for _ in $(seq 50); do timeout 1 bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null && break; sleep 0.1; done
  timeout 10 ssh -i "$T/ssh/id" -o UserKnownHostsFile="$T/ssh/known_hosts" -o StrictHostKeyChecking=yes \
    -o BatchMode=yes -o IdentitiesOnly=yes "root@$addr" true || fail "ssh to host $h ($(cat "$T/sshd-$h.log"))"
done
sshd_a=$(cat "$T/a/sshd.pid"); sshd_b=$(cat "$T/b/sshd.pid")
# Separation where it matters: a file in host a's /etc/ferry is not in host b's.
timeout 10 ssh -i "$T/ssh/id" -o UserKnownHostsFile="$T/ssh/known_hosts" -o BatchMode=yes "root@$mgmt_a" touch /etc/ferry/.host-a
[ -e "$T/a/etc/.host-a" ] && [ ! -e "$T/b/etc/.host-a" ] && [ ! -e /etc/ferry/.host-a ] || fail "hosts do not have private /etc/ferry"
rm -f "$T/a/etc/.host-a"
log "sshd up on both hosts (pids $sshd_a, $sshd_b), private mounts checked"

# --- The controller's side: binaries, inventory ----------------------------------------------
mkdir "$T/bin"
cp "$bin_dir/source-agent" "$bin_dir/dest-agent" "$bin_dir/ferry-workload" "$T/bin/"   # a stable copy
# The Swift runtime of this (debug) build, as one archive the role installs in /opt/ferry/lib.
mkdir "$T/runtime"
ldd "$T/bin/source-agent" "$T/bin/dest-agent" "$T/bin/ferry-workload" | awk '$3 ~ /^\/opt\/swift\// {print $3}' | sort -u | xargs -r cp -t "$T/runtime"
tar -C "$T/runtime" -cf "$T/runtime.tar" $(ls "$T/runtime")
packages='[liburing2, libssl3, libxxhash0]'
/usr/bin/python3 -c 'import apt' 2>/dev/null || { log "WARNING: no python3-apt: the package task is skipped"; packages='[]'; }
{
  echo "ferry_hosts:"
  echo "  hosts:"
  echo "    ferry-a: {ansible_host: $mgmt_a, ferry_agent_migration_address: $wan_a}"
  echo "    ferry-b: {ansible_host: $mgmt_b, ferry_agent_migration_address: $wan_b}"
  echo "  vars:"
  echo "    ansible_user: root"
  echo "    ansible_become: false"
  echo "    ansible_python_interpreter: /usr/bin/python3"
  echo "    ansible_ssh_private_key_file: $T/ssh/id"
  echo "    ansible_ssh_common_args: -o UserKnownHostsFile=$T/ssh/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
  echo "    ferry_agent_binaries_src: $T/bin"
  echo "    ferry_agent_runtime_archive: $T/runtime.tar"
  echo "    ferry_agent_packages: $packages"
  echo "    ferry_agent_key_local_path: $T/controller/ferry.key"
  echo "    ferry_agent_service_manager: none"
  echo "    ferry_agent_unit_dir: /etc/ferry/systemd"
  if [ "$rtt_ms" -gt 0 ]; then
    echo "    ferry_agent_listen_address: 127.0.0.1"
  else
    echo "    ferry_agent_listen_address: '{{ ferry_agent_migration_address }}'"
  fi
  echo "    ferry_agent_log_level: debug"
} > "$T/inventory.yml"
mkdir -m 700 "$T/controller"
export ANSIBLE_CONFIG="$repo/deploy/ansible.cfg" ANSIBLE_SSH_CONTROL_PATH_DIR="$T/cp" ANSIBLE_LOCAL_TEMP="$T/ansible-tmp"
# Task timings in the logs when the ansible package (ansible.posix) is there; not needed otherwise.
if [ -z "${FERRY_DEPLOY_CALLBACKS+set}" ]; then
  FERRY_DEPLOY_CALLBACKS=
  [ -f /usr/lib/python3/dist-packages/ansible_collections/ansible/posix/plugins/callback/profile_tasks.py ] &&
    FERRY_DEPLOY_CALLBACKS=ansible.posix.profile_tasks
fi
export ANSIBLE_CALLBACKS_ENABLED=$FERRY_DEPLOY_CALLBACKS ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_HOST_KEY_CHECKING=True

play() {  # play NAME TIMEOUT PLAYBOOK ARGS...: runs ansible-playbook, log in $T/NAME.log
  local name=$1 limit=$2; shift 2
  log "ansible-playbook $* ($name)"
  if ! timeout "$limit" ansible-playbook -i "$T/inventory.yml" "$@" >"$T/$name.log" 2>&1; then
    grep -E 'fatal|FAILED|failed=|msg' "$T/$name.log" | tail -n 20
    return 1
  fi
  grep -A3 'PLAY RECAP' "$T/$name.log" | sed 's/^/    /'
}

# --- install.yml twice -------------------------------------------------------------------------
play install-1 300 "$repo/deploy/install.yml" || fail "install.yml (first run)"
[ "$(stat -c %a "$T/a/etc/ferry.key")" = 600 ] && [ "$(stat -c %s "$T/a/etc/ferry.key")" = 32 ] || fail "key on host a is not 32 bytes, 0600"
cmp -s "$T/a/etc/ferry.key" "$T/b/etc/ferry.key" && cmp -s "$T/a/etc/ferry.key" "$T/controller/ferry.key" || fail "hosts hold different keys"
key_sum=$(sha256sum < "$T/controller/ferry.key")
play install-2 300 "$repo/deploy/install.yml" || fail "install.yml (second run)"
changed=$(awk '/PLAY RECAP/{r=1} r && /changed=/{sub(/.*changed=/,""); sub(/ .*/,""); s+=$0} END{print s+0}' "$T/install-2.log")
[ "$(sha256sum < "$T/controller/ferry.key")" = "$key_sum" ] && cmp -s "$T/a/etc/ferry.key" "$T/controller/ferry.key" || fail "the key changed on the second run"
log "second install.yml run: changed=$changed"
[ "$changed" = 0 ] || fail "second install.yml run changed $changed task(s): $(grep -E '^changed:' "$T/install-2.log" | head)"

# --- The rendered units: systemd-analyze in host a's mount namespace ----------------------------
in_a() { nsenter -t "$sshd_a" -m -- "$@"; }
mkdir -p "$T/a/etc/systemd-check"
for k in source dest; do
  cp "$T/a/etc/systemd/ferry-$k-agent@.service" "$T/a/etc/systemd-check/ferry-$k-agent@vm1.service"
done
if ! in_a systemd-analyze verify /etc/ferry/systemd-check/ferry-source-agent@vm1.service /etc/ferry/systemd-check/ferry-dest-agent@vm1.service >"$T/verify.log" 2>&1; then
  cat "$T/verify.log"; fail "systemd-analyze verify"
fi
# verify also warns (exit 0) about things it cannot resolve here: show and refuse warnings about our units
if grep -i 'ferry-' "$T/verify.log" | grep -v -i 'not found\|No such file' | grep -q .; then cat "$T/verify.log"; fail "systemd-analyze verify warns"; fi
log "systemd-analyze verify: clean"
for k in source dest; do
  if in_a systemd-analyze security --offline=true "/etc/ferry/systemd-check/ferry-$k-agent@vm1.service" >"$T/security-$k.log" 2>&1 || true; then :; fi
  score=$(grep -o 'Overall exposure level for [^:]*: [0-9.]*' "$T/security-$k.log" | awk '{print $NF}')
  [ -n "$score" ] || { cat "$T/security-$k.log"; fail "no exposure score for the $k unit"; }
  log "systemd-analyze security --offline: $k-agent exposure $score (max $max_exposure)"
  awk -v s="$score" -v m="$max_exposure" 'BEGIN{exit !(s <= m)}' || { cat "$T/security-$k.log"; fail "$k unit exposure $score > $max_exposure"; }
done

# --- Round-trip time on the agents' WAN path (FERRY_DEPLOY_RTT_MS) --------------------------------
if [ "$rtt_ms" -gt 0 ]; then
  for pair in "$nsa:$wan_a" "$nsb:$wan_b"; do
    ip netns exec "${pair%%:*}" setsid /usr/bin/python3 "$repo/scripts/wan/delay-relay.py" "${pair#*:}" 7070 127.0.0.1 7070 \
      "$(awk "BEGIN{print $rtt_ms/2}")" </dev/null >"$T/relay-${pair%%:*}.log" 2>&1 &
  done
  for pair in "$nsa:$wan_a" "$nsb:$wan_b"; do
    for _ in $(seq 50); do timeout 1 ip netns exec "${pair%%:*}" bash -c "exec 3<>/dev/tcp/${pair#*:}/7070" 2>/dev/null && break; sleep 0.1; done
  done
  log "agents' WAN path: +$rtt_ms ms round trip (delay relay on each host's WAN address, port 7070)"
fi

# --- The VM on host a ---------------------------------------------------------------------------
vm_args=(-e ferry_vm=vm1 -e "vm_workload=$T/bin/ferry-workload" -e vm_memory=64M -e vm_rate_bytes=4194304)
play vm-install 120 "$here/vm.yml" -e vm_action=install "${vm_args[@]}" || fail "installing the VM files"
play vm-start 120 "$here/vm.yml" -e vm_action=start -e vm_hosts=ferry-a "${vm_args[@]}" || fail "starting the VM on host a"
vm_pid=$(cat "$T/a/run/vm1.pid")
ip netns pids "$nsa" | grep -qx "$vm_pid" || fail "the VM (pid $vm_pid) is not on host a"
log "the VM runs on host a (pid $vm_pid)"

migrate() {  # migrate FROM TO NAME
  play "$3" 400 "$repo/deploy/migrate.yml" -e ferry_vm=vm1 -e ferry_source_host="$1" -e ferry_dest_host="$2" \
    -e ferry_agent_mode="$mode" -e ferry_agent_max_downtime=0.3 \
    -e '{"ferry_agent_on_switchover": "/var/lib/ferry/testvm/vm-start.sh resume"}'
}

check_reports() {  # check_reports SRC_DIR DST_DIR REQUIRE_WP: the JSON reports agree the VM moved
  /usr/bin/python3 - "$1/var/reports/vm1.source.json" "$2/var/reports/vm1.dest.json" "$3" "$mode" <<'PY'
import json, sys
src, dst = (json.load(open(p)) for p in sys.argv[1:3])
problems = []
if src.get("status") != "completed": problems.append(f"source status {src.get('status')}: {src.get('reason')}")
if src.get("vm_location") != "destination": problems.append(f"source vm_location {src.get('vm_location')}")
if src.get("digests_agree") is not True: problems.append(f"source digests_agree {src.get('digests_agree')}")
if dst.get("status") != "completed": problems.append(f"dest status {dst.get('status')}: {dst.get('reason')}")
if dst.get("digests_agree") is not True: problems.append(f"dest digests_agree {dst.get('digests_agree')}")
mem = src.get("memory", {})
if mem.get("mode") != sys.argv[4]: problems.append(f"memory mode {mem.get('mode')}, asked for {sys.argv[4]}")
tracking = mem.get("tracking_method")
if sys.argv[3] == "1" and not str(tracking).startswith("uffd-wp"):
    problems.append(f"dirty tracking {tracking}, not the kernel's write-protect")
print(f"    report: status {src.get('status')}/{dst.get('status')}, vm_location {src.get('vm_location')}, "
      f"digests_agree {dst.get('digests_agree')}, mode {mem.get('mode')}, tracking {tracking}, "
      f"downtime {src.get('downtime_ms', 0):.0f} ms (expected {src.get('expected_downtime_ms', 0):.0f}), "
      f"total {src.get('total_time_ms', 0):.0f} ms, {src.get('mbps', 0):.0f} Mbit/s, pages/round {mem.get('pages_per_round')}")
sys.exit("; ".join(problems) if problems else 0)
PY
}

check_vm_on() {  # check_vm_on HOST NS DIR
  play "check-$1" 240 "$here/vm.yml" -e vm_action=check -e vm_hosts="ferry-$1" "${vm_args[@]}" || fail "the VM on host $1 does not verify: $(grep VM_CHECK "$T/check-$1.log")"
  grep -o 'VM_CHECK.*' "$T/check-$1.log" | head -c 600; echo
  local pid; pid=$(cat "$3/run/vm1.pid")
  ip netns pids "$2" | grep -qx "$pid" || fail "the VM (pid $pid) does not run in host $1's namespace"
  log "the VM runs on host $1 (pid $pid) and verifies"
}

# --- A -> B -------------------------------------------------------------------------------------
migrate ferry-a ferry-b migrate-ab || fail "migrate.yml a -> b"
# Pre-copy rounds (precopy, hybrid) must use the kernel's write-protect tracking on the fresh VM.
require_wp=${FERRY_DEPLOY_REQUIRE_WP:-$([ "$mode" = postcopy ] && echo 0 || echo 1)}
check_reports "$T/a" "$T/b" "$require_wp" || fail "reports of a -> b"
check_vm_on b "$nsb" "$T/b"
# The VM never runs again at the source: its old process is gone or stopped.
if [ -r "/proc/$vm_pid/stat" ]; then
  old_state=$(awk '{print $3}' "/proc/$vm_pid/stat")
  log "the VM's old process on host a (pid $vm_pid): state $old_state"
  [ "$old_state" = T ] || [ "$old_state" = Z ] || fail "the VM's old process on host a still runs (state $old_state)"
else
  log "the VM's old process on host a (pid $vm_pid) is gone"
fi
# The agents run with the runtime the role installed (ferry-exec's LD_LIBRARY_PATH).
dest_pid=$(cat "$T/b/var/log/dest-vm1.pid")
grep -q ' /opt/ferry/lib/libswiftCore.so$' "/proc/$dest_pid/maps" || fail "dest-agent on host b does not use /opt/ferry/lib"
# Nothing but the source reached dest-agent (migrate.yml waits for its port without connecting).
if grep 'refused a connection' "$T/b/var/log/dest-vm1.log"; then fail "dest-agent on host b refused a stray connection"; fi

# --- B -> A (separately switchable: FERRY_DEPLOY_BACK=0) ------------------------------------------
if [ "$back" = 1 ]; then
  log "BACK-MIGRATION b -> a"
  if ! migrate ferry-b ferry-a migrate-ba; then
    echo "--- source-agent on host b (the back-migration's source):"
    grep -iE 'error|fail|userfaultfd|write-protect|register' "$T/b/var/log/source-vm1.log" | tail -n 15
    fail "BACK-MIGRATION b -> a (migrate.yml)"
  fi
  check_reports "$T/b" "$T/a" 0 || fail "BACK-MIGRATION: reports of b -> a"
  # PRODUCT LIMITATION (not worked around here): the resumed workload at b keeps its own
  # userfaultfd (MISSING mode) registered on its memory, so b's source-agent cannot register
  # write-protect tracking on it (EBUSY) and falls back to content hashing.
  if grep -q 'kernel dirty tracking unavailable' "$T/b/var/log/source-vm1.log"; then
    log "BACK-MIGRATION: PRODUCT LIMITATION: source-agent on host b fell back to content hashing:"
    grep 'kernel dirty tracking unavailable' "$T/b/var/log/source-vm1.log" | head -n 1 | sed 's/^/    /'
  fi
  check_vm_on a "$nsa" "$T/a"
else
  log "back-migration skipped (FERRY_DEPLOY_BACK=0)"
fi

ok=1
log "PASS in $(( $(date +%s) - start_time ))s (mode $mode, rtt +$rtt_ms ms, back-migration $([ "$back" = 1 ] && echo yes || echo skipped))"
