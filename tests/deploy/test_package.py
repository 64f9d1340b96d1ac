"""The Debian packages built from this checkout, installed for real, and
cairnd run exactly as the installed systemd unit says: as its user, with
its directories, told apart from a failed start by systemd's notify
protocol (this machine has no systemd as PID 1, so the test plays
systemd's part of the protocol; `systemd-analyze verify` checks the unit
itself). Two instances, one per site, replicate a volume over mutual TLS
as the least-privilege cephx user, and a restore point is restored and
compared by whole-image hash."""
import grp
import os
import pwd
import random
import shutil
import stat
import subprocess
import tempfile

import pytest
import rbd

import cairn_testlib as lib
from deploylib import UNIT, Instance

MiB = 1 << 20


def _contents(deb):
    r = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True)
    return {line.split()[-1].lstrip(".") for line in r.stdout.splitlines()}


def _field(deb, name):
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_packages_hold_the_programs_the_unit_and_the_driver(packages):
    files = _contents(packages["cairn"])
    for f in ("/usr/bin/cairnd", "/usr/bin/cairn", "/usr/bin/cairn-certs", UNIT,
              "/usr/share/doc/cairn/examples/cairnd.conf.example",
              "/usr/share/doc/cairn/OPERATIONS.md"):
        assert f in files, f"{f} is not in the cairn package"
    depends = _field(packages["cairn"], "Depends")
    for lib_pkg in ("librbd1", "librados2", "liburing2", "libxxhash0", "libsystemd0", "libjemalloc2",
                    "adduser"):
        assert lib_pkg in depends, f"cairn does not depend on {lib_pkg}: {depends}"
    driver = _contents(packages["python3-cairn-cinder"])
    assert "/usr/lib/python3/dist-packages/cairn_cinder/driver.py" in driver
    assert _field(packages["python3-cairn-cinder"], "Architecture") == "all"
    for deb, synopsis in ((packages["cairn"], "cross-site replication of Ceph RBD volumes"),
                          (packages["python3-cairn-cinder"], "Cinder volume driver for Cairn")):
        assert _field(deb, "Description").splitlines()[0] == synopsis


