"""Bad input gets a clear error, a trustworthy exit code, and touches no data."""
import os
import re
import ssl
import subprocess

import cairn_testlib as lib

MiB = 1 << 20


def run_cairnd(config_path):
    return subprocess.run([lib.CAIRND, "-c", config_path, "--check"], capture_output=True,
                          text=True, timeout=60)


def test_config_errors_name_the_problem(tmp_path, testbed):
    cases = {
        "[sink]\nlisten = nowhere\n": "is not host:port",
        "[volume v]\nimage = i\n": "needs 'peer'",
        "[sink]\nspool = /x\n": "unknown key 'spool'",
        "[cairnd]\nsite = a\n": "nothing to do",
    }
    for text, want in cases.items():
        p = tmp_path / "c.conf"
        p.write_text(text)
        r = run_cairnd(str(p))
        assert r.returncode == 2, r
        assert want in r.stderr, r.stderr
    r = run_cairnd(str(tmp_path / "missing.conf"))
    assert r.returncode == 2 and "cannot read config file" in r.stderr


def test_missing_pool_and_wrong_key(tmp_path, testbed):
    p = tmp_path / "c.conf"
    p.write_text(lib.sink_config("b", testbed["CEPH_CONF_B"], 1, str(tmp_path), pools="nosuchpool")
                 .replace("@SOCKET@", str(tmp_path / "s.sock")))
    r = run_cairnd(str(p))
    assert r.returncode == 1
    assert "nosuchpool" in r.stderr, r.stderr

    bad_keyring = tmp_path / "bad.keyring"
    bad_keyring.write_text("[client.cairn]\n\tkey = AQBSdFhiAAAAABAAd4kWm9LzLP5W0cpM2y+M3A==\n")
    text = lib.sink_config("b", testbed["CEPH_CONF_B"], 1, str(tmp_path))
    good_keyring = re.search(r"^keyring = (.*)$", text, re.M).group(1)
    p.write_text(text.replace("@SOCKET@", str(tmp_path / "s.sock"))
                 .replace(good_keyring, str(bad_keyring)))
    r = run_cairnd(str(p))
    assert r.returncode == 1
    assert "key" in r.stderr.lower() and "cairn" in r.stderr, r.stderr


