#!/usr/bin/python3
"""Ferry migration drills: a matrix of live migrations of a real Linux guest, one cell at a time.

    scripts/drill/run.py --quick|--full --out DIR [--only SUBSTR] [--max-minutes N] [--list]

Each cell is one migration by scripts/migrate-vm.sh (Ferry's agents, engine=ferry) or
scripts/vm/migrate-qemu.sh (QEMU's own migration as libvirt drives it, engine=qemu, the same guest
over the same emulated WAN, scripts/wan/wan-link.sh). Axes: mode (precopy, postcopy, hybrid), the
disk pre-copied or post-copied (source-agent --disk-postcopy), link rate (Mbit/s), RTT (ms), the
guest's memory dirty rate and disk write rate (MB/s), and a link cut (the agents' link dropped
mid-migration by `wan-link.sh cut`, then restored: the agents must resume).

Per cell it records downtime, total time, wire and link bytes, dirty rounds, pages pulled on demand,
fault latency p50/p99 (destination report), the guest's slowdown (its own progress counters on the
serial console: pages checked per second before, during and after the migration), the verdict
(the script's: the guest's own check of every page and block, plus, for a cut, that the cut landed
inside the migration and the agents resumed). While a cell runs, a sampler in each namespace
(scripts/drill/sample.py) records the link's bytes every 250 ms and, when the agents serve
`--metrics`, their GET /status (QEMU query-migrate shape); without the endpoint the timeline's other
panels fall back to the final reports.

Writes into DIR: results.json, results.csv, timeline-CELL.png per run, matrix-downtime.png,
matrix-total.png, and cells/CELL/ (raw logs, reports, samples). Exits non-zero if any cell's verdict
is not ok or an expected file is missing. Needs root. FERRY_BIN=DIR takes the agents from DIR (else
the scripts build them); FERRY_GUEST_DIR as scripts/guest/build.sh.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
MEM_MIB = 160          # QEMU RAM; the guest keeps 64 MiB of pages in it (scripts/vm/common.sh)
METRICS_SRC, METRICS_DST = 9464, 9465   # inside each namespace's own loopback
WORKLOAD_MIB = 64      # ferry-workload's memory (the backend without QEMU)
CUT_AFTER_BYTES = 24 << 20              # cut once this much has crossed the link
CUT_SECONDS = 2
CELL_TIMEOUT = 600
# A pre-copy that cannot converge (the guest dirties faster than the link) is switched over after
# this many seconds (source-agent --max-time; its downtime then shows the cost). QEMU has no such
# bound: its migration is cancelled after FERRY_QEMU_TIMEOUT (status=timeout, verdict FAIL).
FERRY_MAX_TIME = 90
QEMU_TIMEOUT = 120

BASE = dict(engine="ferry", mode="precopy", disk="pre", rate=200, rtt=40, dirty=8, disk_rate=2, cut=0)


def cell(**kw):
    c = dict(BASE, **kw)
    c["id"] = ("{engine}-{mode}-disk{disk}-{rate}M-{rtt}ms-mem{dirty}-dw{disk_rate}".format(**c)
               + ("-cut" if c["cut"] else "")).replace(".", "p")
    return c


def quick_cells():
    return [
        cell(mode="precopy", rate=1000, rtt=2),
        cell(engine="qemu", mode="precopy", rate=1000, rtt=2),
        cell(mode="postcopy", rate=200, rtt=40),
        cell(mode="hybrid", disk="post", rate=200, rtt=40),
        cell(mode="precopy", rate=200, rtt=40, cut=1),
    ]


def full_cells():
    """One axis at a time around a base cell (200 Mbit/s, 40 ms, 8 MB/s memory, 2 MB/s disk), most
    telling first so a capped run still answers the questions in docs/drills.md."""
    out = []
    modes = ("precopy", "postcopy", "hybrid")
    for m in modes:                                            # link speed at WAN RTT
        for r in (1000, 200, 50):
            out.append(cell(mode=m, rate=r, rtt=40))
    for m in ("precopy", "postcopy"):                          # QEMU beside it
        for r in (1000, 200, 50):
            out.append(cell(engine="qemu", mode=m, rate=r, rtt=40))
    for m in modes:                                            # LAN and a slow, far WAN
        out.append(cell(mode=m, rate=1000, rtt=2))
        out.append(cell(mode=m, rate=50, rtt=150))
    for m in ("precopy", "postcopy"):
        out.append(cell(engine="qemu", mode=m, rate=1000, rtt=2))
        out.append(cell(engine="qemu", mode=m, rate=50, rtt=150))
    for m in modes:                                            # write-heavy memory and disk
        out.append(cell(mode=m, dirty=32))
        out.append(cell(mode=m, disk_rate=8))
    for m in modes:                                            # disk post-copy
        out.append(cell(mode=m, disk="post"))
    for m in modes:                                            # RTT sweep
        for t in (2, 150):
            out.append(cell(mode=m, rate=200, rtt=t))
    out.append(cell(mode="precopy", rate=200, rtt=40, cut=1))  # link cuts
    out.append(cell(mode="postcopy", rate=200, rtt=40, cut=1))
    out.append(cell(mode="precopy", dirty=2))
    seen, uniq = set(), []
    for c in out:
        if c["id"] not in seen:
            seen.add(c["id"]); uniq.append(c)
    return uniq


# --- running one cell ----------------------------------------------------------------------------

def agent_has_metrics(binary):
    try:
        h = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=20)
        return "--metrics" in (h.stdout + h.stderr)
    except (OSError, subprocess.SubprocessError):
        return False


def ns_exists(name):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == name for line in out.splitlines() if line.strip())


def start_sampler(ns, iface, status_url, out):
    cmd = ["ip", "netns", "exec", ns, "/usr/bin/python3", str(SCRIPTS / "drill" / "sample.py"), "--out", str(out),
           "--interval", "0.25", "--seconds", str(CELL_TIMEOUT)]
    if iface:
        cmd += ["--iface", iface]
    if status_url:
        cmd += ["--status", status_url]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_jsonl(path):
    rows = []
    try:
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    except OSError:
        pass
    return rows


def load_json(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return {}


def run_cell(c, celldir, metrics, backend):
    """Runs one migration script for cell c; returns the row (script result + what the runner adds)."""
    celldir.mkdir(parents=True, exist_ok=True)
    keep = celldir / "keep"
    env = dict(os.environ, FERRY_RESULT_JSON=str(celldir / "result.jsonl"), FERRY_KEEP_LOGS=str(keep))
    args = ["--mode", c["mode"], "--rate", str(c["rate"]), "--rtt", str(c["rtt"]), "--mem", str(MEM_MIB),
            "--dirty", str(c["dirty"]), "--disk-rate", str(c["disk_rate"])]
    if c["engine"] == "ferry":
        if backend == "vm":
            cmd, prefix = ["bash", str(SCRIPTS / "migrate-vm.sh")] + args, "fv"
        else:
            args[args.index("--mem") + 1] = str(WORKLOAD_MIB)
            cmd, prefix = ["bash", str(SCRIPTS / "drill" / "migrate-workload.sh")] + args, "fw"
        src_args, dst_args = [f"--max-time {FERRY_MAX_TIME}"], []
        if c["disk"] == "post":
            src_args.append("--disk-postcopy")
        if metrics:
            src_args.append(f"--metrics tcp:127.0.0.1:{METRICS_SRC}")
            dst_args.append(f"--metrics tcp:127.0.0.1:{METRICS_DST}")
        env["FERRY_SOURCE_ARGS"] = " ".join(filter(None, [os.environ.get("FERRY_SOURCE_ARGS", "")] + src_args))
        env["FERRY_DEST_ARGS"] = " ".join(filter(None, [os.environ.get("FERRY_DEST_ARGS", "")] + dst_args))
    else:
        # libvirt's --copy-storage-synchronous-writes: the background mirror under this guest's
        # steady disk writes seldom gets READY within 300 s (scripts/vm/migrate-qemu.sh).
        cmd = ["bash", str(SCRIPTS / "vm" / "migrate-qemu.sh"), "--sync-writes"] + args
        prefix = "fq"
        env.setdefault("FERRY_QEMU_TIMEOUT", str(QEMU_TIMEOUT))
    log = open(celldir / "run.log", "w")
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    link = f"{prefix}{proc.pid}"        # the scripts name their link after their own PID ($$)
    samplers, cut = [], dict(planned=bool(c["cut"]), done=False, at_bytes=None, output="")
    src_samples, dst_samples = celldir / "samples-src.jsonl", celldir / "samples-dst.jsonl"
    for p in (src_samples, dst_samples):
        p.unlink(missing_ok=True)
    try:
        while proc.poll() is None and time.time() - started < CELL_TIMEOUT:
            if not samplers and ns_exists(f"{link}-src") and ns_exists(f"{link}-dst"):
                time.sleep(0.3)   # (the veth moves into the namespaces just after they appear)
                samplers.append(start_sampler(f"{link}-src", f"{link}-a",
                                              metrics and c["engine"] == "ferry" and f"http://127.0.0.1:{METRICS_SRC}/status",
                                              src_samples))
                samplers.append(start_sampler(f"{link}-dst", f"{link}-b",
                                              metrics and c["engine"] == "ferry" and f"http://127.0.0.1:{METRICS_DST}/status",
                                              dst_samples))
            if cut["planned"] and not cut["done"] and samplers:
                rows = [r for r in read_jsonl(src_samples) if r.get("tx_bytes") is not None]
                if rows and rows[-1]["tx_bytes"] - rows[0]["tx_bytes"] >= CUT_AFTER_BYTES:
                    cut["at"] = time.time()
                    live = [r["status"].get("status") for r in rows if r.get("status")]
                    cut["status_before"] = live[-1] if live else None
                    cut["at_bytes"] = rows[-1]["tx_bytes"] - rows[0]["tx_bytes"]
                    r = subprocess.run(["bash", str(SCRIPTS / "wan" / "wan-link.sh"), "cut", link, str(CUT_SECONDS)],
                                       capture_output=True, text=True, timeout=60)
                    cut["done"], cut["output"] = r.returncode == 0, (r.stdout + r.stderr).strip()
            time.sleep(0.25)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    finally:
        for s in samplers:
            if s.poll() is None:
                s.terminate()
            try:
                s.wait(5)
            except subprocess.TimeoutExpired:
                s.kill()
        log.close()
    rc = proc.returncode
    rows = read_jsonl(celldir / "result.jsonl")
    row = dict(rows[-1]) if rows else {"status": "error", "verdict": "FAIL",
                                        "why": f"exit {rc} without a result: " + " | ".join(
                                            open(celldir / "run.log", errors="replace").read().strip().splitlines()[-3:])}
    row.update(cell=c["id"], engine=c["engine"], mode=c["mode"], disk=c["disk"], rate_mbit=c["rate"], rtt_ms=c["rtt"],
               dirty_mbs=c["dirty"], disk_rate_mbs=c["disk_rate"], cut=c["cut"], exit=rc,
               run_s=round(time.time() - started, 1), started=started)
    if row.get("verdict") == "ok" and rc != 0:
        row["verdict"], row["why"] = "FAIL", f"the script exited {rc} after verdict ok"
    kept = next(iter(sorted(keep.glob(f"{link}*"))), None) if keep.exists() else None
    enrich(row, c, kept, cut)
    return row


def fnum(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def guest_rates(console_src, console_dst, counter="mem_pages_checked"):
    """The guest's own progress: COUNTER (mem_pages_checked, or disk_step: blocks written) per second
    of its uptime, before the migration (at the source, until its first full sweep: migrate-vm.sh
    starts the migration right after it), during (at the source afterwards) and after (at the
    destination). Its uptime is QEMU's virtual clock, which stands still while the VM is paused: the
    downtime itself does not show here, only what the migration costs the running guest (the disk
    write throttle, post-copy's faults)."""
    def lines(path):
        out, verdict_seen = [], False
        try:
            for line in open(path, errors="replace"):
                if "ferry-guest: verdict" in line:
                    verdict_seen = True
                m = re.search(r"ferry-guest: status .*uptime_ms=(\d+) .*\b" + counter + r"=(\d+)", line)
                if m:
                    out.append((int(m.group(1)), int(m.group(2)), verdict_seen))
        except OSError:
            pass
        return out

    def rate(pts):
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / ((pts[-1][0] - pts[0][0]) / 1000)

    src, dst = lines(console_src), lines(console_dst)
    before = [p for p in src if not p[2]][1:]     # (the first status line is the fill)
    during = [p for p in src if p[2]]
    if before and during:
        during = [before[-1]] + during
    return rate(before), rate(during), rate(dst[:6])


def workload_rates(kept):
    """ferry-workload's own ops/s: its reports before the migration started (start.count of them),
    during it (at the source), and after it (the resumed workload, while it still dirtied)."""
    src = [r for r in read_jsonl(kept / "source.jsonl") if r.get("event") == "report"]
    dst = [r for r in read_jsonl(kept / "resumed.jsonl") if r.get("event") == "report"]
    try:
        n = int(open(kept / "start.count").read().strip())
    except (OSError, ValueError):
        n = 0
    mean = lambda rs: statistics.mean(r["ops_per_sec"] for r in rs) if rs else None
    return mean(src[1:n]), mean(src[n:]), mean(dst[:3])


def workload_stall_ms(kept, interval=0.5):
    """The workload paces itself by count, so its mean rate hides a stall: the longest gap between
    two of its reports (each --report-interval 0.5 s), less the interval, at the source during the
    migration and in the resumed workload (post-copy faults)."""
    gaps = []
    for name, rows in (("source.jsonl", None), ("resumed.jsonl", None)):
        ts = [r["t"] for r in read_jsonl(kept / name) if r.get("event") == "report" and "t" in r]
        gaps += [b - a for a, b in zip(ts, ts[1:])]
    return round(max(0.0, max(gaps) - interval) * 1000) if gaps else None


def switch_from_log(path):
    """Seconds from 'migrating memory' to 'VM paused' in the source log (its stamps have 1 s steps)."""
    import datetime
    start = pause = None
    try:
        for line in open(path, errors="replace"):
            stamp = line.split(" ", 1)[0]
            if start is None and "migrating memory" in line:
                start = stamp
            elif pause is None and "VM paused" in line:
                pause = stamp
    except OSError:
        return None
    if not (start and pause):
        return None
    parse = lambda s: datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return parse(pause) - parse(start)


def enrich(row, c, kept, cut):
    """Adds what the script's result line lacks, from the reports and consoles it kept."""
    src = load_json(kept / "src.json") if kept else {}
    dst = load_json(kept / "dst.json") if kept else {}
    qemu = load_json(kept / "qemu.json") if kept else {}
    row["logs"] = str(kept) if kept else ""
    row["cut_at"] = cut.get("at")
    row["switch_log_s"] = switch_from_log(kept / "source.log") if kept else None
    if src:
        row["mem_dirty_rate_mbs"] = (mem_src_rate := src.get("memory", {}).get("dirty_rate")) and mem_src_rate / 1e6
        row["disk_dirty_rate_mbs"] = (disk_rate := src.get("disk", {}).get("dirty_rate")) and disk_rate / 1e6
    mem_src, mem_dst = src.get("memory", {}), dst.get("memory", {})
    if c["engine"] == "ferry":
        row["pages_on_demand"] = mem_src.get("postcopy_requests", mem_dst.get("pages_requested"))
        miss = mem_dst.get("fault_latency_missing", {})
        row["faults_on_missing"] = mem_dst.get("faults_on_missing")
        row["fault_p50_ms"] = miss["p50_us"] / 1000 if miss.get("count") else None
        row["fault_p99_ms"] = miss["p99_us"] / 1000 if miss.get("count") else None
        disk = src.get("disk", {})
        row["disk_postcopy_requests"] = disk.get("postcopy_requests")
        row["throttle_s"] = disk.get("throttle_seconds")
        row["reconnects"] = src.get("reconnects")
        row["expected_downtime_ms"] = src.get("expected_downtime_ms")
        row["total_incl_disk_ms"] = fnum(row.get("total_ms"))
    else:
        # QEMU's total_ms is its RAM migration's; the disk mirror ran before it (mirror_ms).
        t, m = fnum(row.get("total_ms")), fnum(row.get("mirror_ms"))
        row["total_incl_disk_ms"] = t + (m or 0) if t is not None else None
        row["pages_on_demand"] = qemu.get("postcopy_requests")
        row["fault_p50_ms"] = row["fault_p99_ms"] = None
    if kept and (kept / "source.jsonl").exists():
        b, d, a = workload_rates(kept)
        row["workload_max_stall_ms"] = workload_stall_ms(kept)
    elif kept:
        b, d, a = guest_rates(kept / "console-src.log", kept / "console-dst.log")
        db, dd, da = guest_rates(kept / "console-src.log", kept / "console-dst.log", "disk_step")
        row["disk_slowdown_during_pct"] = round(100 * (1 - dd / db), 1) if db and dd is not None else None
        row["disk_slowdown_after_pct"] = round(100 * (1 - da / db), 1) if db and da is not None else None
    if kept:
        row["guest_rate_before"], row["guest_rate_during"], row["guest_rate_after"] = b, d, a
        row["slowdown_during_pct"] = round(100 * (1 - d / b), 1) if b and d is not None else None
        row["slowdown_after_pct"] = round(100 * (1 - a / b), 1) if b and a is not None else None
    # The cut must have landed inside the migration, and the agents must have resumed after it.
    if c["cut"]:
        resumed = 0
        if kept and (kept / "source.log").exists():
            resumed = open(kept / "source.log", errors="replace").read().count("link resumed")
        row["cut_at_bytes"], row["link_resumed"] = cut.get("at_bytes"), resumed
        row["cut_status_before"] = cut.get("status_before")
        why = None
        if not cut["done"]:
            why = f"the link was never cut (nothing crossed {CUT_AFTER_BYTES >> 20} MiB, or the cut failed: {cut['output']})"
        elif (fnum(row.get("link_bytes")) or 0) <= (cut.get("at_bytes") or 0) * 1.05:
            why = "the cut came after the migration had sent nearly everything"
        elif cut.get("status_before") not in (None, "active", "postcopy-active", "setup"):
            why = f"the cut came when the source's /status said {cut['status_before']}, not during the migration"
        elif resumed < 1 or not (row.get("reconnects") or 0) >= 1:
            why = f"no resume after the cut (source log 'link resumed' x{resumed}, report reconnects={row.get('reconnects')})"
        if why and row.get("verdict") == "ok":
            row["verdict"], row["why"] = "FAIL", why


# --- timelines and charts ------------------------------------------------------------------------

def timeline(row, celldir, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    src = read_jsonl(celldir / "samples-src.jsonl")
    dst = read_jsonl(celldir / "samples-dst.jsonl")
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    title = f"{row['cell']}: {row.get('status')} verdict={row.get('verdict')}"
    fig.suptitle(title, fontsize=10)
    pts = [r for r in src if r.get("tx_bytes") is not None]
    # t=0: the first sample in which the link carries more than 1 Mbit/s (the migration's start).
    t0, thr = None, []
    for a, b in zip(pts, pts[1:]):
        dt = b["t"] - a["t"]
        if dt > 0:
            mbit = (b["tx_bytes"] - a["tx_bytes"]) * 8 / dt / 1e6
            thr.append((b["t"], mbit))
            if t0 is None and mbit > 1:
                t0 = a["t"]
    t0 = t0 or (pts[0]["t"] if pts else row["started"])
    ax = axes[0]
    if thr:
        ax.plot([t - t0 for t, _ in thr], [m for _, m in thr], lw=1)
    ax.axhline(row["rate_mbit"], color="grey", ls=":", lw=0.8)
    ax.set_ylabel("link Mbit/s\n(source veth tx)")
    st = [(r["t"] - t0, r["status"]) for r in src if r.get("status")]
    sd = [(r["t"] - t0, r["status"]) for r in dst if r.get("status")]
    live = bool(st)
    switch = None
    for t, s in st:
        if s.get("status") in ("device", "postcopy-active", "completed"):
            switch = t
            break
    switch_note = "switchover"
    if switch is None and row.get("switch_log_s") is not None:
        # No live status: the pause in the source log, counted from its start (1 s steps).
        switch, switch_note = row["switch_log_s"], "switchover (source log, +-1 s)"
    if live:
        axes[1].plot([t for t, s in st], [((s.get("ram") or {}).get("dirty-pages-rate") or 0) *
                                          ((s.get("ram") or {}).get("page-size") or 4096) / 1e6 for t, s in st], label="memory")
        axes[1].plot([t for t, s in st], [((s.get("disk") or {}).get("dirty-rate") or 0) / 1e6 for t, s in st], label="disk")
        axes[1].legend(fontsize=7)
        axes[2].step([t for t, s in st], [1 if (s.get("disk") or {}).get("throttle-active") else 0 for t, s in st], where="post")
        fs = sd or st
        axes[3].plot([t for t, s in fs], [(s.get("faults") or {}).get("on-missing") or 0 for t, s in fs], label="on missing")
        axes[3].plot([t for t, s in fs], [(s.get("faults") or {}).get("on-received") or 0 for t, s in fs], label="on received")
        axes[3].legend(fontsize=7)
    else:
        note = ("QEMU row: sampled the link only; QEMU's final query-migrate figures" if row["engine"] == "qemu"
                else "no live /status endpoint answered: final report figures")
        axes[1].text(0.01, 0.5, f"{note}\nmemory dirty rate {fmt(row.get('mem_dirty_rate_mbs'))} MB/s, "
                     f"disk {fmt(row.get('disk_dirty_rate_mbs'))} MB/s", transform=axes[1].transAxes, fontsize=8, va="center")
        axes[2].text(0.01, 0.5, f"{note}\nthrottled {fmt(row.get('throttle_s'))} s in all",
                     transform=axes[2].transAxes, fontsize=8, va="center")
        axes[3].text(0.01, 0.5, f"{note}\nfaults on missing pages {fmt(row.get('faults_on_missing'))}, "
                     f"pages pulled on demand {fmt(row.get('pages_on_demand'))}, p50 {fmt(row.get('fault_p50_ms'))} ms "
                     f"p99 {fmt(row.get('fault_p99_ms'))} ms", transform=axes[3].transAxes, fontsize=8, va="center")
    axes[1].set_ylabel("dirty MB/s")
    axes[2].set_ylabel("throttle on")
    axes[3].set_ylabel("faults (cum.)")
    axes[3].set_xlabel("seconds since the link got busy")
    for ax in axes:
        if switch is not None:
            ax.axvline(switch, color="red", ls="--", lw=1)
        if row.get("cut_at"):
            ax.axvspan(row["cut_at"] - t0, row["cut_at"] - t0 + CUT_SECONDS, color="orange", alpha=0.3)
    last = max([t - t0 for t, _ in thr] + [0])
    axes[3].set_xlim(-2, last + 1)   # (the boot before the migration is not shown)
    if switch is not None:
        axes[0].text(switch, axes[0].get_ylim()[1] * 0.9, " " + switch_note, color="red", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def fmt(v, nd=1):
    v = fnum(v)
    return "-" if v is None else f"{v:.{nd}f}"


def matrix_chart(rows, key, ylabel, png, scale=1.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # One bar group per cell without its engine; Ferry beside QEMU where both ran.
    groups = {}
    for r in rows:
        g = r["cell"].split("-", 1)[1]
        groups.setdefault(g, {})[r["engine"]] = r
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) + 2), 5))
    w = 0.4
    for i, eng in enumerate(("ferry", "qemu")):
        xs, ys, cols = [], [], []
        for j, g in enumerate(names):
            r = groups[g].get(eng)
            v = fnum(r.get(key)) if r else None
            if v is None:
                continue
            xs.append(j + (i - 0.5) * w)
            ys.append(v * scale)
            cols.append(("tab:blue" if eng == "ferry" else "tab:orange") if r.get("verdict") == "ok" else "tab:red")
        bars = ax.bar(xs, ys, w, color=cols, label=eng)
        ax.bar_label(bars, fmt="%.3g", fontsize=6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if any(p.get_height() > 0 for p in ax.patches):
        ax.set_yscale("log")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "tab:red")],
              labels=["ferry", "qemu", "verdict FAIL"], fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


