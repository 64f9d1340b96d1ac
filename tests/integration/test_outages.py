"""Outages of the standby site, with real processes on two real Ceph
clusters: "lose nothing".

1. Site B's Ceph cluster stops answering (its mon and OSD frozen with
   SIGSTOP, longer than the sink's [ceph] op_timeout): the guest at site A
   goes on writing unhindered, both cairnds say which cluster is unreachable,
   the epoch already durable in the spool stays there, and once the cluster
   answers again a new restore point appears by itself.
2. The spool disk fills up mid-epoch (a small file system of its own), or
   an epoch passes [sink] spool_max_bytes: the epoch is refused with an
   error that names spool_dir and what to do, the verified prefix stays
   durable, and once there is room the source resumes after it.

Every test ends by checking every restore point against its source
snapshot by whole-image hash, that the points form one chain (each based on
the one before: no full resend after the first), and that no spool file is
left behind.

CAIRN_OUTAGE_RECOVERY (seconds, default 60) bounds the time from the end of
an outage to the next restore point.

Test bed artifact: a single-OSD Ceph 16 cluster frozen longer than a PG read
lease (16 s) sometimes leaves a PG `laggy` for good after SIGCONT, every op
on it parked (ceph/ceph-container#1682). The sink then rightly keeps
retrying; the tests unstick such PGs (lib.heal_laggy_pgs: OSD marked down,
it re-peers) and print which, so that the bed stays usable. Seen in 1 of 8
freezes; that point then came 20 s after the thaw instead of 0.1-1 s.
"""
import json
import os
import random
import subprocess
import time

import pytest
import rbd

import cairn_testlib as lib

MiB = 1 << 20
RECOVERY = float(os.environ.get("CAIRN_OUTAGE_RECOVERY", "60"))
OP_TIMEOUT = 5  # the sink's [ceph] op_timeout, seconds


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture
def writers(name):
    """Guest writers, stopped before `name` removes the images."""
    made = []
    yield made
    for w in made:
        try:
            w.stop()
        except Exception:
            pass


@pytest.fixture
def freeze_b(site_b, name):
    """Makes a lib.Frozen of site B's mon and OSD. Afterwards (and before
    `name` removes the images) every freeze is thawed and any PG it left
    laggy is unstuck, so that the test bed stays usable whatever happened."""
    made = []

    def make():
        made.append(lib.Frozen(lib.site_daemon_pids(site_b.conf).values()))
        return made[-1]

    yield make
    for f in made:
        f.thaw()
    if made:
        lib.heal_laggy_pgs(site_b.conf)


def thawed(frozen, site_b):
    """Thaws B; returns the PGs the test bed had to unstick (see
    lib.heal_laggy_pgs) for the record."""
    frozen.thaw()
    return lib.heal_laggy_pgs(site_b.conf)


def status_of(d, volume):
    """The status of `volume` on cairnd d ({} if it has none yet)."""
    for v in d.json("status", volume):
        if v["volume"] == volume:
            return v
    return {}


def points(sink, volume):
    r = sink.cli("--json", "points", volume)
    if r.returncode == 3:  # no point yet
        return []
    if r.returncode != 0:
        raise RuntimeError(f"cairn points: {r.returncode} {r.stderr}")
    return json.loads(r.stdout)


def spool_files(spool_dir, volume):
    d = os.path.join(spool_dir, volume)
    return sorted(f for f in os.listdir(d) if f.endswith(".spool")) if os.path.isdir(d) else []


def verify_points(site_a, site_b, sink, volume, spool_dir, first_bytes, size):
    """Every point equals its source snapshot by whole-image hash; each is
    based on the one before; none after the first is a full resend; no
    spool file is left. Returns the points."""
    pts = points(sink, volume)
    seqs = [p["seq"] for p in pts]
    assert pts and seqs == sorted(set(seqs)), f"restore points out of order: {seqs}"
    assert pts[0]["base_seq"] == 0 and pts[0]["data_bytes"] >= first_bytes, pts[0]
    for prev, p in zip(pts, pts[1:]):
        assert p["base_seq"] == prev["seq"], (
            f"point {p['seq']} is based on {p['base_seq']}, not on {prev['seq']}: {seqs}")
        assert p["data_bytes"] < size // 2, (
            f"point {p['seq']} carried {p['data_bytes']} bytes of a {size}-byte image: a full "
            f"resend?")
    for p in pts:
        assert site_b.digest(p["image"], p["snap"]) == site_a.digest(volume, f"cairn.{p['seq']}"), (
            f"restore point {p['seq']} differs from its source snapshot")
    assert not spool_files(spool_dir, volume), (
        f"spool files left behind: {spool_files(spool_dir, volume)}")
    return pts


