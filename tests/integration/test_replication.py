"""The whole data path on two real Ceph clusters with real cairnd processes
talking TCP: epochs, restore points, restores, all checked by content."""
import random
import threading
import time

import pytest

import cairn_testlib as lib

MiB = 1 << 20


def random_changes(site, image, rng, ops, size):
    """Random writes, discards and zero-writes, as a guest would do them."""
    import rbd
    with rbd.Image(site.ioctx, image) as img:
        for _ in range(ops):
            n = rng.randint(1, 512 * 1024)
            off = rng.randrange(0, size - n)
            kind = rng.random()
            if kind < 0.15:
                img.discard(off, n)
            elif kind < 0.3:
                img.write(bytes(n), off)  # zero-write: travels as a zero record
            else:
                img.write(rng.randbytes(n), off)


def start_pair(site_a, site_b, workdir, daemons, volumes, interval="0"):
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, volumes, interval=interval)))
    return source, sink


def verify_every_point(site_a, site_b, sink, volume, image, name):
    """Restores every point to a new image at site B and compares it by
    whole-image hash with the source snapshot it stands for."""
    points = sink.json("points", volume)
    assert points, "no restore point at site B"
    for i, p in enumerate(points):
        target = f"{name}-r{p['seq']}"
        full = i == len(points) - 1  # the newest by full copy, the rest by clone
        args = ["restore", volume, str(p["seq"]), "--to", target] + (["--full"] if full else [])
        r = sink.json(*args)
        assert r["mode"] == ("full" if full else "clone")
        assert r["seq"] == p["seq"]
        want = site_a.digest(image, f"cairn.{p['seq']}")
        assert site_b.digest(target) == want, f"restore point {p['seq']} differs from its source snapshot"
        assert site_b.digest(p["image"], p["snap"]) == want
    return points


def test_epochs_on_demand_every_point_equals_its_snapshot(site_a, site_b, workdir, daemons, name):
    size = 48 * MiB + 12345  # not a multiple of the 4 MiB object size
    site_a.create(name, size)
    rng = random.Random(1)
    source, sink = start_pair(site_a, site_b, workdir, daemons, {name: (name, name + "-standby")})
    for epoch in range(1, 7):
        random_changes(site_a, name, rng, 40, size)
        r = source.json("replicate", name, "--wait", "--timeout", "120")
        assert r["seq"] == epoch
    points = verify_every_point(site_a, site_b, sink, name, name, name)
    assert [p["seq"] for p in points] == list(range(1, 7))
    # The hash tells points apart: every epoch changed the image.
    digests = {site_b.digest(f"{name}-r{p['seq']}") for p in points}
    assert len(digests) == 6
    assert points[0]["base_seq"] == 0 and points[5]["base_seq"] == 5
    st = source.json("status", name)[0]
    assert st["role"] == "source" and st["last_seq"] == 6 and st["error"] == ""
    st_b = sink.json("status", name)[0]
    assert st_b["role"] == "sink" and st_b["last_seq"] == 6


def test_a_primary_image_recreated_under_a_running_source_is_read_afresh(
        site_a, site_b, workdir, daemons, name):
    """The source keeps the image open between epochs (to read its
    snapshots) for as long as its link lasts. An image removed and made
    again under the same name (Cinder: a volume deleted and one created from
    a Glance image) while that link stays up must be removable, and the
    next point must be the new image, not the old one's snapshot."""
    size = 24 * MiB + 4096
    site_a.create(name, size)
    rng = random.Random(7)
    source, sink = start_pair(site_a, site_b, workdir, daemons, {name: (name, name + "-standby")})
    random_changes(site_a, name, rng, 30, size)
    assert source.json("replicate", name, "--wait", "--timeout", "120")["seq"] == 1
    random_changes(site_a, name, rng, 30, size)
    assert source.json("replicate", name, "--wait", "--timeout", "120")["seq"] == 2
    old = site_a.digest(name, "cairn.2")
    site_a.remove(name)  # with its snapshots; fails if an open handle pins it
    site_a.create(name, size)
    random_changes(site_a, name, rng, 10, size)
    r = source.json("replicate", name, "--wait", "--timeout", "120")
    assert r["seq"] == 3
    new = site_a.digest(name, "cairn.3")
    assert new != old
    point = sink.json("points", name)[-1]
    assert point["seq"] == 3 and point["base_seq"] == 2  # the chain goes on, resynced
    assert site_b.digest(point["image"], point["snap"]) == new
    # And an increment of the new image after it.
    random_changes(site_a, name, rng, 10, size)
    assert source.json("replicate", name, "--wait", "--timeout", "120")["seq"] == 4
    point = sink.json("points", name)[-1]
    assert point["seq"] == 4 and point["base_seq"] == 3
    assert site_b.digest(point["image"], point["snap"]) == site_a.digest(name, "cairn.4")
    st = source.json("status", name)[0]
    assert st["last_seq"] == 4 and st["errors_total"] == 0, st


