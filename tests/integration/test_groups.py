"""Consistency groups on the two real clusters, over mutual TLS as
client.cairn: the members of an RBD group at site A replicate at one
instant (`rbd group snap create`), under dependent writes to all of them;
every group point at site B equals, member by member and by hash, the
group snapshot at A, and holds the members at one instant; a group point
is restored, drilled and failed over whole; members registered at run time
join and leave a group without a resync of the others, and the group
starts again with cairnd."""
import random
import re
import struct
import sys
import threading

import pytest
import rbd

import cairn_testlib as lib

sys.path.insert(0, lib.SHIM)
from cairn_cinder import wire  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def rbd_groups(site_a, name):
    """Creates RBD groups at site A; removes them after the daemons stop
    (requested before `daemons`) and before the images go."""
    made = []

    def make(group, images):
        rbd.RBD().group_create(site_a.ioctx, group)
        made.append(group)
        g = rbd.Group(site_a.ioctx, group)
        for image in images:
            g.add_image(site_a.ioctx, image)

    yield make
    for group in made:
        rbd.RBD().group_remove(site_a.ioctx, group)


class CounterWriter:
    """Dependent writes, each begun once the one before completed: write k
    puts k at offset 0 of image k % n (and random bytes elsewhere). At one
    instant the images hold the last n writes: n consecutive numbers."""

    def __init__(self, site, images, seed):
        self.images = [rbd.Image(site.ioctx, i) for i in images]
        self.rng = random.Random(seed)
        self.k = 0
        self.stopped = threading.Event()
        for _ in images:
            self._write()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _write(self):
        img = self.images[self.k % len(self.images)]
        img.write(struct.pack("<Q", self.k), 0)
        img.write(self.rng.randbytes(4096), self.rng.randrange(1, SIZE // 4096) * 4096)
        self.k += 1

    def _run(self):
        while not self.stopped.is_set():
            self._write()

    def stop(self):
        self.stopped.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=60)
            assert not self.thread.is_alive(), "the writer did not stop"
        for img in self.images:
            img.close()


def _counter(site, image, snap):
    with rbd.Image(site.ioctx, image, snapshot=snap, read_only=True) as img:
        return struct.unpack("<Q", img.read(0, 8))[0]


def _one_instant(site, images, snap):
    counters = sorted(_counter(site, image, snap) for image in images)
    assert counters == list(range(counters[0], counters[0] + len(images))), \
        f"{snap} holds {counters}: not one instant"


def _database(site_a, rbd_groups, name):
    """A database's three volumes at site A, in one RBD group."""
    images = [f"{name}-{m}" for m in ("data", "log", "idx")]
    for image in images:
        site_a.create(image, SIZE)
    group = f"{name}-g"
    rbd_groups(group, images)
    return images, group


def test_group_points_equal_the_group_snapshot_at_one_instant_and_act_whole(
        site_a, site_b, workdir, rbd_groups, daemons, name):
    images, group = _database(site_a, rbd_groups, name)
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {i: (i, i + "-standby") for i in images},
        extra=f"group = {group}\n")))

    writer = CounterWriter(site_a, images, 31)
    writer.thread.start()
    try:
        seqs = [source.json("group", "replicate", group, "--wait", "--timeout", "180")["seq"]
                for _ in range(3)]
    finally:
        writer.stop()
    assert writer.k > 100, f"only {writer.k} writes ran beside three instants"

    points = sink.json("group", "points", group)
    assert [p["seq"] for p in points] == seqs, (points, seqs)
    for p in points:
        assert sorted(p["volumes"]) == sorted(images), p
        snap = f"cairn.{p['seq']}"
        for image in images:
            at_a = site_a.digest(image, snap_id=site_a.group_snap_id(image, snap))
            assert site_b.digest(image + "-standby", snap) == at_a, (image, p)
        _one_instant(site_b, [i + "-standby" for i in images], snap)

    status = source.json("group", "status", group)[0]
    assert status["last_seq"] == seqs[-1] and status["error"] == "", status

    restored = sink.json("group", "restore", group, str(seqs[1]), "--suffix", "r")
    assert restored["seq"] == seqs[1], restored
    assert sorted(restored["images"]) == sorted(f"rbd/{i}-standby-r" for i in images), restored
    for image in images:
        assert site_b.digest(f"{image}-standby-r") == \
            site_b.digest(image + "-standby", f"cairn.{seqs[1]}"), image

    drill = sink.json("group", "drill", "start", group)
    assert drill["seq"] == seqs[-1] and len(drill["images"]) == len(images), drill
    for image in images:
        point = [p for p in sink.json("points", image) if p["seq"] == seqs[-1]][0]
        assert point["held_by"], point
    stopped = sink.json("group", "drill", "stop", group)
    assert sorted(stopped["images"]) == sorted(i.split("/")[1] for i in drill["images"]), stopped

    failed_over = sink.json("group", "failover", group)
    assert failed_over["seq"] == seqs[-1], failed_over
    for image in images:
        assert site_b.digest(f"{image}-standby-failover") == \
            site_b.digest(image + "-standby", f"cairn.{seqs[-1]}"), image