def test_cli_exit_codes(site_a, site_b, workdir, daemons, name):
    r = subprocess.run([lib.CAIRN, "--socket", os.path.join(workdir, "none.sock"), "status"],
                       capture_output=True, text=True)
    assert r.returncode == 4 and "cairnd is not running" in r.stderr

    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port,
                                                                f"{workdir}/spool")))
    site_a.create(name, 4 * MiB)
    source = daemons(lib.Cairnd(workdir, "src", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-s")})))
    source.json("replicate", name, "--wait", "--timeout", "60")

    assert sink.cli("points", "nosuch").returncode == 3
    assert sink.cli("restore", name, "1", "--to", name + "-s").returncode == 6  # exists
    assert sink.cli("restore", name, "x1", "--to", "new").returncode == 5
    assert sink.cli("restore", name, "99", "--to", "new").returncode == 3
    assert source.cli("replicate", "nosuch").returncode == 3
    assert source.cli("points", name).returncode == 5  # not a sink: ask site B
    assert sink.cli("bogus").returncode == 2
    # Nothing was touched by the refused requests.
    assert (name + "-s") in site_b.images() and "new" not in site_b.images()


def test_sink_will_not_overwrite_an_image_it_did_not_create(site_a, site_b, workdir, daemons,
                                                             name):
    import rbd
    site_a.create(name, 4 * MiB)
    site_b.create(name + "-taken", 4 * MiB)
    with rbd.Image(site_b.ioctx, name + "-taken") as img:
        img.write(b"precious", 0)
    before = site_b.digest(name + "-taken")
    port = lib.free_port()
    daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port, f"{workdir}/spool")))
    source = daemons(lib.Cairnd(workdir, "src", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-taken")})))
    r = source.cli("replicate", name, "--wait", "--timeout", "10")
    assert r.returncode == 4
    st = source.json("status", name)[0]
    assert "was not created by Cairn" in st["error"], st
    assert site_b.digest(name + "-taken") == before


# -- peers that are not what they claim --------------------------------------

def _wire():
    import sys
    if lib.SHIM not in sys.path:
        sys.path.insert(0, lib.SHIM)
    from cairn_cinder import cairn_pb2, wire
    return wire, cairn_pb2


def _talk(port, data, timeout=10):
    """Sends raw bytes to 127.0.0.1:port over mutual TLS as site a's source;
    returns the frames answered until the peer closes (or a WireError)."""
    import socket
    wire, _ = _wire()
    got = []
    with lib.tls_client(socket.create_connection(("127.0.0.1", port), timeout=timeout)) as s:
        s.sendall(data)
        try:
            while (f := wire.read_frame(s)) is not None:
                got.append(f)
        except (wire.WireError, ConnectionResetError, ssl.SSLError):
            pass
    return got


def _link_error(frames):
    wire, pb = _wire()
    errors = [f for f in frames if f[0] == wire.LINK_ERROR]
    assert errors, f"no LinkError in {frames}"
    e = pb.LinkError()
    e.ParseFromString(errors[0][1])
    return e.message


class _FakeSink:
    """A TLS server with site b's certificate (a sink that authenticates but
    lies) that answers every connection with `answer(data)`."""

    def __init__(self, answer):
        import socket
        import threading
        self.answer = answer
        self.tls = lib.tls_server_context("b")
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                with self.tls.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(self.answer(tls.recv(65536)))
            except OSError:
                conn.close()

    def stop(self):
        self.stopping = True
        self.server.close()
        self.thread.join(10)


def test_a_sink_refuses_sources_that_do_not_speak_its_protocol(site_a, site_b, workdir, daemons,
                                                                name):
    wire, pb = _wire()
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port,
                                                                f"{workdir}/spool")))
    hello = pb.Hello(protocol_version=99, volume=name, pool="rbd", image=name + "-s",
                     source_site="a")
    msg = _link_error(_talk(port, wire.encode(wire.HELLO, hello.SerializeToString())))
    assert "speaks protocol 99" in msg and "upgrade" in msg, msg
    msg = _link_error(_talk(port, wire.encode(wire.HELLO, hello.SerializeToString(), version=2)))
    assert "unsupported frame version 2" in msg, msg
    # Bytes that are not frames at all: the stream cannot be trusted any more,
    # the sink closes it and logs why.
    assert _talk(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(32, b"\0")) == []
    lib.wait_for("the sink logging the HTTP request as a bad frame",
                 lambda: "bad frame magic 0x20544547" in sink.log_text(), timeout=10)
    msg = _link_error(_talk(port, wire.encode(wire.CONTROL_REQUEST, b"\x08\x01")))
    assert "expected Hello" in msg and "Cairn source" in msg, msg
    hello.protocol_version = 1
    hello.pool = "nosuchpool"
    msg = _link_error(_talk(port, wire.encode(wire.HELLO, hello.SerializeToString())))
    assert "pool 'nosuchpool' is not served by this sink" in msg, msg
    assert name + "-s" not in site_b.images(), "a refused peer created an image"
    # The sink is unharmed: a real source replicates through it.
    site_a.create(name, 4 * MiB)
    with __import__("rbd").Image(site_a.ioctx, name) as img:
        img.write(b"after the liars" * 1000, 12345)
    source = daemons(lib.Cairnd(workdir, "src", lib.source_config(
        "a", site_a.conf, port, {name: (name, name + "-s")})))
    seq = source.json("replicate", name, "--wait", "--timeout", "60")["seq"]
    p = sink.json("points", name)[-1]
    assert p["seq"] == seq
    assert site_b.digest(p["image"], p["snap"]) == site_a.digest(name, f"cairn.{seq}")


