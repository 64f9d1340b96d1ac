"""CairnRBDDriver (cinder_driver_shim/cairn_cinder/driver.py) on real parts:
Cinder 21 (Zed) classes, two real Ceph clusters, real cairnd processes.

Every check of data is a whole-image hash (lib.Site.digest) of the image
the driver uses, at the site it uses it. Waits are on conditions with a
deadline and a message, never on time."""
import datetime
import json
import random
import types
import uuid

import pytest
import rbd

import cairn_testlib as lib
from cinder import exception
from cinder.tests.unit import fake_volume
from cinder.volume.drivers import rbd as cinder_rbd

from cairn_cinder import driver as cairn_driver
from cairn_cinder import wire

MiB = 1 << 20
GiB = 1 << 30
BACKEND_ID = "site-b"  # replication_device backend_id (conftest.make_driver)
REPLICATED = {"replication_enabled": "<is> True"}


def write(site, image, seed, count=6):
    """Random data at random offsets of the whole image, through librbd."""
    rng = random.Random(seed)
    with rbd.Image(site.ioctx, image) as img:
        size = img.size()
        for _ in range(count):
            n = rng.randint(4096, MiB)
            img.write(rng.randbytes(n), rng.randrange(0, size - n))


def replicate_and_wait(cairn, vol, timeout=120):
    """An epoch now (ControlClient.replicate at site A); returns its restore
    point, once site B's cairnd lists it."""
    seq = cairn.source_client().replicate(vol.id).seq
    sink = cairn.sink_client()
    return lib.wait_for(
        f"restore point {seq} of volume {vol.id} at site B\n{cairn.logs()}",
        lambda: next((p for p in sink.points(vol.id) if p.seq >= seq), None), timeout)


def source_volume(cairn, vol_id):
    return next((s for s in cairn.source_client().status() if s.volume == vol_id), None)


def by_id(updates):
    return {u["volume_id"]: u["updates"] for u in updates}


