"""End to end with real Cinder services (cinder-api with noauth,
cinder-scheduler, cinder-volume with Cairn's driver, a private RabbitMQ and
PostgreSQL), driven with the cinder CLI: a volume type with replication, a
volume written at site A, `cinder failover-host` to site B, the data checked
at site B by whole-image hash, written there, and `cinder failover-host
default` back: site B's writes are in the volume at site A. One cairnd per
site, each a source and a sink, as deployed."""
import os
import random

import pytest
import rbd

import cairn_testlib as lib
from cinder_services import CinderServices
from cairn_cinder import wire

MiB = 1 << 20
HOST = f"{CinderServices.HOST}@{CinderServices.BACKEND}"


@pytest.fixture
def services(testbed, tmp_path):
    site_a, site_b = lib.Site(testbed["CEPH_CONF_A"]), lib.Site(testbed["CEPH_CONF_B"])
    work = str(tmp_path)
    port, a_port = lib.free_port(), lib.free_port()
    # Site B's [source] replicates failed-over volumes back to site A's sink.
    sink = lib.Cairnd(work, "node-b", lib.sink_config(
        "b", site_b.conf, port, f"{work}/spool-b") +
        f"\n[source]\npools = rbd\npeer = 127.0.0.1:{a_port}\ninterval = 1s\n")
    source = lib.Cairnd(work, "node-a", lib.sink_config(
        "a", site_a.conf, a_port, f"{work}/spool-a") +
        f"\n[source]\npools = rbd\npeer = 127.0.0.1:{port}\ninterval = 1s\n"
        f"keep_snapshots = 100\n")
    sink.start()
    source.start()
    svc = CinderServices(os.path.join(work, "cinder"), int(os.environ.get(
        "CAIRN_CINDER_BASE_PORT", "0")) or lib.free_port_block(CinderServices.PORTS),
        site_a.conf, site_b.conf, source.socket, sink.socket)
    made = []
    try:
        svc.start()
        yield svc, site_a, site_b, source, sink, made
    finally:
        svc.stop()
        # Registrations live in RADOS: forget this test's, or later cairnds
        # would go on replicating images that are removed below.
        for client in (wire.ControlClient(source.socket), wire.ControlClient(sink.socket)):
            for image in made:
                try:
                    client.unregister(image[len("volume-"):])
                except wire.CairnError as e:
                    if e.code != "NotFound":
                        print(f"unregister {image}: {e}")
        source.stop()
        sink.stop()
        for site in (site_a, site_b):
            for image in made:
                try:
                    site.remove_all(image)
                except Exception as e:  # keep going: leave the bed usable
                    print(f"cleanup of {image}: {e}")
            site.close()


def _wait_status(svc, vid, want, timeout=90):
    def check():
        st = svc.show("", vid)
        if st.get("status") == "error" and want != "error":
            raise AssertionError(f"volume {vid} went to error: {st}\n{svc.logs()}")
        return st if st.get("status") == want else None
    try:
        return lib.wait_for(f"volume {vid} {want}", check, timeout=timeout, interval=0.5)
    except TimeoutError as e:
        raise AssertionError(f"{e}: {svc.show('', vid)}\n{svc.logs()}") from None


def _wait_service(svc, replication_status, timeout=120):
    def check():
        r = svc.cli("service-list", "--withreplication", "--binary", "cinder-volume")
        return replication_status in r.stdout
    try:
        lib.wait_for(f"cinder-volume replication status {replication_status}", check,
                     timeout=timeout, interval=1)
    except TimeoutError as e:
        r = svc.cli("service-list", "--withreplication", check=False)
        raise AssertionError(f"{e}\n{r.stdout}\n{svc.logs()}") from None