def explain(*daemons):
    return "".join(f"\n--- {d.name} log ---\n{d.log_tail(40)}" for d in daemons)


# -- 1. site B's cluster does not answer ------------------------------------


def test_standby_cluster_frozen(site_a, site_b, workdir, name, writers, freeze_b, daemons):
    """Site B's mon and OSD frozen for ~20 s (4 x the sink's op_timeout)
    while replication runs every second and a guest writes at A."""
    t0 = time.monotonic()
    size, prefill, frozen_for = 32 * MiB, 8 * MiB, 20.0
    site_a.create(name, size)
    rng = random.Random(7)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(prefill), 0)
    # The guest's image is open before replication starts, as a VM's is.
    writer = lib.GuestWriter(site_a, name, size, seed=7, ops=2, max_len=32 * 1024)
    writers.append(writer)
    writer.start(paused=True)
    spool = os.path.join(workdir, "spool")
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, spool, ceph_extra=f"op_timeout = {OP_TIMEOUT}s\n")))
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-standby")}, interval="1s")))
    lib.wait_for("the first restore point", lambda: len(points(sink, name)) >= 1, timeout=30)
    writer.go()
    n = len(points(sink, name))
    lib.wait_for("two more points with the guest writing",
                 lambda: len(points(sink, name)) >= n + 2, timeout=20)

    with freeze_b() as frozen:
        # Nothing may touch site B's cluster from here on (this process's own
        # client would hang too): only the cairnds' status and site A.
        batches = writer.batches
        sink_seen = source_seen = None

        def both_say_so():
            nonlocal sink_seen, source_seen
            if sink_seen is None:
                st = status_of(sink, name)
                if st.get("state") == "error" and "standby Ceph cluster" in st.get("error", ""):
                    sink_seen = (round(time.monotonic() - frozen.frozen_at, 1), st["error"])
            if source_seen is None:
                st = status_of(source, name)
                if "standby Ceph cluster" in st.get("error", ""):
                    source_seen = (round(time.monotonic() - frozen.frozen_at, 1), st["error"])
            return sink_seen and source_seen

        try:
            lib.wait_for("the sink and the source both reporting the unreachable standby "
                         "cluster", both_say_so, timeout=frozen_for - 2, interval=0.2)
        except TimeoutError as e:
            raise AssertionError(f"{e}\nsink: {status_of(sink, name)}\nsource: "
                                 f"{status_of(source, name)}" + explain(source, sink)) from None
        lib.wait_for("the outage lasting", lambda: time.monotonic() - frozen.frozen_at
                     >= frozen_for, timeout=frozen_for + 5)
        during = writer.batches - batches
        points_during = status_of(sink, name)["last_seq"]
        # Nothing was acknowledged APPLIED that the sink did not apply.
        assert status_of(source, name)["last_seq"] <= points_during
        unstuck = thawed(frozen, site_b)
    assert during >= 20, f"the guest wrote only {during} batches at A while B was frozen"
    assert writer.max_batch_seconds < 5, (
        f"a guest write at A took {writer.max_batch_seconds:.1f} s while B was frozen")
    for what, (when, msg) in (("sink", sink_seen), ("source", source_seen)):
        assert "/b/ceph.conf" in msg, f"the {what}'s error does not name the cluster: {msg}"
    assert f"site b ({site_b.conf})" in sink_seen[1], sink_seen

    try:
        lib.wait_for("a new restore point after site B came back",
                     lambda: status_of(sink, name)["last_seq"] > points_during
                     and status_of(sink, name)["error"] == "",
                     timeout=RECOVERY, interval=0.2)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nsink: {status_of(sink, name)}\nsource: "
                             f"{status_of(source, name)}" + explain(source, sink)) from None
    first = [p for p in points(sink, name) if p["seq"] > points_during][0]
    recovered_in = first["created_time_ns"] / 1e9 - frozen.thawed_wall
    n = len(points(sink, name))
    lib.wait_for("the source replicating every second again",
                 lambda: len(points(sink, name)) >= n + 2
                 and status_of(source, name)["error"] == "", timeout=RECOVERY)
    writer.stop()
    head = site_a.digest(name)
    want = source.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    source.stop()
    pts = verify_points(site_a, site_b, sink, name, spool, prefill, size)
    last = [p for p in pts if p["seq"] >= want]
    assert last and site_b.digest(last[0]["image"], last[0]["snap"]) == head
    print(f"B frozen {frozen.thawed_at - frozen.frozen_at:.1f} s; seen unreachable by the sink "
          f"after {sink_seen[0]} s, by the source after {source_seen[0]} s; guest batches during "
          f"the outage {during} (slowest {writer.max_batch_seconds:.2f} s); next point "
          f"{recovered_in:.1f} s after B returned (laggy PGs the test bed had to unstick: "
          f"{unstuck}); {len(pts)} points; "
          f"{time.monotonic() - t0:.1f} s\nsink said: {sink_seen[1]}\nsource said: "
          f"{source_seen[1]}")


