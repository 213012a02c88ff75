#!/usr/bin/env bash
# Self-check of Ferry's test guest: boots it under QEMU (TCG) with its RAM in a shared /dev/shm
# file and a zeroed raw disk, and proves its checks both pass and fail:
#   1. clean run: status lines make progress, a memory sweep ends in `verdict ok`, failures=0;
#   2. memory, changed from the host through the RAM file: one page made stale (older pass in its
#      header) and one page made partly stale (half its words from the previous pass): two
#      `FAIL stale-page`;
#   3. disk, changed from the host in the image file: an older record replayed (lost-write), a
#      torn record (new head, old tail: torn-write), a valid record with a newer step
#      (disk-newer-than-memory), another block's record (corrupt-block), zeroes (lost-write);
#   4. afterwards: failures= equals the faults injected (each caught exactly once, no false
#      positives), `verdict FAIL`, one boot id throughout.
# Prints what it saw (boot time, the guest's achieved memory and disk rates). Exits 0 only if all
# checks hold. Usage: [FERRY_GUEST_KERNEL=vmlinux] bash scripts/guest/smoke.sh
# (needs what scripts/guest/build.sh needs, and python3).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mapfile -t built < <(bash "$here/build.sh")
[ "${#built[@]}" -eq 2 ] || { echo "smoke: build.sh did not print two paths" >&2; exit 1; }
kernel=${built[0]} initrd=${built[1]}
# FERRY_GUEST_KERNEL=vmlinux boots the decompressed kernel build.sh leaves next to vmlinuz (PVH
# entry: ~5 s sooner under TCG).
if [ "${FERRY_GUEST_KERNEL:-vmlinuz}" = vmlinux ]; then kernel=$(dirname "$kernel")/vmlinux; fi
[ -f "$kernel" ] || { echo "smoke: no kernel $kernel" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ferry-guest-smoke.XXXXXX")
ram=/dev/shm/ferry-guest-smoke-$$
qpid=""
cleanup() {
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
  fi
  rm -f "$ram"
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

disk=$tmp/disk.img
truncate -s 256M "$disk"
# cache=none opens the image with O_DIRECT: fall back on writeback where the file system refuses it.
cache=none
dd if=/dev/zero of="$tmp/odirect-probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null || cache=writeback
rm -f "$tmp/odirect-probe"

mem_mib=16 dirty=8 disk_mbs=2 diskset=4
console=$tmp/console.log
launched=$(date +%s.%N)
# timeout bounds QEMU even if this script is killed without running its trap.
timeout --kill-after=5 300 qemu-system-x86_64 -accel tcg -machine pc,memory-backend=ram -m 256 \
  -object memory-backend-file,id=ram,size=256M,mem-path="$ram",share=on \
  -smp 1 -nodefaults -no-user-config -display none -serial file:"$console" \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 ferry.mem=$mem_mib ferry.dirty=$dirty ferry.disk=$disk_mbs ferry.diskset=$diskset" \
  -drive file="$disk",format=raw,if=none,id=d0,cache=$cache -device virtio-blk-pci,drive=d0 \
  -no-reboot 2>"$tmp/qemu.err" &
qpid=$!
echo "smoke: QEMU pid $qpid, disk cache=$cache, kernel $kernel, RAM file $ram, console $console"

status=0
python3 - "$console" "$ram" "$disk" "$qpid" "$launched" "$diskset" <<'EOF' || status=$?
import mmap, os, re, struct, sys, time

console, ram_path, disk_path, qpid, launched, diskset = sys.argv[1:]
qpid, launched, nblocks = int(qpid), float(launched), int(diskset) * 256
M = (1 << 64) - 1
WEYL = 0x9E3779B97F4A7C15
PAGE_MAGIC = 0x3145474150595246   # "FRYPAGE1"
BLOCK_MAGIC = 0x31304B4C42595246  # "FRYBLK01"
ok = True

def mix64(x):
    x ^= x >> 30; x = (x * 0xBF58476D1CE4E5B9) & M
    x ^= x >> 27; x = (x * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)

def seed_of(boot, index, gen):  # as ferry-guest.c
    return mix64((mix64(((boot * WEYL) & M) ^ index) + gen * 0xD1B54A32D192ED03) & M)

def words(seed, n):
    return [(seed + (j + 1) * WEYL) & M for j in range(n)]

def record(boot, block, step):  # a valid record, as ferry-guest.c writes it
    payload = words(seed_of(boot, block, step), 506)
    h = 0xCBF29CE484222325
    for w in payload:
        h = ((h ^ w) * 0x100000001B3) & M
    return struct.pack("<5Q", BLOCK_MAGIC, boot, block, step, mix64(h)) + struct.pack("<506Q", *payload) + struct.pack("<Q", step)

def say(msg):
    print(f"smoke: {msg}", flush=True)

def check(cond, msg):
    global ok
    say(("PASS " if cond else "FAIL ") + msg)
    ok = ok and bool(cond)
    return cond

def lines():
    with open(console, "rb") as f:
        data = f.read().decode("utf-8", "replace")
    return [l.rstrip("\r") for l in data.split("\n")[:-1]]  # complete lines only

STATUS = re.compile(r"^ferry-guest: status boot=([0-9a-f]{8}) uptime_ms=(\d+) mem_pass=(\d+) mem_pages_checked=(\d+) "
                    r"disk_step=(\d+) disk_blocks_checked=(\d+) disk_sweeps=(\d+) failures=(\d+)$")

def statuses(ls):
    out = []
    for l in ls:
        m = STATUS.match(l)
        if m:
            out.append(dict(zip("boot uptime mem_pass pages disk_step blocks sweeps failures".split(),
                                [m.group(1)] + [int(g) for g in m.groups()[1:]])))
    return out

def fails(ls):
    return [l for l in ls if l.startswith("ferry-guest: FAIL ")]

def wait_for(pred, timeout, what):
    """Polls the console until pred(lines) is truthy; returns its value, or None after timeout."""
    end = time.time() + timeout
    while True:
        ls = lines()
        v = pred(ls)
        if v:
            return v
        if time.time() > end:
            say(f"timed out after {timeout:.0f} s waiting for {what}")
            return None
        try:
            os.kill(qpid, 0)
        except ProcessLookupError:
            say(f"QEMU exited while waiting for {what}")
            return None
        time.sleep(0.1)

def rates(a, b, label):
    dt = (b["uptime"] - a["uptime"]) / 1000
    mem = (b["pages"] - a["pages"]) * 4096 / 1e6 / dt
    dsk = (b["blocks"] - a["blocks"]) * 4096 / 1e6 / dt
    say(f"rates {label}: memory {mem:.2f} MB/s, disk {dsk:.2f} MB/s over {dt:.1f} s of guest time")
    return mem, dsk

def tail():
    say("last console lines:")
    for l in lines()[-25:]:
        print("    " + l)

def finish():
    if not ok:
        tail()
    say("RESULT " + ("all checks passed" if ok else "some checks FAILED"))
    sys.exit(0 if ok else 1)

# ---------------------------------------------------------------- 1. clean run
start = wait_for(lambda ls: [l for l in ls if l.startswith("ferry-guest: start ")], 90, "the start line")
if not check(start, "guest started"):
    finish()
t_start = time.time() - launched
boot = int(re.search(r"boot=([0-9a-f]{8})", start[0]).group(1), 16)
say(f"start line after {t_start:.1f} s: {start[0]}")
first = wait_for(lambda ls: statuses(ls), 30, "the first status line")
if not check(first, "first status line"):
    finish()
say(f"first status line after {time.time() - launched:.1f} s of host time (guest uptime_ms={first[0]['uptime']})")

def clean(ls):
    st = statuses(ls)
    verdicts = [l for l in ls if l.startswith("ferry-guest: verdict ")]
    if len(st) >= 4 and verdicts and any(" verdict ok " in v for v in verdicts):
        return ls
    return None
ls = wait_for(clean, 60, "4 status lines and a verdict line")
if not check(ls, "status lines and a verdict line appeared"):
    finish()
st = statuses(ls)
verdicts = [l for l in ls if l.startswith("ferry-guest: verdict ")]
check(all(s["failures"] == 0 for s in st) and not fails(ls), "clean run: failures=0 and no FAIL line")
check(all(" verdict ok " in v for v in verdicts), f"clean run: verdict ok ({verdicts[0]})")
check(all(b["pages"] > a["pages"] and b["disk_step"] > a["disk_step"] for a, b in zip(st, st[1:])),
      f"clean run: memory and disk counters grow in every one of {len(st)} status lines")
check(st[-1]["sweeps"] >= 1, f"clean run: a full disk sweep (disk_sweeps={st[-1]['sweeps']})")
rates(st[0], st[-1], "clean run")

# ---------------------------------------------------------------- 2. memory
fd = os.open(ram_path, os.O_RDWR)
ram = mmap.mmap(fd, 0)
needle = struct.pack("<QQ", PAGE_MAGIC, boot)
offsets = {}  # page index -> its offsets in the RAM file (guest physical addresses)
pos = ram.find(needle)
while pos >= 0:
    if pos % 4096 == 0:
        index = struct.unpack_from("<Q", ram, pos + 16)[0]
        offsets.setdefault(index, []).append(pos)
    pos = ram.find(needle, pos + 8)
npages = 16 * 256
unique = {i: o[0] for i, o in offsets.items() if len(o) == 1}
check(len(offsets) == npages, f"memory: found {len(offsets)} of the guest's {npages} pages in the RAM file "
      f"({npages - len(unique)} with stale copies elsewhere, e.g. left by the guest kernel moving pages)")

def page_pass(i):
    return struct.unpack_from("<Q", ram, unique[i] + 24)[0]

def pick(i):  # the nearest uniquely found page at or after i
    for d in range(npages):
        if (i + d) % npages in unique:
            return (i + d) % npages
    raise SystemExit("no uniquely found page")

# The sweeper's cursor: pages before it hold pass p+1, pages after it pass p. Target pages half a
# sweep away from it, so the guest is nowhere near them when they are changed.
passes = {i: page_pass(i) for i in unique}
top = max(passes.values())
behind = [i for i, p in passes.items() if p == top]
cursor = (max(behind) + 1) % npages if len(behind) < len(passes) else 0
t1 = pick((cursor + npages // 2) % npages)
t2 = pick((t1 + 64) % npages)
q1, q2 = page_pass(t1), page_pass(t2)
struct.pack_into("<Q", ram, unique[t1] + 24, q1 - 1)  # the whole page one pass old
old = words(seed_of(boot, t2, q2 - 1), 508)
struct.pack_into("<254Q", ram, unique[t2] + 32 + 254 * 8, *old[254:])  # its second half one pass old
say(f"memory: cursor near page {cursor}; page {t1} (pass {q1}) set to pass {q1 - 1}; "
    f"page {t2} (pass {q2}): words 254..507 replaced by pass {q2 - 1}'s")

def mem_fails(ls):
    f = [l for l in fails(ls) if "FAIL stale-page" in l]
    a = [l for l in f if f" page={t1} " in l]
    b = [l for l in f if f" page={t2} " in l]
    return (a, b) if a and b else None
got = wait_for(mem_fails, 20, "the two stale-page failures")
if got:
    say("  guest: " + got[0][0]); say("  guest: " + got[1][0])
check(got and f"found_pass={q1 - 1} " in got[0][0], f"memory: stale page {t1} reported as FAIL stale-page")
check(got and "partly" in got[1][0] and f"which_matches_pass={q2 - 1} " in got[1][0],
      f"memory: partly stale page {t2} reported as FAIL stale-page (partly, words of pass {q2 - 1})")

# ---------------------------------------------------------------- 3. disk
dfd = os.open(disk_path, os.O_RDWR)

def rd(b):
    return os.pread(dfd, 4096, b * 4096)

def wr(b, data):
    os.pwrite(dfd, data, b * 4096)
    os.fsync(dfd)

def step_of(data):
    magic, rboot, block, step = struct.unpack_from("<4Q", data)
    return step if magic == BLOCK_MAGIC and rboot == boot else None

steps = [step_of(rd(b)) for b in range(nblocks)]
check(all(steps), f"disk: every block of the {nblocks}-block set holds a record of this boot")
cursor = (max(range(nblocks), key=lambda b: steps[b] or 0) + 1) % nblocks
targets = [(cursor + nblocks // 2 + 8 * k) % nblocks for k in range(5)]
before = {b: rd(b) for b in targets}
# Wait until the guest has just rewritten every target: it comes back to them a sweep later.
end = time.time() + 20
while time.time() < end and any(step_of(rd(b)) == step_of(before[b]) for b in targets):
    time.sleep(0.01)
after = {b: rd(b) for b in targets}
if not check(all(step_of(after[b]) != step_of(before[b]) for b in targets), "disk: the guest rewrote the target blocks"):
    finish()
b_replay, b_torn, b_newer, b_other, b_zero = targets
expected = {b: step_of(after[b]) for b in targets}
wr(b_replay, before[b_replay])                                   # an older record: a lost write
wr(b_torn, after[b_torn][:2048] + before[b_torn][2048:])         # new head, old tail: a torn write
wr(b_newer, record(boot, b_newer, expected[b_newer] + nblocks))  # a valid record from the future
wr(b_other, after[b_replay])                                     # another block's record
wr(b_zero, bytes(4096))                                          # zeroes: a lost write
say(f"disk: cursor near block {cursor}; changed blocks replay={b_replay} (step {step_of(before[b_replay])} "
    f"for {expected[b_replay]}) torn={b_torn} newer={b_newer} (step {expected[b_newer] + nblocks}) "
    f"other={b_other} (block {b_replay}'s record) zero={b_zero}")
want = {b_replay: "lost-write", b_torn: "torn-write", b_newer: "disk-newer-than-memory",
        b_other: "corrupt-block", b_zero: "lost-write"}

def disk_fails(ls):
    found = {}
    for l in fails(ls):
        for b, kind in want.items():
            if f"FAIL {kind} " in l and f" block={b} " in l:
                found[b] = l
    return found if len(found) == len(want) else None
got = wait_for(disk_fails, 20, "the five disk failures") or {}
for b, kind in want.items():
    if b in got:
        say("  guest: " + got[b])
    check(b in got, f"disk: block {b} reported as FAIL {kind}")

# ---------------------------------------------------------------- 4. afterwards
injected = 2 + len(want)
def settled(ls):
    st = statuses(ls)
    v = [l for l in ls if l.startswith("ferry-guest: verdict FAIL ")]
    return ls if st and st[-1]["failures"] >= injected and v else None
ls = wait_for(settled, 15, "a status line counting the failures and a verdict FAIL line") or lines()
st = statuses(ls)
all_fails = fails(ls)
check(st and st[-1]["failures"] == injected and len(all_fails) == injected,
      f"each of the {injected} injected faults caught exactly once (failures={st[-1]['failures'] if st else '?'}, "
      f"{len(all_fails)} FAIL lines)")
v = [l for l in ls if l.startswith("ferry-guest: verdict FAIL ")]
check(v, "the verdict turned FAIL" + (f" ({v[-1]})" if v else ""))
boots = {s["boot"] for s in st}
check(boots == {f"{boot:08x}"} and sum(l.startswith("ferry-guest: start ") for l in ls) == 1,
      "one boot id throughout, no reboot")
rates(st[0], st[-1], "whole run")
say(f"host time since QEMU started: {time.time() - launched:.1f} s")
finish()
EOF
if [ "$status" -ne 0 ] && [ -s "$tmp/qemu.err" ]; then
  echo "smoke: QEMU's stderr:"; sed 's/^/    /' "$tmp/qemu.err"
fi
exit "$status"
