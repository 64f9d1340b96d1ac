"""Failback by replication in reverse: after a failover to site B, site B's
cairnd replicates the promoted image back into site A's original image, as
a delta from the restore point both sites share. If both sites wrote since
that point (a split brain) nothing moves until the operator chooses; what
site A wrote after the point is then kept there as snapshots, never lost. Real cairnd processes
over mutual TLS, real clusters, images compared by whole-image hash."""
import random
import re

import rbd

import cairn_testlib as lib

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
