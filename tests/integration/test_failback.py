"""Failback by replication in reverse: after a failover to site B, site B's
cairnd replicates the promoted image back into site A's original image, as
a delta from the restore point both sites share. If both sites wrote since
that point (a split brain) nothing moves until the operator chooses; what
site A wrote after the point is then kept there as snapshots, never lost. Real cairnd processes
over mutual TLS, real clusters, images compared by whole-image hash."""
import os
import random
import re

import rbd

import cairn_testlib as lib
from fault_proxy import FaultProxy

MiB = 1 << 20
SIZE = 64 * MiB


def _write(site, image, offset, data):
    with rbd.Image(site.ioctx, image) as img:
        img.write(data, offset)


def test_the_promoted_image_flows_back_as_a_delta(site_a, site_b, workdir, daemons, name):
    rng = random.Random(24)
    site_a.create(name, SIZE)
    _write(site_a, name, 0, rng.randbytes(16 * MiB))
    b_port = lib.free_port()
    sink_b = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, b_port, f"{workdir}/spool-b")))
    src_a = daemons(lib.Cairnd(workdir, "src-a", lib.source_config(
        "a", site_a.conf, b_port, {name: (name, name + "-standby")})))
    src_a.json("replicate", name, "--wait", "--timeout", "120")
    _write(site_a, name, 20 * MiB, rng.randbytes(2 * MiB))
    seq = src_a.json("replicate", name, "--wait", "--timeout", "120")["seq"]

    # Site A goes down with writes that never reached B.
    src_a.stop()
    _write(site_a, name, 30 * MiB, rng.randbytes(1 * MiB))
    a_divergent = site_a.digest(name)

    # Failover: B promotes the newest point, and is written.
    promoted = name + "-p"
    assert sink_b.json("promote", name, "--to", promoted)["seq"] == seq
    assert f"cairn.{seq}" in site_b.snaps(promoted)
    b_writes = 3 * 256 * 1024
    for i in range(3):
        _write(site_b, promoted, (40 + 2 * i) * MiB, rng.randbytes(256 * 1024))

    # Site A is back, as a sink for site B; B's cairnd replicates back.
    a_port = lib.free_port()
    sink_a = daemons(lib.Cairnd(workdir, "sink-a", lib.sink_config(
        "a", site_a.conf, a_port, f"{workdir}/spool-a")))
    src_b = daemons(lib.Cairnd(workdir, "src-b", lib.source_config(
        "b", site_b.conf, a_port, {name: (promoted, name)})))

    # Both sites wrote since the shared point: a split brain. Both sites'
    # status say so with the byte counts, and nothing moves.
    assert src_b.cli("replicate", name).returncode == 0
    said = re.compile(rf"split brain: .* site a changed \d+ bytes of rbd/{name} and site b "
                      r"changed \d+ bytes")

    def split_brain(d):
        return [s for s in d.json("status", name) if said.search(s["error"])]

    lib.wait_for("site A's sink reporting the split brain", lambda: split_brain(sink_a), timeout=60)
    lib.wait_for("site B's source reporting it", lambda: split_brain(src_b), timeout=60)
    assert split_brain(sink_a)[0]["state"] == "error"
    assert site_a.digest(name) == a_divergent
    assert not [s for s in site_a.snaps(name) if s.startswith("cairn-divergent-")]
    # The operator chooses site B, at site B (where the volume failed over).
    r = sink_b.json("resolve", name, "--keep", "b")
    assert r["kept_as"] == "" and "site b wins" in r["outcome"], r
    back = src_b.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    assert back == seq + 1
    pts = {p["seq"]: p for p in sink_a.json("points", name)}
    assert sorted(pts) == [seq, back], pts  # the adopted point, then the delta
    assert pts[seq]["image"] == name and pts[back]["base_seq"] == seq
    # Only what changed since the shared point moved: B's writes.
    assert pts[back]["data_bytes"] <= b_writes, pts[back]
    assert site_a.digest(name, f"cairn.{back}") == site_b.digest(promoted, f"cairn.{back}")
    assert site_a.digest(name) == site_b.digest(promoted)
    # A's own writes after the shared point are kept, not lost.
    kept = [s for s in site_a.snaps(name) if s.startswith("cairn-divergent-")]
    assert len(kept) == 1, site_a.snaps(name)
    assert site_a.digest(name, kept[0]) == a_divergent
    assert "adopted as rbd/" in sink_a.log_text() and "kept as snapshot" in sink_a.log_text()

    # It goes on: the next delta is B's next writes.
    _write(site_b, promoted, 50 * MiB, rng.randbytes(512 * 1024))
    again = src_b.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    p = {p["seq"]: p for p in sink_a.json("points", name)}[again]
    assert p["base_seq"] == back and p["data_bytes"] <= 512 * 1024, p
    assert site_a.digest(name, f"cairn.{again}") == site_b.digest(promoted, f"cairn.{again}")


