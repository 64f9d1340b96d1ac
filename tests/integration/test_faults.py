"""Real-process faults on two real Ceph clusters: cairnd killed with SIGKILL
(source and sink), the link cut, bits flipped on the wire.

The source's peer is a FaultProxy (tests/tools/fault_proxy.py) in front of
the sink; a guest writes to the primary image the whole time, holding it
open as a VM does. Whatever happens, at the end (Rig.finish_and_verify):
  - `cairn replicate` asked after the last write promises a restore point
    that equals the image as it was then;
  - the points rise from 1, each based on the one before it (base_seq ==
    previous seq; a gap only where a snapshot taken during an outage was
    dropped unshipped): no full resend after the first epoch, and every
    later epoch carried far less data than the image;
  - every cairn.<N> snapshot at the source became restore point N (a
    snapshot taken but not acknowledged is re-used, not orphaned);
  - every restore point equals, by whole-image hash, the source snapshot of
    the same seq (keep_snapshots 1000 keeps them all); restores work;
  - no spool file is left at the sink.

CAIRN_FAULT_RECOVERY (seconds, default 75) is how long a restarted daemon
or a healed link may take to produce the next restore point. A cairnd
SIGKILLed with an image open leaves its watch (and the exclusive lock, if it
held it) until the OSD times it out, 30 s: the source avoids it by holding
no handle on the primary during an epoch, the sink by fencing (blocklisting)
its previous instance at start; test_sink_killed_repeatedly holds the sink
to 15 s.
"""
import json
import os
import random
import re
import time

import pytest
import rbd

import cairn_testlib as lib
from fault_proxy import FaultProxy

MiB = 1 << 20
SIZE = 32 * MiB
PREFILL = 24 * MiB  # the first epoch carries this; a full resend would too
RECOVERY = float(os.environ.get("CAIRN_FAULT_RECOVERY", "75"))


# -- fixtures ------------------------------------------------------------------


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


def _drop_stale_watchers(site, prefix):
    """A SIGKILLed cairnd leaves its watch on every image it had open until
    the OSD times it out (30 s); the image cannot be removed meanwhile.
    Blocklists every watcher of prefix* images (the daemons and the guest
    are stopped by now, so any watcher left is a dead client)."""
    mine = {site.cluster.get_addrs()}  # the guest's and the checks' own client
    stale = set()
    for image in site.images():
        if not image.startswith(prefix):
            continue
        with rbd.Image(site.ioctx, image, read_only=True) as img:
            stale.update(w["addr"] for w in img.watchers_list() if w["addr"] not in mine)
    for addr in stale:
        site.cluster.blocklist_add(addr, 3600)

    def clear():
        for image in site.images():
            if image.startswith(prefix):
                with rbd.Image(site.ioctx, image, read_only=True) as img:
                    if list(img.watchers_list()):
                        return False
        return True

    if stale:
        lib.wait_for(f"stale watchers {sorted(stale)} gone", clear, timeout=20)


@pytest.fixture
def cleanup(name, site_a, site_b):
    """Requested before `daemons`, so it runs after they stopped and before
    `name` removes the images: stops guests, drops dead clients' watches."""
    writers = []
    yield writers
    for w in writers:
        try:
            w.stop()
        except Exception:
            pass
    for site in (site_a, site_b):
        _drop_stale_watchers(site, name)


# -- the rig -------------------------------------------------------------------