def test_failover_and_failback_bring_the_data_back(site_a, site_b, cairn, volumes, make_driver,
                                                  ctx, caplog, testbed):
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    vol = volumes.new()
    upd = drv.create_volume(vol)
    vol.update(upd)
    target = vol.name + ".standby"
    assert upd["replication_status"] == "enabled"
    assert json.loads(upd["replication_driver_data"]) == {"target": target}
    st = lib.wait_for(f"volume {vol.id} registered at site A", lambda: source_volume(cairn, vol.id))
    assert (st.role, st.pool, st.image) == ("source", "rbd", vol.name)

    # Extended through the driver (the parent's resize); the engine ships the size.
    drv.extend_volume(vol, 2)
    vol.size = 2
    write(site_a, vol.name, seed=1)
    point = replicate_and_wait(cairn, vol)
    assert (point.pool, point.image, point.image_size) == ("rbd", target, 2 * GiB)
    want = site_a.digest(vol.name)
    assert site_b.digest(target, point.snap) == want

    stats = drv.get_volume_stats(refresh=True)
    assert stats["replication_enabled"] is True
    assert sorted(stats["replication_targets"]) == ["default", BACKEND_ID]
    mine = [s for s in cairn.source_client().status() if s.role == "source" and s.pool == "rbd"]
    assert stats["cairn_volumes"] == len(mine)
    ours = next(s for s in mine if s.volume == vol.id)
    assert ours.state != "error" and ours.error == "", ours
    # Registrations left in the pool by other tests (their images gone) are
    # in error; the backend's state is then theirs.
    failing = [s for s in mine if s.state in ("error", "disconnected")]
    assert stats["cairn_state"] == ("ok" if not failing else failing[0].state
                                    if len({s.state for s in failing}) == 1 else "error"), stats
    assert stats["cairn_lag_seconds"] is not None and stats["cairn_lag_seconds"] >= 0
    assert stats["cairn_volumes"] >= 1

    # -- failover: the newest point comes back as volume.name at site B
    active, updates, groups = drv.failover_host(ctx, [vol], BACKEND_ID)
    assert (active, groups) == (BACKEND_ID, [])
    u = by_id(updates)[vol.id]
    assert u["replication_status"] == "failed-over" and "status" not in u, u
    data = json.loads(u["replication_driver_data"])
    assert data["seq"] >= point.seq and data["target"] == target
    assert data["point_time"].endswith("Z")
    vol.update(u)
    assert site_b.digest(vol.name) == want, "the failed-over volume differs from site A"
    assert f"FAILED OVER to {BACKEND_ID} at restore point {data['seq']}" in caplog.text
    # The driver now works on cluster B.
    assert drv._active_backend_id == BACKEND_ID
    assert drv._active_config["conf"] == testbed["CEPH_CONF_B"]
    with cinder_rbd.RBDVolumeProxy(drv, vol.name, read_only=True) as img:
        assert img.size() == 2 * GiB
    assert drv.get_volume_stats(refresh=True)["cairn_state"] == "failed-over"

    # Fenced: site A's cairnd (still running) no longer makes points.
    points_before = [p.seq for p in cairn.sink_client().points(vol.id)]
    write(site_a, vol.name, seed=2)
    try:
        cairn.source_client().replicate(vol.id)
    except wire.CairnError:
        pass  # refusing it at once is as good
    lib.wait_for("site A's cairnd reporting the volume failed over",
                 lambda: "failed over" in source_volume(cairn, vol.id).error, timeout=60)
    assert [p.seq for p in cairn.sink_client().points(vol.id)] == points_before
    at_a = site_a.digest(vol.name)

    # Guests write at site B while failed over.
    write(site_b, vol.name, seed=3)
    at_b = site_b.digest(vol.name)

    # -- failback: site B's image is kept aside, site A's volume is used again
    active, updates, _ = drv.failover_host(ctx, [vol], "default")
    assert active == "default"
    u = by_id(updates)[vol.id]
    assert u["replication_status"] == "enabled" and "status" not in u, u
    kept = json.loads(u["replication_driver_data"])["kept_as"]
    assert kept.startswith(vol.name + ".failback-")
    assert f"kept as {kept}" in caplog.text
    vol.update(u)
    assert site_b.digest(kept) == at_b, "the writes made at site B are not in the kept image"
    assert vol.name not in site_b.images()
    assert drv._active_config["conf"] == testbed["CEPH_CONF_A"]
    assert site_a.digest(vol.name) == at_a

    # Replication resumes from site A.
    write(site_a, vol.name, seed=4)
    again = replicate_and_wait(cairn, vol)
    assert again.seq > max(points_before)
    assert site_b.digest(again.image, again.snap) == site_a.digest(vol.name)

    # -- delete: unregistered first (snapshots gone), then removed
    drv.delete_volume(vol)
    assert vol.name not in site_a.images()
    assert source_volume(cairn, vol.id) is None
    assert cairn.sink_client().points(vol.id), "restore points at site B must stay"


def test_failover_to_an_older_point_named_in_metadata(site_a, site_b, cairn, volumes,
                                                      make_driver, ctx, caplog):
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    by_seq, by_time, bad = volumes.new(), volumes.new(), volumes.new()
    vols = (by_seq, by_time, bad)
    for v in vols:
        v.update(drv.create_volume(v))
    first, digest_first = {}, {}
    for v in vols:
        write(site_a, v.name, seed=10)
        first[v.id] = replicate_and_wait(cairn, v)
        digest_first[v.id] = site_a.digest(v.name)
    for v in vols:
        write(site_a, v.name, seed=11)
        newer = replicate_and_wait(cairn, v)
        assert newer.seq > first[v.id].seq
        assert site_a.digest(v.name) != digest_first[v.id]

    # The operator picks points: a number, a time (just after the first
    # point, long before the second), and a typo.
    just_after = datetime.datetime.fromtimestamp(
        (first[by_time.id].source_time_ns + 500_000) / 1e9, tz=datetime.timezone.utc)
    by_seq.metadata = {cairn_driver.FAILOVER_POINT_KEY: str(first[by_seq.id].seq)}
    by_time.metadata = {cairn_driver.FAILOVER_POINT_KEY: just_after.isoformat()}
    bad.metadata = {cairn_driver.FAILOVER_POINT_KEY: "yesterday"}

    active, updates, _ = drv.failover_host(ctx, list(vols), None)  # None: the one target
    assert active == BACKEND_ID
    u = by_id(updates)
    for v in (by_seq, by_time):
        assert u[v.id]["replication_status"] == "failed-over", u[v.id]
        assert json.loads(u[v.id]["replication_driver_data"])["seq"] == first[v.id].seq
        assert site_b.digest(v.name) == digest_first[v.id], f"{v.id} is not at its older point"
    assert u[bad.id] == {"status": "error", "previous_status": "available",
                         "replication_status": "failover-error"}
    assert bad.name not in site_b.images(), "an image was made for a volume not failed over"
    assert "neither a restore point number" in caplog.text

    # A failed-over volume is deleted at site B, with the point's snapshot.
    assert f"cairn.{first[by_seq.id].seq}" in site_b.snaps(by_seq.name)
    by_seq.update(u[by_seq.id])
    drv.delete_volume(by_seq)
    assert by_seq.name not in site_b.images()


