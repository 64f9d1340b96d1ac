"""The test bed itself: what every other test here relies on.

Ceph 16's memstore OSD segfaulted in snapshot trimming when several PGs
trimmed at once (its omap iterator keeps a std::map iterator between calls,
and the snap mapper is one object shared by all PGs). Retention after an
outage removes many snapshots at once and hit it in CI; testbed.sh now lets
one PG trim at a time. This test removes snapshots whose clones span every
PG of the pool, the way that crashed the OSD within seconds, and checks the
OSD survives the trimming and the image is intact."""
import hashlib
import os
import random
import subprocess

import rbd

import cairn_testlib as lib

OBJECT = 4 << 20


def _digest(size, blocks):
    """Site.digest's hash of an image whose only data is `blocks`
    (offset -> 64 KiB of non-zero bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    for off in sorted(blocks):
        h.update(off.to_bytes(8, "little"))
        h.update(blocks[off])
    return f"{h.hexdigest()}/{size}"


def _snaps_waiting_to_purge(conf, pool_id):
    dump = lib._ceph_json(conf, "osd", "dump")
    return [q for q in dump.get("removed_snaps_queue", []) if q["pool"] == pool_id]


def test_removing_snapshots_across_all_pgs_at_once_keeps_the_osd_up(testbed, site_a, name):
    objects, per_round, rounds = 64, 8, 4  # 64 objects of 4 MiB reach all 32 PGs
    size = objects * OBJECT
    site_a.create(name, size)
    rng = random.Random(5)
    expect = {}
    with rbd.Image(site_a.ioctx, name) as img:
        for r in range(rounds):
            for s in range(per_round):
                data = rng.randbytes(lib.BLOCK)
                for o in range(objects):
                    off = o * OBJECT + s * lib.BLOCK
                    img.write(data, off)
                    expect[off] = data
                img.create_snap(f"t{r}.{s}")  # the next write clones every object
            for s in range(per_round):
                img.remove_snap(f"t{r}.{s}")

    pool_id = site_a.cluster.pool_lookup(site_a.pool)
    lib.wait_for("the OSD purging every removed snapshot (osd dump removed_snaps_queue)",
                 lambda: not _snaps_waiting_to_purge(site_a.conf, pool_id),
                 timeout=180, interval=0.5)
    d = os.path.dirname(os.path.dirname(testbed["CEPH_CONF_A"]))
    r = subprocess.run([lib.TESTBED, "check", d], capture_output=True, text=True)
    assert r.returncode == 0, f"test bed unhealthy after snapshot trimming:\n{r.stdout}{r.stderr}"
    assert site_a.snaps(name) == []
    assert site_a.digest(name) == _digest(size, expect)
