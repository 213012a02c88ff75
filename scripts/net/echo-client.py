#!/usr/bin/python3
"""Client of ferry-guest's TCP echo server (echo=PORT): does one connection survive, intact?

  echo-client.py stream HOST PORT [--interval-ms 10] [--duration S | --until-file PATH] [--json OUT]
      One TCP connection (TCP_NODELAY). Every interval one 32-byte message goes out (scheduled at
      start + k*interval; a late loop sends the ones due at once and records how late). A message is
      b"<seq:10 digits>:<20 hex>\\n" where the hex is a hash of (session, seq): a reply that is not
      exactly the next expected message is a loss (a later one came first), a duplicate (an earlier
      one again) or corrupted (bad framing or hash). Sends are non-blocking with a bounded backlog
      in the client (1 MiB): replies that stall never stall the cadence; a backlog that would
      overflow stops new messages (counted as skipped, a FAIL) rather than blocking.
      Ends when S seconds have passed (default 10) or PATH exists; then sends nothing new, flushes
      the backlog and waits up to 5 s for the outstanding replies. Prints a JSON summary (and writes
      it to OUT): sent, received, lost (sent, never answered), duplicated, corrupted, out_of_order,
      reset (+ error), max_gap_ms (longest time between two consecutive replies, the first one
      measured from the start) with max_gap_end_s (monotonic seconds since the start when it ended),
      rtt_ms {p50, p99, max} (from the message's scheduled time to its reply's arrival), verdict.
      Exit 0 only when the verdict is ok: no reset, every message sent answered exactly once, in
      order, uncorrupted, none skipped.
  echo-client.py once HOST PORT [--timeout S]
      A new connection, one message, its exact echo, close. Exit 0 on success; prints the time.

Standard library only; run it where HOST is reachable (e.g. `ip netns exec NAME-cli ...`).
"""
import argparse
import errno
import hashlib
import json
import math
import os
import select
import socket
import sys
import time

MSG = 32
BACKLOG_MAX = 1 << 20
DRAIN_S = 5.0


def message(session, seq):
    h = hashlib.blake2b(b"%s:%d" % (session, seq), digest_size=10).hexdigest().encode()
    return b"%010d:%s\n" % (seq, h)


def parse(session, chunk):
    """The sequence number of a well-formed, uncorrupted message; None otherwise."""
    if len(chunk) != MSG or chunk[10:11] != b":" or chunk[-1:] != b"\n" or not chunk[:10].isdigit():
        return None
    seq = int(chunk[:10])
    return seq if chunk == message(session, seq) else None


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