def test_volume_without_a_restore_point_is_not_failed_over(site_a, site_b, cairn, volumes,
                                                          make_driver, ctx, caplog):
    # Only site A's cairnd runs: nothing reaches site B.
    cairn.source.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    vol = volumes.new()
    vol.update(drv.create_volume(vol))
    plain = volumes.new(replicated=False)
    upd = drv.create_volume(plain)
    assert upd == {"replication_status": "disabled"}  # the parent's, on a replicating backend
    plain.update(upd)
    assert source_volume(cairn, plain.id) is None, "a volume of a plain type was registered"

    # Site A is lost before the volume's first epoch: its cairnd is gone,
    # site B's runs.
    cairn.source.stop()
    cairn.sink.start()
    active, updates, _ = drv.failover_host(ctx, [vol, plain], BACKEND_ID)
    assert active == BACKEND_ID
    u = by_id(updates)
    assert u[vol.id] == {"status": "error", "previous_status": "available",
                         "replication_status": "failover-error"}
    # Not replicated: error (Cinder's manager records it as failover-error,
    # as for any volume in error; it gives not-capable to the plain volumes
    # it does not pass to the driver).
    assert u[plain.id] == {"status": "error", "previous_status": "available",
                           "replication_status": "not-capable"}
    assert not [i for i in site_b.images() if i.startswith((vol.name, plain.name))], \
        "an image was created at site B for a volume without a restore point"
    assert "has no restore point" in caplog.text
    assert "NOT failed over" in caplog.text
    for v in (vol, plain):  # as Cinder's manager saves them
        v.update(dict(u[v.id], replication_status="failover-error"))

    # Failback: they were never used at site B, so they get their status back.
    cairn.source.start()
    active, updates, _ = drv.failover_host(ctx, [vol, plain], "default")
    assert active == "default"
    u = by_id(updates)
    assert json.loads(u[vol.id].pop("replication_driver_data")) == {"target": vol.name + ".standby"}
    assert u[vol.id] == {"status": "available", "replication_status": "enabled"}
    assert u[plain.id] == {"status": "available", "replication_status": "not-capable"}
    assert site_a.images().count(vol.name) == 1


def test_cairnd_down_errors_name_the_socket_and_what_to_do(site_a, site_b, cairn, volumes,
                                                           make_driver, ctx, caplog, testbed):
    drv = make_driver(cairn.source.socket, cairn.sink.socket)  # no cairnd runs yet
    assert "does not answer" in caplog.text  # check_for_setup_error warns, does not refuse

    vol = volumes.new()
    with pytest.raises(exception.ReplicationError) as e:
        drv.create_volume(vol)
    msg = str(e.value)
    assert cairn.source.socket in msg and "start cairnd at site A" in msg, msg
    assert vol.name not in site_a.images(), "a volume that cannot replicate was left behind"

    # Volumes of plain types do not need cairnd.
    plain = volumes.new(replicated=False)
    plain.update(drv.create_volume(plain))
    assert plain.name in site_a.images()
    drv.delete_volume(plain)
    assert plain.name not in site_a.images()

    stats = drv.get_volume_stats(refresh=True)
    assert (stats["cairn_state"], stats["cairn_lag_seconds"]) == ("down", None)
    assert stats["replication_enabled"] is True
    assert "no replication figures" in caplog.text

    # Failover with site B's cairnd down: refused, nothing changed, the
    # driver still works on site A (Cinder keeps the service's state on
    # InvalidReplicationTarget, so the same command can be run again).
    with pytest.raises(exception.InvalidReplicationTarget) as e:
        drv.failover_host(ctx, [], BACKEND_ID)
    msg = str(e.value)
    assert cairn.sink.socket in msg and "nothing was failed over" in msg, msg
    assert drv._active_backend_id is None
    assert drv._active_config["conf"] == testbed["CEPH_CONF_A"]

    # A replicated volume is not deleted behind the back of a stopped cairnd.
    cairn.start()
    reg = volumes.new()
    reg.update(drv.create_volume(reg))
    cairn.source.stop()
    with pytest.raises(exception.VolumeBackendAPIException) as e:
        drv.delete_volume(reg)
    msg = str(e.value)
    assert "cannot unregister" in msg and cairn.source.socket in msg, msg
    assert reg.name in site_a.images()
    cairn.source.start()
    drv.delete_volume(reg)
    assert reg.name not in site_a.images()