class Rig:
    """Site A image + guest, sink at B, proxy, source at A (interval 1 s)."""

    def __init__(self, site_a, site_b, workdir, daemons, proxies, cleanup, name, seed,
                 source_extra=""):
        self.site_a, self.site_b, self.name = site_a, site_b, name
        site_a.create(name, SIZE)
        rng = random.Random(seed)
        with rbd.Image(site_a.ioctx, name) as img:
            for off in range(0, PREFILL, 4 * MiB):
                img.write(rng.randbytes(4 * MiB), off)
        # The guest's image is open before replication starts, as a VM's is.
        self.writer = lib.GuestWriter(site_a, name, SIZE, seed, ops=2, max_len=32 * 1024,
                                      hold_open=True)
        cleanup.append(self.writer)
        self.writer.start(paused=True)
        sink_port = lib.free_port()
        self.sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
            "b", site_b.conf, sink_port, f"{workdir}/spool")))
        self.spool = os.path.join(workdir, "spool", name)
        self.proxy = proxies(sink_port, seed)
        self.source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
            "a", site_a.conf, self.proxy.port, {name: (name, name + "-standby")},
            interval="1s", keep=1000, extra=source_extra)))
        lib.wait_for("the first restore point (the whole image)",
                     lambda: self.npoints() >= 1, timeout=30)
        self.writer.go()

    def points(self):
        r = self.sink.cli("--json", "points", self.name)
        if r.returncode == 3:  # no point yet
            return []
        if r.returncode != 0:
            raise RuntimeError(f"cairn points: {r.returncode} {r.stderr}")
        return json.loads(r.stdout)

    def npoints(self):
        return len(self.points())

    def state(self, d):
        """The status of this volume on cairnd d ({} if it has none yet)."""
        for v in d.json("status", self.name):
            if v["volume"] == self.name:
                return v
        return {}

    def logs(self, n=50):
        return (f"\n--- source log ---\n{self.source.log_tail(n)}"
                f"\n--- sink log ---\n{self.sink.log_tail(n)}")

    def wait_new_point(self, after, what, timeout=RECOVERY):
        """Waits for more than `after` restore points (a count)."""
        return self._wait_point(f"{what}: a restore point after {after}",
                                lambda: self.npoints() > after, timeout)

    def wait_point_seq(self, seq, what, timeout=RECOVERY):
        """Waits for restore point `seq` or a later one. Points are numbered
        by snapshot, with gaps (outage snapshots dropped unshipped), and an
        idle image makes no more points: a count of points is no seq."""
        return self._wait_point(f"{what}: restore point {seq} or a later one",
                                lambda: any(p["seq"] >= seq for p in self.points()), timeout)

    def _wait_point(self, what, predicate, timeout):
        try:
            return lib.wait_for(what, predicate, timeout=timeout)
        except TimeoutError as e:
            src = _safe(lambda: self.state(self.source))
            snk = _safe(lambda: self.state(self.sink))
            raise AssertionError(f"{e}\nsource status: {src}\nsink status: {snk}"
                                 + self.logs()) from None

    def finish_and_verify(self, before_request=None, after_request=None):
        """Stops the guest, asks the source for a point now, stops the source
        and checks every point against its source snapshot. Returns the
        points. before_request() runs after the last write, before the
        request; with after_request() the request is `cairn replicate`
        without --wait, after_request() runs, then the promised point is
        waited for."""
        self.writer.stop()
        head = self.site_a.digest(self.name)
        if before_request:
            before_request()
        if after_request is None:
            want = self.source.json("replicate", self.name, "--wait", "--timeout", "60")["seq"]
        else:
            want = self.source.json("replicate", self.name)["seq"]
            after_request()
            self.wait_point_seq(want, f"the promised point {want}")
        self.source.stop()
        pts = self.points()
        seqs = [p["seq"] for p in pts]
        # Gaps only where a snapshot taken during an outage was dropped unshipped.
        assert seqs[0] == 1 and seqs == sorted(set(seqs)), f"restore points out of order: {seqs}"

        assert pts[0]["base_seq"] == 0 and pts[0]["data_bytes"] >= PREFILL
        # Epochs whose diff sent the changed objects whole (a client opened
        # the image since their base: the test's own writes do): the bytes
        # of those objects, by base.
        whole = {}
        with open(self.source.log) as f:
            for m in re.finditer(r"from cairn\.(\d+): clients opened the image around a "
                                 r"snapshot since cairn\.\d+; the (\d+) bytes", f.read()):
                base, n = int(m.group(1)), int(m.group(2))
                whole[base] = max(whole.get(base, 0), n)
        for prev, p in zip(pts, pts[1:]):
            assert p["base_seq"] == prev["seq"], (
                f"point {p['seq']} is based on {p['base_seq']}, not on {prev['seq']}: {pts}")
            # What the guest can have written between the two snapshots: a
            # source killed while it held a read-write handle (taking a
            # snapshot) leaves a watch that stalls the next snapshot ~30 s,
            # and that point carries 30 s of the guest's writes.
            wrote = self.writer.most_written(prev["source_time_ns"] / 1e9,
                                             p["source_time_ns"] / 1e9)
            # A full resend carries at least PREFILL: no allowance reaches it.
            limit = max(SIZE // 4, whole.get(p["base_seq"], 0) + 1, min(wrote + 1, PREFILL))
            assert p["data_bytes"] < limit, (
                f"point {p['seq']} carried {p['data_bytes']} data bytes of a {SIZE}-byte "
                f"image: a full resend? (whole objects sent from its base: {whole}; the guest "
                f"wrote at most {wrote} bytes between the two snapshots)")

        snaps = sorted(int(s[len("cairn."):]) for s in self.site_a.snaps(self.name)
                       if s.startswith("cairn."))
        # At most one snapshot taken after the last point, just before the stop.
        assert snaps in (seqs, seqs + [seqs[-1] + 1]), (
            f"source snapshots {snaps} != restore points {seqs}: a snapshot was orphaned or lost")

        for p in pts:
            source_snap = self.site_a.digest(self.name, f"cairn.{p['seq']}")
            point = self.site_b.digest(p["image"], p["snap"])
            assert point == source_snap, (
                f"restore point {p['seq']} differs from its source snapshot")
        # The restore path too: the newest by full copy, a middle one by clone.
        for p, full in ((pts[-1], True), (pts[len(pts) // 2], False)):
            target = f"{self.name}-r{p['seq']}"
            self.sink.json("restore", self.name, str(p["seq"]), "--to", target,
                           *(["--full"] if full else []))
            assert self.site_b.digest(target) == self.site_a.digest(self.name,
                                                                    f"cairn.{p['seq']}")
        leftover = ([f for f in os.listdir(self.spool) if f.endswith(".spool")]
                    if os.path.isdir(self.spool) else [])
        assert not leftover, f"spool files left behind: {leftover}"

        # Last, so that a broken promise does not hide the checks above. The
        # promise is "point `want` or a later one holds every write before it".
        later = [p for p in pts if p["seq"] >= want]
        assert later, f"replicate promised point {want}, points {seqs}"
        promised = later[0]
        assert self.site_b.digest(promised["image"], promised["snap"]) == head, (
            f"`cairn replicate` after the last write promised point {want}; point "
            f"{promised['seq']} is not the image as it was then (points {seqs}; source log "
            f"below)" + self.logs())
        return pts


def _safe(fn):
    try:
        return fn()
    except Exception as e:
        return f"<{e}>"


def reached(what, predicate, timeout=5):
    """wait_for that reports instead of failing: aims a fault at a moment (a
    state) that may pass too quickly to be seen; the caller records it."""
    try:
        lib.wait_for(what, predicate, timeout=timeout, interval=0.01)
        return True
    except TimeoutError:
        return False


def lock_owners(site, image):
    """Addresses of the clients holding image's exclusive lock."""
    with rbd.Image(site.ioctx, image, read_only=True) as img:
        info = img.list_lockers()
    return [addr for _, _, addr in info["lockers"]] if info else []


def refusals(log_text):
    """Sessions the sink ended because a frame failed verification."""
    return [line for line in log_text.splitlines() if "ended: DataLoss" in line]


# -- a. the source is killed -------------------------------------------------


def test_source_killed_repeatedly(site_a, site_b, workdir, name, cleanup, daemons, proxies):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, cleanup, name, seed=11)
    src, proxy = rig.source, rig.proxy
    rng = random.Random(11)
    # "at-start" kills the source right after its restart answered, before
    # it made a point; every other kill waits for progress first.
    moments = ["after-point", "after-writes", "at-start", "syncing", "slow-syncing", "applying",
               "after-point"]
    hit, recovery = [], []
    for i, moment in enumerate(moments):
        n = rig.npoints()
        if moment == "syncing":
            ok = reached("source syncing", lambda: rig.state(src)["state"] == "syncing")
        elif moment == "slow-syncing":  # mid-epoch for sure: a slow link
            proxy.delay(0.05)
            ok = reached("source syncing", lambda: rig.state(src)["state"] == "syncing")
            b = proxy.bytes_up
            ok = ok and reached("epoch bytes flowing", lambda: proxy.bytes_up > b)
        elif moment == "applying":
            ok = reached("source waiting for APPLIED",
                         lambda: rig.state(src)["state"] == "applying")
        elif moment == "after-point":
            rig.wait_new_point(n, f"kill {i}")
            ok = True
        elif moment == "after-writes":
            b = rig.writer.batches + rng.randint(3, 15)
            lib.wait_for("the guest wrote a few batches", lambda: rig.writer.batches >= b, 20)
            ok = True
        else:
            ok = True
        src.kill9()
        proxy.delay(0)
        hit.append((moment, ok))
        n = rig.npoints()
        t = time.monotonic()
        src.start()
        if i + 1 < len(moments) and moments[i + 1] == "at-start":
            recovery.append(None)
            continue
        rig.wait_new_point(n, f"the source restarted after kill {i} ({moment}) making progress")
        recovery.append(round(time.monotonic() - t, 1))
    # The last kill leaves a snapshot taken but not shipped; the guest writes
    # on; the source restarts after the last write, and a point asked of it
    # right away must cover every write, not be that older snapshot.
    proxy.delay(0.05)
    lib.wait_for("source syncing", lambda: rig.state(src)["state"] == "syncing", 10, 0.01)
    src.kill9()
    proxy.delay(0)
    b = rig.writer.batches + 5
    lib.wait_for("the guest writing after the kill", lambda: rig.writer.batches >= b, 20)
    pts = rig.finish_and_verify(before_request=src.start)
    assert rig.writer.max_batch_seconds < 5, (
        f"the guest's writes stalled {rig.writer.max_batch_seconds:.1f} s")
    print(f"kills aimed at {hit}; next point after restart (s) {recovery}; {len(pts)} points; "
          f"{time.monotonic() - t0:.1f} s")


def test_source_kill_does_not_block_the_primary(site_a, site_b, workdir, name, cleanup, daemons,
                                                proxies):
    """A guest whose image is closed while cairnd dies (a VM powered off, or
    between open/close) must not then wait for the dead cairnd: the primary
    never waits on replication."""
    size = 16 * MiB
    site_a.create(name, size)
    sink_port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, sink_port, f"{workdir}/spool")))
    proxy = proxies(sink_port, 5)
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, proxy.port, {name: (name, name + "-standby")}, interval="0")))
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(random.Random(5).randbytes(8 * MiB), 0)
    # A slow link keeps the epoch in flight long enough to kill the source in it.
    proxy.delay(0.3)
    source.cli("replicate", name, check=True)
    lib.wait_for("source syncing", lambda: source.json("status", name)[0]["state"] == "syncing",
                 timeout=10, interval=0.01)
    lockers = lock_owners(site_a, name)  # the primary's exclusive lock owner
    source.kill9()
    proxy.delay(0)
    t = time.monotonic()
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(b"guest write after the crash", 4096)
    stalled = time.monotonic() - t
    assert stalled < 5, (
        f"a guest write to the primary waited {stalled:.1f} s after the source cairnd was "
        f"SIGKILLed mid-epoch: the dead cairnd still held the image's exclusive lock (and its "
        f"watch) until the OSD timed it out (lock owner at the kill: {lockers}, the guest is "
        f"{site_a.cluster.get_addrs()})")
    source.start()
    r = source.json("replicate", name, "--wait", "--timeout", "60")
    (p,) = [p for p in sink.json("points", name) if p["seq"] == r["seq"]]
    assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, f"cairn.{r['seq']}")


