"""Trust nobody on the wire: a sink serves only sources that authenticate
with a certificate from its CA and that a [peer NAME] grant allows. Every
refused peer gets nothing (no seq, no digest), writes nothing, and leaves
the live session of the volume as it was. On the control socket, whoever
may connect may read; only admins may change. A starting sink fences only
the client that holds its lock, never one a forgeable record names."""
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading

import rbd

import cairn_testlib as lib

sys.path.insert(0, lib.SHIM)
from cairn_cinder import cairn_pb2 as pb, wire  # noqa: E402

MiB = 1 << 20


def _hello(volume, image, site="a", pool="rbd"):
    h = pb.Hello(protocol_version=1, volume=volume, pool=pool, image=image, source_site=site)
    return wire.encode(wire.HELLO, h.SerializeToString())


def _answer(sock, data):
    """What the sink answers `data` on `sock`: its frames until it closes."""
    got = []
    try:
        sock.sendall(data)
        while (f := wire.read_frame(sock)) is not None:
            got.append(f)
    except (wire.WireError, OSError):
        pass
    return got


def _tls_refused(port, **tls):
    """A TLS client as `tls` says; returns the frames it got (none expected)
    or the handshake's error."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s = lib.tls_client(raw, **tls)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return e
    with s:
        return _answer(s, _hello("any", "any-s"))


def _link_error(frames):
    assert [f[0] for f in frames] == [wire.LINK_ERROR], f"not one LinkError: {frames}"
    e = pb.LinkError()
    e.ParseFromString(frames[0][1])
    return wire.CODES[e.code], e.message


def test_only_granted_sources_get_anything(site_a, site_b, workdir, daemons, name):
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool",
        grants=lib.grant_config("a", pools="rbd", volumes=f"{name}*"))))
    site_a.create(name, 8 * MiB)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(b"before the intruders" * 4096, 0)
    source = daemons(lib.Cairnd(workdir, "src", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-s")})))
    first = source.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    points = sink.json("points", name)

    # 1. Plaintext: the sink's handshake fails; a Cairn Hello is never read.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = _answer(s, _hello(name, name + "-s"))
    assert got == [], f"a plaintext peer got frames: {got}"
    # 2. TLS without a client certificate, 3. a certificate of another CA.
    no_cert = _tls_refused(port, cert=False)
    assert isinstance(no_cert, Exception) or no_cert == [], no_cert
    rogue = _tls_refused(port, pki_dir=f"{lib.pki()}/rogue")
    assert isinstance(rogue, Exception) or rogue == [], rogue
    lib.wait_for("the sink logging the refused handshakes",
                 lambda: sink.log_text().count("TLS handshake with") >= 3, timeout=20)
    # 4. A valid certificate that no grant names (site-b's), 5. site a's own
    # certificate for a volume, a site or a pool its grant does not allow.
    cases = [("b", name, "a", "rbd", "no [peer NAME] grant"),
             ("a", "other-volume", "a", "rbd", "does not allow site 'a' to write volume"),
             ("a", name, "c", "rbd", "does not allow site 'c'")]
    for cert_site, volume, claimed, pool, want in cases:
        with lib.tls_client(socket.create_connection(("127.0.0.1", port), timeout=10),
                            site=cert_site) as s:
            code, msg = _link_error(_answer(s, _hello(volume, volume + "-s", claimed, pool)))
        assert code == "PermissionDenied" and want in msg, (cert_site, volume, code, msg)
        # One LinkError and nothing else (no HelloReply): no seq, no digest.
        assert "point" not in msg and "chain" not in msg, f"a refusal told of the volume: {msg}"

    # Nothing was written, and the live session carries on.
    assert sink.json("points", name) == points
    assert "other-volume-s" not in site_b.images()
    st = source.json("status", name)[0]
    assert st["state"] != "error" and st["errors_total"] == 0, st
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(b"after the intruders" * 4096, 3 * MiB)
    seq = source.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    assert seq == first + 1
    p = sink.json("points", name)[-1]
    assert p["seq"] == seq and p["source_site"] == "a", p
    assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, f"cairn.{seq}")


def _threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_a_flood_of_connections_is_closed_before_it_costs_threads(site_a, site_b, workdir,
                                                                  daemons, name):
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config(
        "b", site_b.conf, port, f"{workdir}/spool")))
    base = _threads(sink.proc.pid)
    most = base
    flood = []
    stop = threading.Event()

    def watch():
        nonlocal most
        while not stop.is_set():
            most = max(most, _threads(sink.proc.pid))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):  # connect, then say nothing
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        lib.wait_for("the sink closing the connections over its limit at once",
                     lambda: "at once" in sink.log_text(), timeout=30)
        lib.wait_for("the 8 admitted connections timing out of their handshake",
                     lambda: sink.log_text().count("did not finish its TLS handshake") >= 8,
                     timeout=60)
    finally:
        stop.set()
        watcher.join()
        for s in flood:
            s.close()
    # At most 8 unauthenticated connections from one address got a thread.
    assert most <= base + 8 + 1, f"the flood grew the sink from {base} to {most} threads"
    # A real source is served after the flood.
    site_a.create(name, 4 * MiB)
    with rbd.Image(site_a.ioctx, name) as img:
        img.write(b"after the flood" * 1000, 4096)
    source = daemons(lib.Cairnd(workdir, "src", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-s")})))
    seq = source.json("replicate", name, "--wait", "--timeout", "90")["seq"]
    p = sink.json("points", name)[-1]
    assert p["seq"] == seq
    assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, f"cairn.{seq}")


def _as_nobody(sink, *args):
    """The real `cairn` CLI run as uid nobody, gid nogroup: a copy beside the
    socket, as nobody may not traverse to the build (a checkout in a 0700
    directory)."""
    cli = os.path.join(os.path.dirname(sink.socket), "cairn")
    if not os.path.exists(cli):
        shutil.copy(lib.CAIRN, cli)
        os.chmod(cli, 0o755)
    return subprocess.run([cli, "--socket", sink.socket, *args], capture_output=True,
                          text=True, timeout=60, user=65534, group=65534, extra_groups=[])


def test_the_control_socket_lets_readers_read_and_only_admins_change(site_b, daemons, name):
    # A directory others may traverse, as /run/cairn is.
    work = tempfile.mkdtemp(prefix="cairn-control.")
    os.chmod(work, 0o755)
    try:
        port = lib.free_port()
        base = lib.sink_config("b", site_b.conf, port, f"{work}/spool")
        # control_group only: nobody (gid nogroup) may read, not change.
        sink = daemons(lib.Cairnd(work, "sink", base.replace(
            "control_socket = @SOCKET@\n", "control_socket = @SOCKET@\ncontrol_group = nogroup\n")))
        assert stat.S_IMODE(os.stat(sink.socket).st_mode) == 0o660
        assert os.stat(sink.socket).st_gid == 65534
        r = _as_nobody(sink, "status")
        assert r.returncode == 0, r.stderr
        for args in (["promote", name, "--to", name + "-p"], ["release", name],
                     ["restore", name, "1", "--to", name + "-r"]):
            r = _as_nobody(sink, *args)
            assert r.returncode == 8 and "admin_group" in r.stderr, (args, r.returncode, r.stderr)
        lib.wait_for("the sink logging the refused promote by uid 65534",
                     lambda: "refused promote of" in sink.log_text()
                     and "uid 65534 (nobody)" in sink.log_text(), timeout=10)
        assert name + "-p" not in site_b.images()
        sink.stop()

        # admin_group too: the same request now runs (and finds no such volume).
        sink = daemons(lib.Cairnd(work, "sink2", base.replace(
            "control_socket = @SOCKET@\n",
            "control_socket = @SOCKET@\ncontrol_group = nogroup\nadmin_group = nogroup\n")))
        r = _as_nobody(sink, "promote", name, "--to", name + "-p")
        assert r.returncode == 3, (r.returncode, r.stderr)  # NotFound: it ran
        lib.wait_for("the sink logging the promote and its caller",
                     lambda: f"control: promote of '{name}' by pid" in sink.log_text(), timeout=10)
        sink.stop()

        # Neither: the socket is 0600 and nobody may not even connect.
        sink = daemons(lib.Cairnd(work, "sink3", base))
        assert stat.S_IMODE(os.stat(sink.socket).st_mode) == 0o600
        r = _as_nobody(sink, "status")
        assert r.returncode == 8 and "may not connect" in r.stderr, (r.returncode, r.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sink_lock_holders(site):
    """Addresses holding the sink lock on site's catalog, as the OSD says."""
    r = subprocess.run(["rados", "-c", site.conf, "-p", site.pool, "lock", "info",
                        "cairn.catalog", "cairn.sink"], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        assert "No such file" in r.stderr, r.stderr
        return []
    return [locker["addr"] for locker in json.loads(r.stdout)["lockers"]]


def _blocklist(site):
    rc, out, why = site.cluster.mon_command(
        json.dumps({"prefix": "osd blocklist ls", "format": "json"}), b"", timeout=60)
    assert rc == 0, why
    # The addresses, then (newer Ceph) a second array of address ranges.
    entries, _ = json.JSONDecoder().raw_decode(out.decode())
    return [e["addr"] for e in entries]


def test_a_starting_sink_fences_only_the_holder_of_its_lock(site_b, workdir, daemons):
    """The sink instance record in the catalog is any pool writer's to
    forge, so it is never acted on: a starting sink fences (blocklists) the
    client holding the sink lock, which the OSD records. A clean stop gives
    the lock up; the next start fences nobody, though the record still names
    the stopped sink; after kill -9 the lock holder is fenced."""
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config(
        "b", site_b.conf, lib.free_port(), f"{workdir}/spool")))

    def registered(since):
        m = re.findall(r"registered as sink instance (\S+) ", sink.log_text()[since:])
        assert len(m) == 1, sink.log_tail()
        return m[0]

    first = registered(0)
    assert _sink_lock_holders(site_b) == [first]
    sink.stop()
    assert _sink_lock_holders(site_b) == [], "a clean stop kept the sink lock"

    mark = len(sink.log_text())
    sink.start()
    second = registered(mark)
    log = sink.log_text()[mark:]
    assert (f"the sink instance record names {first}" in log
            and "holds no sink lock: not fenced" in log), sink.log_tail()
    assert "fenced the previous sink instance" not in log, sink.log_tail()
    assert first not in _blocklist(site_b)
    assert _sink_lock_holders(site_b) == [second]

    sink.kill9()
    mark = len(sink.log_text())
    sink.start()
    log = sink.log_text()[mark:]
    assert f"fenced the previous sink instance {second}" in log, sink.log_tail()
    assert second in _blocklist(site_b)
    assert _sink_lock_holders(site_b) == [registered(mark)]
