"""TEMPORARY (not committed): per-object reads under races, many rounds."""
import random
import threading
import time
import os

import pytest
import rbd

import cairn_testlib as lib
from test_replication import start_pair

MiB = 1 << 20
ROUNDS = int(os.environ.get("STRESS_ROUNDS", "30"))


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_stress_first_epochs(site_a, site_b, workdir, daemons, name, round_no):
    rng = random.Random(round_no)
    size = 32 * MiB
    vols = {}
    for i in range(3):
        img = f"{name}-v{i}"
        site_a.create(img, size)
        with rbd.Image(site_a.ioctx, img) as im:
            for _ in range(8):
                n = rng.randint(1, 2 * MiB)
                im.write(rng.randbytes(n), rng.randrange(0, size - n))
        vols[img] = (img, img + "-b")
    source, sink = start_pair(site_a, site_b, workdir, daemons, vols, interval="1s")
    errors = []

    def guest(img, seed):
        r = random.Random(seed)
        try:
            time.sleep(r.random() * 1.5)  # a random moment of the first epochs (not sync)
            with rbd.Image(site_a.ioctx, img) as im:
                for _ in range(6):
                    n = r.randint(1, 1 * MiB)
                    off = r.randrange(0, size - n)
                    if r.random() < 0.2:
                        im.discard(off, n)
                    else:
                        im.write(r.randbytes(n), off)
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=guest, args=(img, round_no * 10 + i)) for i, img in enumerate(vols)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for img in vols:
        source.json("replicate", img, "--wait", "--timeout", "120")
    assert source.proc.poll() is None and sink.proc.poll() is None
    for img, (_, tgt) in vols.items():
        points = sink.json("points", img)
        assert points
        for p in points:
            want = site_a.digest(img, f"cairn.{p['seq']}")
            assert site_b.digest(p["image"], p["snap"]) == want, f"{img} point {p['seq']}"
        newest = max(points, key=lambda p: p["seq"])
        assert site_b.digest(newest["image"], newest["snap"]) == site_a.digest(img), \
            f"{img}: the newest point lacks the guest's writes"