# -- b. the sink is killed: see test_sink_killed_repeatedly below ---------


def test_link_cuts_heal_by_themselves(site_a, site_b, workdir, name, cleanup, daemons, proxies):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, cleanup, name, seed=33)
    proxy, src = rig.proxy, rig.source
    cuts = [("syncing", 2.0), ("idle", 3.0), ("slow-syncing", 2.5), ("applying", 2.0)]
    hit, after_heal = [], []
    for i, (moment, seconds) in enumerate(cuts):
        if moment == "slow-syncing":
            proxy.delay(0.05)
            moment = "syncing"
        ok = reached(f"source {moment}", lambda: rig.state(src)["state"] == moment)
        proxy.cut()
        proxy.delay(0)
        hit.append((moment, ok))
        cut_at = time.monotonic()
        n_cut = rig.npoints()
        lib.wait_for("the source noticing the cut",
                     lambda: rig.state(src)["state"] in ("disconnected", "error"), timeout=10)
        # The cut lasts `seconds` (pacing the fault, not synchronisation) while
        # the guest goes on writing.
        lib.wait_for("the cut lasting", lambda: time.monotonic() - cut_at >= seconds,
                     timeout=seconds + 5)
        # An epoch already durable at the sink may still become a point.
        assert rig.npoints() <= n_cut + 1, "restore points made through a cut link"
        assert proxy.active_connections == 0
        proxy.heal()
        n = rig.npoints()
        t = time.monotonic()
        rig.wait_new_point(n, f"the link healed after cut {i}")
        after_heal.append(round(time.monotonic() - t, 1))
    # The replication keeps its pace after the cuts: a point about every second.
    n = rig.npoints()
    lib.wait_for("three more points after the last heal", lambda: rig.npoints() >= n + 3,
                 timeout=10)
    st = rig.state(src)
    assert st["error"] == "", st
    assert proxy.cuts == len(cuts) and proxy.refused > 0, (proxy.cuts, proxy.refused)
    # A source restarted while the link is down is asked for a point after
    # the last write; the point it promises must hold that write.
    pts = rig.finish_and_verify(before_request=lambda: (proxy.cut(), src.kill9(), src.start()),
                                after_request=proxy.heal)
    print(f"cuts at {hit}; first point after heal (s) {after_heal}; connections refused while "
          f"cut {proxy.refused}; {len(pts)} points; {time.monotonic() - t0:.1f} s")