CSV_FIELDS = ["cell", "engine", "mode", "disk", "rate_mbit", "rtt_ms", "dirty_mbs", "disk_rate_mbs", "cut", "status",
              "verdict", "downtime_ms", "total_ms", "wire_bytes", "link_bytes", "rounds", "pages_on_demand",
              "faults_on_missing", "fault_p50_ms", "fault_p99_ms", "slowdown_during_pct", "slowdown_after_pct", "disk_slowdown_during_pct", "disk_slowdown_after_pct", "workload_max_stall_ms",
              "throttle_s", "reconnects", "link_resumed", "mirror_ms", "total_incl_disk_ms", "run_s", "timeline", "why"]


def write_outputs(rows, out):
    json.dump(rows, open(out / "results.json", "w"), indent=1)
    (out / "table.md").write_text(markdown_table(rows))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def markdown_table(rows, link_prefix=""):
    """The table of docs/drills.md: one row per cell; total s is disk + memory (QEMU: mirror + RAM);
    slowdown is the guest's, during / after the migration; the cell links to its timeline."""
    head = ("| cell | mode | disk | Mbit/s | RTT ms | mem MB/s | disk MB/s | status | downtime ms | total s | "
            "link MB | rounds | on demand | fault p50/p99 ms | slowdown % during/after | verdict |")
    out = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        faults = f"{fmt(r.get('fault_p50_ms'))}/{fmt(r.get('fault_p99_ms'))}" if r.get("fault_p50_ms") is not None else ""
        name = f"[{r['cell']}]({link_prefix}{r['timeline']})" if r.get("timeline") else r["cell"]
        tot = fnum(r.get("total_incl_disk_ms"))
        slow = "/".join("-" if r.get(k) is None else str(r[k]) for k in ("slowdown_during_pct", "slowdown_after_pct"))
        out.append(f"| {name} | {r['mode']} | {r['disk']} | {r['rate_mbit']} | {r['rtt_ms']} | {r['dirty_mbs']} | "
                   f"{r['disk_rate_mbs']} | {r.get('status', '')} | {fmt(r.get('downtime_ms'), 0)} | "
                   f"{'-' if tot is None else fmt(tot / 1000)} | {fmt((fnum(r.get('link_bytes')) or 0) / 1e6, 0)} | "
                   f"{r.get('rounds', '')} | {'' if r.get('pages_on_demand') in (None, '') else r.get('pages_on_demand')} | "
                   f"{faults} | {slow} | {r.get('verdict', '')} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", action="store_true", help="the reduced matrix CI runs (< 10 min)")
    g.add_argument("--full", action="store_true", help="the matrix of docs/drills.md")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", action="append", default=[], help="run only cells whose id contains this (repeatable)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new cell after this many minutes (default: none for --quick, 90 for --full)")
    ap.add_argument("--list", action="store_true", help="print the cells and exit")
    ap.add_argument("--backend", choices=("auto", "vm", "workload"), default="auto",
                    help="vm: a real guest under QEMU (scripts/migrate-vm.sh); workload: ferry-workload "
                         "(scripts/drill/migrate-workload.sh, no QEMU rows); auto: vm where QEMU is installed")
    a = ap.parse_args()
    cells = quick_cells() if a.quick else full_cells()
    if a.only:
        cells = [c for c in cells if any(s in c["id"] for s in a.only)]
    if a.list:
        for c in cells:
            print(c["id"])
        return 0
    if os.geteuid() != 0:
        print("drill: needs root (network namespaces)", file=sys.stderr)
        return 2
    backend = a.backend
    if backend == "auto":
        backend = "vm" if shutil.which("qemu-system-x86_64") else "workload"
    if backend == "vm" and not shutil.which("qemu-system-x86_64"):
        print("drill: --backend vm needs qemu-system-x86_64 (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    if backend == "workload":
        if not os.environ.get("FERRY_BIN"):
            print("drill: --backend workload needs FERRY_BIN (source-agent, dest-agent, ferry-workload)", file=sys.stderr)
            return 2
        dropped = [c["id"] for c in cells if c["engine"] == "qemu"]
        cells = [c for c in cells if c["engine"] != "qemu"]
        if dropped:
            print(f"drill: workload backend: no QEMU rows ({len(dropped)} cells left out)", flush=True)
    limit = a.max_minutes if a.max_minutes is not None else (None if a.quick else 90)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    fbin = os.environ.get("FERRY_BIN")
    metrics = bool(fbin) and agent_has_metrics(os.path.join(fbin, "source-agent")) and \
        agent_has_metrics(os.path.join(fbin, "dest-agent"))
    print(f"drill: backend {backend}; {len(cells)} cells; live status endpoint: {'yes' if metrics else 'no (final reports only)'}", flush=True)
    t_start = time.time()
    rows, skipped = [], []
    for i, c in enumerate(cells):
        if limit is not None and time.time() - t_start > limit * 60:
            skipped.append(c["id"])
            continue
        print(f"drill: [{i + 1}/{len(cells)}] {c['id']} ...", flush=True)
        celldir = out / "cells" / c["id"]
        if celldir.exists():
            shutil.rmtree(celldir)
        row = run_cell(c, celldir, metrics, backend)
        png = out / f"timeline-{c['id']}.png"
        try:
            timeline(row, celldir, png)
            row["timeline"] = png.name
        except Exception as e:  # a plot that fails is a missing file below, not a crash
            row["timeline"] = ""
            row.setdefault("plot_error", repr(e))
        rows.append(row)
        print(f"drill:   {row.get('status')} verdict={row.get('verdict')} downtime={fmt(row.get('downtime_ms'), 0)} ms "
              f"total={fmt(fnum(row.get('total_ms') or 0) / 1000)} s link={fmt((fnum(row.get('link_bytes')) or 0) / 1e6, 0)} MB "
              f"rounds={row.get('rounds')} on-demand={row.get('pages_on_demand')} slowdown={row.get('slowdown_during_pct')}% "
              f"({row['run_s']} s){'  why: ' + row['why'] if row.get('why') else ''}", flush=True)
        write_outputs(rows, out)
    expected = [out / "results.json", out / "results.csv", out / "matrix-downtime.png", out / "matrix-total.png"]
    if rows:
        matrix_chart(rows, "downtime_ms", "downtime (ms, log)", out / "matrix-downtime.png")
        matrix_chart(rows, "total_incl_disk_ms", "total time incl. disk (s, log; QEMU: mirror + RAM)",
                     out / "matrix-total.png", scale=1 / 1000)
    expected += [out / f"timeline-{r['cell']}.png" for r in rows]
    write_outputs(rows, out)
    missing = [str(p) for p in expected if not p.exists() or p.stat().st_size == 0]
    failed = [r for r in rows if r.get("verdict") != "ok"]
    elapsed = time.time() - t_start
    print(f"drill: {len(rows)} cells in {elapsed / 60:.1f} min; {len(failed)} failed; "
          f"{len(skipped)} not started (time cap){': ' + ' '.join(skipped) if skipped else ''}")
    for r in failed:
        print(f"drill: FAIL {r['cell']}: {r.get('status')}: {r.get('why', '')[:300]}")
    for m in missing:
        print(f"drill: missing {m}")
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 0 if rows and not failed and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