def test_retype_registers_and_unregisters(site_a, site_b, cairn, volumes, make_driver, ctx):
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    vol = volumes.new(replicated=False)
    vol.update(drv.create_volume(vol))
    plain_type = vol.volume_type
    repl_type = fake_volume.fake_volume_type_obj(ctx, id=str(uuid.uuid4()),
                                                 name="cairn-replicated",
                                                 extra_specs=dict(REPLICATED))
    diff = {"encryption": {}, "qos_specs": {},
            "extra_specs": {"replication_enabled": (None, "<is> True")}}
    host = {"host": "cinder@cairn#cairn", "capabilities": {}}

    ok, upd = drv.retype(ctx, vol, repl_type, diff, host)
    assert ok and upd["replication_status"] == "enabled", upd
    vol.update(upd)
    vol.volume_type = repl_type
    assert source_volume(cairn, vol.id) is not None
    write(site_a, vol.name, seed=20)
    point = replicate_and_wait(cairn, vol)
    assert site_b.digest(point.image, point.snap) == site_a.digest(vol.name)

    diff["extra_specs"]["replication_enabled"] = ("<is> True", None)
    ok, upd = drv.retype(ctx, vol, plain_type, diff, host)
    assert ok and upd == {"replication_status": "disabled", "replication_driver_data": None}
    vol.update(upd)
    vol.volume_type = plain_type
    assert source_volume(cairn, vol.id) is None
    assert not [s for s in site_a.snaps(vol.name) if s.startswith("cairn.")], \
        "unregistering left cairn snapshots on the volume"
    assert cairn.sink_client().points(vol.id), "restore points at site B must stay"
    drv.delete_volume(vol)
    assert vol.name not in site_a.images()


def test_retype_back_to_replicated_replicates_again(site_a, site_b, cairn, volumes,
                                                    make_driver, ctx):
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    vol = volumes.new()
    vol.update(drv.create_volume(vol))
    write(site_a, vol.name, seed=30)
    first = replicate_and_wait(cairn, vol)
    repl_type = vol.volume_type
    plain_type = fake_volume.fake_volume_type_obj(ctx, id=str(uuid.uuid4()), name="plain")
    host = {"host": "cinder@cairn#cairn", "capabilities": {}}
    diff = {"encryption": {}, "qos_specs": {},
            "extra_specs": {"replication_enabled": ("<is> True", None)}}
    vol.update(drv.retype(ctx, vol, plain_type, diff, host)[1])
    vol.volume_type = plain_type
    diff["extra_specs"]["replication_enabled"] = (None, "<is> True")
    vol.update(drv.retype(ctx, vol, repl_type, diff, host)[1])
    vol.volume_type = repl_type
    write(site_a, vol.name, seed=31)
    # The point promised for the writes just made: the first epoch of the new
    # registration may have taken its snapshot before them.
    promised = cairn.source_client().replicate(vol.id).seq
    assert promised > first.seq
    sink = cairn.sink_client()

    def settled():
        st = source_volume(cairn, vol.id)
        if st is not None and st.state == "error":
            return ("error", st)
        point = next((p for p in sink.points(vol.id) if p.seq >= promised), None)
        return ("point", point) if point else None

    kind, got = lib.wait_for("a new restore point, or the volume in error at site A", settled,
                             120)
    assert kind == "point", f"replication stopped: {got.error}"
    # The image lost its base snapshot while it was not replicated: the
    # engine resynced it whole over the old standby, and the chain goes on.
    resync = min((p for p in sink.points(vol.id) if p.seq > first.seq), key=lambda p: p.seq)
    assert resync.base_seq == first.seq
    assert site_b.digest(got.image, got.snap) == site_a.digest(vol.name)


