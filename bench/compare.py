#!/usr/bin/python3
"""Cairn against the tools an operator would otherwise use, in one run, on
the two local test clusters (tests/cluster/testbed.sh): rbd bench (the raw
limits), `rbd export | rbd import`, `rbd export-diff | rbd import-diff` and
rbd-mirror in snapshot mode (one daemon at site B), and fio (rbd engine)
for the load on the primary. Cairn runs over mutual TLS, and (tool
cairn_plain) without it, for what TLS costs.

Every measurement runs `--runs` times (3 by default) and is reported as
median and min-max; every replica is compared with its source by a hash of
the whole image, and a run that does not verify raises: it does not count.
Results: OUT/results.json, OUT/results.md (with ratios against each peer
measured in the same run), OUT/performance.png and OUT/lag.png (the lag over
time of the RPO runs, scraped from both cairnds' /metrics); a run that fails writes
the sections it finished to OUT/results.partial.json instead.

Usage (bench/run.sh does all of it, test bed included):
  bench/compare.py --testbed DIR --out DIR [--runs N] [--rpo-seconds S]
                   [--only SECTION,...] [--merge RESULTS_JSON] [--update-docs]
"""
import argparse
import datetime
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "tools"))
import cairn_testlib as lib  # noqa: E402
import rbd  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
FULL_SIZE = 1 * GiB
INCR_BYTES = 128 * MiB
INCR_BLOCK = 64 * 1024
SECTIONS = ["raw", "full", "incremental", "sparse", "verify", "rpo", "penalty", "memory"]


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def run(*args, timeout=1800, **kw):
    """Runs a command; raises with its stderr when it fails."""
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def sh(cmd, timeout=1800):
    """A shell pipeline with pipefail: every stage must succeed."""
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": list(values)}


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipe_cpu(producer, consumer, timeout=1800):
    """Runs `producer | consumer`; both must succeed. Returns the CPU seconds
    (user + system) each of the two processes used, from its own rusage."""
    errs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    a = subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=errs[0])
    b = subprocess.Popen(consumer, stdin=a.stdout, stdout=subprocess.DEVNULL, stderr=errs[1])
    a.stdout.close()  # the consumer holds the pipe's read end alone
    watchdog = threading.Timer(timeout, lambda: (a.kill(), b.kill()))
    watchdog.start()
    used = []
    try:
        for p, cmd, err in ((a, producer, errs[0]), (b, consumer, errs[1])):
            _, status, ru = os.wait4(p.pid, 0)  # reaps it: Popen must not wait again
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: "
                                   f"{err.read().decode(errors='replace')[-2000:]}")
            used.append(ru.ru_utime + ru.ru_stime)
    finally:
        watchdog.cancel()
        for f in errs:
            f.close()
    return tuple(used)


def per_gib(used):
    """CPU seconds of a round's two phases -> CPU seconds per GiB moved,
    per side and both sides together."""
    out = {}
    for phase, moved in (("full", FULL_SIZE), ("incr", INCR_BYTES)):
        a, b = used[f"{phase}_a"] * GiB / moved, used[f"{phase}_b"] * GiB / moved
        out.update({f"{phase}_a": a, f"{phase}_b": b, f"{phase}_all": a + b})
    return out


def proc_peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def fio_job(image, seconds, rate_bps=None, prefix=()):
    """The guest's fio command: rbd engine, random 64 KiB writes, iodepth 16,
    on rbd/IMAGE for SECONDS (at RATE_BPS if given), a JSON report."""
    job = [*prefix, "fio", "--name=guest", "--ioengine=rbd", "--clientname=admin",
           "--pool=rbd", f"--rbdname={image}", "--rw=randwrite", "--bs=64k", "--iodepth=16",
           "--time_based", f"--runtime={seconds}", "--direct=1", "--output-format=json",
           "--randseed=42"]
    if rate_bps:
        job.append(f"--rate={int(rate_bps)}")
    return job


