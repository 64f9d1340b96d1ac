"""cairn verify on the two real clusters, over mutual TLS as client.cairn:
a restore point is compared with its source snapshot by block digests (no
data shipped), the verdict is recorded with the point at site B; a block
that rots in site B's RADOS object is found at its offset, the point is
then refused by restore unless forced, and `--repair` makes a new point
that carries only that block and equals its source by hash."""
import json
import random

import rbd

import cairn_testlib as lib

MiB = 1 << 20
GRAIN = 64 * 1024


def _pair(site_a, site_b, workdir, daemons, name, size, data, seed, sink_extra=""):
    """A SIZE image at site A with DATA random bytes from offset 0, and the
    sink at B and source at A that replicate it (nothing replicated yet)."""
    site_a.create(name, size)
    rng = random.Random(seed)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(data), 0)
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool", extra=sink_extra)))
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-standby")})))
    return source, sink, rng


def _rot(site, image, offset, length=4096):
    """Overwrites `length` bytes at `offset` of the standby image's RADOS
    object in place, with no snapshot context: the snapshot that shares the
    object (no write since it was taken) reads them too, as bit rot under
    RBD would show."""
    with rbd.Image(site.ioctx, image, read_only=True) as img:
        order = img.stat()["order"]
        prefix = img.stat()["block_name_prefix"]
    obj = f"{prefix}.{offset >> order:016x}"
    site.ioctx.write(obj, random.Random(5).randbytes(length), offset & ((1 << order) - 1))


def test_verify_finds_a_rotten_block_at_site_b_and_repair_sends_only_it(
        site_a, site_b, workdir, daemons, name):
    size = 32 * MiB
    source, sink, rng = _pair(site_a, site_b, workdir, daemons, name, size, 16 * MiB, 26)
    source.json("replicate", name, "--wait", "--timeout", "120")
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(256 * 1024), 20 * MiB)
    seq = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]

    good = source.json("verify", name, "--timeout", "120")
    assert good["seq"] == seq and good["mismatched_grains"] == 0, good
    assert good["done_bytes"] == good["total_bytes"] == size, good
    assert good["error"] == "" and good["mismatches"] == [], good
    point = sink.json("points", name)[-1]
    assert point["seq"] == seq and point["verified_ns"] > 0, point
    assert point["verify_mismatched_grains"] == 0, point

    rotten = 9 * MiB + 12345
    _rot(site_b, name + "-standby", rotten)
    bad = source.cli("--json", "verify", name, "--timeout", "120")
    assert bad.returncode == 7, (bad.returncode, bad.stdout, bad.stderr)
    found = json.loads(bad.stdout)
    assert found["mismatched_grains"] == 1, found
    assert found["mismatches"] == [{"offset": rotten // GRAIN * GRAIN, "length": GRAIN}], found
    assert sink.json("points", name)[-1]["verify_mismatched_grains"] == 1

    refused = sink.cli("restore", name, str(seq), "--to", f"{name}-r")
    assert refused.returncode == 5 and "differs from its source" in refused.stderr, refused
    forced = sink.json("restore", name, str(seq), "--to", f"{name}-r", "--force")
    assert forced["seq"] == seq

    repaired = source.json("verify", name, "--repair", "--timeout", "120")
    assert repaired["mismatched_grains"] == 1 and repaired["repaired_seq"] == seq + 1, repaired
    fixed = sink.json("points", name)[-1]
    assert fixed["seq"] == seq + 1 and fixed["base_seq"] == seq, fixed
    assert fixed["data_bytes"] == GRAIN and fixed["zero_bytes"] == 0, fixed
    assert site_b.digest(name + "-standby", f"cairn.{seq + 1}") == \
        site_a.digest(name, f"cairn.{seq + 1}")
    again = source.json("verify", name, "--timeout", "120")
    assert again["seq"] == seq + 1 and again["mismatched_grains"] == 0, again
    assert "DIFFERS" in sink.log_text() and "by block digests" in source.log_text()


def test_a_drill_clones_a_point_while_replication_goes_on_and_holds_it(
        site_a, site_b, workdir, daemons, name):
    """cairn drill start clones a point at site B while the volume replicates
    on; retention (keep_points = 2) keeps that point as long as the drill
    holds it, and cairn drill stop removes the clone and lets it go."""
    size = 16 * MiB
    source, sink, rng = _pair(site_a, site_b, workdir, daemons, name, size, 4 * MiB, 27, sink_extra="keep_points = 2\n")
    first = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    drill = sink.json("drill", "start", name)
    clone = f"{name}-standby-drill-{first}"
    assert drill["seq"] == first and drill["images"] == [clone], drill
    for i in range(3):
        with rbd.Image(site_a.ioctx, name) as img:
            img.write(rng.randbytes(256 * 1024), (5 + i) * MiB)
        last = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    lib.wait_for("retention keeping the held point and the newest two",
                 lambda: [p["seq"] for p in sink.json("points", name)] == [first, last - 1, last])
    points = sink.json("points", name)
    assert points[0]["held_by"] == [clone] and points[1]["held_by"] == [], points
    assert site_b.digest(clone) == site_a.digest(name, f"cairn.{first}")
    stopped = sink.json("drill", "stop", name)
    assert stopped["images"] == [clone], stopped
    assert clone not in site_b.images()
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(4096), 0)
    newest = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    lib.wait_for("retention letting the released point go",
                 lambda: [p["seq"] for p in sink.json("points", name)] == [newest - 1, newest])


def test_a_point_whose_snapshot_is_removed_at_site_b_is_forgotten_not_resent(
        site_a, site_b, workdir, daemons, name):
    """Someone removes the snapshot of the newest point at site B by hand:
    that point is forgotten, the one before is the base, and what is sent
    is a delta from it, never the whole image."""
    size = 32 * MiB
    source, sink, rng = _pair(site_a, site_b, workdir, daemons, name, size, 16 * MiB, 28)
    first = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(512 * 1024), 20 * MiB)
    second = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    with rbd.Image(site_b.ioctx, name + "-standby") as img:
        img.remove_snap(f"cairn.{second}")
    sink.stop()  # a new session: the sink looks at its points as it starts one
    sink.start()
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(4096), 0)
    newest = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    points = sink.json("points", name)
    assert [p["seq"] for p in points][0] == first, points
    assert all(p["data_bytes"] <= 1 * MiB for p in points[1:]), points  # deltas, not 32 MiB
    assert points[-1]["seq"] == newest
    assert site_b.digest(name + "-standby", f"cairn.{newest}") == \
        site_a.digest(name, f"cairn.{newest}")
    assert "is forgotten: its snapshot" in sink.log_text()