def test_continuous_replication_while_writes_go_on(site_a, site_b, workdir, daemons, name):
    size = 32 * MiB + 4097
    site_a.create(name, size)
    source, sink = start_pair(site_a, site_b, workdir, daemons,
                              {name: (name, name + "-standby")}, interval="1s")
    stop = threading.Event()
    errors = []

    def writer():
        rng = random.Random(2)
        try:
            # A steady guest: a few writes every 100 ms (pacing, not a wait).
            while not stop.wait(0.1):
                random_changes(site_a, name, rng, 5, size)
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        lib.wait_for("five restore points made while writes go on",
                     lambda: len(sink.json("points", name)) >= 5, timeout=120)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    verify_every_point(site_a, site_b, sink, name, name, name)


def test_no_write_is_lost_while_clients_keep_opening_the_image(site_a, site_b, workdir, daemons,
                                                               name):
    """librbd reads an image's header before it starts watching it, so a
    client whose open spans a snapshot can miss the snapshot's notification
    and write on with the snapshot context it read: RADOS then files those
    writes under the snapshot after the epoch listed it, and no later diff of
    clones sees them. A client whose OSD replies are delayed (a wide gap
    between the two steps) opens the image, writes and closes it, over and
    over, while epochs run back to back. Once it stops, one more epoch must
    hold every write it made. (One client: three of them contending for the
    image's exclusive lock once left librbd's snapshot creation and their
    writes waiting on each other for good.)"""
    import rados
    import rbd
    size = 128 * MiB
    site_a.create(name, size)
    source, sink = start_pair(site_a, site_b, workdir, daemons, {name: (name, name + "-standby")})
    stop = threading.Event()
    errors = []
    written = []  # (offset, start, end) of each write, for the failure message

    def opener():
        client = rados.Rados(conffile=site_a.conf, conf={
            "admin_socket": "", "ms_inject_delay_type": "osd", "ms_inject_delay_max": "0.005",
            "ms_inject_delay_probability": "1"})
        client.connect(timeout=30)
        try:
            io = client.open_ioctx(site_a.pool)
            rng = random.Random(100)
            while not stop.is_set():
                with rbd.Image(io, name) as img:
                    at = rng.randrange(size // 4096) * 4096
                    t0 = time.time()
                    img.write(rng.randbytes(4096), at)
                    written.append((at, t0, time.time()))
            io.close()
        except Exception as e:  # surfaced below
            errors.append(e)
        finally:
            client.shutdown()

    t = threading.Thread(target=opener)
    t.start()
    try:
        for epoch in range(1, 41):
            r = source.json("replicate", name, "--wait", "--timeout", "120")
            assert r["seq"] == epoch
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    r = source.json("replicate", name, "--wait", "--timeout", "120")
    assert r["seq"] == 41
    newest = max(sink.json("points", name), key=lambda p: p["seq"])
    assert newest["seq"] == 41
    got, head = site_b.digest(newest["image"], newest["snap"]), site_a.digest(name)
    if got != head:
        at_source = site_a.digest(name, newest["snap"])
        with rbd.Image(site_a.ioctx, name, read_only=True) as a, \
                rbd.Image(site_b.ioctx, newest["image"], snapshot=newest["snap"],
                          read_only=True) as b:
            differ = [off for off in range(0, size, 4096)
                      if a.read(off, 4096) != b.read(off, 4096)]
            zeros = [off for off in differ if b.read(off, 4096) == bytes(4096)]
        when = {off: [f"{t0:.3f}-{t1:.3f}" for at, t0, t1 in written if at == off]
                for off in differ[:5]}
        pytest.fail("the last restore point lacks writes the client made: the point "
                    f"{'equals' if got == at_source else 'differs from'} its source snapshot "
                    f"{newest['snap']}, which {'equals' if at_source == head else 'differs from'} "
                    f"the head; {len(differ)} 4 KiB blocks differ, at (object, offset in it): "
                    f"{[(off >> 22, off & ((1 << 22) - 1)) for off in differ[:20]]}; "
                    f"{len(zeros)} of them zeros at the point; written at (unix s) {when}")


def test_sparse_10gib_image_sends_only_what_is_written(site_a, site_b, workdir, daemons, name):
    size = 10 << 30
    site_a.create(name, size)
    import rbd
    rng = random.Random(3)
    with rbd.Image(site_a.ioctx, name) as img:
        for _ in range(6):
            img.write(rng.randbytes(MiB), rng.randrange(0, size // MiB - 1) * MiB)
    source, sink = start_pair(site_a, site_b, workdir, daemons, {name: (name, name + "-standby")})
    t0 = time.monotonic()
    source.json("replicate", name, "--wait", "--timeout", "120")
    elapsed = time.monotonic() - t0
    (p,) = sink.json("points", name)
    print(f"10 GiB sparse image, 6 MiB written: first restore point in {elapsed:.2f} s")
    assert p["image_size"] == size
    assert p["data_bytes"] == 6 * MiB  # allocated extents only, no holes
    assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, "cairn.1")


def test_a_removed_base_snapshot_is_resynced_by_block_digests(
        site_a, site_b, workdir, daemons, name):
    """The snapshot of the sink's newest point is removed at the source by
    hand: both sites hash the image in 64 KiB grains and only the grains
    that differ travel, never the whole image."""
    import rbd
    size = 64 * MiB
    site_a.create(name, size)
    rng = random.Random(9)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(32 * MiB), 0)
    source, sink = start_pair(site_a, site_b, workdir, daemons, {name: (name, name + "-standby")})
    seq = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    with rbd.Image(site_a.ioctx, name) as img:
        img.remove_snap(f"cairn.{seq}")
        img.write(rng.randbytes(256 * 1024), 20 * MiB + 4096)
        img.discard(8 * MiB, 64 * 1024)
    nxt = source.json("replicate", name, "--wait", "--timeout", "120")["seq"]
    point = sink.json("points", name)[-1]
    assert point["seq"] == nxt and point["base_seq"] == seq, point
    assert point["data_bytes"] <= 256 * 1024 + 64 * 1024, point  # 5 grains of data
    assert point["zero_bytes"] == 64 * 1024, point  # the discarded grain
    assert site_b.digest(point["image"], point["snap"]) == site_a.digest(name, f"cairn.{nxt}")
    assert "by block digests" in source.log_text()


def test_compressed_records_cross_the_link_smaller_and_make_equal_points(
        site_a, site_b, workdir, daemons, name):
    """`compression` over real mutual TLS between two cairnds, through a
    proxy that counts the link's bytes: text leaves at less than half its
    size, random data as it is, and each point equals its source snapshot
    by hash. The codec may change between epochs (a restarted source)."""
    import rbd
    from wan_proxy import WanProxy
    size = 40 * MiB
    site_a.create(name, size)
    rng = random.Random(5)
    words = [b"restore ", b"point ", b"volume ", b"epoch ", b"standby ", b"\n"]
    text = b"".join(rng.choice(words) for _ in range(5 * MiB))[:24 * MiB]
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(text, 0)
        img.write(rng.randbytes(8 * MiB), 28 * MiB)
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    proxy = WanProxy(port, rate_bps=1e12).start()  # counts; no limit that matters here
    try:
        wire = []
        for seq, codec in ((1, "zstd"), (2, "lz4")):
            source = daemons(lib.Cairnd(workdir, f"source-a-{codec}", lib.source_config(
                "a", site_a.conf, proxy.port, {name: (name, name + "-standby")},
                extra=f"compression = {codec}\n")))
            if seq == 2:
                with rbd.Image(site_a.ioctx, name) as img:
                    img.write(text[:8 * MiB], 4 * MiB)  # text over text: 8 MiB changed
            before = proxy.bytes_up
            r = source.json("replicate", name, "--wait", "--timeout", "120")
            assert r["seq"] == seq
            wire.append(proxy.bytes_up - before)
            st = source.json("status", name)[0]  # payloads only: less than the proxy counts
            assert st["wire_bytes_total"] < st["bytes_total"] / 2, st
            assert st["wire_bytes_total"] <= wire[-1], st
            assert site_b.digest(name + "-standby", f"cairn.{seq}") == \
                site_a.digest(name, f"cairn.{seq}"), f"point {seq} ({codec}) differs"
            source.stop()
        # Epoch 1: 24 MiB of text and 8 MiB of random bytes; the random part
        # alone is 8 MiB on the wire, the text at most a third of its size.
        assert 8 * MiB < wire[0] < 8 * MiB + 8 * MiB, f"epoch 1 put {wire[0]} bytes on the wire"
        assert wire[1] < 4 * MiB, f"epoch 2 (8 MiB of text, lz4) put {wire[1]} bytes on the wire"
        assert sink.json("status", name)[0]["corrupt_frames_total"] == 0
    finally:
        proxy.stop()


def test_max_send_rate_caps_what_the_source_sends(site_a, site_b, workdir, daemons, name):
    """`[cairnd] max_send_rate` paces every frame the source sends: 20 MiB
    at 4 MiB/s cannot arrive sooner than the bytes beyond the first burst
    and record allow, and the point still equals its snapshot."""
    size = 20 * MiB
    site_a.create(name, size)
    import rbd
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(random.Random(9).randbytes(size), 0)
    port = lib.free_port()
    daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    config = lib.source_config("a", site_a.conf, port, {name: (name, name + "-standby")})
    source = daemons(lib.Cairnd(workdir, "source-a", config.replace(
        "[cairnd]\n", "[cairnd]\nmax_send_rate = 4M\n", 1)))
    t0 = time.monotonic()
    r = source.json("replicate", name, "--wait", "--timeout", "120")
    elapsed = time.monotonic() - t0
    # A burst of 1 MiB and the 4 MiB record after it go at once; the other
    # 15 MiB drain at 4 MiB/s. (A floor, not a speed: the cap guarantees it.)
    assert elapsed >= 15 / 4, f"20 MiB arrived in {elapsed:.2f} s under a 4 MiB/s cap"
    assert site_b.digest(name + "-standby", f"cairn.{r['seq']}") == \
        site_a.digest(name, f"cairn.{r['seq']}")