def test_long_outage_keeps_the_schedule_and_resumes_mid_epoch(site_a, site_b, workdir, name,
                                                              cleanup, daemons, proxies):
    """The link goes down in the middle of an epoch and stays down: the
    source keeps its base and the epoch in flight, goes on taking a snapshot
    every second but keeps only the newest 3 of them; when the link returns
    the epoch resumes from the sink's durable prefix, then each kept snapshot
    is shipped as one epoch."""
    t0 = time.monotonic()
    keep = 3
    rig = Rig(site_a, site_b, workdir, daemons, proxies, cleanup, name, seed=55,
              source_extra=f"outage_snapshots = {keep}\n")
    proxy, src, sink = rig.proxy, rig.source, rig.sink
    rng = random.Random(55)
    # A big epoch, slowed on the wire, cut once part of it is durable.
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(5 * MiB), 8 * MiB)
    proxy.delay(0.02)
    lib.wait_for("the source shipping the big epoch",
                 lambda: rig.state(src)["state"] == "syncing", 20, 0.01)
    b = proxy.bytes_up + 2 * MiB
    lib.wait_for("2 MiB of the epoch on the wire", lambda: proxy.bytes_up >= b, 20, 0.01)
    points_before = rig.points()
    newest = points_before[-1]["seq"]

    def spooled():
        # Bytes the sink wrote to the spool of the epoch in flight: the
        # prefix it offers to resume from after the cut (on the wire is not
        # enough: a loaded sink may not have read them yet).
        files = ([f for f in os.listdir(rig.spool) if f.endswith(".spool")]
                 if os.path.isdir(rig.spool) else [])
        return sum(os.path.getsize(os.path.join(rig.spool, f)) for f in files)
    lib.wait_for("1 MiB of the epoch in the sink's spool", lambda: spooled() >= MiB, 20, 0.01)
    proxy.cut()
    proxy.delay(0)
    lib.wait_for("the source noticing the cut",
                 lambda: rig.state(src)["state"] in ("disconnected", "error"), timeout=10)

    def cairn_snaps():
        return sorted(int(x[len("cairn."):]) for x in site_a.snaps(name)
                      if x.startswith("cairn."))

    # Epochs go out in snapshot order: the one in flight is the oldest after
    # the newest point (a snapshot taken ahead beside it, or one taken since
    # the cut, may follow; they count among the outage snapshots).
    in_flight = min((x for x in cairn_snaps() if x > newest), default=0)
    assert in_flight > newest, (in_flight, newest)
    first_outage = in_flight + 1
    most = 0

    def outage_progress():
        nonlocal most
        snaps = cairn_snaps()
        pending = [x for x in snaps if x > newest]
        most = max(most, len(pending))
        assert newest in snaps, f"the base cairn.{newest} was dropped during the outage: {snaps}"
        assert in_flight in snaps, (
            f"cairn.{in_flight}, whose epoch the sink holds a prefix of, was dropped: {snaps}")
        assert len(pending) <= 1 + keep, f"outage snapshots not bounded to {keep}: {snaps}"
        return snaps[-1] >= first_outage + 6

    lib.wait_for("seven snapshots taken during the outage", outage_progress, timeout=30,
                 interval=0.2)
    st = rig.state(src)
    assert st["state"] in ("disconnected", "error") and st["pending_snapshots"] == 1 + keep, st
    assert rig.points() == points_before, "restore points made through a cut link"
    kept = [x for x in cairn_snaps() if x > in_flight]
    proxy.heal()
    rig.wait_new_point(len(points_before), "the link healed after the outage")
    lib.wait_for(f"the kept outage snapshots {kept} becoming restore points",
                 lambda: rig.points()[-1]["seq"] >= kept[-1], timeout=30)
    pts = rig.points()
    seqs = [p["seq"] for p in pts]
    # (One more outage snapshot may be taken, and the oldest kept one dropped,
    # between reading `kept` and the heal: finish_and_verify checks that
    # every snapshot left at the source became a point.)
    assert in_flight in seqs and seqs[-1] >= kept[-1], (seqs, in_flight, kept)
    assert len([x for x in seqs if x > in_flight]) <= keep + 1, (seqs, in_flight, kept)
    assert rig.state(src)["resumed_epochs_total"] >= 1, rig.state(src)
    assert rig.state(sink)["resumed_epochs_total"] >= 1, rig.state(sink)
    resumed = [line for line in src.log_text().splitlines() if "resumed at record" in line]
    assert any(f"epoch {in_flight} applied" in line for line in resumed), (
        f"epoch {in_flight} did not resume from the durable prefix" + rig.logs())
    pts = rig.finish_and_verify()
    print(f"outage: in flight {in_flight}, kept {kept}, at most {most} pending snapshots; "
          f"{len(pts)} points; {time.monotonic() - t0:.1f} s")