def test_a_group_whose_rbd_group_lacks_a_member_takes_no_instant_and_says_why(
        site_a, site_b, workdir, rbd_groups, daemons, name):
    images = [f"{name}-{m}" for m in ("a", "b")]
    for image in images:
        site_a.create(image, SIZE)
    group = f"{name}-g"
    rbd_groups(group, images[:1])
    port = lib.free_port()
    daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    source = daemons(lib.Cairnd(workdir, "source-a", lib.source_config(
        "a", site_a.conf, port, {i: (i, i + "-standby") for i in images},
        extra=f"group = {group}\n")))
    source.json("group", "replicate", group)
    lib.wait_for("the group's error", lambda: source.json("group", "status", group)[0]["error"])
    error = source.json("group", "status", group)[0]["error"]
    assert images[1] in error and "rbd group image add" in error, error
    for image in images:
        assert not site_a.snaps(image), f"{image} got a snapshot of an instant never taken"


def _points(sink, volume):
    return {p["seq"]: p for p in sink.json("points", volume)}


def test_members_registered_at_run_time_join_and_leave_without_a_resync_of_the_others(
        site_a, site_b, workdir, rbd_groups, daemons, name):
    images = [f"{name}-{m}" for m in ("m1", "m2", "m3")]
    single = f"{name}-m4"  # replicated on its own first, then moved into the group
    rng = random.Random(43)
    for image in images + [single]:
        site_a.create(image, SIZE)
        with rbd.Image(site_a.ioctx, image) as img:
            img.write(rng.randbytes(2 * MiB), rng.randrange(0, 8) * MiB)
    group = f"{name}-g"
    rbd_groups(group, images[:2])
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink-b", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    source = daemons(lib.Cairnd(workdir, "source-a", (
        "[cairnd]\nsite = a\ncontrol_socket = @SOCKET@\n\n" + lib.ceph_config(site_a.conf)
        + lib.tls_config("a")
        + f"[source]\npools = rbd\npeer = 127.0.0.1:{port}\ninterval = 0\n")))
    a = wire.ControlClient(source.socket)

    def register(image):
        return a.register(image, "rbd", image, target_image=image + "-standby", group=group)

    def expect_refused(image, grp, words):
        try:
            a.register(image, "rbd", image, target_image=image + "-standby", group=grp)
        except wire.CairnError as e:
            assert all(w in str(e) for w in words), e
            return
        raise AssertionError(f"{image} registered into group {grp}")

    expect_refused(images[2], group, [images[2], "rbd group image add"])
    expect_refused(images[2], f"{name}-nosuch", ["rbd group create"])
    for image in images[:2]:
        register(image)
    a.register(single, "rbd", single, target_image=single + "-standby")
    alone = source.json("replicate", single, "--wait", "--timeout", "180")["seq"]

    def replicate_and_check(members):
        seq = source.json("group", "replicate", group, "--wait", "--timeout", "180")["seq"]
        point = [p for p in sink.json("group", "points", group) if p["seq"] == seq]
        assert point and sorted(point[0]["volumes"]) == sorted(members), (seq, point)
        for image in members:
            snap = f"cairn.{seq}"
            assert site_b.digest(image + "-standby", snap) == \
                site_a.digest(image, snap_id=site_a.group_snap_id(image, snap)), (image, seq)
        return seq

    first = replicate_and_check(images[:2])
    # A third member joins (a full sync of its own), and a volume that
    # replicated on its own moves in: it and the others diff from their
    # points. Both at once (register_volumes), the group started once; a
    # batch with an image outside the RBD group changes nothing.
    for image in images + [single]:
        with rbd.Image(site_a.ioctx, image) as img:
            img.write(rng.randbytes(64 * 1024), rng.randrange(0, SIZE // MiB) * MiB)
    batch = [(image, "rbd", image, image + "-standby") for image in (images[2], single)]
    rbd.Group(site_a.ioctx, group).add_image(site_a.ioctx, single)
    try:
        a.register_many(batch, group)
        raise AssertionError(f"{images[2]} registered while outside RBD group {group}")
    except wire.CairnError as e:
        assert images[2] in str(e) and "rbd group image add" in str(e), e
    by_volume = {s.volume: s for s in a.status()}
    assert images[2] not in by_volume, "a refused batch registered a volume"
    assert sorted(source.json("group", "status", group)[0]["volumes"]) == sorted(images[:2])

    def starts():
        return len(re.findall(rf"group {re.escape(group)}: \d+ volumes of RBD group",
                              source.log_text()))

    before = starts()
    rbd.Group(site_a.ioctx, group).add_image(site_a.ioctx, images[2])
    statuses = a.register_many(batch, group)
    assert sorted(s.volume for s in statuses) == sorted([images[2], single]), statuses
    lib.wait_for(f"group {group} started again in the log", lambda: starts() > before, 30)
    assert starts() == before + 1, "registering two members at once restarted the group twice"
    images.append(single)
    second = replicate_and_check(images)
    for image in images[:2]:
        assert _points(sink, image)[second]["base_seq"] == first, image
    assert _points(sink, images[2])[second]["base_seq"] == 0
    assert _points(sink, single)[second]["base_seq"] == alone
    # One leaves (the RBD group first): the others go on from their points.
    rbd.Group(site_a.ioctx, group).remove_image(site_a.ioctx, images[1])
    a.unregister(images[1])
    with rbd.Image(site_a.ioctx, images[0]) as img:
        img.write(rng.randbytes(4096), 0)
    members = [images[0], images[2], single]
    third = replicate_and_check(members)
    for image in members:
        assert _points(sink, image)[third]["base_seq"] == second, image
    status = source.json("group", "status", group)[0]
    assert sorted(status["volumes"]) == sorted(members), status
    # The group is registered: it starts again with cairnd.
    source.stop()
    source.start()
    fourth = replicate_and_check(members)
    assert _points(sink, images[0])[fourth]["base_seq"] == third


def _node(site, conf, listen_port, peer_port, workdir, volumes=None, group=None):
    """One cairnd per site, as deployed: a sink (for a group failed over
    from the other site), a [source] (to replicate it back), and `volumes`
    of its own, members of `group`."""
    return lib.sink_config(site, conf, listen_port, f"{workdir}/spool-{site}") + (
        f"\n[source]\npools = rbd\npeer = 127.0.0.1:{peer_port}\ninterval = 0\n"
    ) + "".join(f"\n[volume {image}]\npool = rbd\nimage = {image}\n"
                f"target_image = {image}-standby\npeer = 127.0.0.1:{peer_port}\n"
                f"interval = 0\ngroup = {group}\n" for image in (volumes or []))


def test_a_failed_over_group_replicates_back_as_a_group_and_fails_back_at_one_instant(
        site_a, site_b, workdir, rbd_groups, daemons, name):
    images, group = _database(site_a, rbd_groups, name)
    a_port, b_port = lib.free_port(), lib.free_port()
    a_conf = _node("a", site_a.conf, a_port, b_port, workdir, images, group)
    node_a = daemons(lib.Cairnd(workdir, "node-a", a_conf))
    node_b = daemons(lib.Cairnd(workdir, "node-b", _node("b", site_b.conf, b_port, a_port,
                                                         workdir)))
    # A's writers stop before its last group point (else A would hold
    # writes B never got: a split brain, tests/integration/test_failback.py).
    CounterWriter(site_a, images, 47).stop()
    first = node_a.json("group", "replicate", group, "--wait", "--timeout", "180")["seq"]

    # Site A is lost. B fails the group over at its newest group point and
    # replicates the promoted images back as one group, written meanwhile.
    node_a.stop()
    out = node_b.json("group", "failover", group, *[
        a for i in images for a in ("--back", f"{i}=rbd/{i}")])
    assert out["seq"] == first and sorted(out["back_to"]) == sorted(images), out
    promoted = [f"{i}-standby-failover" for i in images]
    assert sorted(out["images"]) == sorted(f"rbd/{p}" for p in promoted), out
    assert sorted(i["name"] for i in rbd.Group(site_b.ioctx, group).list_images()) == \
        sorted(promoted)
    writer = CounterWriter(site_b, promoted, 53)
    writer.thread.start()

    # Site A is back: the group points it gets from B hold every member at
    # one instant (B's group snapshot), equal by hash.
    node_a = daemons(lib.Cairnd(workdir, "node-a2", a_conf))
    try:
        back = [node_b.json("group", "replicate", group, "--wait", "--timeout", "180")["seq"]
                for _ in range(2)]
    finally:
        writer.stop()
    at_a = {p["seq"]: p for p in node_a.json("group", "points", group)}
    assert set(back) <= set(at_a), (back, at_a)
    for image in images:  # A's images were idle: each adopted its share, then deltas
        assert _points(node_a, image)[back[0]]["base_seq"] == first, image
    for seq in back:
        assert sorted(at_a[seq]["volumes"]) == sorted(images), at_a[seq]
        _one_instant(site_a, images, f"cairn.{seq}")
        for image, p in zip(images, promoted):
            share = site_b.group_snap_id(p, f"cairn.{seq}")
            assert site_a.digest(image, f"cairn.{seq}") == site_b.digest(p, snap_id=share), image

    # A member alone does not fail back: the group comes home whole.
    alone = node_b.cli("failback", images[0], "--timeout", "60")
    assert alone.returncode != 0 and f"cairn group failback {group}" in alone.stderr, alone
    # Failback waits for every member's writers to go: one held open at B
    # refuses it all, and nothing changes.
    with rbd.Image(site_b.ioctx, promoted[1]):
        held = node_b.cli("group", "failback", group, "--timeout", "180")
    assert held.returncode != 0 and "is held open by" in held.stderr, held
    assert sorted(node_b.json("group", "status", group)[0]["volumes"]) == sorted(images)

    fb = node_b.json("group", "failback", group, "--timeout", "180")
    final = fb["seq"]
    assert final > back[-1] and fb["primary_site"] == "a", fb
    assert len(fb["kept_as"]) == len(images), fb
    for image in images:
        home = site_a.digest(image)
        assert home == site_a.digest(image, f"cairn.{final}"), image
        assert home == site_b.digest(image + "-standby", f"cairn.{final}"), image
    _one_instant(site_a, images, f"cairn.{final}")
    # B's standby images hold it as a group point: a next failover can take it.
    at_b = [p for p in node_b.json("group", "points", group) if p["seq"] == final]
    assert at_b and sorted(at_b[0]["volumes"]) == sorted(images), at_b
    assert node_b.cli("group", "status", group).returncode != 0, "B still runs the group"
    assert group not in rbd.RBD().group_list(site_b.ioctx), "B's RBD group outlived the failback"

    # A's group replicates to B again, each member a delta from the final
    # point, and the group point equals A's group snapshot.
    writer = CounterWriter(site_a, images, 59)
    writer.thread.start()
    try:
        nxt = node_a.json("group", "replicate", group, "--wait", "--timeout", "180")["seq"]
    finally:
        writer.stop()
    point = [p for p in node_b.json("group", "points", group) if p["seq"] == nxt]
    assert point and sorted(point[0]["volumes"]) == sorted(images), (nxt, point)
    for image in images:
        snap = f"cairn.{nxt}"
        assert site_b.digest(image + "-standby", snap) == \
            site_a.digest(image, snap_id=site_a.group_snap_id(image, snap)), image
    _one_instant(site_b, [i + "-standby" for i in images], f"cairn.{nxt}")


def test_a_member_released_from_a_group_replicating_back_leaves_the_others_going_on(
        site_a, site_b, workdir, rbd_groups, daemons, name):
    images, group = _database(site_a, rbd_groups, name)
    a_port, b_port = lib.free_port(), lib.free_port()
    node_a = daemons(lib.Cairnd(workdir, "node-a", _node(
        "a", site_a.conf, a_port, b_port, workdir, images, group)))
    node_b = daemons(lib.Cairnd(workdir, "node-b", _node("b", site_b.conf, b_port, a_port,
                                                         workdir)))
    CounterWriter(site_a, images, 61).stop()
    node_a.json("group", "replicate", group, "--wait", "--timeout", "180")
    node_a.stop()
    node_b.json("group", "failover", group, *[
        a for i in images for a in ("--back", f"{i}=rbd/{i}")])

    released = node_b.json("release", images[2])
    assert released["kept_as"].startswith(f"{images[2]}-standby-failover.failback-"), released
    rest = sorted(images[:2])
    assert sorted(node_b.json("group", "status", group)[0]["volumes"]) == rest
    assert sorted(i["name"] for i in rbd.Group(site_b.ioctx, group).list_images()) == \
        sorted(f"{i}-standby-failover" for i in rest)
    sources = [s["volume"] for s in node_b.json("status")
               if s["role"] == "source" and s["volume"] in images]
    assert sorted(sources) == rest, sources
    node_b.stop()
    rbd.RBD().group_remove(site_b.ioctx, group)  # its images can go then