def test_standby_cluster_frozen_and_source_gone(site_a, site_b, workdir, name, freeze_b,
                                                daemons):
    """As above, but the source dies while B is frozen (site A lost for
    good, say): the epoch that was durable in the spool becomes a restore
    point anyway, applied by the sink on its own once B answers; a source
    started later goes on from there."""
    size, prefill = 32 * MiB, 4 * MiB
    site_a.create(name, size)
    rng = random.Random(8)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(prefill), 0)
    spool = os.path.join(workdir, "spool")
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, spool, ceph_extra=f"op_timeout = {OP_TIMEOUT}s\n")))
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-standby")}, interval="0")))
    source.json("replicate", name, "--wait", "--timeout", "30")
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(2 * MiB), 16 * MiB)
    with freeze_b() as frozen:
        want = source.json("replicate", name)["seq"]
        lib.wait_for(f"epoch {want} durable at the sink and its apply failing",
                     lambda: "standby Ceph cluster" in status_of(sink, name).get("error", "")
                     and spool_files(spool, name) == [f"{want}.spool"],
                     timeout=3 * OP_TIMEOUT, interval=0.2)
        source.kill9()  # site A is gone
        lib.wait_for("B frozen for 3 op timeouts",
                     lambda: time.monotonic() - frozen.frozen_at >= 3 * OP_TIMEOUT,
                     timeout=4 * OP_TIMEOUT)
        assert status_of(sink, name)["last_seq"] == want - 1
        unstuck = thawed(frozen, site_b)
    try:
        lib.wait_for(f"the sink applying epoch {want} by itself",
                     lambda: status_of(sink, name)["last_seq"] == want, timeout=RECOVERY,
                     interval=0.2)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nsink: {status_of(sink, name)}" + explain(sink)) from None
    alone_in = [p for p in points(sink, name) if p["seq"] == want][0]["created_time_ns"] / 1e9 \
        - frozen.thawed_wall
    assert "made from the spool by the sink itself" in sink.log_text(), explain(sink)
    st = status_of(sink, name)
    assert st["error"] == "" and st["state"] == "disconnected", st
    # The source comes back (site A restored) and goes on from that point.
    source.start()
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(1 * MiB), 24 * MiB)
    head = site_a.digest(name)
    later = source.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    source.stop()
    pts = verify_points(site_a, site_b, sink, name, spool, prefill, size)
    assert [p["seq"] for p in pts][-2:] == [want, later], pts
    assert site_b.digest(pts[-1]["image"], pts[-1]["snap"]) == head
    print(f"point {want} made by the sink alone {alone_in:.1f} s after B returned (laggy PGs "
          f"the test bed had to unstick: {unstuck})")


# -- 2. the spool disk is full, or an epoch passes the quota -----------------