# -- d. bits flipped on the wire ---------------------------------------------


def test_flipped_bits_are_refused_and_resent(site_a, site_b, workdir, name, cleanup, daemons,
                                             proxies):
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, cleanup, name, seed=44)
    proxy, sink, src = rig.proxy, rig.sink, rig.source
    rng = random.Random(44)
    seen = []
    # "next": the next chunk on the wire, mostly an epoch's first frames;
    # "payload": inside a 4 MiB epoch slowed down by the proxy, block bytes.
    for i, where in enumerate(["next", "payload", "next", "payload"]):
        before = len(refusals(sink.log_text()))
        flips = len(proxy.flips)
        if where == "payload":
            with rbd.Image(site_a.ioctx, name) as img:
                img.write(rng.randbytes(4 * MiB), rng.randrange(0, SIZE - 4 * MiB))
            proxy.delay(0.02)
            lib.wait_for("source syncing", lambda: rig.state(src)["state"] == "syncing", 10,
                         0.01)
            b = proxy.bytes_up + 256 * 1024
            lib.wait_for("epoch bytes flowing", lambda: proxy.bytes_up >= b, 10, 0.01)
        proxy.flip_bits(1)
        lib.wait_for(f"flip {i} made on the wire", lambda: len(proxy.flips) > flips, timeout=20)
        proxy.delay(0)
        try:
            lib.wait_for(f"the sink refusing the frame corrupted by flip {proxy.flips[-1]}",
                         lambda: len(refusals(sink.log_text())) > before, timeout=20)
        except TimeoutError as e:
            raise AssertionError(f"{e}: a corrupt frame went unnoticed?" + rig.logs()) from None
        n = rig.npoints()
        rig.wait_new_point(n, f"the source re-sending after flip {i}")
        new = refusals(sink.log_text())[before:]
        assert len(new) == 1, new
        # The link is TLS: a changed byte fails the TLS record's check
        # before any frame check sees it. (The frame and block checks catch
        # what a peer itself gets wrong: FaultLink over TLS, unit tests.)
        assert "TLS record" in new[0] and "failed its integrity check" in new[0], new[0]
        seen.append((where, new[0].split("ended: ", 1)[1]))
    counted = rig.state(sink)
    assert counted["corrupt_frames_total"] == 4 and counted["errors_total"] >= 4, counted
    pts = rig.finish_and_verify()
    assert len(refusals(sink.log_text())) == 4
    print(f"flips (connection, byte, bit) {proxy.flips}; refused as {seen}; {len(pts)} points; "
          f"{time.monotonic() - t0:.1f} s")


