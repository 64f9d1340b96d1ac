"""Real-process faults on two real Ceph clusters: cairnd killed with SIGKILL
(source and sink), the link cut, bits flipped on the wire.

The source's peer is a FaultProxy (tests/tools/fault_proxy.py) in front of
the sink. A guest writes to the primary image the whole time. Whatever
happens, at the end:
  - every restore point equals, by whole-image hash, the source snapshot of
    the same seq (the sources keep all their snapshots: keep_snapshots 1000);
  - the points are 1..N without a gap, each based on the one before it
    (base_seq == previous seq): no full resend after the first epoch, and
    every later epoch carried far less data than the image;
  - every cairn.<N> snapshot at the source became restore point N (a
    snapshot taken but not acknowledged is re-used, not orphaned);
  - `cairn replicate --wait` after the writes stopped yields a point equal to
    the image as it is now.
"""
import os
import random
import re
import time

import pytest

import cairn_testlib as lib
from fault_proxy import FaultProxy

MiB = 1 << 20
SIZE = 32 * MiB
PREFILL = 24 * MiB  # the first epoch carries this; a full resend would too


# -- set-up ------------------------------------------------------------------


@pytest.fixture
def proxies():
    made = []

    def make(target_port, seed):
        p = FaultProxy(target_port, seed=seed).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()
        assert not p.threads_alive(), f"fault proxy leaked threads: {p.threads_alive()}"