def test_failover_host_and_back_with_real_cinder(services):
    svc, site_a, site_b, source, sink, made = services
    svc.cli("type-create", "cairn-repl")
    svc.cli("type-key", "cairn-repl", "set", "replication_enabled=<is> True",
            f"volume_backend_name={CinderServices.BACKEND}")
    svc.cli("type-create", "plain")
    svc.cli("type-key", "plain", "set", f"volume_backend_name={CinderServices.BACKEND}")

    rid = svc.show("", svc.cli("create", "--volume-type", "cairn-repl", "--name", "repl",
                               "1").stdout.split("| id ")[1].split("|")[1].strip())["id"]
    pid = svc.show("", svc.cli("create", "--volume-type", "plain", "--name", "plain",
                               "1").stdout.split("| id ")[1].split("|")[1].strip())["id"]
    image = f"volume-{rid}"
    made += [image, f"volume-{pid}"]
    st = _wait_status(svc, rid, "available")
    assert st["replication_status"] == "enabled", st
    _wait_status(svc, pid, "available")

    # The guest's data, written at site A through librbd.
    rng = random.Random(4)
    with rbd.Image(site_a.ioctx, image) as img:
        for off in (0, 300 * MiB, 1023 * MiB):
            img.write(rng.randbytes(MiB), off)
    want = site_a.digest(image)
    seq = source.json("replicate", rid, "--wait", "--timeout", "120")["seq"]
    assert seq >= 1

    svc.cli("failover-host", HOST, "--backend_id", "site-b")
    _wait_service(svc, "failed-over")
    st = svc.show("", rid)
    assert st["replication_status"] == "failed-over", st
    assert image in site_b.images(), site_b.images()
    assert site_b.digest(image) == want, "the volume Cinder sees at site B lacks the data"
    # A volume that was not replicated is not silently emptied at site B.
    plain = svc.show("", pid)
    assert plain["status"] == "error", plain
    assert f"volume-{pid}" not in site_b.images()

    # The guest writes at site B; the volume replicates back to site A
    # meanwhile, site A's own replication of it standing by.
    with rbd.Image(site_b.ioctx, image) as img:
        img.write(rng.randbytes(2 * MiB), 500 * MiB)
    at_b = site_b.digest(image)
    lib.wait_for("site A's source of the volume standing by", lambda: [
        s for s in source.json("status", rid) if s["role"] == "source"
        and s["state"] == "standby"], timeout=60)

    svc.cli("failover-host", HOST, "--backend_id", "default")
    _wait_service(svc, "enabled")
    svc.cli("service-enable", HOST, "cinder-volume", check=False)
    st = svc.show("", rid)
    assert st["replication_status"] == "enabled", st
    assert site_a.digest(image) == at_b, "site B's writes did not come home"
    assert at_b != want

    # Site A is the primary again; its next point at site B is a delta.
    with rbd.Image(site_a.ioctx, image) as img:
        img.write(rng.randbytes(MiB), 700 * MiB)
    nxt = source.json("replicate", rid, "--wait", "--timeout", "120")["seq"]
    p = {p["seq"]: p for p in sink.json("points", rid)}[nxt]
    assert p["source_site"] == "a" and p["data_bytes"] <= 4 * MiB, p
    assert site_b.digest(f"{image}.standby", f"cairn.{nxt}") == site_a.digest(image)


def _wait_group(svc, gid, replication_status, timeout=120):
    def check():
        st = svc.show("group", gid)
        if st.get("status") == "error":
            raise AssertionError(f"group {gid} went to error: {st}\n{svc.logs()}")
        return st if st.get("replication_status") == replication_status else None
    try:
        return lib.wait_for(f"group {gid} replication {replication_status}", check,
                            timeout=timeout, interval=0.5)
    except TimeoutError as e:
        raise AssertionError(f"{e}: {svc.show('group', gid)}\n{svc.logs()}") from None


def _created_id(result):
    return result.stdout.split("| id ")[1].split("|")[1].strip()


def test_group_replication_fails_over_and_back_whole_with_real_cinder(services):
    """cinder group-create of a group type with consistent group
    replication, group-enable-replication, group-failover-replication to
    site B (every volume at one group point, by hash) and back ('default',
    site B's writes home), group-disable-replication."""
    svc, site_a, site_b, source, sink, made = services
    svc.cli("type-create", "cairn-repl")
    svc.cli("type-key", "cairn-repl", "set", "replication_enabled=<is> True",
            f"volume_backend_name={CinderServices.BACKEND}")
    svc.cli("group-type-create", "cairn-cg")
    svc.cli("group-type-key", "cairn-cg", "set",
            "consistent_group_replication_enabled=<is> True")
    gid = _created_id(svc.cli("group-create", "--name", "db", "cairn-cg", "cairn-repl"))
    lib.wait_for("group db available",
                 lambda: svc.show("group", gid).get("status") == "available", 60, 0.5)
    vids = [_created_id(svc.cli("create", "--volume-type", "cairn-repl", "--group-id", gid,
                                "--name", f"db-{i}", "1")) for i in range(2)]
    images = [f"volume-{v}" for v in vids]
    made += images
    try:
        _group_replication_round_trip(svc, site_a, site_b, source, sink, gid, vids, images)
    finally:
        try:  # a failure midway leaves the RBD group: its images could not go
            rbd.RBD().group_remove(site_a.ioctx, f"group-{gid}")
        except rbd.ObjectNotFound:
            pass