def test_a_source_refuses_sinks_that_lie(site_a, site_b, workdir, daemons, name):
    wire, pb = _wire()
    site_a.create(name, 4 * MiB)
    before = site_a.digest(name)
    cases = [
        (lambda _: wire.encode(wire.HELLO_REPLY, pb.HelloReply(
            protocol_version=99, last_chain=b"\0" * 16).SerializeToString()),
         "sink speaks protocol 99"),
        (lambda _: b"SSH-2.0-OpenSSH_9.2\r\n" + b"\0" * 40, "bad frame magic"),
        (lambda _: wire.encode(wire.EPOCH_ACK, b""), "did not answer Hello with HelloReply"),
        (lambda _: wire.encode(wire.HELLO_REPLY, pb.HelloReply(
            protocol_version=1, last_chain=b"short").SerializeToString()),
         "malformed chain digest"),
    ]
    for i, (answer, want) in enumerate(cases):
        fake = _FakeSink(answer)
        try:
            vid = f"{name}-{i}"
            src = daemons(lib.Cairnd(workdir, f"src{i}", lib.source_config(
                "a", site_a.conf, fake.port, {vid: (name, name + "-s")}, interval="1s")))

            def error():
                st = src.json("status", vid)[0]
                return st["error"] if want in st["error"] else None

            try:
                lib.wait_for(f"the source reporting '{want}'", error, timeout=20)
            except TimeoutError as e:
                raise AssertionError(f"{e}: {src.json('status', vid)}") from None
            st = src.json("status", vid)[0]
            assert st["state"] == "error" or st["state"] == "disconnected", st
            assert st["last_seq"] == 0 and st["errors_total"] >= 1, st
            src.stop()
        finally:
            fake.stop()
    # A lying sink got nothing applied and the primary is as it was.
    assert site_a.digest(name) == before


def test_malformed_control_requests_do_not_hurt_cairnd(site_b, workdir, daemons, name):
    import socket
    wire, pb = _wire()
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port,
                                                                f"{workdir}/spool")))
    bad = [
        b"\xff" * 64,                                              # not a frame
        wire.encode(wire.CONTROL_REQUEST, b"\xff\xff\xff\xff"),    # not protobuf
        wire.encode(wire.CONTROL_REQUEST, b""),                    # no request in it
        wire.encode(wire.HELLO, b""),                              # wrong frame type
        wire.encode(wire.CONTROL_REQUEST, b"x" * 100)[:50],        # truncated
    ]
    answers = []
    for data in bad:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(sink.socket)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            try:
                f = wire.read_frame(s)
            except (wire.WireError, ConnectionResetError):
                f = None
        if f is not None and f[0] == wire.CONTROL_REPLY:
            r = pb.ControlReply()
            r.ParseFromString(f[1])
            assert r.code != 0 and r.message, (data[:40], r)
            answers.append(r.message)
    assert answers, "no malformed request got an error reply"
    # cairnd still serves well-formed requests.
    assert wire.ControlClient(sink.socket).status() == []
    assert sink.cli("status").returncode == 0
    print(f"answers to malformed requests: {answers}")


def test_a_missing_source_image_is_named(site_a, site_b, workdir, daemons, name):
    port = lib.free_port()
    daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port,
                                                         f"{workdir}/spool")))
    src = daemons(lib.Cairnd(workdir, "src", lib.source_config(
        "a", site_a.conf, port, {name: (name + "-nosuch", name + "-s")}, interval="1s")))
    lib.wait_for("the source naming the missing image",
                 lambda: f"{name}-nosuch" in src.json("status", name)[0]["error"], timeout=20)
    assert name + "-s" not in site_b.images()
    # No point can be promised for an image that is not there: refused at
    # once (not found), not after the wait.
    r = src.cli("replicate", name, "--wait", "--timeout", "30")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert f"{name}-nosuch does not exist" in r.stderr, r.stderr
    assert "no restore point can be promised" in r.stderr, r.stderr


def _check(workdir, name, text):
    p = os.path.join(workdir, f"{name}.conf")
    with open(p, "w") as f:
        f.write(text.replace("@SOCKET@", os.path.join(workdir, f"{name}.sock")))
    return run_cairnd(p)


class _NotCairn:
    """Another service on a port: answers every connection with an HTTP
    error and closes it, as a web server would."""

    def __init__(self):
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.recv(4096)
                c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def close(self):
        self.sock.close()
        self.thread.join(timeout=10)


