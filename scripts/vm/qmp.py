#!/usr/bin/env python3
"""QMP driving for scripts/vm/migrate-qemu.sh: QEMU's own live migration with storage, the way
libvirt does `virsh migrate --live --copy-storage-all [--postcopy]` (stdlib only).

  qmp.py migrate --src SOCK --dst SOCK --mode precopy|postcopy --uri tcp:HOST:PORT
                 --nbd-listen HOST:PORT --nbd-connect HOST:PORT --report FILE [--timeout S]
                 [--copy-mode background|write-blocking]
  qmp.py status SOCK        prints the VM's run state (query-status), e.g. `running` or `postmigrate`

`migrate` (libvirt's sequence, src/qemu/qemu_migration.c):
  destination  migrate-set-capabilities events, late-block-activate (+ postcopy-ram);
               nbd-server-start on --nbd-listen; block-export-add of node d0 (writable, name d0)
  source       blockdev-add an nbd client node of that export (through --nbd-connect, the second
               delay relay); blockdev-mirror d0 -> it, sync full, copy-mode background (libvirt's
               default) or write-blocking (`virsh migrate --copy-storage-synchronous-writes`: each
               guest write waits for the destination); wait for BLOCK_JOB_READY
  source       migrate-set-capabilities events, pause-before-switchover (+ postcopy-ram);
               max-bandwidth unlimited (libvirt's default; QEMU's own is 32 MiB/s); migrate --uri
  postcopy     migrate-start-postcopy once the first pass is over (dirty-sync-count >= 2, as
               `virsh migrate --postcopy-after-precopy` does on the second MIGRATION_PASS)
  at pre-switchover (the source VM is stopped): block-job-cancel the READY mirror (it copies what
               is still dirty, then ends: the destination's disk is the source's), migrate-continue
  destination  when the source reports postcopy-active (postcopy) or completed (precopy; then also
               the destination's own incoming status): nbd-server-stop, cont; then wait until it
               runs; the source's nbd node is deleted after the cont (its round trip stays out of
               the downtime)
  A migration not completed within --timeout s of the mirror's start is cancelled (migrate_cancel,
  the mirror force-cancelled) and reported as status "timeout"; "failed" is a result too.

The report (JSON): status, reason, downtime_ms, total_ms, setup_ms (QEMU's), rounds (ram
dirty-sync-count), ram_bytes (ram transferred), disk_bytes (the mirror job's offset: QEMU counts every
byte it processed, zero ranges included), mirror_ready_ms, src_status, dst_status, the last
query-migrate and the QMP events with their times. Everything sent and received is logged on stderr.
"""
import argparse
import json
import os
import select
import socket
import sys
import time

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:8.3f}] {msg}", file=sys.stderr, flush=True)


class QMPError(Exception):
    pass


class QMP:
    """One QMP connection: commands and their answers; events are kept in self.events."""

    def __init__(self, path, name, timeout=30):
        self.name = name
        self.events = []
        self.buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        greeting = self._read(timeout)
        log(f"{name} < {json.dumps(greeting)}")
        self.cmd("qmp_capabilities")

    def _read(self, timeout):
        """The next message, or None after timeout seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QMPError(f"{self.name}: QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _event(self, msg):
        msg["t"] = round(time.monotonic() - T0, 3)
        self.events.append(msg)
        log(f"{self.name} event {msg['event']} {json.dumps(msg.get('data', {}))}")

    def cmd(self, command, quiet=False, timeout=60, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        if not quiet:
            log(f"{self.name} > {json.dumps(msg)}")
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(timeout)
            if reply is None:
                raise QMPError(f"{self.name}: no answer to {command} in {timeout} s")
            if "event" in reply:
                self._event(reply)
                continue
            if "error" in reply:
                log(f"{self.name} < error {json.dumps(reply['error'])}")
                raise QMPError(f"{self.name}: {command}: {reply['error'].get('desc')}")
            if not quiet:
                log(f"{self.name} < {json.dumps(reply.get('return'))}")
            return reply.get("return")

    def wait_event(self, timeout, wake=()):
        """Reads events for at most timeout seconds, or until one named in `wake` arrives; returns
        those that arrived."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return got
            if "event" in msg:
                self._event(msg)
                got.append(msg)
                if msg["event"] in wake:
                    return got
            if time.monotonic() >= deadline:
                return got


def job_end(events, job):
    """The event that ended block job `job` (a BLOCK_JOB_COMPLETED or _CANCELLED), if any."""
    for e in events:
        if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and e.get("data", {}).get("device") == job:
            return e
    return None


def host_port(text):
    host, port = text.rsplit(":", 1)
    return host, port


