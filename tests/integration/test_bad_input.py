"""Bad input gets a clear error, a trustworthy exit code, and touches no data."""
import os
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
    bad_keyring.write_text("[client.admin]\n\tkey = AQBSdFhiAAAAABAAd4kWm9LzLP5W0cpM2y+M3A==\n")
    p.write_text(lib.sink_config("b", testbed["CEPH_CONF_B"], 1, str(tmp_path))
                 .replace("@SOCKET@", str(tmp_path / "s.sock"))
                 .replace("client = admin\n", f"client = admin\nkeyring = {bad_keyring}\n"))
    r = run_cairnd(str(p))
    assert r.returncode == 1
    assert "key" in r.stderr.lower() and "admin" in r.stderr, r.stderr


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