def test_a_volume_types_retention_specs_decide_its_points_at_site_b(
        site_a, site_b, cairn, volumes, make_driver, ctx, testbed, tmp_path):
    """cairn:keep_points in a volume type's extra specs: site B keeps that
    many of the volume's points (beside its own rule, 1 here: a source's
    rules add to the sink's), after a restart of the site A cairnd too
    (the registry holds the rules); and
    cairn:snapshot_retention keeps today's newest older snapshot at site A
    beside the base (without it, the base alone). A spec that is no count
    is refused, naming it."""
    cairn.sink = lib.Cairnd(str(tmp_path), "sink-b", lib.sink_config(
        "b", testbed["CEPH_CONF_B"], cairn.port, f"{tmp_path}/spool", extra="keep_points = 1\n"))
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    own = volumes.new(specs={"cairn:keep_points": "2", "cairn:retention": "1d*7",
                             "cairn:snapshot_retention": "1d*7"})
    plain = volumes.new()
    for v in (own, plain):
        v.update(drv.create_volume(v))
    sink = cairn.sink_client()

    def seqs(v):
        return sorted(p.seq for p in sink.points(v.id))

    for seed in range(3):
        for v in (own, plain):
            write(site_a, v.name, seed=40 + seed)
            replicate_and_wait(cairn, v)
        if seed == 1:
            cairn.source.stop()
            cairn.source.start()
    newest = lib.wait_for(
        f"volume {own.id} keeping 2 points at site B (its type's cairn:keep_points)\n"
        f"{cairn.logs()}",
        lambda: (lambda s: s if len(s) == 2 else None)(seqs(own)), 60)
    # 1d*7 keeps the newest of today, which is the newest point anyway.
    assert newest[1] == max(p.seq for p in sink.points(own.id))
    lib.wait_for(f"volume {plain.id} keeping 1 point at site B (the sink's keep_points)",
                 lambda: len(seqs(plain)) == 1, 60)

    def cairn_snaps(v):
        return sorted(s for s in site_a.snaps(v.name) if s.startswith("cairn."))

    lib.wait_for(f"site A keeping 2 snapshots of {own.name} (base and today's)",
                 lambda: len(cairn_snaps(own)) == 2, 60)
    lib.wait_for(f"site A keeping only the base snapshot of {plain.name}",
                 lambda: len(cairn_snaps(plain)) == 1, 60)
    point = max(sink.points(own.id), key=lambda p: p.seq)
    assert site_b.digest(point.image, point.snap) == site_a.digest(own.name)

    bad = volumes.new(specs={"cairn:keep_points": "many"})
    with pytest.raises(exception.ReplicationError) as e:
        drv.create_volume(bad)
    assert "cairn:keep_points='many'" in str(e.value), e.value


class _Group:
    """What the driver reads of a Cinder group object."""

    def __init__(self, replication_status="enabled"):
        self.id = str(uuid.uuid4())
        self.replication_status = replication_status
        self.group_type_id = None  # no group specs


def test_a_failed_over_groups_volumes_attach_at_site_b(site_a, site_b, cairn, volumes,
                                                       make_driver, testbed, ctx):
    drv = make_driver(cairn.source.socket, cairn.sink.socket, setup=False)
    drv.do_setup(ctx)
    vol = volumes.new()
    at_a = drv.initialize_connection(vol, {})["data"]
    vol.replication_status = "failed-over"
    vol.replication_driver_data = json.dumps({"group": "group-x", "site": BACKEND_ID})
    at_b = drv.initialize_connection(vol, {})["data"]
    mon_b = testbed["CEPH_MON_B"].split(":")
    assert (at_b["hosts"], at_b["ports"]) == ([mon_b[1]], [mon_b[2]]), at_b
    assert at_a["ports"] != at_b["ports"], (at_a, at_b)
    assert at_b["name"] == f"rbd/{vol.name}" and "keyring" not in at_b, at_b
    # What would act on its stale image at site A is refused, saying why.
    snap = types.SimpleNamespace(volume=vol, name="snapshot-x", volume_name=vol.name)
    for act in (lambda: drv.extend_volume(vol, 2), lambda: drv.create_snapshot(snap),
                lambda: drv.create_cloned_volume(volumes.new(), vol),
                lambda: drv.revert_to_snapshot(ctx, vol, snap),
                lambda: drv.create_group_snapshot(ctx, None, [snap])):
        with pytest.raises(exception.ReplicationError) as e:
            act()
        assert "failed over to" in str(e.value) and "stale" in str(e.value), e.value
    # Not failed over (or the whole backend is): the active site's.
    vol.replication_status = "enabled"
    assert drv.initialize_connection(vol, {})["data"]["ports"] == at_a["ports"]


