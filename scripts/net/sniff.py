#!/usr/bin/python3
"""Captures every frame on one interface (AF_PACKET, run it inside the interface's namespace) until a
file appears, and counts the frames that carry an echo-client message in the clear
(`NNNNNNNNNN:<20 hex digits>\\n`, scripts/net/echo-client.py).

    sniff.py IFACE STOP_FILE OUT_JSON

Used twice in a migration with --net (scripts/migrate-vm.sh): on the agents' WAN link, where the
tunnelled echo traffic must never show (it travels sealed), and on the client's own port, where it
must (the control that shows the search finds what it looks for)."""
import json, os, re, select, socket, sys, time

iface, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
pattern = re.compile(rb"\d{10}:[0-9a-f]{20}\n")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
s.bind((iface, 0))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
frames = bytes_seen = hits = 0
start = time.monotonic()
while not os.path.exists(stop) and time.monotonic() - start < 900:
    ready, _, _ = select.select([s], [], [], 0.2)
    if not ready:
        continue
    while True:
        try:
            data = s.recv(65535, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        frames += 1
        bytes_seen += len(data)
        if pattern.search(data):
            hits += 1
json.dump({"iface": iface, "frames": frames, "bytes": bytes_seen, "plaintext_frames": hits}, open(out, "w"))