def test_the_version_names_the_commit_it_was_built_from(packages):
    """Each build's version is newer than the last one's (apt upgrades a node)
    and names its commit: 0.1.0+git<commits>.<hash>."""
    def git(*args):
        return subprocess.run(["git", "-C", lib.ROOT, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    want = f"+git{git('rev-list', '--count', 'HEAD')}.{git('rev-parse', '--short=10', 'HEAD')}"
    for deb in packages.values():
        version = _field(deb, "Version")
        assert version.endswith(want), f"{deb}: version {version}, not ...{want}"
    older = f"{version.split('+')[0]}+git{int(git('rev-list', '--count', 'HEAD')) - 1}.0"
    assert subprocess.run(["dpkg", "--compare-versions", version, "gt", older]).returncode == 0


def test_the_example_configuration_is_the_documented_one(installed):
    """The package's example holds every key of docs/OPERATIONS.md's
    configuration, as documented there."""
    with open(os.path.join(lib.ROOT, "docs", "OPERATIONS.md")) as f:
        doc = f.read().split("```ini\n", 1)[1].split("```", 1)[0]
    with open("/usr/share/doc/cairn/examples/cairnd.conf.example") as f:
        example = f.read()
    assert example.endswith(doc), "deploy/cairnd.conf.example differs from docs/OPERATIONS.md"


def test_the_installed_unit_verifies_and_the_user_exists(installed):
    r = subprocess.run(["systemd-analyze", "verify", "cairnd@site-a.service"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "cairnd@" not in r.stderr, r.stderr
    # systemd's own score of the hardening: 0 (locked down) to 10 (none).
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", UNIT],
                       capture_output=True, text=True)
    exposure = [line for line in r.stdout.splitlines() if "Overall exposure level" in line]
    assert r.returncode == 0 and exposure, r.stdout + r.stderr
    assert float(exposure[0].split(":")[1].split()[0]) <= 3.5, exposure
    user = pwd.getpwnam("cairn")
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin", user
    assert grp.getgrnam("cairn").gr_gid == user.pw_gid
    grp.getgrnam("cairn-admin")
    st = os.stat("/var/lib/cairn")
    assert st.st_uid == user.pw_uid and stat.S_IMODE(st.st_mode) == 0o750
    st = os.stat("/etc/cairn")
    assert st.st_uid == 0 and st.st_gid == user.pw_gid and stat.S_IMODE(st.st_mode) == 0o750
    r = subprocess.run(["/usr/bin/python3", "-c", "import cairn_cinder.driver as d; "
                        "print(d.__file__)"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("/usr/lib/python3/dist-packages/"), r


@pytest.fixture
def keys(installed):
    """Certificates (made by the installed cairn-certs) and the cephx
    keyrings of client.cairn, where the cairn user reads them."""
    d = tempfile.mkdtemp(prefix="keys.", dir="/etc/cairn")
    shutil.chown(d, "root", "cairn")
    os.chmod(d, 0o750)
    for args in (["ca", d], ["cert", d, "site-a", "IP:127.0.0.1"],
                 ["cert", d, "site-b", "IP:127.0.0.1"]):
        subprocess.run(["/usr/bin/cairn-certs", *args], check=True, capture_output=True)
    yield d
    shutil.rmtree(d)


def _secure(path):
    shutil.chown(path, "root", "cairn")
    os.chmod(path, 0o640)


def test_two_instances_as_the_unit_says_replicate_and_restore(installed, keys, testbed):
    for f in os.listdir(keys):
        _secure(os.path.join(keys, f))
    for site in "ab":
        k = os.path.join(keys, f"client.cairn.{site}.keyring")
        shutil.copy(testbed[f"CAIRN_KEYRING_{site.upper()}"], k)
        _secure(k)
        shutil.copy(testbed[f"CEPH_CONF_{site.upper()}"], os.path.join(keys, f"ceph.{site}.conf"))
        _secure(os.path.join(keys, f"ceph.{site}.conf"))
    port = lib.free_port()
    name = f"deploy-{os.getpid()}"

    def common(site):
        return (f"[cairnd]\nsite = {site}\ncontrol_socket = /run/cairn/site-{site}.sock\n"
                f"control_group = cairn\nadmin_group = cairn-admin\n\n"
                f"[ceph]\nconf = {keys}/ceph.{site}.conf\nclient = cairn\n"
                f"keyring = {keys}/client.cairn.{site}.keyring\n\n"
                f"[tls]\nca = {keys}/ca.pem\ncert = {keys}/site-{site}.pem\n"
                f"key = {keys}/site-{site}.key\n\n")

    b_conf = (common("b") + "[peer site-a]\nsite = a\n\n"
              f"[sink]\nlisten = 127.0.0.1:{port}\nspool_dir = /var/lib/cairn/site-b/spool\n"
              "pools = rbd\nkeep_points = 0\n")
    a_conf = (common("a") + f"[volume {name}]\npool = rbd\nimage = {name}\n"
              f"target_image = {name}-standby\npeer = 127.0.0.1:{port}\npeer_name = site-b\n"
              "interval = 0\n")
    site_a = lib.Site(testbed["CEPH_CONF_A"])
    site_b = lib.Site(testbed["CEPH_CONF_B"])
    site_a.create(name, 48 * MiB)
    rng = random.Random(25)
    with rbd.Image(site_a.ioctx, name) as img:
        for i in range(6):
            img.write(rng.randbytes(MiB), rng.randrange(0, 47) * MiB)
    notify = tempfile.mkdtemp(prefix="cairn-notify.")
    os.chmod(notify, 0o755)
    started = []
    try:
        for site, conf in (("b", b_conf), ("a", a_conf)):
            inst = Instance(f"site-{site}", conf, notify)
            started.append(inst)
            msg = inst.wait_said("READY=1", inst.unit.seconds("timeoutstartsec"))
            assert f"MAINPID={inst.proc.pid}" in msg, msg
            sock = os.stat(f"/run/cairn/site-{site}.sock")
            assert sock.st_uid == pwd.getpwnam("cairn").pw_uid
            assert stat.S_IMODE(sock.st_mode) == 0o660
        a, b = started[1], started[0]
        seq = a.cli("replicate", name, "--wait", "--timeout", "120")["seq"]
        point = [p for p in b.cli("points", name) if p["seq"] == seq][0]
        assert site_b.digest(point["image"], point["snap"]) == site_a.digest(name, f"cairn.{seq}")
        restored = b.cli("restore", name, str(seq), "--to", f"{name}-restored", "--full")
        assert restored["seq"] == seq
        assert site_b.digest(f"{name}-restored") == site_a.digest(name, f"cairn.{seq}")
    finally:
        for inst in started:
            inst.stop()
        shutil.rmtree(notify, ignore_errors=True)
        site_a.remove_all(name)
        site_b.remove_all(name)
    for inst in started:
        assert inst.proc.returncode == 0, f"cairnd@{inst.name} exited {inst.proc.returncode}"