@pytest.fixture
def small_fs(workdir):
    """A 24 MiB file system of its own for the spool: ext4 on a loop device
    (what a spool disk is), else tmpfs; the test is skipped, with the
    reason, if neither can be mounted here. Request it before `daemons`, so
    that it is unmounted after they stopped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for the spool needs root")
    mnt = os.path.join(workdir, "spoolfs")
    img = os.path.join(workdir, "spoolfs.img")
    os.makedirs(mnt)
    tried = []
    how = None
    for kind, cmds in (
            ("ext4 on a loop device", [["truncate", "-s", "24M", img],
                                       ["mkfs.ext4", "-q", "-F", "-m", "0", img],
                                       ["mount", "-o", "loop", img, mnt]]),
            ("tmpfs", [["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", mnt]])):
        try:
            for cmd in cmds:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
            how = kind
            break
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{kind}: {getattr(e, 'stderr', '') or e}".strip())
    if how is None:
        pytest.skip(f"cannot mount a small file system for the spool: {'; '.join(tried)}")
    try:
        yield mnt, how
    finally:
        r = subprocess.run(["umount", mnt], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=60)
        if os.path.exists(img):
            os.remove(img)


def fill(path, leave):
    """Writes a file at `path` that leaves about `leave` bytes free on its
    file system; returns its size."""
    st = os.statvfs(os.path.dirname(path))
    n = max(0, st.f_bavail * st.f_frsize - leave) // MiB * MiB
    chunk = bytes(MiB)
    with open(path, "wb") as f:
        for _ in range(n // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return n


def resumed_at(source, seq):
    """The record the source resumed epoch `seq` at (from its log), or None."""
    import re
    for line in source.log_text().splitlines():
        m = re.search(rf"epoch {seq} applied at the sink: \d+ records \(resumed at record (\d+)\)",
                      line)
        if m:
            return int(m.group(1))
    return None


def kept_records(error, seq):
    import re
    m = re.search(rf"(\d+) verified records of epoch {seq} are kept", error)
    assert m, f"the error does not say what is kept of epoch {seq}: {error}"
    return int(m.group(1))


def refused_epoch(sink, source, name, what):
    """Waits until both cairnds report `what` for volume name; returns
    (sink error, source error)."""
    def both():
        a, b = status_of(sink, name), status_of(source, name)
        return (a.get("state") == "error" and what in a.get("error", "")
                and b.get("state") == "error" and what in b.get("error", "")) and (a, b)
    try:
        a, b = lib.wait_for(f"the sink and the source reporting '{what}'", both, timeout=30,
                            interval=0.2)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nsink: {status_of(sink, name)}\nsource: "
                             f"{status_of(source, name)}" + explain(source, sink)) from None
    return a["error"], b["error"]


def test_spool_disk_full(site_a, site_b, workdir, name, small_fs, daemons):
    """The spool's file system fills up in the middle of a 12 MiB epoch."""
    mnt, how = small_fs
    size, prefill = 48 * MiB, 4 * MiB
    site_a.create(name, size)
    rng = random.Random(9)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(prefill), 0)
    spool = os.path.join(mnt, "spool")
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config("b", site_b.conf, port, spool)))
    # 1 MiB records (not the default 4 MiB): several fit before the disk
    # is full, so there is a verified prefix to keep.
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-standby")}, interval="0",
        extra="block_size = 1M\n")))
    source.json("replicate", name, "--wait", "--timeout", "30")
    filler = os.path.join(mnt, "filler")
    fill(filler, 6 * MiB)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(12 * MiB), 8 * MiB)
    want = source.json("replicate", name)["seq"]
    sink_err, source_err = refused_epoch(sink, source, name, "spool disk full")
    assert f"free space in {spool} or move [sink] spool_dir" in sink_err, sink_err
    assert "No space left on device" in sink_err, sink_err
    assert f"spool disk full: writing spool {spool}/{name}/{want}.spool" in source_err, source_err
    lib.wait_for("the sink keeping the verified prefix",
                 lambda: f"kept " in sink.log_text() and spool_files(spool, name), timeout=10)
    assert spool_files(spool, name) == [f"{want}.spool"]
    kept = kept_records(sink_err, want)
    assert kept >= 2, sink_err
    # The disk stays full for a while: the source keeps trying (with backoff)
    # and is told why; nothing is lost, nothing more is made a point.
    full_at = time.monotonic()
    lib.wait_for("the disk staying full for 6 s", lambda: time.monotonic() - full_at >= 6,
                 timeout=10, interval=0.5)
    st = status_of(source, name)
    assert "spool disk full" in st["error"] and st["last_seq"] == want - 1, st
    assert status_of(sink, name)["last_seq"] == want - 1
    assert spool_files(spool, name) == [f"{want}.spool"]
    # The kept records are 1 MiB data records (block_size), the first one too.
    assert os.path.getsize(os.path.join(spool, name, f"{want}.spool")) >= kept * MiB
    os.remove(filler)
    freed = time.monotonic()
    try:
        lib.wait_for(f"restore point {want} once space was freed",
                     lambda: status_of(sink, name)["last_seq"] >= want, timeout=RECOVERY,
                     interval=0.2)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nsink: {status_of(sink, name)}\nsource: "
                             f"{status_of(source, name)}" + explain(source, sink)) from None
    recovered_in = time.monotonic() - freed
    at = lib.wait_for(f"the source's log of epoch {want}", lambda: resumed_at(source, want)
                      or "applied at the sink" in source.log_text() and -1, timeout=10)
    assert at > 0, f"epoch {want} started over instead of resuming" + explain(source)
    head = site_a.digest(name)
    source.stop()
    pts = verify_points(site_a, site_b, sink, name, spool, prefill, size)
    assert site_b.digest(pts[-1]["image"], pts[-1]["snap"]) == head
    print(f"spool on {how}: refused as '{sink_err}'; epoch {want} resumed at record {at}; point "
          f"{recovered_in:.1f} s after space was freed")