def _group_replication_round_trip(svc, site_a, site_b, source, sink, gid, vids, images):
    for v in vids:
        _wait_status(svc, v, "available")

    svc.cli("group-enable-replication", gid)
    _wait_group(svc, gid, "enabled")
    group = f"group-{gid}"
    rng = random.Random(9)
    for image in images:
        with rbd.Image(site_a.ioctx, image) as img:
            img.write(rng.randbytes(2 * MiB), rng.randrange(0, 500) * MiB)
    seq = source.json("group", "replicate", group, "--wait", "--timeout", "180")["seq"]
    points = {p["seq"]: p for p in sink.json("group", "points", group)}
    assert sorted(points[seq]["volumes"]) == sorted(vids), points
    at_point = {}
    for image in images:
        at_point[image] = site_a.digest(image, snap_id=site_a.group_snap_id(
            image, f"cairn.{seq}"))
        assert site_b.digest(f"{image}.standby", f"cairn.{seq}") == at_point[image], image
    svc.cli("group-failover-replication", gid, "--secondary-backend-id", "site-b")
    _wait_group(svc, gid, "failed-over")
    # Every volume at the newest group point (the group is idle since, so
    # it took no other), equal to the group snapshot at site A.
    b = wire.ControlClient(sink.socket)
    promoted = {b.promote(v, image, pool="rbd").point.seq for v, image in zip(vids, images)}
    assert promoted == {seq}, promoted
    for v, image in zip(vids, images):
        assert svc.show("", v)["replication_status"] == "failed-over", v
        assert site_b.digest(image) == at_point[image], f"{image} at site B is not group point {seq}"
    # They replicate back as one group: an RBD group of them at site B.
    assert sorted(sink.json("group", "status", group)[0]["volumes"]) == sorted(vids)
    assert sorted(i["name"] for i in rbd.Group(site_b.ioctx, group).list_images()) == \
        sorted(images)

    # Written at site B while failed over; the group fails back with it.
    with rbd.Image(site_b.ioctx, images[1]) as img:
        img.write(rng.randbytes(MiB), 100 * MiB)
    at_b = {image: site_b.digest(image) for image in images}
    for v in vids:
        lib.wait_for(f"site A's source of {v} standing by", lambda v=v: [
            s for s in source.json("status", v) if s["role"] == "source"
            and s["state"] == "standby"], timeout=60)
    svc.cli("group-failover-replication", gid, "--secondary-backend-id", "default")
    _wait_group(svc, gid, "enabled")
    for image in images:
        assert site_a.digest(image) == at_b[image], f"site B's writes to {image} did not come home"
    # All came home at one group point, which site B's standby images hold.
    finals = {v: max(p["seq"] for p in sink.json("points", v)) for v in vids}
    assert len(set(finals.values())) == 1 and min(finals.values()) > seq, finals
    for v, image in zip(vids, images):
        assert site_b.digest(f"{image}.standby", f"cairn.{finals[v]}") == at_b[image], image
    assert sink.cli("group", "status", group).returncode == 3, "site B still runs the group"
    assert group not in rbd.RBD().group_list(site_b.ioctx)

    svc.cli("group-disable-replication", gid)
    _wait_group(svc, gid, "disabled")
    # Each volume replicates on its own again; no group is left.
    assert source.cli("group", "status", group).returncode == 3
    for v in vids:
        assert [s for s in source.json("status", v) if s["role"] == "source"], v
    assert source.json("replicate", vids[0], "--wait", "--timeout", "120")["seq"] > seq