class Rig:
    """Site A image + guest, sink at B, proxy, source at A (interval 1 s)."""

    def __init__(self, site_a, site_b, workdir, daemons, proxies, name, seed):
        self.site_a, self.site_b, self.name = site_a, site_b, name
        site_a.create(name, SIZE)
        import rbd
        rng = random.Random(seed)
        with rbd.Image(site_a.ioctx, name) as img:
            for off in range(0, PREFILL, 4 * MiB):
                img.write(rng.randbytes(4 * MiB), off)
        sink_port = lib.free_port()
        self.sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
            "b", site_b.conf, sink_port, f"{workdir}/spool")))
        self.spool = os.path.join(workdir, "spool", name)
        self.proxy = proxies(sink_port, seed)
        self.source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
            "a", site_a.conf, self.proxy.port, {name: (name, name + "-standby")},
            interval="1s", keep=1000)))
        lib.wait_for("the first restore point (the whole image)",
                     lambda: len(self.points()) >= 1, timeout=30)
        self.writer = lib.GuestWriter(site_a, name, SIZE, seed, ops=2, max_len=32 * 1024,
                                      hold_open=True).start()

    def points(self):
        r = self.sink.cli("--json", "points", self.name)
        if r.returncode == 3:  # no point yet
            return []
        if r.returncode != 0:
            raise RuntimeError(f"cairn points: {r.returncode} {r.stderr}")
        import json
        return json.loads(r.stdout)

    def npoints(self):
        return len(self.points())

    def state(self, d):
        for v in d.json("status", self.name):
            if v["volume"] == self.name:
                return v
        return {}

    def wait_new_point(self, after, what, timeout=20):
        return lib.wait_for(f"{what}: a restore point after {after}",
                            lambda: self.npoints() > after, timeout=timeout)

    def logs(self):
        return (f"\n--- source log ---\n{self.source.log_tail(60)}"
                f"\n--- sink log ---\n{self.sink.log_tail(60)}")

    def finish_and_verify(self):
        """Stops the guest, asks for a point now, stops the source and checks
        every point against its source snapshot. Returns the points."""
        self.writer.stop()
        head = self.site_a.digest(self.name)
        r = self.source.json("replicate", self.name, "--wait", "--timeout", "60")
        self.source.stop()
        pts = self.points()
        seqs = [p["seq"] for p in pts]
        assert seqs == list(range(1, len(pts) + 1)), f"restore points are not 1..N: {seqs}"
        assert r["seq"] in seqs, f"replicate --wait returned {r['seq']}, points {seqs}"
        newest = pts[seqs.index(r["seq"])]
        assert self.site_b.digest(newest["image"], newest["snap"]) == head, (
            f"replicate --wait after the writes stopped returned point {r['seq']}, which is not "
            f"the image as it is now (points {seqs})" + self.logs())

        assert pts[0]["base_seq"] == 0 and pts[0]["data_bytes"] >= PREFILL
        for prev, p in zip(pts, pts[1:]):
            assert p["base_seq"] == prev["seq"], (
                f"point {p['seq']} is based on {p['base_seq']}, not on {prev['seq']}: {pts}")
            assert p["data_bytes"] < SIZE // 4, (
                f"point {p['seq']} carried {p['data_bytes']} data bytes of a {SIZE}-byte "
                f"image: a full resend?")

        snaps = sorted(int(s[len("cairn."):]) for s in self.site_a.snaps(self.name)
                       if s.startswith("cairn."))
        # At most one snapshot taken after the last point, just before the stop.
        assert snaps in (seqs, seqs + [seqs[-1] + 1]), (
            f"source snapshots {snaps} != restore points {seqs}: a snapshot was orphaned or lost")

        for p in pts:
            want = self.site_a.digest(self.name, f"cairn.{p['seq']}")
            got = self.site_b.digest(p["image"], p["snap"])
            assert got == want, f"restore point {p['seq']} differs from its source snapshot"
        # The restore path too: the newest by full copy, a middle one by clone.
        for p, full in ((pts[-1], True), (pts[len(pts) // 2], False)):
            target = f"{self.name}-r{p['seq']}"
            self.sink.json("restore", self.name, str(p["seq"]), "--to", target,
                           *(["--full"] if full else []))
            assert self.site_b.digest(target) == self.site_a.digest(self.name,
                                                                    f"cairn.{p['seq']}")
        leftover = [f for f in os.listdir(self.spool) if f.endswith(".spool")] \
            if os.path.isdir(self.spool) else []
        assert not leftover, f"spool files left behind: {leftover}"
        return pts


def reached(what, predicate, timeout):
    """wait_for that reports instead of failing: used to aim a fault at a
    moment (a state) that may pass too quickly to be seen."""
    try:
        lib.wait_for(what, predicate, timeout=timeout, interval=0.01)
        return True
    except TimeoutError:
        return False


def refusals(log_text):
    """Sessions the sink ended because a frame failed verification."""
    return [line for line in log_text.splitlines() if re.search(r"ended: DataLoss", line)]


# -- a. the source is killed -------------------------------------------------


def test_source_killed_repeatedly(site_a, site_b, workdir, daemons, proxies, name):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, name, seed=11)
    src = rig.source
    rng = random.Random(11)
    moments = ["syncing", "after-point", "after-writes", "at-start", "syncing", "applying",
               "after-point"]
    hit = []
    for i, moment in enumerate(moments):
        n = rig.npoints()
        if moment == "syncing":
            ok = reached("source syncing", lambda: rig.state(src)["state"] == "syncing", 5)
        elif moment == "applying":
            ok = reached("source waiting for APPLIED",
                         lambda: rig.state(src)["state"] == "applying", 5)
        elif moment == "after-point":
            rig.wait_new_point(n, f"kill {i}")
            ok = True
        elif moment == "after-writes":
            b = rig.writer.batches + rng.randint(3, 15)
            lib.wait_for("the guest wrote a few batches", lambda: rig.writer.batches >= b, 20)
            ok = True
        else:  # at-start: right after the restart answered
            ok = True
        src.kill9()
        hit.append((moment, ok))
        src.start()
    # The restarted source catches up by itself.
    n = rig.npoints()
    rig.wait_new_point(n, "after the last restart")
    pts = rig.finish_and_verify()
    assert rig.writer.max_batch_seconds < 5, (
        f"the guest's writes stalled {rig.writer.max_batch_seconds:.1f} s")
    print(f"kills aimed at {hit}; {len(pts)} points; {time.monotonic() - t0:.1f} s")


def test_source_kill_does_not_block_the_primary(site_a, site_b, workdir, daemons, proxies, name):
    """A guest that is between writes (image closed) when cairnd dies must not
    wait for the dead cairnd: the primary never waits on replication."""
    rig_size = 16 * MiB
    site_a.create(name, rig_size)
    sink_port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, sink_port, f"{workdir}/spool")))
    proxy = proxies(sink_port, 5)
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, proxy.port, {name: (name, name + "-standby")}, interval="0")))
    import rbd
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(random.Random(5).randbytes(8 * MiB), 0)
    # Slow link: the epoch is in flight long enough to kill the source in it.
    proxy.delay(0.3)
    source.cli("replicate", name, check=True)
    lib.wait_for("source syncing", lambda: source.json("status", name)[0]["state"] == "syncing",
                 timeout=10, interval=0.01)
    source.kill9()
    proxy.delay(0)
    t = time.monotonic()
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(b"guest write after the crash", 4096)
    stalled = time.monotonic() - t
    source.start()
    r = source.json("replicate", name, "--wait", "--timeout", "60")
    (p, *_rest) = [p for p in sink.json("points", name) if p["seq"] == r["seq"]]
    assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, f"cairn.{r['seq']}")
    assert stalled < 5, (
        f"a guest write to the primary waited {stalled:.1f} s after the source cairnd was "
        f"killed: the dead cairnd still held the image's exclusive lock")


# -- b. the sink is killed ---------------------------------------------------