def _one_node_per_site(site, conf, listen_port, peer_port, workdir, volumes=None):
    """One cairnd per site, as deployed: the sink for volumes failed over
    from the other site, the [source] volumes are registered into (a
    failover sets one up to replicate back), and `volumes` of its own."""
    return lib.sink_config(site, conf, listen_port, f"{workdir}/spool-{site}") + (
        f"\n[source]\npools = rbd\npeer = 127.0.0.1:{peer_port}\ninterval = 0\n"
    ) + "".join(f"\n[volume {vid}]\npool = rbd\nimage = {image}\ntarget_image = {target}\n"
                f"peer = 127.0.0.1:{peer_port}\ninterval = 0\nkeep_snapshots = 1000\n"
                for vid, (image, target) in (volumes or {}).items())


def _replicated_pair(site_a, site_b, workdir, daemons, name, rng, data):
    """A volume of SIZE with `data` bytes written at its start, replicated
    once from site A to site B, one cairnd per site. Returns site A's
    config (to start it again), both cairnds and the restore point."""
    site_a.create(name, SIZE)
    _write(site_a, name, 0, rng.randbytes(data))
    a_port, b_port = lib.free_port(), lib.free_port()
    a_conf = _one_node_per_site("a", site_a.conf, a_port, b_port, workdir,
                                {name: (name, name + "-standby")})
    node_a = daemons(lib.Cairnd(workdir, "node-a", a_conf))
    node_b = daemons(lib.Cairnd(workdir, "node-b", _one_node_per_site(
        "b", site_b.conf, b_port, a_port, workdir)))
    seq = node_a.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    return a_conf, node_a, node_b, seq


def test_a_planned_failback_brings_every_write_home_and_resumes_as_a_delta(
        site_a, site_b, workdir, daemons, name):
    rng = random.Random(25)
    a_conf, node_a, node_b, first = _replicated_pair(
        site_a, site_b, workdir, daemons, name, rng, 16 * MiB)

    # Site A is lost; site B fails over, sets up replication back, and is
    # written while A is away.
    node_a.stop()
    out = node_b.json("failover", name, "--to", name)
    assert out["seq"] == first and out["back_to"] == f"rbd/{name}", out
    b_writes = 3 * 256 * 1024
    for i in range(3):
        _write(site_b, name, (40 + 2 * i) * MiB, rng.randbytes(256 * 1024))

    # Site A is back: its sink takes B's writes as a delta from the point
    # both hold; its own source stands by meanwhile.
    node_a = daemons(lib.Cairnd(workdir, "node-a2", a_conf))
    back = node_b.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    pts = {p["seq"]: p for p in node_a.json("points", name)}
    assert sorted(pts) == [first, back], pts
    assert pts[back]["data_bytes"] <= b_writes, pts[back]
    assert site_a.digest(name) == site_b.digest(name)
    refused = node_a.cli("replicate", name)
    assert refused.returncode == 5 and f"cairn failback {name}" in refused.stderr, refused
    assert [s for s in node_a.json("status", name) if s["role"] == "source"][0]["state"] == \
        "standby"

    # Planned failback: B's last writes go home in the final delta, A's
    # image is the primary again, and B's standby image takes that point.
    _write(site_b, name, 50 * MiB, rng.randbytes(256 * 1024))
    with rbd.Image(site_b.ioctx, name):  # a guest still attached at B
        held = node_b.cli("failback", name, "--timeout", "120")
    assert held.returncode == 5 and "is held open by" in held.stderr, held
    assert [s for s in node_b.json("status", name) if s["role"] == "source"]
    fb = node_b.json("failback", name, "--timeout", "120")
    final = fb["seq"]
    assert final > back and fb["primary_site"] == "a", fb
    assert 0 < fb["copied_bytes"] <= b_writes + 256 * 1024, fb
    home = site_a.digest(name)
    assert home == site_b.digest(name + "-standby", f"cairn.{final}")
    assert fb["kept_as"].startswith(f"{name}.failback-")
    assert site_b.digest(fb["kept_as"]) == home
    assert node_a.cli("points", name).returncode == 3  # A's sink let it go
    assert not [s for s in node_b.json("status", name) if s["role"] == "source"]

    # A replicates to B again, as a delta from the final point.
    _write(site_a, name, 8 * MiB, rng.randbytes(512 * 1024))
    nxt = node_a.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    p = {p["seq"]: p for p in node_b.json("points", name)}[nxt]
    assert nxt == final + 1 and p["base_seq"] == final and p["source_site"] == "a", p
    assert p["data_bytes"] <= 512 * 1024, p
    assert site_b.digest(name + "-standby", f"cairn.{nxt}") == site_a.digest(name)


