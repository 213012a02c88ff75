#!/usr/bin/env python3
"""Timeline sampler for one drill cell: runs inside one of the link's network namespaces.

    ip netns exec NAME-src python3 sample.py --out FILE.jsonl [--iface DEV] [--status URL]
                                            [--interval 0.25] [--seconds MAX]

Every --interval seconds it appends one JSON line to --out:
    {"t": wall-clock seconds, "tx_bytes": N, "rx_bytes": N, "status": {...} or null}
tx/rx_bytes are DEV's counters (/sys/class/net/DEV/statistics: what really crossed the link, headers
included); "status" is the agent's `GET /status` (QEMU query-migrate shape) when --status is given and
the endpoint answers within the interval, else null (the runner then falls back to the agents' final
reports). Stops on SIGTERM/SIGINT, after --seconds, or once DEV has gone (the link was taken down).
"""
import argparse
import json
import signal
import sys
import time
import urllib.request

stop = False


def on_signal(*_):
    global stop
    stop = True


def counter(iface, which):
    try:
        with open(f"/sys/class/net/{iface}/statistics/{which}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def status(url, timeout):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8", "replace"))
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iface")
    ap.add_argument("--status")
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--seconds", type=float, default=3600)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    end = time.monotonic() + a.seconds
    seen_iface = False
    with open(a.out, "a", buffering=1) as out:
        while not stop and time.monotonic() < end:
            t0 = time.monotonic()
            row = {"t": round(time.time(), 3)}
            if a.iface:
                tx, rx = counter(a.iface, "tx_bytes"), counter(a.iface, "rx_bytes")
                if tx is None and seen_iface:
                    break  # the namespace (and its veth) is gone: the cell is over
                seen_iface = seen_iface or tx is not None
                row["tx_bytes"], row["rx_bytes"] = tx, rx
            row["status"] = status(a.status, max(0.05, a.interval * 0.8)) if a.status else None
            out.write(json.dumps(row, separators=(",", ":")) + "\n")
            time.sleep(max(0.0, a.interval - (time.monotonic() - t0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
