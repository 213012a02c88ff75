#!/usr/bin/env bash
# The emulated WAN's delay relay: what it adds to a round trip beyond the delay it is set to, for the compiled
# relay (ferry-delay-relay: C, epoll, timerfd) beside the old Python asyncio one (scripts/wan/delay-relay.py),
# in the same run, on loopback: a 64-byte ping-pong (2000 round trips), idle and while a second connection
# streams bulk data through the same relay at the emulated link's rate (as the agents' bulk stream shares the
# relay with their urgent lane; tc tbf, not the relay, limits the rate on the WAN). The echo server, the bulk
# sender and its sink are processes of their own. Added = RTT through the relay - 2 x DELAY - RTT direct.
# Goal: under 50 us per round trip at the median, under bulk. Exit 0 either way: a benchmark measures.
# Usage: scripts/bench-relay.sh [DELAY_MS] [BULK_MB_PER_S]   (defaults 20 and 25, i.e. 200 Mbit/s;
# builds ferry-delay-relay in release first). Run it on a quiet machine: it measures microseconds.
set -euo pipefail
cd "$(dirname "$0")/.."
delay=${1:-20}
bulk_rate=${2:-25}
swift build -c release --product ferry-delay-relay >/dev/null
relay=$(swift build -c release --show-bin-path)/ferry-delay-relay
exec /usr/bin/python3 - "$relay" "$delay" "$bulk_rate" <<'PY'
import os, socket, statistics, subprocess, sys, threading, time

relay_bin, delay_ms, bulk_rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]) * 1e6

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

# The echo server: its own process (a thread here would share the GIL with the measuring loop). A connection
# whose first byte is 'B' is a bulk sink.
ECHO = r"""
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(64)
def handle(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = c.recv(1, socket.MSG_PEEK)
    while True:
        data = c.recv(1 << 20)
        if not data: break
        if first != b"B": c.sendall(data)
    c.close()
while True:
    threading.Thread(target=handle, args=(l.accept()[0],), daemon=True).start()
"""
# The bulk sender: its own process, paced to RATE bytes/s in 64 KiB writes.
BULK = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); rate = float(sys.argv[2])
chunk = b"B" * (64 << 10); sent = 0; start = time.monotonic()
while True:
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0: time.sleep(ahead)
    s.sendall(chunk); sent += len(chunk)
"""
echo_port = free_port()
echo = subprocess.Popen(["/usr/bin/python3", "-c", ECHO, str(echo_port)])

def connect(port):
    s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); return s

def wait_port(port):
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", port)).close(); return
        except OSError: time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")

def pingpong(port, n):
    s = connect(port); msg = b"p" * 64; rtts = []
    for _ in range(n):
        t0 = time.perf_counter_ns(); s.sendall(msg); got = 0
        while got < 64: got += len(s.recv(64 - got))
        rtts.append((time.perf_counter_ns() - t0) / 1000)
    s.close(); return rtts

def measure(port, loaded, n=2000):
    sender = subprocess.Popen(["/usr/bin/python3", "-c", BULK, str(port), str(bulk_rate)]) if loaded else None
    if sender: time.sleep(0.5)
    try:
        rtts = pingpong(port, n)
    finally:
        if sender: sender.kill(); sender.wait()
    return statistics.median(rtts), sorted(rtts)[int(len(rtts) * 0.99)]

wait_port(echo_port)
direct = measure(echo_port, False)[0]
rows = []
for name, argv in (("Python asyncio relay", ["/usr/bin/python3", "scripts/wan/delay-relay.py"]), ("ferry-delay-relay", [relay_bin])):
    port = free_port()
    proc = subprocess.Popen(argv + ["127.0.0.1", str(port), "127.0.0.1", str(echo_port), str(delay_ms / 2)])
    try:
        wait_port(port)
        for loaded in (False, True):
            p50, p99 = measure(port, loaded)
            rows.append((name, loaded, p50 - delay_ms * 1000 - direct, p99 - delay_ms * 1000 - direct))
    finally:
        proc.kill(); proc.wait()
echo.kill()
print(f"round trip {delay_ms:g} ms set; direct loopback RTT {direct:.1f} us (median); bulk {bulk_rate / 1e6:g} MB/s")
print(f"{'relay':24} {'load':6} {'added p50 us':>13} {'added p99 us':>13}")
for name, loaded, a50, a99 in rows:
    print(f"{name:24} {'bulk' if loaded else 'idle':6} {a50:13.1f} {a99:13.1f}")
ours = [r for r in rows if r[0] == "ferry-delay-relay" and r[1]][0][2]
theirs = [r for r in rows if r[0] != "ferry-delay-relay" and r[1]][0][2]
print(f"under bulk: ferry-delay-relay adds {ours:.1f} us, the Python relay {theirs:.1f} us")
print(f"goal: added under 50 us at the median under bulk, measured {ours:.1f} -> {'met' if ours < 50 else 'BELOW GOAL'}")
PY
