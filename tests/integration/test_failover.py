"""Volumes registered at run time (what the Cinder shim does), failover by
promoting a restore point at site B, failback by releasing it: real cairnd
processes, real clusters, every image compared by whole-image hash."""
import random
import sys

import rbd

import cairn_testlib as lib

sys.path.insert(0, lib.SHIM)
from cairn_cinder import wire  # noqa: E402

MiB = 1 << 20


def source_with_registry(site_a, peer_port):
    return (f"[cairnd]\nsite = a\ncontrol_socket = @SOCKET@\n\n" +
            lib.ceph_config(site_a.conf) + lib.tls_config("a") +
            f"[source]\npools = rbd\npeer = 127.0.0.1:{peer_port}\ninterval = 0\n"
            f"keep_snapshots = 100\n")


def test_register_promote_release(site_a, site_b, workdir, daemons, name):
    rng = random.Random(7)
    site_a.create(name, 8 * MiB)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(3 * MiB), 1 * MiB)
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port,
                                                                f"{workdir}/spool")))
    src = daemons(lib.Cairnd(workdir, "src", source_with_registry(site_a, port)))
    a, b = wire.ControlClient(src.socket), wire.ControlClient(sink.socket)

    try:
        a.register(name, "nosuchpool", name)
        raise AssertionError("registered into a pool that is not a [source] pool")
    except wire.CairnError as e:
        assert e.code == "FailedPrecondition" and "[source] pools" in e.message, e
    try:
        a.register(name, "rbd", name + "-nosuch")
        raise AssertionError("registered an image that does not exist")
    except wire.CairnError as e:
        assert e.code == "NotFound" and name + "-nosuch" in e.message, e

    st = a.register(name, "rbd", name).status
    assert st.volume == name and st.role == "source", st
    assert a.register(name, "rbd", name).status.volume == name  # the same again: fine
    seq1 = src.json("replicate", name, "--wait", "--timeout", "60")["seq"]

    # A restarted source cairnd finds its registrations in RADOS.
    src.stop()
    src.start()
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(rng.randbytes(1 * MiB), 5 * MiB)
    seq2 = src.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    assert seq2 > seq1
    pts = {p["seq"]: p for p in sink.json("points", name)}
    for seq in (seq1, seq2):
        assert site_b.digest(pts[seq]["image"], pts[seq]["snap"]) == \
            site_a.digest(name, f"cairn.{seq}")
    assert pts[seq2]["image"] == name + ".standby"

    # Failover: the newest point becomes image `name` at site B.
    r = b.promote(name, name)
    assert r.point.seq == seq2 and r.image == name and not r.again, r
    assert site_b.digest(name) == site_a.digest(name, f"cairn.{seq2}")
    assert b.promote(name, name).again
    # The source is fenced: it reports why, and makes no new point.
    assert src.cli("replicate", name).returncode == 0
    lib.wait_for("the source reporting the failover",
                 lambda: "failed over" in src.json("status", name)[0]["error"], timeout=20)
    assert max(p["seq"] for p in sink.json("points", name)) == seq2
    # Writes at site B while failed over.
    with rbd.Image(site_b.ioctx, name) as img:
        img.write(b"written at site b" * 100, 0)
    at_b = site_b.digest(name)

    # Failback: the promoted image is kept under a new name, replication resumes.
    kept = b.release(name).kept_as
    assert kept.startswith(name + ".failback-") and site_b.digest(kept) == at_b
    assert name not in site_b.images()
    seq3 = src.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    after = [p for p in sink.json("points", name) if p["seq"] > seq2]
    prev = seq2
    for p in after:  # (a snapshot taken while fenced is shipped first)
        assert p["base_seq"] == prev and p["data_bytes"] < 1 * MiB, after  # no full resend
        prev = p["seq"]
    p3 = after[-1]
    assert p3["seq"] == seq3, after
    assert site_b.digest(p3["image"], p3["snap"]) == site_a.digest(name, f"cairn.{seq3}")

    # Unregister removes the source's snapshots so the image can be deleted.
    a.unregister(name)
    assert not [s for s in site_a.snaps(name) if s.startswith("cairn.")]
    try:
        a.unregister(name)
        raise AssertionError("unregistered twice")
    except wire.CairnError as e:
        assert e.code == "NotFound", e