def test_spool_quota(site_a, site_b, workdir, name, daemons):
    """An epoch larger than [sink] spool_max_bytes is refused the same way;
    the sink restarted with a larger quota takes the rest of it."""
    size, prefill = 48 * MiB, 2 * MiB
    site_a.create(name, size)
    rng = random.Random(10)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(prefill), 0)
    spool = os.path.join(workdir, "spool")
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, spool, extra="spool_max_bytes = 4M\n")))
    # 1 MiB records: a few fit in the quota and are kept.
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-standby")}, interval="0",
        extra="block_size = 1M\n")))
    source.json("replicate", name, "--wait", "--timeout", "30")
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(10 * MiB), 8 * MiB)
    want = source.json("replicate", name)["seq"]
    sink_err, source_err = refused_epoch(sink, source, name, "spool quota exceeded")
    assert "over the limit of 4194304 bytes" in sink_err, sink_err
    assert "raise [sink] spool_max_bytes" in sink_err, sink_err
    assert "verified records of epoch" in sink_err and "are kept" in sink_err, sink_err
    assert spool_files(spool, name) == [f"{want}.spool"]
    assert os.path.getsize(os.path.join(spool, name, f"{want}.spool")) <= 4 * MiB
    refused_at = time.monotonic()
    lib.wait_for("the quota refusing for 3 s", lambda: time.monotonic() - refused_at >= 3,
                 timeout=10, interval=0.5)
    st = status_of(source, name)
    assert "spool quota exceeded" in st["error"] and st["last_seq"] == want - 1, st
    sink.stop()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, spool, extra="spool_max_bytes = 64M\n")))
    raised = time.monotonic()
    try:
        lib.wait_for(f"restore point {want} once the quota was raised",
                     lambda: status_of(sink, name).get("last_seq", 0) >= want, timeout=RECOVERY,
                     interval=0.2)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nsink: {status_of(sink, name)}\nsource: "
                             f"{status_of(source, name)}" + explain(source, sink)) from None
    recovered_in = time.monotonic() - raised
    at = lib.wait_for(f"the source's log of epoch {want}", lambda: resumed_at(source, want)
                      or "applied at the sink" in source.log_text() and -1, timeout=10)
    assert at > 0, f"epoch {want} started over instead of resuming" + explain(source)
    head = site_a.digest(name)
    source.stop()
    pts = verify_points(site_a, site_b, sink, name, spool, prefill, size)
    assert site_b.digest(pts[-1]["image"], pts[-1]["snap"]) == head
    print(f"refused as '{sink_err}'; epoch {want} resumed at record {at}; point "
          f"{recovered_in:.1f} s after the sink restarted with a larger quota")