def test_a_cut_reverse_delta_resumes_from_what_site_a_holds(site_a, site_b, workdir, daemons,
                                                           name):
    rng = random.Random(26)
    site_a.create(name, SIZE)
    _write(site_a, name, 0, rng.randbytes(8 * MiB))
    a_port, b_port = lib.free_port(), lib.free_port()
    proxy = FaultProxy(a_port, seed=26).start()  # site B's way to site A's sink
    try:
        node_a = daemons(lib.Cairnd(workdir, "node-a", _one_node_per_site(
            "a", site_a.conf, a_port, b_port, workdir, {name: (name, name + "-standby")})))
        node_b = daemons(lib.Cairnd(workdir, "node-b", _one_node_per_site(
            "b", site_b.conf, b_port, proxy.port, workdir)))
        node_a.json("replicate", name, "--wait", "--timeout", "120")
        node_b.json("failover", name, "--to", name)
        b_writes = 6 * MiB
        _write(site_b, name, 16 * MiB, rng.randbytes(b_writes))

        # The reverse delta, slowed on the wire, cut once site A's sink holds
        # part of it durably.
        proxy.delay(0.02)
        assert node_b.cli("replicate", name).returncode == 0
        spool = f"{workdir}/spool-a/{name}"

        def spooled():
            files = [f for f in os.listdir(spool) if f.endswith(".spool")] \
                if os.path.isdir(spool) else []
            return sum(os.path.getsize(os.path.join(spool, f)) for f in files)
        lib.wait_for("1 MiB of the reverse delta in site A's spool",
                     lambda: spooled() >= MiB, 60, 0.01)
        proxy.cut()
        proxy.delay(0)

        def back():
            return [s for s in node_b.json("status", name) if s["role"] == "source"][0]
        lib.wait_for("site B's source noticing the cut",
                     lambda: back()["state"] in ("disconnected", "error"), timeout=30)
        proxy.heal()
        seq = node_b.json("replicate", name, "--wait", "--timeout", "120")["seq"]
        assert back()["resumed_epochs_total"] >= 1, back()
        pts = node_a.json("points", name)
        assert pts[-1]["seq"] == seq and site_a.digest(name) == site_b.digest(name)
        # Only B's writes crossed, once: no full resend, the prefix not resent.
        assert sum(p["data_bytes"] for p in pts[1:]) <= b_writes, pts
        resumed = [line for line in node_b.log_text().splitlines() if "resumed at record" in line]
        assert resumed, "the reverse epoch did not resume from site A's durable prefix"
    finally:
        proxy.stop()


def test_a_split_brain_resolved_for_site_a_keeps_both_and_a_replicates_on(
        site_a, site_b, workdir, daemons, name):
    rng = random.Random(27)
    a_conf, node_a, node_b, seq = _replicated_pair(
        site_a, site_b, workdir, daemons, name, rng, 16 * MiB)

    # Site A is lost; site B fails over, sets up replication back, and is
    # written. Site A's guest wrote too, cut off from B: a split brain.
    node_a.stop()
    out = node_b.json("failover", name, "--to", name)
    assert out["seq"] == seq and out["back_to"] == f"rbd/{name}", out
    b_writes = 3 * 256 * 1024
    for i in range(3):
        _write(site_b, name, (40 + 2 * i) * MiB, rng.randbytes(256 * 1024))
    a_writes = MiB
    _write(site_a, name, 30 * MiB, rng.randbytes(a_writes))
    a_head, b_head = site_a.digest(name), site_b.digest(name)
    assert a_head != b_head

    # Site A is back. Both sites' status say split brain, with the bytes
    # each wrote since the shared point; nothing moves.
    node_a = daemons(lib.Cairnd(workdir, "node-a2", a_conf))
    assert node_b.cli("replicate", name).returncode == 0
    said = re.compile(rf"split brain: since restore point {seq} .* site a changed (\d+) bytes "
                      rf"of rbd/{name} and site b changed (\d+) bytes")

    def split_brain(d):
        return [(s, m) for s in d.json("status", name) if (m := said.search(s["error"]))]

    for site, d, role in (("A", node_a, "sink"), ("B", node_b, "source")):
        found = lib.wait_for(f"site {site}'s {role} reporting the split brain",
                             lambda: split_brain(d), timeout=60)
        assert [s["role"] for s, _ in found] == [role], found
        # As the images' diffs list them: at least what was written, at
        # most the 4 MiB objects it was written in (A: one, B: two).
        a_said, b_said = map(int, found[0][1].groups())
        assert a_writes <= a_said <= 4 * MiB and b_writes <= b_said <= 8 * MiB, found
    assert site_a.digest(name) == a_head and site_b.digest(name) == b_head
    assert node_a.cli("points", name).returncode == 3  # A's sink took nothing

    # The operator chooses site A, at site B: B's promoted image, with B's
    # writes, is kept aside there, byte for byte.
    r = node_b.json("resolve", name, "--keep", "a")
    kept = r["kept_as"]
    assert kept.startswith(f"{name}.failback-") and "site a wins" in r["outcome"], r
    assert name not in site_b.images() and site_b.digest(kept) == b_head
    assert "released at site b" in node_b.log_text()

    # Site A's source replicates again, a delta from B's newest point: A's
    # writes since it, only those.
    nxt = node_a.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    pts = {p["seq"]: p for p in node_b.json("points", name)}
    assert sorted(pts) == [seq, nxt] and nxt == seq + 1, pts
    assert pts[nxt]["base_seq"] == seq and pts[nxt]["source_site"] == "a", pts[nxt]
    assert 0 < pts[nxt]["data_bytes"] <= a_writes, pts[nxt]
    assert site_b.digest(name + "-standby", f"cairn.{nxt}") == a_head == site_a.digest(name)
    assert site_a.digest(name, f"cairn.{nxt}") == a_head

    # Nothing moved back to site A: its image holds its own writes, its
    # sink holds no point and kept no divergent snapshot, and the source
    # the failover set up at B went with the release.
    assert not [s for s in node_b.json("status", name) if s["role"] == "source"]
    assert "no longer replicated back" in node_b.log_text()
    again = node_b.cli("replicate", name, "--wait", "--timeout", "60")
    assert again.returncode != 0, again
    assert site_a.digest(name) == a_head and site_b.digest(kept) == b_head
    assert node_a.cli("points", name).returncode == 3
    assert not [s for s in site_a.snaps(name) if s.startswith("cairn-divergent-")]