def connect(host, port, timeout):
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def stream(args):
    interval = args.interval_ms / 1000.0
    session = os.urandom(6).hex().encode()
    t0 = time.monotonic()
    r = {"mode": "stream", "host": args.host, "port": args.port, "interval_ms": args.interval_ms,
         "sent": 0, "received": 0, "lost": 0, "duplicated": 0, "corrupted": 0, "out_of_order": 0,
         "skipped": 0, "unsent": 0, "reset": False, "error": None, "max_gap_ms": None, "max_gap_end_s": None,
         "rtt_ms": {"p50": None, "p99": None, "max": None}, "max_send_late_ms": 0.0, "backlog_max_bytes": 0}
    try:
        sock = connect(args.host, args.port, 5.0)
    except OSError as e:
        r.update(reset=True, error=f"connect: {e}", verdict="FAIL", why=["cannot connect"], ended_s=round(time.monotonic() - t0, 3))
        return r
    sock.setblocking(False)
    t0 = time.monotonic()  # the schedule starts once connected
    sched = {}         # seq -> scheduled time, for messages sent and not yet answered
    answered = set()
    rtts = []
    backlog = bytearray()
    backlog_seqs = []  # (seq, end offset in the stream) of messages still (partly) in backlog
    stream_off = 0     # bytes handed to the kernel so far
    queued_off = 0     # bytes queued (backlog included)
    next_seq = 0       # next message to schedule
    expect = 0         # next reply expected
    rbuf = bytearray()
    last_reply = t0
    max_gap = 0.0
    max_gap_end = None
    stopping_at = None  # when the sending stopped
    sent_upto = 0       # messages whose last byte went to the kernel

    def fail_conn(err):
        r["reset"] = True
        r["error"] = err

    while True:
        now = time.monotonic()
        if stopping_at is None:
            if (args.until_file and os.path.exists(args.until_file)) or \
               (not args.until_file and now - t0 >= args.duration):
                stopping_at = now
        if stopping_at is None:
            # Schedule every message that is due.
            while t0 + next_seq * interval <= now:
                due = t0 + next_seq * interval
                if len(backlog) + MSG > BACKLOG_MAX:
                    r["skipped"] += 1
                else:
                    r["max_send_late_ms"] = max(r["max_send_late_ms"], (now - due) * 1000)
                    backlog += message(session, next_seq)
                    queued_off += MSG
                    backlog_seqs.append((next_seq, queued_off))
                    sched[next_seq] = due
                next_seq += 1
        # Hand the backlog to the kernel without blocking.
        if backlog:
            try:
                n = sock.send(backlog)
                del backlog[:n]
                stream_off += n
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                fail_conn(f"send: {e}")
                break
            r["backlog_max_bytes"] = max(r["backlog_max_bytes"], len(backlog))
            while backlog_seqs and backlog_seqs[0][1] <= stream_off:
                backlog_seqs.pop(0)
                sent_upto += 1
        if stopping_at is not None:
            outstanding = len(sched)
            if outstanding == 0 or now - stopping_at >= DRAIN_S:
                break
            timeout = min(0.05, DRAIN_S - (now - stopping_at))
        else:
            timeout = max(0.0, t0 + next_seq * interval - time.monotonic())
        try:
            rd, wr, _ = select.select([sock], [sock] if backlog else [], [], timeout)
        except InterruptedError:
            continue
        if not rd:
            continue
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as e:
            fail_conn(f"recv: {e}")
            break
        tr = time.monotonic()
        if not data:
            fail_conn("recv: connection closed by the server (EOF)")
            break
        rbuf += data
        while len(rbuf) >= MSG:
            chunk = bytes(rbuf[:MSG])
            seq = parse(session, chunk)
            if seq is None:
                r["corrupted"] += 1
                # Resynchronise on the next newline.
                nl = rbuf.find(b"\n")
                del rbuf[:(nl + 1) if nl >= 0 else len(rbuf)]
                continue
            del rbuf[:MSG]
            if seq in answered:
                r["duplicated"] += 1
                continue
            if seq not in sched:  # never sent (or not by this client)
                r["corrupted"] += 1
                continue
            if seq != expect:  # a later message came first, or an earlier one came late
                r["out_of_order"] += 1
            answered.add(seq)
            rtts.append((tr - sched.pop(seq)) * 1000)
            r["received"] += 1
            gap = tr - last_reply
            if gap > max_gap:
                max_gap, max_gap_end = gap, tr - t0
            last_reply = tr
            expect = max(expect, seq + 1)
    end = time.monotonic()
    try:
        sock.close()
    except OSError:
        pass
    r["sent"] = sent_upto
    r["unsent"] = len(backlog_seqs)
    r["lost"] = len(sched) - r["unsent"]  # sent and never answered
    if rbuf:
        r["corrupted"] += 1  # a partial message at the end
    rtts.sort()
    r["rtt_ms"] = {"p50": rnd(percentile(rtts, 50)), "p99": rnd(percentile(rtts, 99)), "max": rnd(rtts[-1] if rtts else None)}
    r["max_gap_ms"] = rnd(max_gap * 1000)
    r["max_gap_end_s"] = rnd(max_gap_end)
    r["max_send_late_ms"] = rnd(r["max_send_late_ms"])
    r["ended_s"] = rnd(end - t0)
    r["stopped_sending_s"] = rnd((stopping_at or end) - t0)
    why = []
    if r["reset"]:
        why.append("connection failed: " + str(r["error"]))
    for k in ("lost", "duplicated", "corrupted", "out_of_order", "skipped", "unsent"):
        if r[k]:
            why.append(f"{k}={r[k]}")
    if r["sent"] == 0:
        why.append("nothing sent")
    if r["received"] != r["sent"]:
        why.append(f"received {r['received']} of {r['sent']}")
    r["verdict"] = "FAIL" if why else "ok"
    r["why"] = why
    return r


def rnd(v):
    return None if v is None else round(v, 3)


def once(args):
    t0 = time.monotonic()
    r = {"mode": "once", "host": args.host, "port": args.port}
    try:
        sock = connect(args.host, args.port, args.timeout)
        sock.settimeout(max(0.1, args.timeout - (time.monotonic() - t0)))
        msg = message(os.urandom(6).hex().encode(), 0)
        sock.sendall(msg)
        got = b""
        while len(got) < MSG:
            d = sock.recv(MSG - len(got))
            if not d:
                raise OSError(errno.ECONNRESET, "connection closed before the whole echo came back")
            got += d
        sock.close()
        ok = got == msg
        r.update(verdict="ok" if ok else "FAIL", error=None if ok else f"echo differs: {got!r}")
    except (OSError, socket.timeout) as e:
        r.update(verdict="FAIL", error=str(e) or type(e).__name__)
    r["ms"] = rnd((time.monotonic() - t0) * 1000)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("stream")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--interval-ms", type=float, default=10.0)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, default=10.0)
    g.add_argument("--until-file")
    s.add_argument("--json")
    o = sub.add_parser("once")
    o.add_argument("host")
    o.add_argument("port", type=int)
    o.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    if args.mode == "stream":
        if args.interval_ms <= 0:
            ap.error("--interval-ms must be > 0")
        r = stream(args)
        text = json.dumps(r)
        print(text, flush=True)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, args.json)
    else:
        r = once(args)
        if r["verdict"] == "ok":
            print(f"once ok {r['ms']} ms", flush=True)
        else:
            print(f"once FAIL after {r['ms']} ms: {r['error']}", flush=True)
    sys.exit(0 if r["verdict"] == "ok" else 1)


if __name__ == "__main__":
    main()