def window_mean(samples, start, seconds):
    """Mean of fio's per-second IOPS samples (Unix time, IOPS) whose second
    lies in [START, START + SECONDS] (Unix time)."""
    inside = [v for t, v in samples if start + 1 <= t <= start + seconds]
    if len(inside) < max(1, seconds // 2):
        raise RuntimeError(f"fio logged {len(inside)} samples in a {seconds} s window "
                           f"(of {len(samples)}): its log does not cover the window")
    return statistics.mean(inside)


def with_metrics(config_text, port):
    """A cairnd config that also serves Prometheus metrics on 127.0.0.1:PORT."""
    return config_text.replace("[cairnd]\n", f"[cairnd]\nmetrics_listen = 127.0.0.1:{port}\n", 1)


def scrape(port, name, **labels):
    """The value of one sample of cairnd's /metrics page (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class LagSampler:
    """Scrapes cairn_volume_lag_seconds from the sink's and the source's
    /metrics every PERIOD seconds, in a thread, from start to stop: the lag
    over time, as an operator's Prometheus would see it."""

    def __init__(self, vol, sink_port, source_port, period=0.25):
        self.series = []  # (seconds since start, lag at site B, lag at site A)
        self.errors = []
        self._stop = threading.Event()
        t0 = time.monotonic()

        def sample():
            while not self._stop.wait(period):
                try:
                    b = scrape(sink_port, "cairn_volume_lag_seconds", volume=vol, role="sink")
                    a = scrape(source_port, "cairn_volume_lag_seconds", volume=vol,
                               role="source")
                    self.series.append((round(time.monotonic() - t0, 3), b, a))
                except (OSError, ValueError) as e:  # a failed scrape is a gap, said in the results
                    self.errors.append(f"{time.monotonic() - t0:.1f} s: {e}")
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self.t0 = t0

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.series


class RunningFio:
    def __init__(self, bench, image, label, rate_bps, prefix):
        self.log_prefix = os.path.join(bench.work, f"fio-{label}")
        for f in os.listdir(bench.work):
            if f.startswith(f"fio-{label}_iops"):
                os.unlink(os.path.join(bench.work, f))
        job = fio_job(image, 3600, rate_bps, prefix) + [
            f"--write_iops_log={self.log_prefix}", "--log_avg_msec=1000", "--log_unix_epoch=1"]
        with rbd.Image(bench.a.ioctx, image, read_only=True) as im:
            before = {(w["id"], w["cookie"]) for w in im.watchers_list()}
        self.proc = subprocess.Popen(job, env={**os.environ, "CEPH_CONF": bench.conf_a},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Open, as a running VM's image is, before anything replicates it.
        try:
            with rbd.Image(bench.a.ioctx, image, read_only=True) as im:
                def watching():
                    self.check_running("it opened its image")
                    return any((w["id"], w["cookie"]) not in before
                               for w in im.watchers_list())
                lib.wait_for(f"fio to open rbd/{image} (a watcher on its header)", watching,
                             timeout=60)
        except BaseException:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


    def check_running(self, what):
        if self.proc.poll() is not None:
            _, err = self.proc.communicate()
            raise RuntimeError(f"fio ended before {what}: {err[:1500]}")

    def stop(self):
        """Interrupts fio; returns its per-second write IOPS as (Unix time
        in seconds, IOPS). fio ends with status 128 on SIGINT but writes its
        report; an error in the report raises."""
        self.check_running("it was stopped")
        self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("fio did not end within 120 s of SIGINT")
        if "{" not in out:
            raise RuntimeError(f"fio wrote no report (status {self.proc.returncode}): {err[:1500]}")
        job = json.loads(out[out.index("{"):])["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio failed (error {job['error']}): {err[:1500]}")
        samples = []
        with open(f"{self.log_prefix}_iops.1.log") as f:
            for line in f:
                fields = [x.strip() for x in line.split(",")]
                if len(fields) >= 3 and fields[2] == "1":
                    samples.append((int(fields[0]) / 1000, int(fields[1])))
        return samples


class Bench:
    def __init__(self, args):
        self.args = args
        env = {}
        with open(os.path.join(args.testbed, "env")) as f:
            for line in f:
                if "=" in line:
                    k, v = line.strip().split("=", 1)
                    env[k] = v.strip('"')
        self.conf_a, self.conf_b = env["CEPH_CONF_A"], env["CEPH_CONF_B"]
        self.a = lib.Site(self.conf_a)
        self.b = lib.Site(self.conf_b)
        self.work = os.path.join(args.out, "work")
        os.makedirs(self.work, exist_ok=True)
        self.results = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "runs": args.runs, "host": os.uname().nodename,
            "cpus": os.cpu_count(), "sections": {}}
        self.port = lib.free_port()
        self.sink = None
        self.plain_port = lib.free_port()  # the sink without TLS (tool cairn_plain)
        self.plain_sink = None
        self.sink_metrics = lib.free_port()  # the TLS sink's /metrics (the lag chart)
        self.mirror = None
        self.randfile = os.path.join(self.work, "random-1g.bin")
        # Volume ids and images are new in every invocation: the sink's
        # catalog keeps the points of earlier ones, and a volume id stays
        # bound to its standby image.
        self.tag = f"{int(time.time()) % 100000:05d}"

    # --- placement -----------------------------------------------------------
    # On separate hardware the primary's guest and storage share nothing with
    # the standby site or the replicator nodes (DESIGN: cairnd runs on
    # replicator nodes). "per-site" gives site A (its mon, mgr, OSD and the
    # guest, fio) core 0, and site B plus the replicators (both cairnds) core
    # 1; "shared" lets everything float over all cores.
    def site_cores(self):
        n = os.cpu_count() or 1
        return ("0", "1" if n == 2 else f"1-{n - 1}") if n >= 2 else None

    def pin(self, pid, cores):
        run("taskset", "-a", "-p", "-c", cores, str(pid))

    def place(self, placement, *cairnds):
        """Pins the test bed's daemons and the given cairnds for `placement`
        ("per-site" or "shared"); returns the fio command prefix."""
        cores = self.site_cores()
        if placement == "shared" or cores is None:
            every = f"0-{(os.cpu_count() or 1) - 1}"
            for conf in (self.conf_a, self.conf_b):
                for pid in lib.site_daemon_pids(conf, kinds=("mon", "mgr", "osd")).values():
                    self.pin(pid, every)
            for c in cairnds:
                self.pin(c.proc.pid, every)
            return []
        for conf, c in ((self.conf_a, cores[0]), (self.conf_b, cores[1])):
            for pid in lib.site_daemon_pids(conf, kinds=("mon", "mgr", "osd")).values():
                self.pin(pid, c)
        for c in cairnds:
            self.pin(c.proc.pid, cores[1])
        return ["taskset", "-c", cores[0]]

    # --- helpers -------------------------------------------------------------
    def osd_cpu(self):
        """CPU seconds used so far by the OSD of site A and of site B."""
        out = []
        for conf in (self.conf_a, self.conf_b):
            pids = lib.site_daemon_pids(conf, kinds=("osd",))
            out.append(sum(proc_cpu_seconds(p) for p in pids.values()))
        return out

    def osd_cost(self, before):
        """The OSDs' CPU seconds since `before` (an osd_cpu() reading)."""
        a, b = self.osd_cpu()
        return {"osd_a_cpu_s": a - before[0], "osd_b_cpu_s": b - before[1]}

    def rbd_a(self, *args, **kw):
        return run("rbd", "-c", self.conf_a, *args, **kw)

    def rbd_b(self, *args, **kw):
        return run("rbd", "-c", self.conf_b, *args, **kw)

    def export_hash(self, conf, spec):
        """md5 of every byte of the image (holes as zeros): `rbd export` to a pipe."""
        return sh(f"rbd -c {conf} export --no-progress {spec} - | md5sum").split()[0]

    def remove(self, site, name):
        if name in site.images():
            site.remove_all(name)

    def ensure_random_file(self):
        if not os.path.exists(self.randfile):
            with open(self.randfile + ".tmp", "wb") as f:
                rng = random.Random(7)
                for _ in range(FULL_SIZE // (64 * MiB)):
                    f.write(rng.randbytes(64 * MiB))
            os.rename(self.randfile + ".tmp", self.randfile)

    def make_full_image(self, name):
        """A 1 GiB image at site A holding the random file."""
        self.remove(self.a, name)
        self.rbd_a("import", "--no-progress", "--image-feature",
                   "layering,exclusive-lock,object-map,fast-diff", self.randfile, f"rbd/{name}")

    def incremental_writes(self, name, seed):
        """INCR_BYTES of random 64 KiB writes at distinct random offsets."""
        rng = random.Random(seed)
        blocks = rng.sample(range(FULL_SIZE // INCR_BLOCK), INCR_BYTES // INCR_BLOCK)
        with rbd.Image(self.a.ioctx, name) as img:
            comps = []
            for blk in blocks:
                comps.append(img.aio_write(rng.randbytes(INCR_BLOCK), blk * INCR_BLOCK,
                                           lambda c: None))
                if len(comps) >= 32:
                    for c in comps:
                        c.wait_for_complete_and_cb()
                    comps = []
            for c in comps:
                c.wait_for_complete_and_cb()
            img.flush()

    def start_sink(self, tls=True):
        # One sink per pool (a second one fences the first): the sink with
        # TLS and the one without take turns.
        other = "plain_sink" if tls else "sink"
        if getattr(self, other) is not None:
            getattr(self, other).stop()
            setattr(self, other, None)
        if not tls:
            if self.plain_sink is None:
                self.plain_sink = lib.Cairnd(self.work, "sink-b-plain", lib.sink_config(
                    "b", self.conf_b, self.plain_port, os.path.join(self.work, "spool-plain"),
                    extra="keep_points = 3\n", tls=False)).start()
            return self.plain_sink
        if self.sink is None:
            # Retention keeps the standby's snapshots (memstore is RAM) bounded
            # under the RPO load: one point a second.
            self.sink = lib.Cairnd(self.work, "sink-b", with_metrics(lib.sink_config(
                "b", self.conf_b, self.port, os.path.join(self.work, "spool"),
                extra="keep_points = 3\n" +
                "".join(f"{o}\n" for o in self.args.sink_option)), self.sink_metrics)).start()
        return self.sink

    def start_source(self, name, volumes, interval="0", tls=True, metrics_port=None):
        config = lib.source_config(
            "a", self.conf_a, self.port if tls else self.plain_port, volumes, interval=interval,
            keep=0, extra="".join(f"{o}\n" for o in self.args.volume_option), tls=tls)
        if metrics_port:
            config = with_metrics(config, metrics_port)
        return lib.Cairnd(self.work, name, config).start()

    def cairn_replicate(self, src, vol):
        t0 = time.monotonic()
        r = src.json("replicate", vol, "--wait", "--timeout", "1200")
        return time.monotonic() - t0, r["seq"]

    def names(self, kind, run_no):
        """(volume id, source image, standby image) of one run."""
        vol = f"bench-{kind}{run_no}-{self.tag}"
        return vol, vol, vol + "-b"

    def fio(self, image, seconds, rate_bps=None, conf=None, prefix=()):
        """fio (rbd engine) random 64 KiB writes, iodepth 16, on rbd/IMAGE at
        site A. Returns (write IOPS, write bytes/s)."""
        conf = conf or self.conf_a
        job = fio_job(image, seconds, rate_bps, prefix)
        out = run(*job, env={**os.environ, "CEPH_CONF": conf}, timeout=seconds * 4 + 120)
        j = json.loads(out[out.index("{"):])
        w = j["jobs"][0]["write"]
        return w["iops"], w["bw_bytes"]

    def start_fio(self, image, label, rate_bps=None, prefix=()):
        """The fio job of fio() left running (until stop()), writing its
        per-second IOPS to a log: a guest whose image is open before
        replication starts, as a VM's is. A client that opens the image
        mid-replication costs one epoch of whole objects (docs/RELIABILITY.md,
        "a late write ... hidden by the next write"); a VM pays that once per
        attach, not at every interval."""
        return RunningFio(self, image, label, rate_bps, prefix)

    # --- rbd-mirror ------------------------------------------------------------
    def start_mirror(self, secure=False):
        """rbd-mirror at site B; `secure`: every connection of it in msgr2's
        secure mode (AES-GCM), as a link between sites would be encrypted."""
        if self.mirror and getattr(self, "mirror_secure", False) != secure:
            self.stop_mirror()
        self.mirror_secure = secure
        if self.mirror:
            return
        d = os.path.join(self.work, "rbd-mirror")
        os.makedirs(d, exist_ok=True)
        self.rbd_a("mirror", "pool", "enable", "rbd", "image")
        self.rbd_b("mirror", "pool", "enable", "rbd", "image")
        peers = json.loads(self.rbd_b("mirror", "pool", "info", "rbd", "--format", "json"))
        if not peers.get("peers"):
            token = self.rbd_a("mirror", "pool", "peer", "bootstrap", "create", "--site-name",
                               "site-a", "rbd")
            tok = os.path.join(d, "token")
            with open(tok, "w") as f:
                f.write(token)
            self.rbd_b("mirror", "pool", "peer", "bootstrap", "import", "--site-name", "site-b",
                       "--direction", "rx-only", "rbd", tok)
        keyring = os.path.join(d, "keyring")
        run("ceph", "-c", self.conf_b, "auth", "get-or-create", "client.rbd-mirror.b", "mon",
            "profile rbd-mirror", "osd", "profile rbd", "-o", keyring)
        link = os.path.join(d, "ceph.conf")
        if os.path.lexists(link):  # maybe left by an earlier bench, for another test bed
            os.unlink(link)
        os.symlink(self.conf_b, link)
        logf = open(os.path.join(d, "rbd-mirror.log"), "a")
        self.mirror = subprocess.Popen(
            ["rbd-mirror", "--id", "rbd-mirror.b", "--keyring", keyring, "-f"]
            + (["--ms_client_mode", "secure"] if secure else []), cwd=d,
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            if self.mirror.poll() is not None:
                raise RuntimeError(f"rbd-mirror exited {self.mirror.returncode}")
            st = json.loads(self.rbd_b("mirror", "pool", "status", "rbd", "--format", "json"))
            return st["summary"]["daemon_health"] == "OK"
        lib.wait_for("rbd-mirror at site B reporting healthy", up, timeout=120, interval=0.5)

    def stop_mirror(self):
        if self.mirror and self.mirror.poll() is None:
            self.mirror.terminate()
            try:
                self.mirror.wait(30)
            except subprocess.TimeoutExpired:
                self.mirror.kill()
                self.mirror.wait()
        self.mirror = None

    def mirror_synced(self, name, primary_snap_id):
        """True once site B holds a complete copy of A's mirror snapshot."""
        try:
            with rbd.Image(self.b.ioctx, name, read_only=True) as img:
                for s in img.list_snaps():
                    if s.get("namespace") != rbd.RBD_SNAP_NAMESPACE_TYPE_MIRROR:
                        continue
                    ns = img.snap_get_mirror_namespace(s["id"])
                    if ns.get("primary_snap_id") == primary_snap_id and ns.get("complete"):
                        return True
        except rbd.ImageNotFound:
            return False
        return False

    def newest_mirror_snap_id(self, name):
        with rbd.Image(self.a.ioctx, name, read_only=True) as img:
            ids = [s["id"] for s in img.list_snaps()
                   if s.get("namespace") == rbd.RBD_SNAP_NAMESPACE_TYPE_MIRROR]
        return max(ids)

    def mirror_remove(self, name, keep_primary=False):
        """Disables mirroring of NAME and removes its copy at site B, and
        the primary too unless KEEP_PRIMARY."""
        if name in self.a.images():
            with rbd.Image(self.a.ioctx, name) as img:
                try:
                    img.mirror_image_disable(True)
                except rbd.InvalidArgument:
                    pass
            if not keep_primary:
                self.a.remove_all(name)

        def gone():
            return name not in self.b.images()
        lib.wait_for(f"rbd-mirror removing {name} at site B", gone, timeout=120, interval=0.2)

    # --- sections --------------------------------------------------------------
    def section_raw(self):
        out = {}
        for site, conf in (("a", self.conf_a), ("b", self.conf_b)):
            for io in ("write", "read"):
                vals = []
                for _ in range(self.args.runs):
                    name = "bench-raw"
                    if io == "write":
                        s = self.a if site == "a" else self.b
                        self.remove(s, name)
                        run("rbd", "-c", conf, "create", f"rbd/{name}", "--size", "1G")
                    t0 = time.monotonic()
                    run("rbd", "-c", conf, "bench", "--io-type", io, "--io-size", "4M",
                        "--io-pattern", "seq", "--io-total", "1G", "--io-threads", "16",
                        f"rbd/{name}")
                    vals.append(GiB / (time.monotonic() - t0) / MiB)
                out[f"{io}_{site}"] = stats(vals)
                log(f"raw {io} site {site}: {out[f'{io}_{site}']['median']:.0f} MiB/s")
            self.remove(self.a if site == "a" else self.b, "bench-raw")
        return out

    def _verify(self, what, src_conf, src_spec, dst_conf, dst_spec):
        a = self.export_hash(src_conf, src_spec)
        b = self.export_hash(dst_conf, dst_spec)
        if a != b:
            raise RuntimeError(f"{what}: replica {dst_spec} differs from {src_spec} ({b} != {a})")
        self.results.setdefault("verified", []).append(what)
        self.results["bytes_compared"] = self.results.get("bytes_compared", 0) + 2 * FULL_SIZE

    def _cairn_round(self, run_no, tls=True):
        """Full sync of a 1 GiB random image, then 128 MiB of 64 KiB writes;
        over mutual TLS, or (tls=False) plaintext to measure what TLS costs."""
        vol, img, tgt = self.names("c" if tls else "p", run_no)
        self.make_full_image(img)
        sink = self.start_sink(tls)
        src = self.start_source(f"src-{'' if tls else 'plain-'}{run_no}", {vol: (img, tgt)},
                                tls=tls)
        try:
            cpu_a0, cpu_b0 = proc_cpu_seconds(src.proc.pid), proc_cpu_seconds(sink.proc.pid)
            osd0 = self.osd_cpu()
            full, seq = self.cairn_replicate(src, vol)
            osd = self.osd_cost(osd0)
            osd["tool_cpu_s"] = (proc_cpu_seconds(src.proc.pid) - cpu_a0
                                 + proc_cpu_seconds(sink.proc.pid) - cpu_b0)
            cpu = {"source_cpu_s_per_gib": proc_cpu_seconds(src.proc.pid) - cpu_a0,
                   "sink_cpu_s_per_gib": proc_cpu_seconds(sink.proc.pid) - cpu_b0,
                   "source_peak_rss_mib": proc_peak_rss_mib(src.proc.pid),
                   "sink_peak_rss_mib": proc_peak_rss_mib(sink.proc.pid)}
            self._verify(f"cairn full run {run_no}", self.conf_a, f"rbd/{img}@cairn.{seq}",
                         self.conf_b, f"rbd/{tgt}@cairn.{seq}")
            used = {"full_a": cpu["source_cpu_s_per_gib"], "full_b": cpu["sink_cpu_s_per_gib"]}
            self.incremental_writes(img, seed=100 + run_no)
            cpu_a0, cpu_b0 = proc_cpu_seconds(src.proc.pid), proc_cpu_seconds(sink.proc.pid)
            incr, seq2 = self.cairn_replicate(src, vol)
            used["incr_a"] = proc_cpu_seconds(src.proc.pid) - cpu_a0
            used["incr_b"] = proc_cpu_seconds(sink.proc.pid) - cpu_b0
            self._verify(f"cairn incremental run {run_no}", self.conf_a,
                         f"rbd/{img}@cairn.{seq2}", self.conf_b, f"rbd/{tgt}@cairn.{seq2}")
        finally:
            src.stop()
        self.remove(self.a, img)
        self.remove(self.b, tgt)
        return full, incr, osd, used, cpu

    def _export_round(self, run_no):
        _, img, tgt = self.names("e", run_no)
        self.make_full_image(img)
        self.remove(self.b, tgt)
        # Timed like Cairn's point: from the snapshot at site A to the
        # snapshot at site B that makes the copy a point (as rbd-mirror's).
        osd0 = self.osd_cpu()
        t0 = time.monotonic()
        self.rbd_a("snap", "create", f"rbd/{img}@s1")
        full_a, full_b = pipe_cpu(["rbd", "-c", self.conf_a, "export", "--no-progress",
                                   f"rbd/{img}@s1", "-"],
                                  ["rbd", "-c", self.conf_b, "import", "--no-progress", "-",
                                   f"rbd/{tgt}"])
        self.rbd_b("snap", "create", f"rbd/{tgt}@s1")
        full = time.monotonic() - t0
        osd = self.osd_cost(osd0)
        osd["tool_cpu_s"] = full_a + full_b
        used = {"full_a": full_a, "full_b": full_b}
        self._verify(f"export|import run {run_no}", self.conf_a, f"rbd/{img}@s1", self.conf_b,
                     f"rbd/{tgt}@s1")
        self.incremental_writes(img, seed=100 + run_no)
        t0 = time.monotonic()  # import-diff makes the snapshot at site B
        self.rbd_a("snap", "create", f"rbd/{img}@s2")
        used["incr_a"], used["incr_b"] = pipe_cpu(
            ["rbd", "-c", self.conf_a, "export-diff", "--no-progress", "--from-snap", "s1",
             f"rbd/{img}@s2", "-"],
            ["rbd", "-c", self.conf_b, "import-diff", "--no-progress", "-", f"rbd/{tgt}"])
        incr = time.monotonic() - t0
        self._verify(f"export-diff|import-diff run {run_no}", self.conf_a, f"rbd/{img}@s2",
                     self.conf_b, f"rbd/{tgt}@s2")
        self.remove(self.a, img)
        self.remove(self.b, tgt)
        return full, incr, osd, used

    def _mirror_round(self, run_no, secure=False):
        _, img, _ = self.names("ms" if secure else "m", run_no)
        self.start_mirror(secure)
        self.make_full_image(img)
        osd0 = self.osd_cpu()
        mirror0 = proc_cpu_seconds(self.mirror.pid)
        t0 = time.monotonic()
        with rbd.Image(self.a.ioctx, img) as im:
            im.mirror_image_enable(rbd.RBD_MIRROR_IMAGE_MODE_SNAPSHOT)
        sid = self.newest_mirror_snap_id(img)
        lib.wait_for(f"rbd-mirror full sync of {img}", lambda: self.mirror_synced(img, sid),
                     timeout=1200, interval=0.02)
        full = time.monotonic() - t0
        osd = self.osd_cost(osd0)
        osd["tool_cpu_s"] = proc_cpu_seconds(self.mirror.pid) - mirror0
        used = {"full_a": 0.0, "full_b": osd["tool_cpu_s"]}  # one daemon, at site B
        # No write at A since the mirror snapshot: A's head equals it, and
        # B's head equals its complete non-primary copy.
        self._verify(f"rbd-mirror full run {run_no}", self.conf_a, f"rbd/{img}", self.conf_b,
                     f"rbd/{img}")
        self.incremental_writes(img, seed=100 + run_no)
        t0 = time.monotonic()
        mirror0 = proc_cpu_seconds(self.mirror.pid)
        with rbd.Image(self.a.ioctx, img) as im:
            im.mirror_image_create_snapshot()
        sid = self.newest_mirror_snap_id(img)
        lib.wait_for(f"rbd-mirror incremental sync of {img}",
                     lambda: self.mirror_synced(img, sid), timeout=1200, interval=0.02)
        incr = time.monotonic() - t0
        used.update(incr_a=0.0, incr_b=proc_cpu_seconds(self.mirror.pid) - mirror0)
        self._verify(f"rbd-mirror incremental run {run_no}", self.conf_a, f"rbd/{img}",
                     self.conf_b, f"rbd/{img}")
        self.mirror_remove(img)
        return full, incr, osd, used

    def section_sync(self):
        """Full and incremental, each tool once per run, interleaved."""
        self.ensure_random_file()
        tools = {"cairn": self._cairn_round, "export": self._export_round,
                 "cairn_plain": lambda r: self._cairn_round(r, tls=False)}
        if not self.args.no_mirror:
            tools["rbd_mirror"] = self._mirror_round
            tools["rbd_mirror_secure"] = lambda r: self._mirror_round(r, secure=True)
        tools = {t: fn for t, fn in tools.items() if t in self.args.tools.split(",")}
        full = {t: [] for t in tools}
        incr = {t: [] for t in tools}
        cpu = {}
        used = {t: [] for t in tools}
        osd = {t: [] for t in tools}
        for r in range(1, self.args.runs + 1):
            # The order turns each run: memstore's OSD slows as it takes
            # writes, so a fixed order would favour whichever tool goes first.
            names = list(tools)
            k = (r - 1) % len(names)
            for t in names[k:] + names[:k]:
                res = tools[t](r)
                full[t].append(FULL_SIZE / res[0] / MiB)
                incr[t].append(INCR_BYTES / res[1] / MiB)
                osd[t].append(res[2])
                used[t].append(per_gib(res[3]))
                if t.startswith("cairn"):
                    cpu.setdefault(t, []).append(res[4])
                log(f"run {r} {t}: full {full[t][-1]:.0f} MiB/s ({res[0]:.2f} s), "
                    f"incremental {incr[t][-1]:.0f} MiB/s ({res[1]:.2f} s); CPU s per GiB "
                    f"{used[t][-1]['full_all']:.2f} full, {used[t][-1]['incr_all']:.2f} "
                    "incremental")
        self.results["sections"]["full"] = {t: stats(v) for t, v in full.items()}
        self.results["sections"]["full_cpu"] = {
            t: {k: stats([o[k] for o in v]) for k in v[0]} for t, v in osd.items()}
        self.results["sections"]["incremental"] = {t: stats(v) for t, v in incr.items()}
        self.results["sections"]["cpu_per_gib"] = {
            t: {k: stats([u[k] for u in v]) for k in v[0]} for t, v in used.items()}
        for t, v in cpu.items():  # Cairn was among --tools
            self.results["sections"][f"{t}_cost"] = {k: stats([c[k] for c in v]) for k in v[0]}

    def section_sparse(self):
        """10 GiB sparse image with 10 MiB written: time to the first point."""
        cairn, export = [], []
        for r in range(1, self.args.runs + 1):
            vol, img, tgt = self.names("s", r)
            self.a.create(img, 10 * GiB)
            rng = random.Random(r)
            with rbd.Image(self.a.ioctx, img) as im:
                for blk in rng.sample(range(10 * GiB // MiB), 10):
                    im.write(rng.randbytes(MiB), blk * MiB)
            self.start_sink()
            src = self.start_source(f"src-s{r}", {vol: (img, tgt)})
            try:
                dt, seq = self.cairn_replicate(src, vol)
            finally:
                src.stop()
            cairn.append(dt)
            want = self.a.digest(img, f"cairn.{seq}")
            if self.b.digest(tgt, f"cairn.{seq}") != want:
                raise RuntimeError(f"sparse run {r}: restore point differs from its source")
            # The peer: export-diff of the whole snapshot into a new image.
            t0 = time.monotonic()
            self.rbd_a("snap", "create", f"rbd/{img}@e1")
            self.rbd_b("create", f"rbd/{tgt}-e", "--size", "10G")
            sh(f"rbd -c {self.conf_a} export-diff --no-progress rbd/{img}@e1 - | "
               f"rbd -c {self.conf_b} import-diff --no-progress - rbd/{tgt}-e")
            export.append(time.monotonic() - t0)
            if self.b.digest(f"{tgt}-e") != self.a.digest(img, "e1"):
                raise RuntimeError(f"sparse run {r}: export-diff copy differs from its source")
            self.results.setdefault("verified", []).extend(
                [f"sparse cairn run {r}", f"sparse export-diff run {r}"])
            log(f"sparse run {r}: cairn {cairn[-1]:.2f} s, export-diff|import-diff "
                f"{export[-1]:.2f} s")
            self.remove(self.a, img)
            self.remove(self.b, f"{tgt}-e")
            self.remove(self.b, tgt)
        self.results["sections"]["sparse"] = {"cairn_s": stats(cairn),
                                              "export_diff_s": stats(export)}

    def section_verify(self):
        """cairn verify of a replicated 1 GiB point (MiB/s), against its peer:
        `rbd export | md5sum` of the point at both sites at once (what an
        operator would otherwise run); then one 4 KiB block rotted in site
        B's RADOS object and `cairn verify --repair`: the bytes its point
        sends."""
        self.ensure_random_file()
        cairn, peer, repair = [], [], []
        for r in range(1, self.args.runs + 1):
            vol, img, tgt = self.names("v", r)
            self.make_full_image(img)
            self.start_sink()
            src = self.start_source(f"src-v{r}", {vol: (img, tgt)})
            try:
                _, seq = self.cairn_replicate(src, vol)
                t0 = time.monotonic()
                v = src.json("verify", vol, "--timeout", "1200")
                cairn.append(time.monotonic() - t0)
                if v["mismatched_grains"] != 0 or v["done_bytes"] != FULL_SIZE:
                    raise RuntimeError(f"verify run {r}: {v}")
                t0 = time.monotonic()
                both = [subprocess.Popen(f"rbd -c {conf} export --no-progress rbd/{name}@cairn.{seq} "
                                         f"- | md5sum", shell=True, stdout=subprocess.PIPE, text=True)
                        for conf, name in ((self.conf_a, img), (self.conf_b, tgt))]
                sums = [p.communicate()[0].split()[0] for p in both]
                peer.append(time.monotonic() - t0)
                if sums[0] != sums[1]:
                    raise RuntimeError(f"verify run {r}: the point differs from its source")
                with rbd.Image(self.b.ioctx, tgt, read_only=True) as im:
                    prefix = im.stat()["block_name_prefix"]
                self.b.ioctx.write(f"{prefix}.{(FULL_SIZE // 2) >> 22:016x}", b"\xff" * 4096, 12345)
                fixed = src.cli("--json", "verify", vol, "--repair", "--timeout", "1200")
                v = json.loads(fixed.stdout)
                if fixed.returncode != 0 or v["mismatched_grains"] != 1 or not v["repaired_seq"]:
                    raise RuntimeError(f"verify run {r}: the repair did not go as it should: {v}")
                point = [p for p in self.sink.json("points", vol) if p["seq"] == v["repaired_seq"]][0]
                repair.append(point["data_bytes"] + point["zero_bytes"])
                if self.b.digest(tgt, f"cairn.{point['seq']}") != \
                        self.a.digest(img, f"cairn.{point['seq']}"):
                    raise RuntimeError(f"verify run {r}: the repaired point differs from its source")
            finally:
                src.stop()
            self.results.setdefault("verified", []).append(f"verify run {r}")
            log(f"verify run {r}: cairn verify {FULL_SIZE / MiB / cairn[-1]:.0f} MiB/s, "
                f"export|md5sum at both sites {FULL_SIZE / MiB / peer[-1]:.0f} MiB/s; "
                f"repair sent {repair[-1]} bytes")
            self.remove(self.a, img)
            self.remove(self.b, tgt)
        self.results["sections"]["verify"] = {
            "cairn_mib_s": stats([FULL_SIZE / MiB / t for t in cairn]),
            "export_md5_mib_s": stats([FULL_SIZE / MiB / t for t in peer]),
            "repair_bytes": stats(repair)}

    def _fio_image(self, name, journaling=False):
        self.remove(self.a, name)
        feats = "layering,exclusive-lock,object-map,fast-diff" + (",journaling" if journaling
                                                                 else "")
        self.rbd_a("create", f"rbd/{name}", "--size", "1G", "--image-feature", feats)
        # Fill once, so that later writes overwrite allocated objects as a
        # guest's do.
        self.rbd_a("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
                   "--io-total", "1G", f"rbd/{name}")

    def section_rpo(self, fraction, placement):
        """fio at `fraction` of the primary's capacity (measured just before,
        under the same placement), Cairn at interval 1 s; the age of the
        newest restore point sampled every second."""
        seconds = self.args.rpo_seconds
        pct = int(round(fraction * 100))
        img = f"bench-rpo{pct}{placement[0]}-{self.tag}"
        self._fio_image(img)
        sink = self.start_sink()
        try:
            self._rpo_runs(img, fraction, placement, sink, seconds, pct)
        finally:
            self.place("shared", sink)
        self.remove(self.a, img)

    def _rpo_runs(self, img, fraction, placement, sink, seconds, pct):
        p50s, p99s, maxs, caught_up, written, caps, rates = [], [], [], [], [], [], []
        samples = []  # each run's ages, in sampling order (for a look at the backlog)
        lags = []  # each run's lag over time, scraped from both cairnds' /metrics
        for r in range(1, self.args.runs + 1):
            vol, _, tgt = self.names(f"rpo{pct}{placement[0]}-", r)
            for s in self.a.snaps(img):
                self.rbd_a("snap", "rm", f"rbd/{img}@{s}")
            # The capacity is measured before every run: memstore's OSD slows
            # as it takes writes (docs/PERFORMANCE.md, "A test bed that slows
            # down"), so one measured minutes earlier would ask the later runs
            # for more than half of what the primary can do by then.
            fio = self.place(placement, sink)
            self.fio(img, 5, prefix=fio)  # warm-up, not counted (as in the penalty section)
            _, cap = self.fio(img, 15, prefix=fio)
            rate = cap * fraction
            caps.append(cap / MiB)
            rates.append(rate / MiB)
            log(f"rpo run {r} ({placement} cores): primary capacity {cap / MiB:.1f} MiB/s "
                f"(64 KiB random writes, iodepth 16); load at {rate / MiB:.1f} MiB/s")
            guest = self.start_fio(img, f"rpo{pct}{placement[0]}{r}", rate, prefix=fio)
            src = sampler = None
            source_metrics = lib.free_port()
            try:
                src = self.start_source(f"src-rpo{pct}{placement[0]}-{r}", {vol: (img, tgt)},
                                        interval="1s", metrics_port=source_metrics)
                sampler = LagSampler(vol, self.sink_metrics, source_metrics)
                self.place(placement, sink, src)
                lib.wait_for("the first restore point of the RPO image",
                             lambda: sink.json("status", vol)[0]["last_seq"] > 0, timeout=300)
                guest.check_running("the first restore point")
                # The first point copied the whole image while fio wrote; the
                # next carries what it wrote meanwhile. The RPO is sampled once
                # that backlog is through: site B holds a point whose snapshot
                # was taken after the first point was made. (Until 2026-11-30's
                # fifth round the test was "the newest point at most 5 s old",
                # which a first sync of under 5 s met at once, so the samples
                # began with the backlog epoch and its 4-7 s ages.)
                t_first = time.monotonic()
                t_first_wall = time.time()
                lag = {"first_point_s": round(t_first - sampler.t0, 3)}

                def point_time():
                    guest.check_running("replication caught up")
                    return sink.json("status", vol)[0]["last_point_time_ns"] / 1e9

                def age():
                    return time.time() - point_time()
                try:
                    lib.wait_for("a restore point taken after the first one was made (the "
                                 "first sync's backlog through)",
                                 lambda: point_time() >= t_first_wall, timeout=180, interval=0.1)
                    caught_up.append(time.monotonic() - t_first)
                except TimeoutError:
                    guest.check_running("replication caught up")
                    log(f"rpo run {r}: replication did not catch up within 180 s of its "
                        f"first point; sampling anyway")
                    caught_up.append(None)
                # One sample a second, each at a random moment of its second:
                # on the second, the samples can fall in step with points made
                # about a second apart and see the same phase of the age's
                # saw-tooth every time (a run of 2026-12-01 read 0.7-1.1 s
                # throughout, its points 1 s apart and up to 2 s old).
                jitter = random.Random(f"{img}-{r}")
                ages = []
                t_second = time.monotonic()
                lag["window_s"] = [round(t_second - sampler.t0, 3),
                                   round(t_second + seconds - sampler.t0, 3)]
                for _ in range(seconds):
                    t_sample = t_second + jitter.random()
                    time.sleep(max(0, t_sample - time.monotonic()))  # the sampling period
                    ages.append(age())
                    t_second += 1
                t_window = time.time() - seconds
                lag["series"] = sampler.stop()
                lag["scrape_errors"] = sampler.errors[:20]
                sampler = None
                lags.append(lag)
                src.stop()  # before fio closes its image (_window_with_snapshots says why)
                src = None
                load = window_mean(guest.stop(), t_window, seconds) * 64 * 1024
                guest = None
                written.append(load / MiB)
                log(f"rpo run {r}: fio wrote {load / MiB:.1f} MiB/s while sampled")
                seq = self._last_point(f"src-rpo{pct}{placement[0]}-{r}-last", vol, img, tgt)
            finally:
                if sampler:
                    sampler.stop()
                if guest:
                    guest.kill()
                if src:
                    src.stop()
            want = self.export_hash(self.conf_a, f"rbd/{img}@cairn.{seq}")
            if self.export_hash(self.conf_b, f"rbd/{tgt}@cairn.{seq}") != want:
                raise RuntimeError(f"rpo run {r}: restore point {seq} differs from its source")
            self.results.setdefault("verified", []).append(f"rpo {pct} % {placement} run {r}")
            self.remove(self.b, tgt)
            log(f"rpo run {r}: ages (s) " + " ".join(f"{a:.1f}" for a in ages))
            samples.append([round(a, 3) for a in ages])
            ages = sorted(ages)
            p50s.append(statistics.median(ages))
            p99s.append(ages[min(len(ages) - 1, int(0.99 * len(ages)))])
            maxs.append(ages[-1])
            log(f"rpo {pct} % ({placement} cores) run {r}: {len(ages)} samples, p50 {p50s[-1]:.2f} s, p99 {p99s[-1]:.2f} s, "
                f"max {maxs[-1]:.2f} s; {seq} points; caught up "
                + (f"{caught_up[-1]:.1f} s after the first" if caught_up[-1] is not None
                   else "never"))
        self.results["sections"][f"rpo_{pct}_{placement}"] = {
                                           "load_mib_s": statistics.median(rates),
                                           "placement": placement,
                                           "capacity_mib_s": statistics.median(caps),
                                           "capacity_runs_mib_s": stats(caps),
                                           "fraction": fraction,
                                           "seconds": seconds, "p50_s": stats(p50s),
                                           "p99_s": stats(p99s), "max_s": stats(maxs),
                                           "caught_up_s": (stats([c for c in caught_up
                                                                  if c is not None])
                                                           if any(c is not None
                                                                  for c in caught_up) else None),
                                           "not_caught_up": caught_up.count(None),
                                           "written_mib_s": stats(written),
                                           "ages_s": samples, "lag_over_time": lags}

    def section_penalty(self):
        """fio write IOPS at the primary: no replication, Cairn at 1 s,
        journaling; under each placement of --penalty-placements."""
        seconds = self.args.penalty_seconds
        out = {}
        sink = self.start_sink()
        try:
            for placement in self.args.penalty_placements:
                rows = ("snapshots", "snapshots_default", "cairn", "cairn_default",
                        "journaling") + (() if self.args.no_mirror else ("mirror_default",))
                res = {k: [] for k in ("off",) + rows}
                # Each row against replication off measured just before it
                # on the same image: memstore's OSD slows as it takes writes
                # (docs/PERFORMANCE.md, "A test bed that slows down"), so a
                # baseline from the start of the run would charge the later
                # rows with the test bed's own decay.
                ratio = {k: [] for k in rows}
                for r in range(1, self.args.runs + 1):
                    vol, img, tgt = self.names(f"pen{placement[0]}", r)
                    self._fio_image(img)
                    fio = self.place(placement, sink)
                    # Warm-up, not counted: the first random writes after the
                    # fill run slower (the OSD's heap grows), which would
                    # flatter every row measured after "off".
                    self.fio(img, min(5, seconds), prefix=fio)

                    def paired(key, measure):
                        off, _ = self.fio(img, seconds, prefix=self.place(placement, sink))
                        res["off"].append(off)
                        iops = measure()
                        res[key].append(iops)
                        ratio[key].append(iops / off)
                        log(f"penalty ({placement} cores) run {r}: {key} {iops:.0f} IOPS against "
                            f"{off:.0f} off just before ({(iops / off - 1) * 100:+.1f} %)")

                    for key, interval in (("snapshots", 1.0), ("snapshots_default", 5.0)):
                        paired(key, lambda: self._fio_under_snapshots(
                            img, seconds, placement, fio, interval))
                    for key, interval, suffix in (("cairn", "1s", ""),
                                                  ("cairn_default", "5s", "-d")):
                        paired(key, lambda: self._fio_under_cairn(
                            f"{vol}{suffix}", img, f"{tgt}{suffix}", interval, seconds,
                            placement, sink, f"penalty {placement} run {r}, interval {interval}"))

                    if not self.args.no_mirror:
                        paired("mirror_default", lambda: self._fio_under_mirror(
                            img, 5.0, seconds, placement, sink,
                            f"penalty {placement} run {r}, rbd-mirror every 5 s"))

                    def journaled():
                        self._fio_image(img + "-j", journaling=True)
                        jfio = self.place(placement, sink)
                        self.fio(img + "-j", min(5, seconds), prefix=jfio)  # as "off"'s warm-up
                        iops, _ = self.fio(img + "-j", seconds, prefix=jfio)
                        self.remove(self.a, img + "-j")
                        return iops

                    paired("journaling", journaled)
                    self.remove(self.a, img)
                out[placement] = {k: stats(v) for k, v in res.items()}
                out[placement]["vs_off"] = {k: stats(v) for k, v in ratio.items()}
        finally:
            self.place("shared", sink)
        self.results["sections"]["penalty"] = out

    def _fio_under_cairn(self, vol, img, tgt, interval, seconds, placement, sink, what):
        """fio IOPS on IMG over SECONDS while a source replicates it every
        INTERVAL. fio opens the image before the source starts, as a VM's is,
        and only the seconds after the second restore point count; then a
        last point, compared with its source by hash."""
        guest = self.start_fio(img, vol, prefix=self.place(placement, sink))
        src = None
        try:
            src = self.start_source(f"src-{vol}", {vol: (img, tgt)}, interval=interval)
            self.place(placement, sink, src)
            # The first point carries the full sync, the second what fio
            # wrote meanwhile; the window opens after both.
            lib.wait_for("the second restore point of the penalty image",
                         lambda: sink.json("status", vol)[0]["last_seq"] > 1, timeout=300)
            guest.check_running("the second restore point")
            t_window = time.time()
            time.sleep(seconds)  # the measured window (a bench, not a test)
            src.stop()  # before fio closes its image (_window_with_snapshots says why)
            src = None
            iops = window_mean(guest.stop(), t_window, seconds)
            guest = None
            seq = self._last_point(f"src-{vol}-last", vol, img, tgt)
        finally:
            if guest:
                guest.kill()
            if src:
                src.stop()
        if self.export_hash(self.conf_b, f"rbd/{tgt}@cairn.{seq}") != self.export_hash(
                self.conf_a, f"rbd/{img}@cairn.{seq}"):
            raise RuntimeError(f"{what}: restore point {seq} differs from its source")
        self.results.setdefault("verified", []).append(what)
        self.rbd_a("snap", "purge", f"rbd/{img}")
        self.remove(self.b, tgt)
        return iops

    def _last_point(self, name, vol, img, tgt):
        """A last restore point of VOL, taken once fio is gone by a source
        started for it (the one that replicated under fio was stopped before
        fio closed its image); returns its seq."""
        src = self.start_source(name, {vol: (img, tgt)})
        try:
            return self.cairn_replicate(src, vol)[1]
        finally:
            src.stop()

    def _window_with_snapshots(self, guest, seconds, interval, snapshot, what):
        """fio's mean IOPS over a window of SECONDS while SNAPSHOT() runs every
        INTERVAL seconds on a thread; then GUEST is stopped (killed on a
        failure). The snapshots stop before fio closes its image: Ceph 16's
        librbd can abort in close (AsyncOpTracker, "m_pending_ops == 0")
        while it serves another client's snapshot request as the lock
        owner, which ended bench runs in fio (docs/RELIABILITY.md). Cairn's
        sources under fio stop first for the same reason."""
        stop = threading.Event()
        failed = []

        def snapshots():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    snapshot()
                except Exception as e:  # reported after fio
                    failed.append(e)
                    return
                stop.wait(max(0.0, interval - (time.monotonic() - t0)))

        t = threading.Thread(target=snapshots)
        try:
            t_window = time.time()
            t.start()
            time.sleep(seconds)  # the measured window (a bench, not a test)
            stop.set()
            t.join()
            iops = window_mean(guest.stop(), t_window, seconds)
            guest = None
        finally:
            stop.set()
            if t.is_alive():
                t.join()
            if guest:
                guest.kill()
        if failed:
            raise RuntimeError(f"{what}: snapshots under fio failed: {failed[0]}")
        return iops

    def _fio_under_mirror(self, img, interval, seconds, placement, sink, what):
        """fio IOPS on IMG over SECONDS while rbd-mirror (snapshot mode, its
        daemon with site B) replicates it, a mirror snapshot taken every
        INTERVAL seconds: rbd-mirror's own scheduler goes no lower than a
        minute, so the bench takes them (`rbd mirror image snapshot`), as
        Cairn's source would at that interval. As with Cairn, fio opens the
        image first and the window opens once the first sync and one
        incremental are complete; then a last snapshot, synced, and both
        copies compared by hash."""
        self.start_mirror()
        cores = self.site_cores()
        per_site = placement == "per-site" and cores
        self.pin(self.mirror.pid, cores[1] if per_site else f"0-{(os.cpu_count() or 1) - 1}")
        pin = ["taskset", "-c", cores[1]] if per_site else []
        guest = self.start_fio(img, f"mirror-{img}", prefix=self.place(placement, sink))

        def snapshot():
            run(*pin, "rbd", "-c", self.conf_a, "mirror", "image", "snapshot", f"rbd/{img}",
                timeout=120)
            return self.newest_mirror_snap_id(img)

        try:
            with rbd.Image(self.a.ioctx, img) as im:
                im.mirror_image_enable(rbd.RBD_MIRROR_IMAGE_MODE_SNAPSHOT)
            sid = self.newest_mirror_snap_id(img)
            lib.wait_for(f"rbd-mirror's first sync of {img} under fio",
                         lambda: self.mirror_synced(img, sid), timeout=600, interval=0.2)
            guest.check_running("rbd-mirror's first sync")
            sid = snapshot()
            lib.wait_for(f"rbd-mirror's second snapshot of {img} under fio",
                         lambda: self.mirror_synced(img, sid), timeout=600, interval=0.2)
            guest.check_running("rbd-mirror's second snapshot")
        except BaseException:
            guest.kill()
            raise
        iops = self._window_with_snapshots(guest, seconds, interval, snapshot, what)
        sid = snapshot()  # nothing writes now: the head at A equals it
        lib.wait_for(f"rbd-mirror's last snapshot of {img}",
                     lambda: self.mirror_synced(img, sid), timeout=600, interval=0.2)
        self._verify(what, self.conf_a, f"rbd/{img}", self.conf_b, f"rbd/{img}")
        self.mirror_remove(img, keep_primary=True)
        self.rbd_a("snap", "purge", f"rbd/{img}")
        return iops

    def _fio_under_snapshots(self, img, seconds, placement, fio, interval):
        """fio IOPS while a snapshot of IMG is taken (and the one before
        removed) every INTERVAL seconds, and nothing reads them: what any
        snapshot-based replication at that interval costs the primary
        (rbd-mirror's snapshot mode included), before reading a byte."""
        cores = self.site_cores()
        pin = ["taskset", "-c", cores[1]] if placement == "per-site" and cores else []
        taken = []

        def snapshot():
            name = f"ref{len(taken) + 1}"
            run(*pin, "rbd", "-c", self.conf_a, "snap", "create", f"rbd/{img}@{name}", timeout=60)
            if taken:
                run(*pin, "rbd", "-c", self.conf_a, "snap", "rm", f"rbd/{img}@{taken[-1]}",
                    timeout=60)
            taken.append(name)

        guest = self.start_fio(img, f"snaps-{interval:g}-{img}", prefix=fio)
        iops = self._window_with_snapshots(guest, seconds, interval, snapshot,
                                           f"snapshots every {interval:g} s")
        self.rbd_a("snap", "purge", f"rbd/{img}")
        return iops

    def section_memory(self):
        """Peak RSS and CPU seconds of fresh source and sink processes
        replicating a sparse image with 64 MiB written: 1 GiB against 1 TiB,
        each --runs times. The CPU is each process's over the replicate (the
        first sync: planning from the allocation map, reading, sending,
        verifying, spooling and writing), also per GiB of data moved."""
        out = {}
        written = 64 * MiB
        for label, size in (("1GiB", GiB), ("1TiB", 1 << 40)):
            runs = []
            for r in range(1, self.args.runs + 1):
                vol, img, tgt = self.names(f"mem-{label}-", r)
                self.a.create(img, size)
                rng = random.Random(5 + r)
                with rbd.Image(self.a.ioctx, img) as im:
                    for blk in rng.sample(range(size // MiB), written // MiB):
                        im.write(rng.randbytes(MiB), blk * MiB)
                port = lib.free_port()
                sink = lib.Cairnd(self.work, f"sink-mem-{label}-{r}", lib.sink_config(
                    "b", self.conf_b, port, os.path.join(self.work, f"spool-{label}-{r}"))).start()
                src = lib.Cairnd(self.work, f"src-mem-{label}-{r}", lib.source_config(
                    "a", self.conf_a, port, {vol: (img, tgt)}, keep=0)).start()
                try:
                    c0 = proc_cpu_seconds(src.proc.pid), proc_cpu_seconds(sink.proc.pid)
                    dt, seq = self.cairn_replicate(src, vol)
                    c1 = proc_cpu_seconds(src.proc.pid), proc_cpu_seconds(sink.proc.pid)
                    run = {"seconds": dt,
                           "source_peak_rss_mib": proc_peak_rss_mib(src.proc.pid),
                           "sink_peak_rss_mib": proc_peak_rss_mib(sink.proc.pid),
                           "source_cpu_s": c1[0] - c0[0], "sink_cpu_s": c1[1] - c0[1]}
                finally:
                    src.stop()
                    sink.stop()
                if self.b.digest(tgt, f"cairn.{seq}") != self.a.digest(img, f"cairn.{seq}"):
                    raise RuntimeError(f"memory {label} run {r}: restore point differs")
                self.results.setdefault("verified", []).append(f"memory {label} run {r}")
                for side in ("source", "sink"):
                    run[f"{side}_cpu_s_per_gib"] = run[f"{side}_cpu_s"] * GiB / written
                runs.append(run)
                log(f"memory {label} run {r}: source {run['source_peak_rss_mib']:.0f} MiB "
                    f"{run['source_cpu_s']:.2f} CPU s, sink {run['sink_peak_rss_mib']:.0f} MiB "
                    f"{run['sink_cpu_s']:.2f} CPU s, {dt:.2f} s")
                self.remove(self.a, img)
                self.remove(self.b, tgt)
            out[label] = {k: stats([x[k] for x in runs]) for k in runs[0]}
            out[label]["written_bytes"] = written
        self.results["sections"]["memory"] = out

    def close(self):
        for sink in (self.sink, self.plain_sink):
            if sink:
                sink.stop()
        self.stop_mirror()


# --- report ------------------------------------------------------------------
def fmt_stat(s, unit="", prec=0):
    return f"{s['median']:.{prec}f}{unit} ({s['min']:.{prec}f}-{s['max']:.{prec}f})"


def caught_up_cell(rp):
    """The RPO table's "caught up" cell: seconds from the first point until
    the newest was young, and in how many runs it never was."""
    if "caught_up_s" not in rp:  # a results.json from before the column
        return "-"
    never = rp.get("not_caught_up", 0)
    cell = fmt_stat(rp["caught_up_s"], " s", 1) if rp["caught_up_s"] else ""
    if never:
        cell += f"{'; ' if cell else ''}not within 180 s in {never} run(s)"
    return cell


def target_line(ok):
    return "met" if ok else "**missed**"


CPU_TOOLS = {"cairn": "Cairn over mutual TLS (source, sink)",
             "cairn_plain": "Cairn without TLS (source, sink)",
             "export": "`rbd export(-diff) \\| import(-diff)` (export, import)",
             "rbd_mirror": "rbd-mirror, snapshot mode (–, the daemon)",
             "rbd_mirror_secure": "rbd-mirror, msgr2 secure mode (–, the daemon)"}


def cpu_table(cpu, targets):
    """Markdown: each tool's own CPU seconds per GiB moved, per site and in
    all, for the full sync and the incremental; Cairn's ratio against each
    rbd-mirror measured, and the targets (Cairn's CPU at most rbd-mirror's)."""
    lines = ["The tools' own processes, CPU seconds (user + system) per GiB moved "
             "(site A: what runs there; site B: likewise; rbd-mirror runs at site B alone):", "",
             "| CPU s per GiB | full: site A | full: site B | full: both | incremental: site A "
             "| incremental: site B | incremental: both |", "|---|---:|---:|---:|---:|---:|---:|"]
    for tool, v in cpu.items():
        cells = []
        for phase in ("full", "incr"):
            cells += ["–" if tool.startswith("rbd_mirror") else fmt_stat(v[f"{phase}_a"], "", 2),
                      fmt_stat(v[f"{phase}_b"], "", 2), f"**{fmt_stat(v[f'{phase}_all'], '', 2)}**"]
        lines.append(f"| {CPU_TOOLS[tool]} | " + " | ".join(cells) + " |")
    lines.append("")
    for peer in ("rbd_mirror", "rbd_mirror_secure"):
        if "cairn" not in cpu or peer not in cpu:
            continue
        for phase, what in (("full", "full sync"), ("incr", "incremental")):
            ratio = cpu["cairn"][f"{phase}_all"]["median"] / cpu[peer][f"{phase}_all"]["median"]
            whose = {"rbd_mirror": "rbd-mirror's",
                     "rbd_mirror_secure": "rbd-mirror's in msgr2 secure mode"}[peer]
            targets.append((f"{what}: CPU per GiB of both cairnd ≤ {whose}", f"{ratio:.2f}×",
                            ratio <= 1))
    return lines


def report(results):
    """Markdown of the results, with ratios and the targets of docs/PERFORMANCE.md."""
    s = results["sections"]
    when = results["when"]
    if results.get("merged_from"):
        parts = results.get("also_from", []) + [when]
        when = f"{results['merged_from']} (with sections from {' and '.join(parts)})"
    lines = [f"Measured {when} on {results['cpus']} cores, {results['runs']} runs "
             "each: median (min-max). Every replica was compared with its source by a hash of "
             f"the whole image ({len(results.get('verified', []))} comparisons).", ""]
    targets = []
    if "raw" in s:
        r = s["raw"]
        lines += ["| raw limit (`rbd bench`, 4 MiB sequential, 16 threads) | site A | site B |",
                  "|---|---:|---:|",
                  f"| write MiB/s | {fmt_stat(r['write_a'])} | {fmt_stat(r['write_b'])} |",
                  f"| read MiB/s | {fmt_stat(r['read_a'])} | {fmt_stat(r['read_b'])} |", ""]
    for key, title in (("full", "full sync, 1 GiB of random data"),
                       ("incremental", "incremental, 128 MiB of random 64 KiB writes")):
        if key not in s:
            continue
        t = s[key]
        c = t["cairn"]["median"] if "cairn" in t else None  # --tools without cairn: no ratios
        lines += [f"| {title} | MiB/s | Cairn ÷ peer |", "|---|---:|---:|"]
        names = {"cairn": "Cairn", "export": "`rbd export \\| import`" if key == "full" else
                 "`rbd export-diff \\| import-diff`", "rbd_mirror": "rbd-mirror (snapshot mode)",
                 "rbd_mirror_secure": "rbd-mirror, its connections in msgr2 secure mode",
                 "cairn_plain": "Cairn without TLS (`insecure = true`)"}
        for tool, st in t.items():
            ratio = "" if tool == "cairn" or c is None else f"{c / st['median']:.2f}×"
            lines.append(f"| {names[tool]} | {fmt_stat(st)} | {ratio} |")
        lines.append("")
        if c is None:
            continue
        if key == "full":
            if "raw" in s:
                ratio = c / s["raw"]["write_b"]["median"]
                lines.append(f"Full sync ÷ raw write speed of site B: {ratio:.2f}×")
                lines.append("")
                targets.append(("full sync ≥ 0.9× raw write of site B", f"{ratio:.2f}×",
                                ratio >= 0.9))
            if "export" in t:
                ratio = c / t["export"]["median"]
                targets.append(("full sync ≥ 1.5× export|import", f"{ratio:.2f}×",
                                ratio >= 1.5))
        elif "export" in t:
            ratio = c / t["export"]["median"]
            targets.append(("incremental ≥ 2× export-diff|import-diff", f"{ratio:.2f}×",
                            ratio >= 2))
        if "cairn_plain" in t:
            ratio = c / t["cairn_plain"]["median"]
            targets.append((f"{key}: mutual TLS costs < 10 % of throughput (TLS ÷ plaintext "
                            "≥ 0.9)", f"{ratio:.2f}×", ratio >= 0.9))
        if "rbd_mirror" in t:
            ratio = c / t["rbd_mirror"]["median"]
            targets.append((f"{key} ≥ 2× rbd-mirror snapshot mode", f"{ratio:.2f}×", ratio >= 2))
    if "full_cpu" in s:
        names = {"cairn": "Cairn (both cairnd)", "export": "export \\| import (both rbd)",
                 "rbd_mirror": "rbd-mirror (the daemon)",
                 "rbd_mirror_secure": "rbd-mirror in msgr2 secure mode (the daemon)",
                 "cairn_plain": "Cairn without TLS (both cairnd)"}
        lines += ["| CPU seconds during the 1 GiB full sync | OSD site A | OSD site B | "
                  "the tool's own |", "|---|---:|---:|---:|"]
        for t, v in s["full_cpu"].items():
            lines.append(f"| {names[t]} | {fmt_stat(v['osd_a_cpu_s'], '', 1)} | "
                         f"{fmt_stat(v['osd_b_cpu_s'], '', 1)} | "
                         f"{fmt_stat(v['tool_cpu_s'], '', 1)} |")
        lines.append("")
    if "cpu_per_gib" in s:
        lines += cpu_table(s["cpu_per_gib"], targets)
    if "cairn_cost" in s:
        k = s["cairn_cost"]
        lines += ["| Cairn's cost, full sync of 1 GiB | source (site A) | sink (site B) |",
                  "|---|---:|---:|",
                  f"| CPU seconds per GiB | {fmt_stat(k['source_cpu_s_per_gib'], '', 2)} | "
                  f"{fmt_stat(k['sink_cpu_s_per_gib'], '', 2)} |"]
        if "cairn_plain_cost" in s:
            p = s["cairn_plain_cost"]
            lines.append(f"| CPU seconds per GiB without TLS | "
                         f"{fmt_stat(p['source_cpu_s_per_gib'], '', 2)} | "
                         f"{fmt_stat(p['sink_cpu_s_per_gib'], '', 2)} |")
        lines += [f"| peak RSS MiB | {fmt_stat(k['source_peak_rss_mib'])} | "
                  f"{fmt_stat(k['sink_peak_rss_mib'])} |", ""]
    if "sparse" in s:
        sp = s["sparse"]
        lines += ["| 10 GiB sparse image, 10 MiB written | seconds to a verified copy |",
                  "|---|---:|",
                  f"| Cairn, first restore point | {fmt_stat(sp['cairn_s'], ' s', 2)} |",
                  f"| `rbd export-diff \\| import-diff` | {fmt_stat(sp['export_diff_s'], ' s', 2)} |",
                  ""]
        targets.append(("10 GiB sparse: first point ≤ 2 s", f"{sp['cairn_s']['median']:.2f} s",
                        sp["cairn_s"]["max"] <= 2))
    if "verify" in s:
        vf = s["verify"]
        ratio = vf["cairn_mib_s"]["median"] / vf["export_md5_mib_s"]["median"]
        lines += ["| verify a 1 GiB restore point with its source | MiB/s |",
                  "|---|---:|",
                  f"| `cairn verify` (digests only cross the link) | "
                  f"{fmt_stat(vf['cairn_mib_s'])} ({ratio:.2f}x) |",
                  f"| `rbd export \\| md5sum` at both sites at once | "
                  f"{fmt_stat(vf['export_md5_mib_s'])} |",
                  f"| bytes the repair of one rotten 4 KiB block sent | "
                  f"{fmt_stat(vf['repair_bytes'])} |", ""]
    rpos = sorted((k for k in s if k.startswith("rpo_")),
                  key=lambda k: (s[k].get("placement", "shared") != "per-site", -s[k]["fraction"]))
    if rpos:
        lines += ["RPO under load: fio 64 KiB random writes (iodepth 16) at a fraction of the "
                  "primary's write capacity measured before each run under the same "
                  "placement (median, with the runs' range) "
                  "(per site: site A and fio on core 0, site B and both cairnds on the other; "
                  "shared: everything over all cores), Cairn at `interval = 1s`. fio opens "
                  "the image before Cairn starts and writes through the first sync; once "
                  "site B holds a point taken after the first point was made (\"caught up\": "
                  "the first sync's backlog through, counted from the first point; sampled "
                  "anyway if not within 180 s), the newest point's age is sampled once a second, at a random moment of each second:",
                  "",
                  "| cores | load | caught up | p50 | p99 | max |",
                  "|---|---|---:|---:|---:|---:|"]
        for k in rpos:
            rp = s[k]
            placement = rp.get("placement", "shared")
            cap = (fmt_stat(rp["capacity_runs_mib_s"]) if "capacity_runs_mib_s" in rp
                   else f"{rp['capacity_mib_s']:.0f}")
            lines.append(f"| {placement} | {rp['fraction'] * 100:.0f} % of "
                         f"{cap} MiB/s = "
                         f"{rp['load_mib_s']:.1f} MiB/s for {rp['seconds']} s"
                         + (f" (written: {rp['written_mib_s']['median']:.1f} MiB/s)"
                            if "written_mib_s" in rp else "") + " | "
                         f"{caught_up_cell(rp)} | {fmt_stat(rp['p50_s'], ' s', 2)} | {fmt_stat(rp['p99_s'], ' s', 2)} | "
                         f"{fmt_stat(rp['max_s'], ' s', 2)} |")
            if rp["fraction"] == 0.5:
                targets.append((f"RPO p99 ≤ 2 s at half the primary's capacity ({placement} "
                                "cores)", f"{rp['p99_s']['median']:.2f} s",
                                rp["p99_s"]["median"] <= 2))
        lines.append("")
    if "penalty" in s:
        where = {"per-site": "site A and the guest on core 0; site B and both cairnds on the "
                             "other core",
                 "shared": "everything (both sites, both cairnds, fio) floating over all cores"}
        for placement, pe in s["penalty"].items():
            off = pe["off"]["median"]
            paired = "vs_off" in pe  # each row against "off" measured just before it

            def vs_off(k):
                """The row's IOPS against replication off, as a fraction."""
                return pe["vs_off"][k]["median"] if paired else pe[k]["median"] / off

            lines += [f"Primary write IOPS, {where[placement]}"
                      + (" (each row against replication off measured just before it on "
                         "the same image, median of the runs' ratios; the \"off\" row "
                         "gathers those measurements)" if paired else "") + ":", "",
                      "| fio, 64 KiB random writes, iodepth 16 | IOPS | vs off |",
                      "|---|---:|---:|"]
            for k, name in (("off", "replication off"),
                            ("snapshots", "a snapshot a second, nothing read (any snapshot-based "
                                          "replication at 1 s, rbd-mirror's included)"),
                            ("snapshots_default", "a snapshot every 5 s, nothing read"),
                            ("cairn", "Cairn, interval 1 s"),
                            ("cairn_default", "Cairn, interval 5 s (the default)"),
                            ("mirror_default", "rbd-mirror snapshot mode, a mirror snapshot "
                                               "every 5 s (taken by the bench)"),
                            ("journaling", "journaling feature (rbd-mirror journal mode)")):
                if k not in pe:
                    continue
                cell = "" if k == "off" else f"{(vs_off(k) - 1) * 100:+.1f} %"
                if k != "off" and paired:
                    v = pe["vs_off"][k]
                    cell += f" ({(v['min'] - 1) * 100:+.1f} to {(v['max'] - 1) * 100:+.1f})"
                lines.append(f"| {name} | {fmt_stat(pe[k])} | {cell} |")
            lines.append("")
            for k, label in (("cairn", "interval 1 s"), ("cairn_default", "interval 5 s")):
                if k not in pe:
                    continue
                pen = (1 - vs_off(k)) * 100
                targets.append((f"primary write penalty ≤ 5 % ({placement} cores, {label})",
                                f"{pen:.1f} %", pen <= 5))
    if "memory" in s:
        m = s["memory"]
        if all(isinstance(v["seconds"], dict) for v in m.values()):
            runs = len(next(iter(m.values()))["seconds"]["runs"])
            lines += [f"Sparse images with 64 MiB written, fresh processes, {runs} run(s) each: "
                      "peak RSS, and CPU seconds over the first sync (per GiB: of the 64 MiB "
                      "moved):", "",
                      "| sparse image, 64 MiB written | source peak RSS MiB | sink peak RSS MiB "
                      "| source CPU s (per GiB) | sink CPU s (per GiB) | time |",
                      "|---|---:|---:|---:|---:|---:|"]
            for label, v in m.items():
                lines.append(
                    f"| {label} | {fmt_stat(v['source_peak_rss_mib'])} | "
                    f"{fmt_stat(v['sink_peak_rss_mib'])} | "
                    f"{fmt_stat(v['source_cpu_s'], '', 2)} "
                    f"({v['source_cpu_s_per_gib']['median']:.1f}) | "
                    f"{fmt_stat(v['sink_cpu_s'], '', 2)} ({v['sink_cpu_s_per_gib']['median']:.1f})"
                    f" | {fmt_stat(v['seconds'], ' s', 2)} |")
            peak = max(max(v["source_peak_rss_mib"]["max"], v["sink_peak_rss_mib"]["max"])
                       for v in m.values())
        else:  # a results.json from before the runs and CPU columns
            lines += ["| sparse image, 64 MiB written | source peak RSS | sink peak RSS | time |",
                      "|---|---:|---:|---:|"]
            for label, v in m.items():
                lines.append(f"| {label} | {v['source_peak_rss_mib']:.0f} MiB | "
                             f"{v['sink_peak_rss_mib']:.0f} MiB | {v['seconds']:.2f} s |")
            peak = max(max(v["source_peak_rss_mib"], v["sink_peak_rss_mib"]) for v in m.values())
        lines.append("")
        targets.append(("peak RSS ≤ 128 MiB, 1 GiB and 1 TiB alike", f"{peak:.0f} MiB",
                        peak <= 128))
    if targets:
        lines += ["| target | measured | |", "|---|---:|---|"]
        lines += [f"| {t} | {v} | {target_line(ok)} |" for t, v, ok in targets]
        lines.append("")
    results["targets"] = [{"target": t, "measured": v, "met": ok} for t, v, ok in targets]
    return "\n".join(lines)


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = results["sections"]
    panels = [k for k in ("full", "incremental") if k in s]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    if len(panels) == 1:
        axes = [axes]
    names = {"cairn": "Cairn", "export": "export|import\n(-diff)", "rbd_mirror": "rbd-mirror\nsnapshot",
             "rbd_mirror_secure": "rbd-mirror\nsecure", "cairn_plain": "Cairn\nno TLS"}
    for ax, key in zip(axes, panels):
        tools = list(s[key])
        med = [s[key][t]["median"] for t in tools]
        err = [[m - s[key][t]["min"] for t, m in zip(tools, med)],
               [s[key][t]["max"] - m for t, m in zip(tools, med)]]
        ax.bar([names[t] for t in tools], med, yerr=err, capsize=4,
               color=["#2b7a4b" if t == "cairn" else "#8899aa" for t in tools])
        if key == "full" and "raw" in s:
            ax.axhline(s["raw"]["write_b"]["median"], color="#aa4444", linestyle="--",
                       label="raw write, site B")
            ax.legend()
        ax.set_title({"full": "full sync, 1 GiB", "incremental": "incremental, 128 MiB"}[key])
        ax.set_ylabel("MiB/s (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def chart_lag(results, path):
    """The lag over time of every RPO run, as both cairnds' /metrics said it
    (cairn_volume_lag_seconds): one panel per load and placement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = results["sections"]
    keys = [k for k in sorted(s) if k.startswith("rpo_") and s[k].get("lag_over_time")]
    if not keys:
        return False
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        sec = s[key]
        for r, run in enumerate(sec["lag_over_time"], 1):
            t = [p[0] for p in run["series"]]
            line, = ax.plot(t, [p[1] for p in run["series"]], linewidth=1,
                            label=f"run {r}, site B (sink)")
            ax.plot(t, [p[2] for p in run["series"]], linewidth=0.8, linestyle=":",
                    color=line.get_color(), label=f"run {r}, site A (source)")
            ax.axvline(run["first_point_s"], color=line.get_color(), linewidth=0.6,
                       linestyle="--")
        w = sec["lag_over_time"][0]["window_s"]
        ax.axvspan(w[0], w[1], color="#dddddd", alpha=0.5, label="run 1's sampled window")
        ax.set_title(f"lag at {sec['fraction'] * 100:.0f} % of the primary's capacity "
                     f"({sec['load_mib_s']:.0f} MiB/s), {sec['placement']} cores; "
                     f"dashed: first point")
        ax.set_ylabel("cairn_volume_lag_seconds")
        ax.set_xlabel("seconds since the source started")
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def update_docs(md, png, lag_png=None):
    doc = os.path.join(lib.ROOT, "docs", "PERFORMANCE.md")
    with open(doc) as f:
        text = f.read()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text:
        raise RuntimeError(f"{doc} has no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(doc, "w") as f:
        lag = "![Lag over time, from /metrics](lag.png)\n\n" if lag_png else ""
        f.write(f"{head}{begin}\n{md}\n![Cairn against its peers](performance.png)\n\n{lag}"
                f"{end}{tail}")
    if png:
        shutil.copy(png, os.path.join(lib.ROOT, "docs", "performance.png"))
    if lag_png:
        shutil.copy(lag_png, os.path.join(lib.ROOT, "docs", "lag.png"))


# The sections each step of main() writes.
STEP_SECTIONS = {"raw": ("raw",), "sync": ("full", "full_cpu", "incremental", "cairn_cost",
                                           "cairn_plain_cost", "cpu_per_gib"),
                 "sparse": ("sparse",), "verify": ("verify",), "penalty": ("penalty",),
                 "memory": ("memory",)}
# The comparisons each step records (the prefixes of their names).
STEP_VERIFIED = {"raw": (), "sync": ("cairn full", "cairn incremental", "export", "rbd-mirror"),
                 "sparse": ("sparse",), "verify": ("verify",), "rpo": ("rpo",),
                 "penalty": ("penalty",),
                 "memory": ("memory",)}


def step_of(section):
    """The step that writes SECTION (an RPO section is a step of its own)."""
    return section if section.startswith("rpo_") else next(
        (st for st, secs in STEP_SECTIONS.items() if section in secs), None)


def verified_prefixes(step):
    """The names of the comparisons STEP records begin with these."""
    if step.startswith("rpo_"):  # rpo_50_per-site: "rpo 50 % per-site run N"
        _, pct, placement = step.split("_", 2)
        return (f"rpo {pct} % {placement} ",)
    return STEP_VERIFIED[step]


def merge_results(now, earlier, done, mark):
    """This invocation's results of its finished steps (DONE; its first MARK
    comparisons), over EARLIER's (a results.json to merge, or None): a
    section measured again replaces the earlier one with its comparisons;
    the rest of EARLIER stays, with where it came from."""
    out = {k: v for k, v in now.items() if k not in ("sections", "verified", "failed")}
    sections = {k: v for k, v in now["sections"].items() if step_of(k) in done}
    verified = now.get("verified", [])[:mark]
    if earlier:
        again = tuple(p for st in done for p in verified_prefixes(st))
        # The earlier RPO sections of a placement measured again all go once
        # the RPO step is through (its loads may differ); before that, those
        # measured again. Those of the other placement stay.
        again_at = {st.split("_", 2)[2] for st in done if st.startswith("rpo_")}
        old = {k: v for k, v in earlier["sections"].items()
               if step_of(k) not in done
               and not ("rpo" in done and k.startswith("rpo_") and k.split("_", 2)[2] in again_at)}
        sections = {**old, **sections}
        # Exact repeats (an older merge's) count once.
        kept = [v for v in earlier.get("verified", []) if not (again and v.startswith(again))]
        verified = list(dict.fromkeys(kept + verified))
        if done:
            # A merge of a merge keeps naming every earlier part.
            out["merged_from"] = earlier.get("merged_from") or earlier["when"]
            out["also_from"] = earlier.get("also_from", []) + (
                [earlier["when"]] if earlier.get("merged_from") else [])
        else:  # nothing new: the earlier results as they were
            out = {k: v for k, v in earlier.items() if k not in ("sections", "verified", "failed")}
    out["sections"] = sections
    out["verified"] = verified
    return out


def write_json(path, data):
    """Writes PATH whole or not at all (a full disk leaves the old file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", required=True, help="a running tests/cluster/testbed.sh DIR")
    ap.add_argument("--out", required=True, help="where results.{json,md} and the chart go")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rpo-seconds", type=int, default=60)
    ap.add_argument("--rpo-loads", type=lambda v: [float(x) for x in v.split(",")],
                    default=[0.5, 0.25],
                    help="fio loads of the RPO section, as fractions of the primary's capacity")
    ap.add_argument("--rpo-placements", type=lambda v: v.split(","),
                    default=["per-site", "shared"],
                    help="core placements of the RPO section (as --penalty-placements)")
    ap.add_argument("--penalty-seconds", type=int, default=20)
    ap.add_argument("--penalty-placements", type=lambda v: v.split(","),
                    default=["per-site", "shared"],
                    help="core placements of the penalty section: per-site (site A and "
                         "the guest on core 0, site B and the cairnds on the rest), shared")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--no-mirror", action="store_true", help="leave rbd-mirror out")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep OUT/work (cairnd logs and configs)")
    ap.add_argument("--tools", default="cairn,cairn_plain,export,rbd_mirror",
                    help="the tools of the full and incremental sections (also: "
                         "rbd_mirror_secure, rbd-mirror with msgr2 secure mode)")
    ap.add_argument("--volume-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a [volume] setting for Cairn's sources (tuning experiments), "
                         "e.g. --volume-option 'window = 16'")
    ap.add_argument("--sink-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a [sink] setting for Cairn's sink (tuning experiments), "
                         "e.g. --sink-option 'window = 16'")
    ap.add_argument("--merge", metavar="RESULTS_JSON",
                    help="keep the sections of an earlier results.json and add those run now")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the table and chart into docs/PERFORMANCE.md")
    args = ap.parse_args()
    only = args.only.split(",")
    bad = [o for o in only if o not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; known: {SECTIONS}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    args.out = os.path.abspath(args.out)  # rbd-mirror runs in a directory of its own
    os.makedirs(args.out, exist_ok=True)
    b = Bench(args)
    earlier = None
    if args.merge:
        # Sections measured by an earlier invocation (its results.json, or
        # the results.partial.json of one that failed) join this one's
        # table; the "measured" line names every part.
        with open(args.merge) as f:
            earlier = json.load(f)
        if earlier.get("failed"):
            log(f"merging from a run that failed ({earlier['failed'][:200]}): its finished "
                f"sections ({', '.join(earlier['sections']) or 'none'}) are kept")
    done = []  # the steps finished, and how many comparisons they made
    mark = 0

    def finished(step):
        nonlocal mark
        done.append(step)
        mark = len(b.results.get("verified", []))

    try:
        if "raw" in only:
            b.results["sections"]["raw"] = b.section_raw()
            finished("raw")
        if "full" in only or "incremental" in only:
            b.section_sync()
            finished("sync")
        if "sparse" in only:
            b.section_sparse()
            finished("sparse")
        if "verify" in only:
            b.section_verify()
            finished("verify")
        if "rpo" in only:
            for placement in args.rpo_placements:
                for fraction in args.rpo_loads:
                    b.section_rpo(fraction, placement)
                    # Each load and placement is kept once finished.
                    finished(f"rpo_{int(round(fraction * 100))}_{placement}")
            finished("rpo")
        if "penalty" in only:
            b.section_penalty()
            finished("penalty")
        if "memory" in only:
            b.section_memory()
            finished("memory")
    except BaseException as e:
        # An hour's run that fails late keeps what it measured: the steps
        # finished go to results.partial.json with the failure (results.json
        # is left as it was), and a later invocation can --merge it and
        # measure only the rest.
        partial = os.path.join(args.out, "results.partial.json")
        try:
            kept = merge_results(b.results, earlier, done, mark)
            kept["failed"] = f"{type(e).__name__}: {e}"[:4000]
            write_json(partial, kept)
            log(f"failed; the steps finished ({', '.join(done) or 'none'}) are in {partial}: "
                f"measure the rest with --only ... --merge {partial}")
        except Exception as w:  # the run's own failure is the one to report
            log(f"failed, and could not keep the steps finished in {partial}: {w}")
        raise
    finally:
        b.close()
    b.results = merge_results(b.results, earlier, done, mark)
    md = report(b.results)
    write_json(os.path.join(args.out, "results.json"), b.results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    png = os.path.join(args.out, "performance.png")
    if not chart(b.results, png):
        png = None
    lag_png = os.path.join(args.out, "lag.png")
    if not chart_lag(b.results, lag_png):
        lag_png = None
    print(md)
    if args.update_docs:
        update_docs(md, png, lag_png)
    if not args.keep_work:
        shutil.rmtree(b.work, ignore_errors=True)


if __name__ == "__main__":
    main()