def test_site_a_without_the_shared_point_is_resynced_by_block_digests_once_chosen(
        site_a, site_b, workdir, daemons, name):
    """Site A's image lost the point it shares with B (its cairn.<N>
    snapshots pruned or removed) and was written after it. Nothing moves
    until the operator chooses B; then A's image, kept as a snapshot, is
    compared with B's block by block and only the blocks that differ
    move."""
    rng = random.Random(28)
    a_conf, node_a, node_b, seq = _replicated_pair(
        site_a, site_b, workdir, daemons, name, rng, 24 * MiB)

    node_a.stop()
    out = node_b.json("failover", name, "--to", name)
    assert out["seq"] == seq, out
    b_writes = 512 * 1024
    _write(site_b, name, 40 * MiB, rng.randbytes(b_writes))
    # At A: the shared point's snapshot is gone, and A wrote after it.
    with rbd.Image(site_a.ioctx, name) as img:
        for s in [s["name"] for s in img.list_snaps() if s["name"].startswith("cairn.")]:
            img.remove_snap(s)
    a_writes = MiB
    _write(site_a, name, 30 * MiB, rng.randbytes(a_writes))
    a_head = site_a.digest(name)

    node_a = daemons(lib.Cairnd(workdir, "node-a2", a_conf))
    assert node_b.cli("replicate", name).returncode == 0
    lib.wait_for("site A's sink refusing an image without the shared point",
                 lambda: [s for s in node_a.json("status", name)
                          if f"has no snapshot of restore point {seq}" in s["error"]
                          and f"cairn resolve {name} --keep b" in s["error"]], timeout=60)
    assert site_a.digest(name) == a_head
    assert node_a.cli("points", name).returncode == 3

    node_b.json("resolve", name, "--keep", "b")
    lib.wait_for(f"site A's sink taking restore point {seq} back",
                 lambda: node_a.cli("points", name).returncode == 0, timeout=120)
    back = node_b.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    assert site_a.digest(name) == site_b.digest(name)
    pts = node_a.json("points", name)
    assert pts[0]["seq"] == seq and pts[-1]["seq"] == back, pts
    # The promoted point, made of A's image by the blocks A wrote since
    # (64 KiB grains), then B's writes as deltas (the snapshot B's refused
    # attempt took, then the one asked for).
    first = pts[0]
    assert first["base_seq"] == 0 and 0 < first["data_bytes"] + first["zero_bytes"] <= \
        a_writes + 128 * 1024, first
    assert [p["base_seq"] for p in pts[1:]] == [p["seq"] for p in pts[:-1]], pts
    assert sum(p["data_bytes"] for p in pts[1:]) <= b_writes, pts
    kept = [s for s in site_a.snaps(name) if s.startswith("cairn-divergent-") and "." not in s]
    assert len(kept) == 1 and site_a.digest(name, kept[0]) == a_head, site_a.snaps(name)
    assert "compared by digests with" in node_a.log_text()
