# Shared by the real-VM migration scripts (scripts/migrate-vm.sh: Ferry; scripts/vm/migrate-qemu.sh:
# QEMU's own migration): the guest, its QEMU command line, waiting on its console, its verdict.
# Source it from the repository root.

# vm_guest: builds the test guest if needed; sets $vm_kernel (the uncompressed vmlinux when there:
# it boots in half the time under TCG) and $vm_initrd.
vm_guest() {
  local built
  mapfile -t built < <(bash scripts/guest/build.sh)
  vm_kernel=${built[0]} vm_initrd=${built[1]}
  [ -f "${vm_kernel%/*}/vmlinux" ] && vm_kernel=${vm_kernel%/*}/vmlinux
  return 0
}

# vm_qemu_base NAME MEM_MIB DIRTY_MBS DISK_MBS [APPEND]: prints the QEMU command line both hosts share
# (no RAM backend, disk node, monitor or console: each script adds its own). The guest keeps 64 MiB
# of pages and writes a 16 MiB set of its disk, checking both. APPEND (optional) adds words to the
# kernel command line, e.g. "ferry.ip=10.78.5.10/24 ferry.echo=7777" (no quotes or spaces inside a word).
vm_qemu_base() {
  local args="console=ttyS0 panic=-1 ferry.mem=64 ferry.dirty=$3 ferry.disk=$4 ferry.diskset=16${5:+ $5}"
  printf '%s' "qemu-system-x86_64 -name $1 -accel tcg -m $2 -smp 1 -nodefaults -no-user-config -display none \
-kernel $vm_kernel -initrd $vm_initrd -append '$args' -device virtio-blk-pci,drive=d0"
}

# vm_wait_for SECONDS FILE PATTERN: true once PATTERN appears in FILE.
vm_wait_for() {
  local deadline=$((SECONDS + $1))
  while [ $SECONDS -lt $deadline ]; do grep -q -- "$3" "$2" 2>/dev/null && return 0; sleep 0.2; done
  return 1
}

# vm_field FILE KEY.PATH: a value from a JSON file ('' when absent, or when the file is).
vm_field() {
  python3 -c "import json,sys
try: v=json.load(open(sys.argv[1]))
except (OSError, ValueError): v={}
for k in sys.argv[2].split('.'): v=v.get(k) if isinstance(v,dict) else None
print('' if v is None else v)" "$1" "$2"
}

# vm_link_bytes NAMESPACE DEVICE: bytes sent on that interface so far (frames, headers included).
vm_link_bytes() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/tx_bytes"; }

# vm_status_value CONSOLE KEY: KEY's value in the console's last status line.
vm_status_value() { { grep 'ferry-guest: status' "$1" 2>/dev/null | tail -n 1 | grep -o "$2=[0-9]*" | cut -d= -f2; } || true; }

# vm_mark CONSOLE: sets $vm_verdicts_before and $vm_sweeps_before (what the guest had checked so far).
vm_mark() {
  vm_verdicts_before=$(grep -c "ferry-guest: verdict" "$1" 2>/dev/null || true)
  vm_sweeps_before=$(vm_status_value "$1" disk_sweeps)
  vm_verdicts_before=${vm_verdicts_before:-0} vm_sweeps_before=${vm_sweeps_before:-0}
}

# vm_check_guest CONSOLE BOOT TIMEOUT: after vm_mark, waits (at most TIMEOUT s) until the guest on
# CONSOLE has finished a memory sweep and a disk sweep more, then judges: sets $vm_verdict (ok|FAIL),
# $vm_why and $vm_last (its last status). FAIL on any FAIL line, another boot id (a reboot), no
# status of BOOT, or no new sweep in time.
vm_check_guest() {
  local console=$1 boot=$2 deadline=$((SECONDS + $3)) verdicts sweeps
  while [ $SECONDS -lt $deadline ]; do
    verdicts=$(grep -c "ferry-guest: verdict" "$console" 2>/dev/null || true)
    sweeps=$(vm_status_value "$console" disk_sweeps)
    [ "${verdicts:-0}" -gt "$vm_verdicts_before" ] && [ "${sweeps:-0}" -gt "$vm_sweeps_before" ] && break
    grep -q "FAIL" "$console" 2>/dev/null && break
    sleep 0.5
  done
  vm_verdict=ok vm_why=""
  vm_last=$(grep 'ferry-guest: status' "$console" 2>/dev/null | tail -n 1 | sed 's/.*ferry-guest: status //')
  if grep -q "FAIL" "$console" 2>/dev/null; then vm_verdict=FAIL vm_why=$(grep -m3 "FAIL" "$console" | tr '\n' ' ')
  elif ! grep -q "status boot=$boot" "$console" 2>/dev/null; then vm_verdict=FAIL vm_why="no status of boot $boot where the VM runs (it rebooted or never ran)"
  elif grep 'ferry-guest: status' "$console" | grep -vq "boot=$boot"; then vm_verdict=FAIL vm_why="another boot id appeared: the guest rebooted"
  elif [ "$(grep -c "ferry-guest: verdict" "$console")" -le "$vm_verdicts_before" ]; then vm_verdict=FAIL vm_why="no full memory sweep checked within $3 s"
  elif [ "$(vm_status_value "$console" disk_sweeps)" -le "$vm_sweeps_before" ] 2>/dev/null; then vm_verdict=FAIL vm_why="no full disk sweep checked within $3 s"
  fi
}