# -- e. the sink is killed -----------------------------------------------------

# The next restore point after a sink restart must come well inside the OSD's
# watch timeout (osd_client_watch_timeout, 30 s): the restarted sink fences
# the dead one instead of waiting for its watch and lock to time out.
SINK_RESTART_DEADLINE = 15.0


def test_sink_killed_repeatedly(site_a, site_b, workdir, name, cleanup, daemons, proxies):
    """kill -9 of the sink cairnd while it receives an epoch, while it applies
    one to the standby image (which it then holds open, with a watch and the
    exclusive lock), and idle after a point; restarted each time. After each
    restart a restore point made by the new process must appear within
    SINK_RESTART_DEADLINE s; at the end every point equals its source
    snapshot, no epoch was re-sent in full, no spool file is left."""
    t0 = time.monotonic()
    rig = Rig(site_a, site_b, workdir, daemons, proxies, cleanup, name, seed=22)
    sink, src, proxy = rig.sink, rig.source, rig.proxy
    standby = name + "-standby"
    rng = random.Random(22)

    def big_write():
        # 4 MiB in one place: an epoch long enough to be seen receiving or
        # applying (and far below the 8 MiB that would count as a resend).
        with rbd.Image(site_a.ioctx, name) as img:
            img.write(rng.randbytes(4 * MiB), rng.randrange(0, SIZE - 4 * MiB))

    def sink_state():
        return rig.state(sink).get("state")

    def aim(moment):
        """Waits for `moment` at the sink; True if it was seen."""
        if moment == "idle":  # right after a point
            rig.wait_new_point(rig.npoints(), "a point before killing the sink idle")
            return sink_state() == "idle"
        for _ in range(3):  # a short apply may slip between two polls: try again
            if moment == "receiving":
                proxy.delay(0.05)  # ~3 s of receiving for 4 MiB
            big_write()
            if moment == "receiving":
                b = proxy.bytes_up
                ok = (reached("sink receiving", lambda: sink_state() == "receiving", timeout=10)
                      and reached("epoch bytes flowing to the sink",
                                  lambda: proxy.bytes_up >= b + 512 * 1024, timeout=10))
            else:  # the sink writing the standby image: it holds its exclusive lock
                ok = reached("sink applying, holding the standby image's lock",
                             lambda: lock_owners(site_b, standby), timeout=10)
            if ok:
                return True
            proxy.delay(0)
        return False

    moments = ["applying", "receiving", "applying", "idle", "applying", "receiving", "applying"]
    hit, recovery, left_locked = [], [], 0
    for i, moment in enumerate(moments):
        ok = aim(moment)
        sink.kill9()
        proxy.delay(0)
        killed_ns = time.time_ns()
        locked = lock_owners(site_b, standby)  # a dead sink's lock, held until fenced
        left_locked += bool(locked)
        hit.append((moment, ok, bool(locked)))
        t = time.monotonic()
        sink.start()

        def new_point():
            return [p["seq"] for p in rig.points() if p["created_time_ns"] > killed_ns]

        try:
            lib.wait_for(f"a restore point made by the sink restarted after kill {i} ({moment})",
                         new_point, timeout=SINK_RESTART_DEADLINE - (time.monotonic() - t))
        except TimeoutError:
            raise AssertionError(
                f"after kill -9 #{i} of the sink ({moment}, aimed: {ok}, standby image locked "
                f"by the dead sink: {locked}) the restarted sink made "
                f"no restore point within {SINK_RESTART_DEADLINE:.0f} s of its restart (the dead "
                f"sink's watch or exclusive lock on the standby image holding it up until the OSD "
                f"times it out, 30 s?)\nsource status: {_safe(lambda: rig.state(src))}\nsink "
                f"status: {_safe(lambda: rig.state(sink))}" + rig.logs(80)) from None
        recovery.append(round(time.monotonic() - t, 1))
    assert left_locked >= 2, (
        f"only {left_locked} kills left the standby image locked by the dead sink (the case "
        f"that stalls the next point): (moment, aimed, left locked) {hit}")
    pts = rig.finish_and_verify()
    fenced = [line for line in sink.log_text().splitlines() if "fenced" in line]
    print(f"sink kills (moment, aimed, left locked) {hit}; next point after restart (s) "
          f"{recovery}; "
          f"{len(fenced)} fencing log lines; {len(pts)} points; {time.monotonic() - t0:.1f} s")