def test_a_group_is_not_failed_over_without_a_point_holding_every_volume(
        site_a, site_b, cairn, volumes, make_driver, ctx):
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    vols = [volumes.new(), volumes.new()]
    for v in vols:
        v.update(drv.create_volume(v))
    group = _Group()
    try:
        with pytest.raises(exception.ReplicationGroupError) as e:
            drv.failover_replication(ctx, group, vols, BACKEND_ID)
        assert "NOT failed over" in str(e.value) and group.id in str(e.value), e.value
        for v in vols:
            assert v.name not in site_b.images(), "a volume promoted without its group's point"
    finally:
        for v in vols:
            drv.delete_volume(v)


def test_volumes_leave_a_replicating_group_by_their_type(site_a, site_b, cairn, volumes,
                                                         make_driver, ctx):
    """update_group and disable_replication: a volume of a replicated type
    goes back to its own schedule, a plain one stops replicating; the RBD
    group follows, and goes at disable."""
    cairn.start()
    drv = make_driver(cairn.source.socket, cairn.sink.socket)
    repl, plain, added = volumes.new(), volumes.new(replicated=False), volumes.new()
    for v in (repl, plain, added):
        v.update(drv.create_volume(v) or {})
    group = _Group("disabled")
    name = f"group-{group.id}"
    src = cairn.source_client()

    def members():
        return sorted(i["name"] for i in rbd.Group(site_a.ioctx, name).list_images())

    def registered(v):
        try:
            return [s for s in src.status(v.id) if s.role == "source"]
        except wire.CairnError as e:
            assert e.code == "NotFound", e
            return []

    try:
        model, updates = drv.enable_replication(ctx, group, [repl, plain])
        assert model == {"replication_status": "enabled"}, model
        assert {u["id"] for u in updates} == {repl.id, plain.id}, updates
        assert members() == sorted([repl.name, plain.name])
        group.replication_status = "enabled"
        with pytest.raises(NotImplementedError):  # Cinder records it (generic)
            drv.update_group(ctx, group, add_volumes=[added], remove_volumes=[plain])
        assert members() == sorted([repl.name, added.name])
        assert not registered(plain), "a plain volume still replicated after leaving"
        assert registered(added) and registered(repl)
        model, _ = drv.disable_replication(ctx, group, [repl, added])
        assert model == {"replication_status": "disabled"}, model
        assert registered(repl) and registered(added), "replicated types replicate on their own"
        assert name not in rbd.RBD().group_list(site_a.ioctx)
    finally:
        try:
            rbd.RBD().group_remove(site_a.ioctx, name)
        except rbd.ObjectNotFound:
            pass
        for v in (repl, plain, added):
            drv.delete_volume(v)


def test_enabling_group_replication_names_a_missing_cairnd(make_driver, volumes, ctx,
                                                           site_a, site_b, tmp_path):
    drv = make_driver(str(tmp_path / "nosuch.sock"))
    vol = volumes.new()
    site_a.create(vol.name, 1 << 20)
    group = _Group("disabled")
    try:
        with pytest.raises(exception.ReplicationGroupError) as e:
            drv.enable_replication(ctx, group, [vol])
        assert "nosuch.sock" in str(e.value) and f"group-{group.id}" in str(e.value), e.value
    finally:
        rbd.RBD().group_remove(site_a.ioctx, f"group-{group.id}")


def test_driver_options_are_registered_with_help(make_driver):
    drv = make_driver("/nonexistent/cairnd.sock", setup=False)
    names = {o.name: o for o in cairn_driver.CairnRBDDriver.get_driver_options()}
    for name in ("cairn_control_socket", "cairn_standby_control_socket",
                 "cairn_target_suffix", "cairn_timeout", "replication_device", "rbd_pool"):
        assert name in names
    for o in cairn_driver.CAIRN_OPTS:
        assert o.help
    assert drv.configuration.cairn_target_suffix == ".standby"
    assert drv.configuration.cairn_control_socket == "/nonexistent/cairnd.sock"


def test_driver_data_fits_cinders_column():
    long_name = "volume-" + "f" * 36 + ".failback-20261125T060718Z" + "x" * 200
    text = cairn_driver._driver_data(target="t" * 200, seq=12,
                                     point_time="2026-11-25T06:07:18.123Z", kept_as=long_name)
    assert len(text) <= 255
    assert json.loads(text)["seq"] == 12
