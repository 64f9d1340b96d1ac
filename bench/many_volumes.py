#!/usr/bin/python3
"""A thousand volumes per daemon pair (issue 21): one source cairnd (site A)
and one sink cairnd (site B) replicating N volumes (1000 by default) on the
two local test clusters (tests/cluster/testbed.sh).

What it measures, in order:
  1. setup: N images of 4 MiB at site A, 256 KiB of random data at offset 0
     of each; one config with N [volume] sections (keep_snapshots = 0), a
     sink with keep_points = 3; sink started, then source;
  2. initial sync: time from the source's start until every volume has a
     restore point at the sink (all N last_seq >= 1 in the sink's status);
  3. idle phase (nothing written), once every volume has made its first
     unchanged check (steady state): CPU (% of one core) and RSS of each
     daemon, points made, unchanged checks at the source;
  4. loaded phase: random 64 KiB writes to random volumes at an aggregate
     rate; CPU and RSS again, points made, and the latency of control calls
     against both daemons, serially: status [VOLUME] on the control socket
     through the client the Cinder driver uses (the daemon's answer time;
     this is what the target is checked on), and `cairn --json status
     [VOLUME]` (CLI start-up included);
  5. shutdown: SIGTERM to the source, then the sink; time until each exits.
Then the figures against the issue's targets (idle CPU < 2 % of a core,
RSS <= 256 MiB per daemon, status p99 < 100 ms, shutdown < 10 s).

Results: OUT/many_volumes.json and OUT/many_volumes.md; a run that fails
writes what it measured, with the failure, to the same files (and exits 1).
It measures; it does not test.

Usage:
  bench/many_volumes.py [--volumes N] [--interval 30s] [--idle-seconds S]
                        [--load-seconds S] [--write-rate W] [--out DIR]
                        [--memory-budget SIZE]
                        [--testbed DIR] [--writer hold-open|open-each]
                        [--stacks] [--keep-work]
Without --testbed it starts its own test bed (base port 27789, 6 GiB of
memstore per OSD) and purges it at the end. Binaries: $CAIRN_BUILD (see
tests/tools/cairn_testlib.py), else build/. Takes about 10 minutes with
the defaults on a 2-core VM. cairnd raises its own open-files soft limit
to the hard one (it needs 4 descriptors per volume: a socket, an epoll, a
timerfd and an eventfd); the run records the limit it started with.
"""
import argparse
import collections
import datetime
import json
import os
import queue
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "tools"))
import cairn_testlib as lib  # noqa: E402
sys.path.insert(0, lib.SHIM)
from cairn_cinder import wire  # noqa: E402
import rbd  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
IMAGE_SIZE = 4 * MiB
INITIAL_DATA = 256 * KiB
WRITE_BLOCK = 64 * KiB
# The targets.
TARGET_IDLE_CPU_PCT = 2.0
TARGET_RSS_MIB = 256
TARGET_STATUS_P99_MS = 100
TARGET_SHUTDOWN_S = 10


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# --- one process, from /proc ---------------------------------------------------

def proc_sample(pid):
    """CPU seconds (utime + stime, all threads), VmRSS, VmHWM (MiB),
    threads and open file descriptors of PID, now."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    return {"t": time.monotonic(), "cpu_s": cpu,
            "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            # Of the main thread only in /proc/PID/status: summed over
            # all threads from /proc/PID/task/*/status.
            "wakeups": task_switches(pid)}


def task_switches(pid):
    """Voluntary context switches of all threads of PID (each one a thread
    that blocked and was woken again)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        n += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            pass
    return n


def phase_figures(before, after):
    """CPU % of one core between two samples; RSS at the end and the peak."""
    wall = after["t"] - before["t"]
    return {"wall_s": round(wall, 2), "cpu_s": round(after["cpu_s"] - before["cpu_s"], 2),
            "cpu_pct": round(100 * (after["cpu_s"] - before["cpu_s"]) / wall, 2),
            "rss_mib": round(after["rss_mib"], 1), "hwm_mib": round(after["hwm_mib"], 1),
            "threads": after["threads"], "fds": after["fds"],
            "wakeups_per_s": round((after["wakeups"] - before["wakeups"]) / wall)}


def percentiles(ms):
    s = sorted(ms)

    def rank(p):  # nearest rank
        return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))]
    return {"n": len(s), "p50_ms": round(rank(50), 1), "p99_ms": round(rank(99), 1),
            "max_ms": round(s[-1], 1)}