def migrate(a):
    report = {"status": "failed", "reason": "", "mode": a.mode}
    src = QMP(a.src, "src")
    dst = QMP(a.dst, "dst")
    job, target = "mirror-d0", "mig-d0"
    start = time.monotonic()
    deadline = start + a.timeout
    last = {}
    mirror_offset = None
    try:
        # Destination: capabilities first (before the source connects), then the disk's export.
        dcaps = ["events", "late-block-activate"] + (["postcopy-ram"] if a.mode == "postcopy" else [])
        dst.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in dcaps])
        host, port = host_port(a.nbd_listen)
        dst.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": host, "port": port}})
        dst.cmd("block-export-add", type="nbd", id="d0", **{"node-name": "d0"}, writable=True, name="d0")

        # Source: mirror the disk into that export, through the shaped link, until READY.
        host, port = host_port(a.nbd_connect)
        src.cmd("blockdev-add", driver="nbd", **{"node-name": target}, server={"type": "inet", "host": host, "port": port}, export="d0")
        src.cmd("blockdev-mirror", **{"job-id": job, "copy-mode": a.copy_mode}, device="d0", target=target, sync="full")
        ready = None
        next_note = time.monotonic() + 5
        while ready is None and time.monotonic() < deadline:
            if time.monotonic() >= next_note:
                next_note += 5
                src.cmd("query-block-jobs")
            for e in src.wait_event(0.5, wake=("BLOCK_JOB_READY",)):
                if e["event"] == "BLOCK_JOB_READY" and e["data"].get("device") == job:
                    ready = e
            if job_end(src.events, job):
                raise QMPError(f"the mirror ended before it was ready: {json.dumps(job_end(src.events, job).get('data'))}")
        if ready is None:
            report["status"], report["reason"] = "timeout", f"the disk mirror was not ready within {a.timeout} s"
            src.cmd("block-job-cancel", device=job, force=True)
            return report
        report["mirror_ready_ms"] = round((time.monotonic() - start) * 1000)
        log(f"mirror ready after {report['mirror_ready_ms']} ms: {json.dumps(ready['data'])}")

        # Source: RAM.
        scaps = ["events", "pause-before-switchover"] + (["postcopy-ram"] if a.mode == "postcopy" else [])
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in scaps])
        # libvirt sets max-bandwidth to its QEMU_DOMAIN_MIG_BANDWIDTH_MAX (INT64_MAX / 2^20 MiB/s)
        # unless told otherwise; QEMU's own default would cap the migration at 32 MiB/s.
        src.cmd("migrate-set-parameters", **{"max-bandwidth": (2**63 - 1) // 2**20 * 2**20})
        src.cmd("query-migrate-parameters")
        src.cmd("migrate", uri=a.uri)
        postcopy_asked = switched = dst_started = False
        while True:
            # QEMU's MIGRATION and MIGRATION_PASS events wake us at once (libvirt reacts to them too):
            # the pause at pre-switchover is part of the downtime.
            src.wait_event(0.1, wake=("MIGRATION", "MIGRATION_PASS"))
            last = src.cmd("query-migrate", quiet=True)
            status = last.get("status")
            ram = last.get("ram", {})
            if a.mode == "postcopy" and not postcopy_asked and status == "active" and ram.get("dirty-sync-count", 0) >= 2:
                log(f"first pass over (dirty-sync-count {ram.get('dirty-sync-count')}, {ram.get('transferred')} bytes): migrate-start-postcopy")
                src.cmd("migrate-start-postcopy")
                postcopy_asked = True
            if status == "pre-switchover" and not switched:
                # The source VM is stopped: finish the mirror (a READY mirror cancelled without force
                # copies what is still dirty, then ends), then let QEMU switch over.
                log(f"pre-switchover: {json.dumps(last)}")
                src.cmd("block-job-cancel", device=job)
                end_by = time.monotonic() + 120
                while job_end(src.events, job) is None and time.monotonic() < end_by:
                    jobs = src.cmd("query-block-jobs", quiet=True)
                    for j in jobs:
                        if j.get("device") == job:
                            mirror_offset = j.get("offset")
                    if not jobs:
                        break
                    src.wait_event(0.05)
                end = job_end(src.events, job)
                if end is None and src.cmd("query-block-jobs", quiet=True):
                    raise QMPError("the mirror did not finish within 120 s of block-job-cancel")
                if end is not None:
                    mirror_offset = end["data"].get("offset", mirror_offset)
                    if end["data"].get("error"):
                        raise QMPError(f"the mirror ended with an error: {end['data']['error']}")
                report["mirror_event"] = end["event"] if end else "gone"
                # Its nbd node goes once the destination runs: deleting it (closing the NBD
                # connection) costs a round trip that need not fall in the downtime.
                src.cmd("migrate-continue", state="pre-switchover")
                switched = True
            if status in ("postcopy-active", "completed") and switched and not dst_started:
                if status == "completed":
                    # As libvirt's Finish: the destination must have loaded everything first (without
                    # a return path the source's "completed" means only "all sent").
                    end_by = time.monotonic() + 60
                    while dst.cmd("query-migrate", quiet=True).get("status") not in ("completed", "failed") and time.monotonic() < end_by:
                        dst.wait_event(0.05)
                    incoming = dst.cmd("query-migrate")
                    if incoming.get("status") != "completed":
                        raise QMPError(f"the destination's incoming migration is {incoming.get('status')}: {incoming.get('error-desc', '')}")
                dst.cmd("nbd-server-stop")
                dst.cmd("cont")
                dst_started = True
                src.cmd("blockdev-del", **{"node-name": target})
            if status in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                report["status"], report["reason"] = "timeout", f"not completed within {a.timeout} s (status {status})"
                if (status or "").startswith("postcopy"):
                    # Post-copy cannot be undone: the VM already runs at the destination, its memory
                    # split between the hosts. It is left to finish (or fail) as it is.
                    log(f"not completed within {a.timeout} s ({status}); post-copy is not cancelled")
                    report["reason"] += "; post-copy cannot be cancelled: the VM is split between the hosts"
                    break
                log(f"not completed within {a.timeout} s ({status}): migrate_cancel")
                src.cmd("migrate_cancel")
                end_by = time.monotonic() + 30
                while time.monotonic() < end_by:
                    last = src.cmd("query-migrate", quiet=True)
                    if last.get("status") not in ("active", "cancelling", "pre-switchover", "device"):
                        break
                    src.wait_event(0.2)
                if not switched and job_end(src.events, job) is None:
                    try:
                        src.cmd("block-job-cancel", device=job, force=True)
                    except QMPError:
                        pass
                break
        if last.get("status") == "completed":
            # QEMU sets "completed" a moment before it fills in total-time and downtime.
            end_by = time.monotonic() + 10
            while not last.get("total-time") and time.monotonic() < end_by:
                time.sleep(0.05)
                last = src.cmd("query-migrate", quiet=True)
            log(f"source at the end: {json.dumps(last)}")
        if report["status"] != "timeout":
            report["status"] = last.get("status")
            report["reason"] = last.get("error-desc", "")
        if report["status"] == "completed":
            end_by = time.monotonic() + 30
            while dst.cmd("query-status", quiet=True).get("status") != "running" and time.monotonic() < end_by:
                dst.wait_event(0.1)
    except (QMPError, OSError) as e:
        log(f"error: {e}")
        report["status"], report["reason"] = "failed", str(e)
        try:
            last = src.cmd("query-migrate", quiet=True) or last
            if last.get("status") in ("setup", "active", "pre-switchover", "device"):
                # Not past the point of no return: give the VM back to the source, as libvirt does.
                src.cmd("migrate_cancel")
        except (QMPError, OSError):
            pass
    finally:
        ram = last.get("ram", {})
        report.update({
            "downtime_ms": last.get("downtime", ""), "total_ms": last.get("total-time", ""),
            "setup_ms": last.get("setup-time", ""), "rounds": ram.get("dirty-sync-count", ""),
            "ram_bytes": ram.get("transferred", ""), "disk_bytes": mirror_offset if mirror_offset is not None else "",
            "postcopy_requests": ram.get("postcopy-requests", ""),
        })
        for name, q in (("src", src), ("dst", dst)):
            try:
                report[f"{name}_status"] = q.cmd("query-status").get("status")
            except (QMPError, OSError) as e:
                report[f"{name}_status"] = f"unknown ({e})"
        # The guest's own blackout, by QEMU's event clocks (one host): the source's STOP to the
        # destination's RESUME (our reaction to the source's status is part of it, as libvirt's is).
        stop = next((e for e in src.events if e["event"] == "STOP"), None)
        resume = next((e for e in dst.events if e["event"] == "RESUME"), None)
        if stop and resume:
            ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
            report["pause_ms"] = round((ts(resume) - ts(stop)) * 1000)
        report["query_migrate"] = last
        report["events"] = {"src": src.events, "dst": dst.events}
        log(f"report: {json.dumps({k: v for k, v in report.items() if k not in ('events', 'query_migrate')})}")
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    m = sub.add_parser("migrate")
    m.add_argument("--src", required=True)
    m.add_argument("--dst", required=True)
    m.add_argument("--mode", choices=["precopy", "postcopy"], default="precopy")
    m.add_argument("--uri", required=True)
    m.add_argument("--nbd-listen", required=True)
    m.add_argument("--nbd-connect", required=True)
    m.add_argument("--report", required=True)
    m.add_argument("--timeout", type=float, default=300)
    m.add_argument("--copy-mode", choices=["background", "write-blocking"], default="background")
    s = sub.add_parser("status")
    s.add_argument("sock")
    a = p.parse_args()
    if a.verb == "status":
        print(QMP(a.sock, "status", timeout=5).cmd("query-status", quiet=True).get("status"))
        return
    report = migrate(a)
    with open(a.report + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(a.report + ".tmp", a.report)


if __name__ == "__main__":
    main()