def test_a_second_sink_fences_the_first(site_b, workdir, name, daemons):
    """Two sinks for one pool started on purpose: the second fences the first
    (a warning names it) and serves; the fenced one stops by itself (its I/O
    is refused; one sink per pool)."""
    first = daemons(lib.Cairnd(workdir, "sink-1", lib.sink_config(
        "b", site_b.conf, lib.free_port(), f"{workdir}/spool-1")))
    first_pid = first.proc.pid
    second = daemons(lib.Cairnd(workdir, "sink-2", lib.sink_config(
        "b", site_b.conf, lib.free_port(), f"{workdir}/spool-2")))
    proc = first.proc
    lib.wait_for("the fenced first sink stopping by itself", lambda: proc.poll() is not None,
                 timeout=20)
    assert proc.returncode == 0, first.log_tail()
    fenced = [line for line in second.log_text().splitlines()
              if "fenced the previous sink instance" in line]
    assert len(fenced) == 1 and " warning " in fenced[0] and f"pid {first_pid} " in fenced[0], (
        f"the second sink did not warn that it fenced the first (pid {first_pid}):\n"
        + second.log_tail())
    # Its reads are refused (blocklisted) or, later, show the newer sink.
    assert re.search(r"sink: .*(was blocklisted|the sink lock of pool rbd was taken from this sink).*; "
                     r"stopping this cairnd", first.log_text()), first.log_tail()
    assert second.cli("status").returncode == 0, second.log_tail()


# -- the source image vanishing under a running sync ----------------------------

GONE_SIZE = 256 * MiB


