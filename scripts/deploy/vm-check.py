#!/usr/bin/python3
"""Checks the test's "VM" (vm-start.sh) on this host: it runs, it ran on here (reports), and its
memory verifies (no corrupt page, every page valid or untouched). Then it dirties again.
Prints one JSON line; exit status 1 on any failure."""
import json, os, sys, time

D = os.path.dirname(os.path.abspath(__file__))
env = dict(line.strip().split("=", 1) for line in open(os.path.join(D, "vm.env")) if "=" in line)
pages = int(env["VM_MEMORY"].rstrip("M")) * 256
rate = int(env["VM_RATE_BYTES"])


def events():
    try:
        with open(os.path.join(D, "out")) as f:
            return [json.loads(l) for l in f if l.startswith("{")]
    except (OSError, ValueError):
        return []


def wait(event, after=0, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [e for e in events() if e.get("event") == event]
        if len(found) > after:
            return found[after]
        time.sleep(0.1)
    fail(f"no {event!r} line (after {after}) within {timeout}s")


def fail(why):
    print(json.dumps({"ok": False, "why": why, "last": events()[-3:]}))
    sys.exit(1)


def send(line):
    with open(os.path.join(D, "cmd"), "w") as f:
        f.write(line + "\n")


pid = int(open(env["VM_PIDFILE"]).read())
try:
    os.kill(pid, 0)
except OSError:
    fail(f"the VM (pid {pid}) does not run here")
state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
wait("ready")
before = len([e for e in events() if e.get("event") == "report"])
wait("report", after=before + 1, timeout=30)          # it runs on: new reports
rates = len([e for e in events() if e.get("event") == "rate"])
send("rate 0")
wait("rate", after=rates)
send("verify")
v = wait("verified", timeout=120)
send(f"rate {rate}")
problems = []
if v.get("corrupt") != 0:
    problems.append("corrupt pages")
if v.get("interrupted_writes", 0) not in (0, 1):
    problems.append("more than one interrupted write")
if v.get("valid", -1) + v.get("untouched", -1) != pages:
    problems.append(f"valid + untouched != {pages}")
print(json.dumps({"ok": not problems, "problems": problems, "pid": pid, "state": state, "verified": v}))
sys.exit(1 if problems else 0)