def test_sink_killed_repeatedly(site_a, site_b, workdir, daemons, proxies, name):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, name, seed=22)
    sink = rig.sink
    rng = random.Random(22)
    moments = ["receiving", "after-point", "applying", "after-writes", "at-start", "receiving",
               "after-point"]
    hit, recovery = [], []
    for i, moment in enumerate(moments):
        n = rig.npoints()
        if moment in ("receiving", "applying"):
            ok = reached(f"sink {moment}", lambda: rig.state(sink).get("state") == moment, 5)
        elif moment == "after-point":
            rig.wait_new_point(n, f"kill {i}")
            ok = True
        elif moment == "after-writes":
            b = rig.writer.batches + rng.randint(3, 15)
            lib.wait_for("the guest wrote a few batches", lambda: rig.writer.batches >= b, 20)
            ok = True
        else:
            ok = True
        n = rig.npoints()
        sink.kill9()
        hit.append((moment, ok))
        t = time.monotonic()
        sink.start()
        rig.wait_new_point(n, f"after sink restart {i} ({moment})", timeout=30)
        recovery.append(round(time.monotonic() - t, 1))
    pts = rig.finish_and_verify()
    print(f"kills aimed at {hit}; recovery (s) {recovery}; {len(pts)} points; "
          f"{time.monotonic() - t0:.1f} s")
    assert max(recovery) < 10, (
        f"a restarted sink took {max(recovery)} s to make its next restore point "
        f"(per kill: {list(zip([m for m, _ in hit], recovery))})" + rig.logs())


# -- c. the link is cut --------------------------------------------------------


def test_link_cuts_heal_by_themselves(site_a, site_b, workdir, daemons, proxies, name):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, name, seed=33)
    proxy, src = rig.proxy, rig.source
    cuts = [("syncing", 2.0), ("idle", 3.0), ("syncing", 2.5), ("applying", 2.0)]
    hit, after_heal = [], []
    for i, (moment, seconds) in enumerate(cuts):
        ok = reached(f"source {moment}", lambda: rig.state(src)["state"] == moment, 5)
        proxy.cut()
        hit.append((moment, ok))
        cut_at = time.monotonic()
        n_cut = rig.npoints()
        lib.wait_for("the source noticing the cut",
                     lambda: rig.state(src)["state"] in ("disconnected", "error"), timeout=10)
        # Let the cut last (pacing the fault, not synchronisation): writes go on.
        b = rig.writer.batches + int(seconds / 0.1)
        lib.wait_for("the guest writing through the cut",
                     lambda: rig.writer.batches >= b or time.monotonic() - cut_at >= seconds,
                     timeout=seconds + 10)
        assert rig.npoints() <= n_cut + 1, "restore points made through a cut link"
        proxy.heal()
        t = time.monotonic()
        rig.wait_new_point(rig.npoints(), f"heal {i}", timeout=20)
        after_heal.append(round(time.monotonic() - t, 1))
        lib.wait_for("the source idle again after heal",
                     lambda: rig.state(src)["state"] in ("idle", "syncing", "applying")
                     and rig.state(src)["error"] == "", timeout=10)
    # The replication keeps its pace after the cuts: a point about every second.
    n = rig.npoints()
    lib.wait_for("three more points after the last heal", lambda: rig.npoints() >= n + 3,
                 timeout=10)
    assert proxy.cuts == len(cuts)
    pts = rig.finish_and_verify()
    print(f"cuts at {hit}; first point after heal (s) {after_heal}; refused while cut "
          f"{proxy.refused}; {len(pts)} points; {time.monotonic() - t0:.1f} s")
    assert max(after_heal) < 10, f"first point after a heal took {after_heal} s" + rig.logs()


# -- d. bits flipped on the wire ---------------------------------------------


def test_flipped_bits_are_refused_and_resent(site_a, site_b, workdir, daemons, proxies, name):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, name, seed=44)
    proxy, sink = rig.proxy, rig.sink
    seen = []
    for i in range(4):
        before = len(refusals(sink.log_text()))
        flips = len(proxy.flips)
        proxy.flip_bits(1)
        lib.wait_for(f"flip {i} made on the wire", lambda: len(proxy.flips) > flips, timeout=20)
        lib.wait_for(f"the sink refusing the corrupt frame of flip {i} {proxy.flips[-1]}",
                     lambda: len(refusals(sink.log_text())) > before, timeout=20)
        n = rig.npoints()
        rig.wait_new_point(n, f"the source re-sending after flip {i}", timeout=20)
        new = refusals(sink.log_text())[before:]
        assert len(new) == 1, new
        assert re.search(r"checksum mismatch|bad frame magic", new[0]), new[0]
        seen.append(new[0].split("ended: ", 1)[1])
    pts = rig.finish_and_verify()
    assert len(refusals(sink.log_text())) == 4
    print(f"flips {proxy.flips}; refused as {seen}; {len(pts)} points; "
          f"{time.monotonic() - t0:.1f} s")