class _FirstError:
    """The first error of `volume` on cairnd d that contains `marker`, as
    `cairn status` showed it, polled in a thread from before the image goes.
    Such an error stays in status only until that cairnd's next outcome for
    the volume: the source's next attempt (the `cairn replicate` asked
    before is still pending) fails anew or, on a recreated image, makes a
    point, and a point clears the sink's error too. That may all happen
    while the test still renames, recreates or fills the image, before a
    poll that started afterwards would look."""

    def __init__(self, d, volume, marker, registry):
        import threading
        registry.append(self)  # stopped at the end of the test, whatever happens
        self.d, self.volume, self.marker = d, volume, marker
        self.seen = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"status-watch-{d.name}")
        self._thread.start()

    def _run(self):
        while self.seen is None and not self._stop.is_set():
            try:
                for st in self.d.json("status", self.volume):
                    if st["volume"] == self.volume and self.marker in st["error"]:
                        self.seen = st["error"]
            except Exception:  # cairnd busy or restarting: the next poll tells
                pass
            self._stop.wait(0.05)  # pacing of the polls, not a wait for anything

    def wait(self, what, timeout):
        """The error, once seen (fails after timeout); the polling stops."""
        try:
            return lib.wait_for(what, lambda: self.seen, timeout=timeout)
        finally:
            self.stop()

    def stop(self):
        self._stop.set()
        self._thread.join(30)


@pytest.fixture
def status_watches():
    made = []
    yield made
    for w in made:
        w.stop()


def _fill(site, image, seed):
    """Every byte of the image written (no hole that reads zeros anyway)."""
    rng = random.Random(seed)
    with rbd.Image(site.ioctx, image) as img:
        for off in range(0, GONE_SIZE, 4 * MiB):
            img.write(rng.randbytes(4 * MiB), off)


@pytest.mark.parametrize("how", ["deleted", "renamed", "recreated", "snapshot-removed"])
def test_source_image_gone_under_a_first_sync_makes_no_point(site_a, site_b, workdir, name,
                                                             daemons, proxies, status_watches,
                                                             how):
    """The image at site A is deleted (snapshots purged, then removed),
    renamed, deleted and created anew under its name, or the epoch's
    snapshot removed by hand, while its first epoch is being read. RADOS reads a removed image's objects as zeros, not
    as an error: without the check after the reads, site B recorded a
    full-size point of mostly zeros. Now the epoch is abandoned at both
    sites, with the reason in `cairn status`, and no point is made of it."""
    name += "-" + how[:4]  # a volume of its own: the catalog at B outlives the images
    site_a.create(name, GONE_SIZE)
    _fill(site_a, name, 1)
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    proxy = proxies(port, seed=1)
    proxy.delay(0.002)  # ~8 s for the image: it is deleted well before its end
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, proxy.port, {name: (name, name + "-standby")})))
    source.cli("replicate", name, check=True)
    source_saw = _FirstError(source, name, "while it was read", status_watches)
    sink_saw = _FirstError(sink, name, "abandoned by its source", status_watches)
    lib.wait_for("the first epoch under way (8 MiB through the link)",
                 lambda: proxy.bytes_up >= 8 * MiB, timeout=60)
    if how == "renamed":
        rbd.RBD().rename(site_a.ioctx, name, name + "-moved")
    elif how == "snapshot-removed":
        with rbd.Image(site_a.ioctx, name) as img:
            img.remove_snap("cairn.1")
    else:
        site_a.remove(name)
    if how == "recreated":
        site_a.create(name, GONE_SIZE)
        _fill(site_a, name, 2)
    assert proxy.bytes_up < GONE_SIZE // 2, "the epoch was nearly sent before the image went"
    proxy.delay(0)

    err = source_saw.wait("the source abandoning the epoch, saying why", timeout=60)
    assert "epoch 1 of" in err and "is discarded" in err, err
    assert ("snapshot rbd/" + name + "@cairn.1" if how == "snapshot-removed"
            else "removed, renamed or replaced") in err, err
    err_b = sink_saw.wait("the sink showing the abandoned epoch", timeout=30)
    assert "no restore point is made of it" in err_b, err_b
    assert sink.json("status", name)[0]["corrupt_frames_total"] == 0

    if how in ("deleted", "renamed"):
        # Nothing to replicate any more: no point, ever, and the source says
        # the image is gone.
        lib.wait_for("the source reporting the image missing",
                     lambda: "does not exist" in source.json("status", name)[0]["error"],
                     timeout=60)
        r = sink.cli("--json", "points", name)
        assert r.returncode != 0 and "has no restore point at this site" in r.stdout, r
        return
    # Recreated: the new image is a new image; its first point is made of it
    # whole and equals it; nothing of the old one is in any point. Snapshot
    # removed: the next epoch takes a new one, and its point equals it.
    r = source.json("replicate", name, "--wait", "--timeout", "120")
    points = sink.json("points", name)
    assert points and points[-1]["seq"] == r["seq"], points
    for p in points:
        assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, f"cairn.{p['seq']}"), \
            f"restore point {p['seq']} differs from the new image's snapshot"
    assert sink.json("status", name)[0]["error"] == ""