def test_check_tells_the_truth(site_a, site_b, workdir, daemons, name):
    """`cairnd --check` probes what a running cairnd will need: the peer (a
    Cairn sink that would take the volume, by a probe handshake that
    replaces no session), the pools the sink serves, the spool. Each setup
    that can never replicate fails the check with what is wrong; a service
    that is not Cairn is called so, never data loss."""
    site_a.create(name, 4 * MiB)
    port = lib.free_port()
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port,
                                                                f"{workdir}/spool")))
    vols = {name: (name, name + "-s")}
    ok = _check(workdir, "good", lib.source_config("a", site_a.conf, port, vols))
    assert ok.returncode == 0, ok
    assert f"ok: [volume {name}] peer 127.0.0.1:{port}: sink of site 'b'" in ok.stdout, ok.stdout
    assert "is valid" in ok.stdout

    # Nothing listens on the peer port.
    dead = lib.free_port()
    r = _check(workdir, "dead", lib.source_config("a", site_a.conf, dead, vols))
    assert r.returncode == 1, r
    assert f"FAILED: [volume {name}] peer 127.0.0.1:{dead}" in r.stdout, r.stdout
    assert "refused" in r.stdout.lower(), r.stdout

    # Another service on the peer port.
    other = _NotCairn()
    try:
        r = _check(workdir, "other", lib.source_config("a", site_a.conf, other.port, vols))
    finally:
        other.close()
    assert r.returncode == 1, r
    # (It cannot even do the TLS handshake, and is asked whether it is a sink.)
    assert "is it a Cairn sink" in r.stdout, r.stdout
    assert "DataLoss" not in r.stdout + r.stderr and "truncated" not in r.stdout, r.stdout

    # A target pool the sink does not serve.
    r = _check(workdir, "pool", lib.source_config("a", site_a.conf, port, vols)
               .replace(f"target_image = {name}-s\n", f"target_image = {name}-s\ntarget_pool = volumes\n"))
    assert r.returncode == 1, r
    assert "pool 'volumes' is not served by this sink" in r.stdout, r.stdout

    # A spool directory that cannot be made (its parent is a file).
    blocker = os.path.join(workdir, "not-a-dir")
    with open(blocker, "w") as f:
        f.write("x")
    r = _check(workdir, "spool", lib.sink_config("b", site_b.conf, lib.free_port(),
                                                 os.path.join(blocker, "spool")))
    assert r.returncode == 1, r
    assert "FAILED: [sink] spool_dir" in r.stdout and "cannot be created" in r.stdout, r.stdout

    # The probes replaced no session and made no point; the sink still works.
    source = daemons(lib.Cairnd(workdir, "src", lib.source_config("a", site_a.conf, port, vols)))
    r1 = source.json("replicate", name, "--wait", "--timeout", "60")
    assert r1["seq"] == 1
    assert sink.json("status", name)[0]["corrupt_frames_total"] == 0

    # A restarted source shows the newest point the sink holds at once,
    # even for a volume replicated on demand only.
    source.stop()
    source.start()
    lib.wait_for("the restarted source showing point 1",
                 lambda: source.json("status", name)[0]["last_seq"] == 1, timeout=30)


def test_the_sinks_status_shows_its_spool_errors(site_a, site_b, workdir, daemons, name):
    """A sink that cannot spool a volume says so in its own `cairn status`,
    not only in the source's."""
    site_a.create(name, 4 * MiB)
    port = lib.free_port()
    spool = os.path.join(workdir, "spool")
    os.makedirs(spool)
    with open(os.path.join(spool, name), "w") as f:  # where the volume's spool dir goes
        f.write("in the way")
    sink = daemons(lib.Cairnd(workdir, "sink", lib.sink_config("b", site_b.conf, port, spool)))
    daemons(lib.Cairnd(workdir, "src", lib.source_config("a", site_a.conf, port,
                                                          {name: (name, name + "-s")})))

    def sink_error():
        for st in sink.json("status"):
            if st["volume"] == name and "cannot create spool directory" in st["error"]:
                return st
        return None

    st = lib.wait_for("the sink's status showing its spool error", sink_error, timeout=30)
    assert st["state"] == "error" and st["errors_total"] >= 1, st