def thread_stacks(pid):
    """What each thread of PID is doing, from one `gdb -batch` look at all
    of them (the process stops for the seconds that takes): the threads
    counted by their innermost frame and their innermost Cairn frames,
    most common first."""
    t = time.monotonic()
    r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"],
                       capture_output=True, text=True, timeout=600)
    stalled = time.monotonic() - t
    count = collections.Counter()
    for th in re.split(r"\n(?=Thread \d+ )", r.stdout)[1:]:
        frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?([^\s(]+)", th, re.M)
        cairn = [f for f in frames if f.startswith("cairn::") and f != "cairn::"][:3]
        top = frames[0] if frames else "?"
        count[f"{top} <- {' <- '.join(cairn) or '(no cairn frame)'}"] += 1
    return {"threads": sum(count.values()), "gdb_stall_s": round(stalled, 1),
            "top": count.most_common(12)}


# --- the guest load ---------------------------------------------------------------

class LoadWriter:
    """Random 64 KiB blocks of random data to random volumes at RATE writes
    per second in all: a pacer puts one job per 1/RATE s in a queue, THREADS
    workers write it. With HANDLES ({image: open rbd.Image}) they write
    through images held open since before replication started, as running
    VMs do; without, each write opens the image, writes and closes it (a
    short-lived client, the worst case for the source: docs/OPERATIONS.md,
    "Clients that open a replicated image")."""

    def __init__(self, site, images, rate, seed, handles=None, threads=4):
        self.site, self.images, self.rate = site, images, rate
        self.handles = handles
        self.rng = random.Random(seed)
        self.jobs = queue.Queue()
        self.stop_ev = threading.Event()
        self.done = 0
        self.errors = []
        self.latencies = []
        self.written = collections.Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"writer-{i}")
                        for i in range(threads)]
        self.pacer = threading.Thread(target=self._pace, daemon=True, name="pacer")

    def start(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        self.pacer.start()
        return self

    def _pace(self):
        i = 0
        while not self.stop_ev.is_set():
            due = self.t0 + i / self.rate
            wait = due - time.monotonic()
            if wait > 0 and self.stop_ev.wait(wait):
                break
            image = self.rng.choice(self.images)
            off = self.rng.randrange(0, IMAGE_SIZE // WRITE_BLOCK) * WRITE_BLOCK
            self.jobs.put((image, off, self.rng.randbytes(WRITE_BLOCK)))
            i += 1

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            image, off, data = job
            t = time.monotonic()
            try:
                if self.handles is not None:
                    self.handles[image].write(data, off)
                else:
                    with rbd.Image(self.site.ioctx, image) as img:
                        img.write(data, off)
                with self.lock:
                    self.done += 1
                    self.written[image] += 1
                    self.latencies.append((time.monotonic() - t) * 1000)
            except Exception as e:  # reported, not raised: the load goes on
                with self.lock:
                    self.errors.append(f"{image}: {type(e).__name__}: {e}")

    def stop(self):
        self.stop_ev.set()
        self.pacer.join()
        self.t1 = time.monotonic()
        backlog = self.jobs.qsize()
        # Jobs still queued are dropped: the phase is over.
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(120)
        wall = self.t1 - self.t0
        return {"rate_asked": self.rate, "writes": self.done,
                "rate_achieved": round(self.done / wall, 2), "dropped_backlog": backlog,
                "volumes_written": len(self.written), "errors": len(self.errors),
                "error_samples": self.errors[:5],
                "write_latency": percentiles(self.latencies) if self.latencies else None}


# --- the bench -------------------------------------------------------------------

def duration_s(text):
    """A cairnd duration ("30s", "1m", "500ms") in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use 30s, 1m, 500ms)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class Bench:
    def __init__(self, args):
        self.args = args
        self.n = args.volumes
        self.interval_s = duration_s(args.interval)
        self.results = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "host": os.uname().nodename, "cpus": os.cpu_count(),
            "command": "/usr/bin/python3 " + " ".join(map(shlex.quote, sys.argv)),
            "cairnd": lib.CAIRND, "volumes": self.n, "interval": args.interval,
            "idle_seconds": args.idle_seconds, "load_seconds": args.load_seconds,
            "write_rate": args.write_rate, "writer": args.writer, "sections": {}}
        self.own_testbed = None
        self.handles = None
        self.diag = {}
        self.results["diagnostics"] = self.diag
        self.source = self.sink = None
        self.a = self.b = None
        # Short paths: control sockets are limited to 107 bytes.
        self.work = tempfile.mkdtemp(prefix="cairn-mv.", dir="/tmp")
        self.results["workdir"] = self.work
        self.tag = f"{int(time.time()) % 100000:05d}"
        # Volume id = image name: "mv12345-0999" (12 chars, <= 42).
        self.vids = [f"mv{self.tag}-{i:04d}" for i in range(self.n)]

    # --- test bed --------------------------------------------------------------
    def open_testbed(self):
        tb = self.args.testbed
        if not tb:
            tb = f"/tmp/cairn-mvtb.{os.getpid()}"
            cmd = [lib.TESTBED, "start", tb, "--base-port", str(self.args.base_port),
                   "--store-mib", str(self.args.store_mib)]
            log(f"starting the test bed: {' '.join(cmd)}")
            self.own_testbed = tb
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=300)
        env = {}
        with open(os.path.join(tb, "env")) as f:
            for line in f:
                if "=" in line:
                    k, v = line.strip().split("=", 1)
                    env[k] = v.strip('"')
        self.testbed = tb
        self.conf_a, self.conf_b = env["CEPH_CONF_A"], env["CEPH_CONF_B"]
        self.a = lib.Site(self.conf_a)
        self.b = lib.Site(self.conf_b)

    def close(self):
        for d in (self.source, self.sink):
            if d and d.proc and d.proc.poll() is None:
                d.proc.kill()  # our own child, by its Popen handle
                d.proc.wait()
        for h in (self.handles or {}).values():
            try:
                h.close()
            except Exception:
                pass
        self.handles = None
        if self.args.testbed and not self.args.keep_images and self.a:
            log("removing this run's images from the test bed")
            for site in (self.a, self.b):
                try:
                    site.remove_all(f"mv{self.tag}-")
                except Exception as e:
                    log(f"could not remove the images: {e}")
        for s in (self.a, self.b):
            if s:
                s.close()
        if self.own_testbed:
            log(f"stopping the test bed {self.own_testbed}")
            subprocess.run([lib.TESTBED, "stop", self.own_testbed, "--purge"],
                           stdout=subprocess.DEVNULL, timeout=300)

    def daemon_alive(self, d):
        if d.proc.poll() is not None:
            raise RuntimeError(f"cairnd {d.name} exited with {d.proc.returncode}:\n"
                               + d.log_tail())

    # --- 1. setup ----------------------------------------------------------------
    def setup(self):
        log(f"creating {self.n} images of 4 MiB at site A, 256 KiB of random data in each")
        t0 = time.monotonic()
        rng = random.Random(21)
        datas = [rng.randbytes(INITIAL_DATA) for _ in range(min(self.n, 16))]
        errors = []
        todo = queue.Queue()
        for i, v in enumerate(self.vids):
            todo.put((i, v))

        def work():
            while True:
                try:
                    i, v = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    self.a.create(v, IMAGE_SIZE)
                    with rbd.Image(self.a.ioctx, v) as img:
                        img.write(datas[i % len(datas)], 0)
                except Exception as e:
                    errors.append(f"{v}: {e}")
                    return
        ts = [threading.Thread(target=work) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise RuntimeError(f"creating images failed: {errors[:5]}")
        create_s = time.monotonic() - t0
        log(f"  {self.n} images in {create_s:.1f} s")
        open_s = None
        if self.args.writer == "hold-open":
            # The guests' images are open before replication starts.
            t = time.monotonic()
            self.handles = {v: rbd.Image(self.a.ioctx, v) for v in self.vids}
            open_s = time.monotonic() - t
            log(f"  {self.n} images opened by the writer (held open) in {open_s:.1f} s")
        self.port = lib.free_port()
        spool = os.path.join(self.work, "spool")
        sink_text = lib.sink_config("b", self.conf_b, self.port, spool,
                                    extra="keep_points = 3\n")
        src_text = lib.source_config("a", self.conf_a, self.port,
                                     {v: (v, v) for v in self.vids},
                                     interval=self.args.interval, keep=0)
        if self.args.memory_budget:
            line = f"control_socket = @SOCKET@\nmemory_budget = {self.args.memory_budget}\n"
            sink_text = sink_text.replace("control_socket = @SOCKET@\n", line, 1)
            src_text = src_text.replace("control_socket = @SOCKET@\n", line, 1)
        self.sink = lib.Cairnd(self.work, "sink", sink_text)
        self.source = lib.Cairnd(self.work, "source", src_text)
        self.results["sections"]["setup"] = {"create_images_s": round(create_s, 1),
                                             "writer_open_s": open_s and round(open_s, 1),
                                             "config_lines": src_text.count("\n")}

    # --- 2. initial sync -------------------------------------------------------------
    def initial_sync(self):
        log("starting the sink")
        t = time.monotonic()
        self.sink.start(timeout=600)
        sink_start = time.monotonic() - t
        log(f"  answering after {sink_start:.2f} s; starting the source")
        t0 = time.monotonic()
        self.source.start(timeout=600)
        source_start = time.monotonic() - t0
        log(f"  answering after {source_start:.2f} s")
        self.pids = {"source": self.source.proc.pid, "sink": self.sink.proc.pid}
        marks = {}
        progress = []
        deadline = t0 + self.args.sync_timeout
        last_log = 0
        while True:
            self.daemon_alive(self.source)
            self.daemon_alive(self.sink)
            st = self.sink.json("status")
            mine = [v for v in st if v["volume"] in self.vset]
            done = sum(1 for v in mine if v["last_seq"] >= 1)
            el = time.monotonic() - t0
            progress.append((round(el, 1), done))
            for frac in (0.5, 0.9):
                if done >= frac * self.n and frac not in marks:
                    marks[frac] = round(el, 1)
            if time.monotonic() - last_log > 15:
                log(f"  {done}/{self.n} volumes have a restore point after {el:.0f} s")
                last_log = time.monotonic()
            if done >= self.n:
                break
            if self.args.stacks_sync and el > 60 and "stacks_during_sync" not in self.diag:
                log("  looking at the source's threads (gdb; --stacks)")
                self.diag["stacks_during_sync"] = {"at_s": round(el, 1), "volumes_done": done,
                                                   **thread_stacks(self.source.proc.pid)}
            if time.monotonic() > deadline:
                src = self.source.json("status")
                errs = collections.Counter(v["error"][:160] for v in src if v["error"])
                raise TimeoutError(f"only {done}/{self.n} volumes had a restore point "
                                   f"{self.args.sync_timeout} s after the source started; "
                                   f"source errors: {errs.most_common(5)}")
            time.sleep(2)
        total = time.monotonic() - t0
        log(f"  all {self.n} volumes have a restore point {total:.1f} s after the source started")
        samples = {k: proc_sample(p) for k, p in self.pids.items()}
        self.results["sections"]["initial_sync"] = {
            "sink_answering_s": round(sink_start, 2), "source_answering_s": round(source_start, 2),
            "all_points_s": round(total, 1), "half_points_s": marks.get(0.5),
            "ninety_pct_points_s": marks.get(0.9), "progress": progress[::max(1, len(progress) // 60)],
            "daemons": {k: {"cpu_s": round(s["cpu_s"], 1), "hwm_mib": round(s["hwm_mib"], 1),
                            "rss_mib": round(s["rss_mib"], 1), "threads": s["threads"],
                            "fds": s["fds"]} for k, s in samples.items()}}

    # --- status sums ----------------------------------------------------------------------
    def sums(self):
        src = [v for v in self.source.json("status") if v["volume"] in self.vset]
        snk = [v for v in self.sink.json("status") if v["volume"] in self.vset]
        return {"source_epochs": sum(v["epochs_total"] for v in src),
                "source_unchanged_checks": sum(v["unchanged_checks_total"] for v in src),
                "source_errors": sum(v["errors_total"] for v in src),
                "source_states": dict(collections.Counter(v["state"] for v in src)),
                "source_volumes_with_error": sum(1 for v in src if v["error"]),
                "sink_points": sum(v["epochs_total"] for v in snk),
                "sink_last_seq_sum": sum(v["last_seq"] for v in snk),
                "sink_errors": sum(v["errors_total"] for v in snk),
                "sink_states": dict(collections.Counter(v["state"] for v in snk)),
                "sink_max_lag_s": round(max((v["lag_seconds"] for v in snk), default=0), 1),
                "source_max_lag_s": round(max((v["lag_seconds"] for v in src), default=0), 1),
                "pending_snapshots": sum(v["pending_snapshots"] for v in src)}

    def delta(self, a, b):
        return {"points_made": b["sink_points"] - a["sink_points"],
                "source_epochs": b["source_epochs"] - a["source_epochs"],
                "unchanged_checks": b["source_unchanged_checks"] - a["source_unchanged_checks"],
                "source_errors": b["source_errors"] - a["source_errors"],
                "sink_errors": b["sink_errors"] - a["sink_errors"],
                "sink_states_end": b["sink_states"], "source_states_end": b["source_states"],
                "source_max_lag_s_end": b["source_max_lag_s"],
                "sink_max_lag_s_end": b["sink_max_lag_s"],
                "pending_snapshots_end": b["pending_snapshots"]}

    def wait_phase(self, until):
        while time.monotonic() < until:
            self.daemon_alive(self.source)
            self.daemon_alive(self.sink)
            time.sleep(min(1.0, max(0.0, until - time.monotonic())))

    # --- 3. idle ----------------------------------------------------------------------------
    def warm_up(self):
        """Steady state: every volume has made its first unchanged check
        since its newest point (that one learns what the object map must
        read; the later ones only ask whether it still does)."""
        t0 = time.monotonic()
        deadline = t0 + 2 * self.interval_s + 120
        while True:
            src = [v for v in self.source.json("status") if v["volume"] in self.vset]
            waiting = sum(1 for v in src if v["unchanged_checks_total"] < 1)
            if waiting == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up: {waiting} volumes made no unchanged check within "
                                   f"{deadline - t0:.0f} s of the initial sync")
            self.daemon_alive(self.source)
            self.daemon_alive(self.sink)
            time.sleep(1.0)
        self.results["sections"]["warm_up_s"] = round(time.monotonic() - t0, 1)
        log(f"  warm-up: every volume checked once, {time.monotonic() - t0:.1f} s")

    def idle(self):
        s = self.args.idle_seconds
        self.warm_up()
        log(f"idle phase: {s} s, nothing written")
        st0 = self.sums()
        before = {k: proc_sample(p) for k, p in self.pids.items()}
        self.wait_phase(before["source"]["t"] + s)
        after = {k: proc_sample(p) for k, p in self.pids.items()}
        st1 = self.sums()
        out = {k: phase_figures(before[k], after[k]) for k in self.pids}
        out.update(self.delta(st0, st1))
        out["unchanged_checks_total_end"] = st1["source_unchanged_checks"]
        self.results["sections"]["idle"] = out
        log(f"  source {out['source']['cpu_pct']} %, sink {out['sink']['cpu_pct']} % of a core; "
            f"{out['points_made']} points, {out['unchanged_checks']} unchanged checks")

    # --- 4. loaded ------------------------------------------------------------------------------
    def timed(self, *argv):
        t = time.perf_counter()
        r = subprocess.run([lib.CAIRN, *argv], capture_output=True, text=True, timeout=120)
        ms = (time.perf_counter() - t) * 1000
        return ms, r

    def socket_calls(self, d, rng, n, volume_fn):
        """n status calls through the control client the Cinder driver uses
        (one Unix-socket connection per call, no process start-up): the
        daemon's own answer time."""
        client = wire.ControlClient(d.socket, timeout=120)
        lat, failed = [], []
        for _ in range(n):
            t = time.perf_counter()
            try:
                got = client.status(volume_fn(rng))
                if not got:
                    failed.append("empty status reply")
            except wire.CairnError as e:
                failed.append(str(e)[:200])
            lat.append((time.perf_counter() - t) * 1000)
        return percentiles(lat), failed

    def latency_set(self, d, rng):
        out = {}
        out["socket_status_volume"], failed = self.socket_calls(
            d, rng, self.args.status_calls, lambda r: r.choice(self.vids))
        out["socket_status_all"], more = self.socket_calls(
            d, rng, self.args.status_all_calls, lambda r: "")
        failed += more
        single = []
        for _ in range(self.args.status_calls):
            ms, r = self.timed("--socket", d.socket, "--json", "status", rng.choice(self.vids))
            single.append(ms)
            if r.returncode != 0:
                failed.append(r.stderr.strip()[:200])
        out["status_volume"] = percentiles(single)
        every = []
        for _ in range(self.args.status_all_calls):
            ms, r = self.timed("--socket", d.socket, "--json", "status")
            every.append(ms)
            if r.returncode != 0:
                failed.append(r.stderr.strip()[:200])
        out["status_all"] = percentiles(every)
        floor = []
        for _ in range(self.args.floor_calls):
            ms, r = self.timed("--socket", d.socket, "status", "nosuch")
            floor.append(ms)  # exit 3, not found: a round trip all the same
        out["floor_status_nosuch"] = percentiles(floor)
        out["failed_calls"] = len(failed)
        out["failure_samples"] = failed[:3]
        return out

    def loaded(self):
        s = self.args.load_seconds
        log(f"loaded phase: {s} s, {self.args.write_rate} writes/s of 64 KiB to random volumes")
        st0 = self.sums()
        before = {k: proc_sample(p) for k, p in self.pids.items()}
        writer = LoadWriter(self.a, self.vids, self.args.write_rate, seed=2121,
                            handles=self.handles).start()
        end = before["source"]["t"] + s
        lat = {}
        rng = random.Random(7)
        try:
            for k in ("source", "sink"):
                t = time.monotonic()
                lat[k] = self.latency_set(getattr(self, k), rng)
                log(f"  {k} control calls: {time.monotonic() - t:.1f} s; status VOLUME "
                    f"p50 {lat[k]['status_volume']['p50_ms']} ms p99 "
                    f"{lat[k]['status_volume']['p99_ms']} ms (socket p99 "
                    f"{lat[k]['socket_status_volume']['p99_ms']} ms); status (all) p99 "
                    f"{lat[k]['status_all']['p99_ms']} ms; floor p50 "
                    f"{lat[k]['floor_status_nosuch']['p50_ms']} ms")
            lat_done = time.monotonic()
            self.wait_phase(end)
        finally:
            load = writer.stop()
        after = {k: proc_sample(p) for k, p in self.pids.items()}
        st1 = self.sums()
        if self.args.stacks:
            log("  looking at the source's threads (gdb; --stacks)")
            self.diag["stacks_end_of_load"] = thread_stacks(self.source.proc.pid)
        out = {k: phase_figures(before[k], after[k]) for k in self.pids}
        out.update(self.delta(st0, st1))
        out["load"] = load
        out["latency"] = lat
        out["latency_calls_s"] = round(lat_done - before["source"]["t"], 1)
        self.results["sections"]["loaded"] = out
        log(f"  source {out['source']['cpu_pct']} %, sink {out['sink']['cpu_pct']} % of a core; "
            f"{load['writes']} writes to {load['volumes_written']} volumes, "
            f"{out['points_made']} points")

    # --- 5. shutdown -------------------------------------------------------------------------------
    def shutdown(self):
        out = {}
        for d in (self.source, self.sink):
            final = proc_sample(d.proc.pid)
            t = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(timeout=self.args.stop_timeout)
                secs = time.monotonic() - t
            except subprocess.TimeoutExpired:
                d.proc.kill()
                rc = d.proc.wait()
                secs = None
            out[d.name] = {"exit_s": round(secs, 2) if secs is not None else None,
                           "exit_code": rc, "hwm_mib": round(final["hwm_mib"], 1),
                           "threads": final["threads"], "fds": final["fds"]}
            log(f"  {d.name}: SIGTERM -> exit {rc} in "
                f"{f'{secs:.2f} s' if secs is not None else f'> {self.args.stop_timeout} s (killed)'}")
        self.results["sections"]["shutdown"] = out

    def log_summary(self):
        """Lines per level in each daemon's log, and the first warnings/errors."""
        out = {}
        for d in (self.source, self.sink):
            if not d or not os.path.exists(d.log):
                continue
            levels = collections.Counter()
            samples = []
            with open(d.log, errors="replace") as f:
                for line in f:
                    parts = line.split(" ", 3)
                    if len(parts) < 3 or not parts[0][:4].isdigit():
                        levels["other"] += 1  # not a cairnd log line
                        continue
                    lvl = parts[1]
                    levels[lvl] += 1
                    if lvl in ("warning", "error", "critical") and len(samples) < 10:
                        samples.append(line.rstrip()[:300])
            out[d.name] = {"lines_per_level": dict(levels), "warnings_errors": samples,
                           "log": d.log}
        self.results["logs"] = out

    def run(self):
        self.results["loadavg_start"] = os.getloadavg()
        self.vset = set(self.vids)
        self.open_testbed()
        self.setup()
        self.initial_sync()
        self.idle()
        self.loaded()
        self.shutdown()
        self.results["loadavg_end"] = os.getloadavg()


# --- the report ---------------------------------------------------------------------

def met(ok):
    return "**met**" if ok else "**not met**"


def fmt_load(v):
    return "/".join(f"{x:.1f}" for x in v)


def report(r):
    s = r["sections"]
    cmd = r["command"]
    lines = [f"# Many volumes per daemon pair (issue 21)", "",
             f"Measured {r['when']} on {r['cpus']} cores ({r['host']}): one source cairnd "
             f"(site A) and one sink cairnd (site B), **{r['volumes']} volumes**, "
             f"interval {r['interval']}, keep_snapshots = 0, sink keep_points = 3; "
             "4 MiB images with 256 KiB of random data each; both Ceph sites on one "
             "machine (tests/cluster/testbed.sh, memstore)."
             + (f" Load average (1/5/15 min) at the start {fmt_load(r['loadavg_start'])}"
                if r.get("loadavg_start") else "")
             + (f", at the end {fmt_load(r['loadavg_end'])}" if r.get("loadavg_end") else "")
             + (" (other work shared the machine; latencies are noisy)."
                if r.get("loadavg_start") and r["loadavg_start"][0] > 1.5 else "."), "",
             f"Every figure below was produced by this command:", "",
             f"    {cmd}", ""]
    if r.get("failed"):
        lines += [f"**The run failed**: `{r['failed'][:1500]}`", ""]
    how = ("CPU: utime+stime of the daemon (/proc/PID/stat) over the phase ÷ its wall time, "
           "in % of one core. RSS: VmRSS at the end of the phase; peak: VmHWM since start "
           "(/proc/PID/status).")
    if "setup" in s:
        lines += [f"Setup: {r['volumes']} images created and written in "
                  f"{s['setup']['create_images_s']} s (8 threads of python-rbd).", ""]
    if "initial_sync" in s:
        i = s["initial_sync"]
        lines += ["| initial sync | |", "|---|---:|",
                  f"| sink answering on its socket after start | {i['sink_answering_s']} s |",
                  f"| source answering on its socket after start | {i['source_answering_s']} s |",
                  f"| every volume has restore point ≥ 1 (sink `cairn --json status`) | "
                  f"**{i['all_points_s']} s** after the source started |",
                  f"| half of them | {i['half_points_s']} s |",
                  f"| 90 % of them | {i['ninety_pct_points_s']} s |",
                  f"| source then: CPU s since start, peak RSS, threads, fds | "
                  f"{i['daemons']['source']['cpu_s']} s, {i['daemons']['source']['hwm_mib']} MiB, "
                  f"{i['daemons']['source']['threads']}, {i['daemons']['source']['fds']} |",
                  f"| sink then: CPU s since start, peak RSS, threads, fds | "
                  f"{i['daemons']['sink']['cpu_s']} s, {i['daemons']['sink']['hwm_mib']} MiB, "
                  f"{i['daemons']['sink']['threads']}, {i['daemons']['sink']['fds']} |", ""]
    warm = s.get("warm_up_s")
    idle_title = f"idle phase, {r['idle_seconds']} s, nothing written" + (
        f", after a {warm} s warm-up (every volume checked once)" if warm is not None else "")
    for key, title in (("idle", idle_title),
                       ("loaded", f"loaded phase, {r['load_seconds']} s, "
                                  f"{r['write_rate']} writes/s of 64 KiB")):
        if key not in s:
            continue
        p = s[key]
        lines += [f"| {title} | source | sink |", "|---|---:|---:|",
                  f"| CPU, % of one core | {p['source']['cpu_pct']} % | {p['sink']['cpu_pct']} % |",
                  f"| CPU seconds / wall seconds | {p['source']['cpu_s']} / {p['source']['wall_s']}"
                  f" | {p['sink']['cpu_s']} / {p['sink']['wall_s']} |",
                  f"| RSS at the end | {p['source']['rss_mib']} MiB | {p['sink']['rss_mib']} MiB |",
                  f"| peak RSS (VmHWM) | {p['source']['hwm_mib']} MiB | {p['sink']['hwm_mib']} MiB |",
                  f"| threads, open fds | {p['source']['threads']}, {p['source']['fds']} | "
                  f"{p['sink']['threads']}, {p['sink']['fds']} |",
                  f"| thread wake-ups per s (voluntary context switches, all threads) | "
                  f"{p['source'].get('wakeups_per_s')} | {p['sink'].get('wakeups_per_s')} |",
                  f"| epochs (source) / restore points made (sink `epochs_total`) | "
                  f"{p['source_epochs']} | {p['points_made']} |",
                  f"| unchanged checks (source `unchanged_checks_total`, Σ over volumes) | "
                  f"{p['unchanged_checks']} in the phase"
                  + (f", {p['unchanged_checks_total_end']} since start" if key == "idle" else "")
                  + " | |",
                  f"| errors_total increase | {p['source_errors']} | {p['sink_errors']} |",
                  f"| states at the end | {p['source_states_end']} | {p['sink_states_end']} |",
                  f"| largest lag at the end | {p['source_max_lag_s_end']} s | "
                  f"{p['sink_max_lag_s_end']} s |", ""]
        if key == "loaded":
            ld = p["load"]
            wl = ld["write_latency"] or {}
            lines += [f"Load: {ld['writes']} writes ({ld['rate_achieved']}/s of "
                      f"{ld['rate_asked']}/s asked) to {ld['volumes_written']} distinct volumes, "
                      f"{ld['errors']} failed; "
                      + ("through images the writer opened before the source started and "
                         "held open, as running VMs do"
                         if r.get("writer", "open-each") == "hold-open" else
                         "each write opens the image, writes, closes (a short-lived client)")
                      + f" (write latency p50 {wl.get('p50_ms')} ms, p99 {wl.get('p99_ms')} ms).",
                      ""]
            lat = p["latency"]
            lines += ["| control call (serial, during the load) | "
                      "source p50 / p99 / max | sink p50 / p99 / max |", "|---|---:|---:|"]
            for k, label in (("socket_status_volume", "status VOLUME (random volume) on the "
                                                      "control socket, as the Cinder driver "
                                                      "calls it"),
                             ("socket_status_all", "status (all volumes) on the control socket"),
                             ("status_volume", "`cairn --socket S --json status VOLUME` "
                                               "(random volume; CLI start-up included)"),
                             ("status_all", "`cairn --socket S --json status` (all volumes)"),
                             ("floor_status_nosuch", "floor: `cairn --socket S status nosuch`")):
                cells = []
                for d in ("source", "sink"):
                    if d in lat:
                        x = lat[d][k]
                        cells.append(f"{x['p50_ms']} / {x['p99_ms']} / {x['max_ms']} ms "
                                     f"({x['n']} calls)")
                    else:
                        cells.append("")
                lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
            fails = {d: lat[d]["failed_calls"] for d in lat}
            lines += ["", f"Failed control calls: {fails}. The calls took "
                      f"{p['latency_calls_s']} s of the phase.", ""]
    if "shutdown" in s:
        sd = s["shutdown"]
        lines += ["| shutdown: SIGTERM (source first) until the process exits | source | sink |",
                  "|---|---:|---:|",
                  "| seconds | " + " | ".join(
                      f"{sd[d]['exit_s']} s" if sd[d]["exit_s"] is not None else "did not exit"
                      for d in ("source", "sink")) + " |",
                  f"| exit status | {sd['source']['exit_code']} | {sd['sink']['exit_code']} |",
                  f"| peak RSS over the whole run | {sd['source']['hwm_mib']} MiB | "
                  f"{sd['sink']['hwm_mib']} MiB |", ""]
    lines += [how, ""]
    targets = []
    if "idle" in s:
        for d in ("source", "sink"):
            v = s["idle"][d]["cpu_pct"]
            targets.append((f"idle CPU < {TARGET_IDLE_CPU_PCT:g} % of a core ({d})", f"{v} %",
                            v < TARGET_IDLE_CPU_PCT))
    peak = {}
    for d in ("source", "sink"):
        vals = [s[k][d]["hwm_mib"] for k in ("idle", "loaded") if k in s and d in s[k]]
        if "shutdown" in s:
            vals.append(s["shutdown"][d]["hwm_mib"])
        if vals:
            peak[d] = max(vals)
            targets.append((f"RSS ≤ {TARGET_RSS_MIB} MiB at {r['volumes']} volumes ({d}, peak)",
                            f"{peak[d]} MiB", peak[d] <= TARGET_RSS_MIB))
    if "loaded" in s:
        for d in ("source", "sink"):
            if d in s["loaded"]["latency"]:
                v = s["loaded"]["latency"][d]["socket_status_volume"]["p99_ms"]
                targets.append((f"status VOLUME p99 < {TARGET_STATUS_P99_MS} ms on the control "
                                f"socket ({d})", f"{v} ms", v < TARGET_STATUS_P99_MS))
                v = s["loaded"]["latency"][d]["socket_status_all"]["p99_ms"]
                targets.append((f"status (all) p99 < {TARGET_STATUS_P99_MS} ms on the control "
                                f"socket ({d})", f"{v} ms", v < TARGET_STATUS_P99_MS))
    if "shutdown" in s:
        for d in ("source", "sink"):
            v = s["shutdown"][d]["exit_s"]
            targets.append((f"shutdown < {TARGET_SHUTDOWN_S} s ({d})",
                            f"{v} s" if v is not None else "did not exit",
                            v is not None and v < TARGET_SHUTDOWN_S))
    if targets:
        lines += ["| target (issue 21) | measured | |", "|---|---:|---|"]
        lines += [f"| {t} | {v} | {met(ok)} |" for t, v, ok in targets]
        lines.append("")
        missed = [t for t, _, ok in targets if not ok]
        lines.append("All targets met." if not missed else
                     "Not met: " + "; ".join(missed) + ".")
        lines.append("")
    r["targets"] = [{"target": t, "measured": v, "met": ok} for t, v, ok in targets]
    for k, label in (("stacks_during_sync", "the source's threads during the initial sync"),
                     ("stacks_end_of_load", "the source's threads at the end of the loaded "
                                            "phase")):
        d = r.get("diagnostics", {}).get(k)
        if d:
            at = (f", {d['at_s']} s after its start, {d['volumes_done']} volumes done"
                  if "at_s" in d else "")
            lines += [f"{label.capitalize()} (gdb `thread apply all bt`{at}; "
                      f"{d['threads']} threads; the process stood still {d['gdb_stall_s']} s):", "",
                      "| threads | innermost frame <- innermost Cairn frames |", "|---:|---|"]
            lines += [f"| {n} | `{what[:230]}` |" for what, n in d["top"]]
            lines.append("")
    logs = r.get("logs", {})
    if logs:
        lines += ["Daemon log lines per level: " + "; ".join(
            f"{d} {v['lines_per_level']}" for d, v in logs.items()) + ".", ""]
    return "\n".join(lines)


def raise_nofile(need):
    """Makes the open-files limit this process (and so the cairnds it
    starts) has at least NEED: cairnd holds 4 descriptors per volume and
    raises its own soft limit to the hard one, but not the hard one.
    Returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))  # needs root
        except (ValueError, OSError) as e:
            log(f"warning: the open files hard limit is {hard}, under the {need} the daemons "
                f"need, and cannot be raised ({e}); expect cairnd to fail on sockets")
    elif soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--interval", default="30s", help="[volume] interval")
    ap.add_argument("--memory-budget", help="[cairnd] memory_budget of both daemons (else "
                    "cairnd's default)")
    ap.add_argument("--idle-seconds", type=int, default=90)
    ap.add_argument("--load-seconds", type=int, default=90)
    ap.add_argument("--write-rate", type=float, default=20.0,
                    help="64 KiB writes per second, all volumes together")
    ap.add_argument("--writer", choices=["hold-open", "open-each"], default="hold-open",
                    help="the load's images held open from before replication starts (as "
                         "VMs), or opened, written and closed for every write")
    ap.add_argument("--out", default=os.path.join(lib.ROOT, "bench", "results"))
    ap.add_argument("--testbed", help="a running tests/cluster/testbed.sh DIR (else one is "
                                      "started and purged)")
    ap.add_argument("--base-port", type=int, default=27789, help="of the test bed started")
    ap.add_argument("--store-mib", type=int, default=6144, help="of the test bed started")
    ap.add_argument("--sync-timeout", type=int, default=1800,
                    help="seconds for every volume to get its first restore point")
    ap.add_argument("--status-calls", type=int, default=200)
    ap.add_argument("--status-all-calls", type=int, default=20)
    ap.add_argument("--floor-calls", type=int, default=50)
    ap.add_argument("--stop-timeout", type=int, default=120,
                    help="seconds to wait for a daemon's exit after SIGTERM before SIGKILL")
    ap.add_argument("--stacks", action="store_true",
                    help="diagnosis: look at the source's threads with gdb at the end of the "
                         "loaded phase (after its figures, before the shutdown)")
    ap.add_argument("--stacks-sync", action="store_true",
                    help="diagnosis: also 60 s into the initial sync (its time then "
                         "includes the seconds gdb stops the source)")
    ap.add_argument("--keep-images", action="store_true",
                    help="with --testbed: leave this run's images in it")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work directory (configs, cairnd logs, spool)")
    args = ap.parse_args()
    if args.volumes < 1 or args.volumes > 9999:
        ap.error("--volumes must be 1..9999")
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    nofile = raise_nofile(4 * args.volumes + 512)
    log(f"cairnd: {lib.CAIRND}; open files limit (soft, hard) for the daemons: {nofile}")
    b = Bench(args)
    b.results["nofile_limit"] = nofile
    failed = None
    try:
        try:
            b.run()
        except BaseException as e:
            failed = e
            b.results["failed"] = f"{type(e).__name__}: {e}"[:4000]
            log(f"failed: {b.results['failed'][:2000]}")
        try:
            b.log_summary()
        except Exception as e:
            log(f"could not summarise the logs: {e}")
        # The results are written before the clean-up, which may be long
        # (removing the images from a test bed given with --testbed).
        md = report(b.results)
        write_json(os.path.join(args.out, "many_volumes.json"), b.results)
        with open(os.path.join(args.out, "many_volumes.md"), "w") as f:
            f.write(md + "\n")
        print(md, flush=True)
    finally:
        b.close()
    if failed is None and not args.keep_work:
        shutil.rmtree(b.work, ignore_errors=True)
    else:
        log(f"work directory (configs, logs) kept: {b.work}")
    if failed is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
