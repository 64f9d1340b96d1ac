"""Fixtures for the Cinder driver tests: the real python3-cinder classes
(Debian's, run with /usr/bin/python3), two real Ceph clusters from
tests/cluster/testbed.sh (CAIRN_TESTBED=DIR reuses a running one and leaves
it running) and real cairnd processes: a source at site A with a [source]
section (volumes are registered by the driver) and a sink at site B.

Nothing is faked: the driver talks librados/librbd to the clusters and the
control API to cairnd. Volumes are Cinder volume objects built with Cinder's
own test helpers (cinder.tests.unit.fake_volume), with no database."""
import os
import random
import subprocess
import sys
import tempfile
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import cairn_testlib as lib  # noqa: E402

if lib.SHIM not in sys.path:
    sys.path.insert(0, lib.SHIM)

from cinder import context as cinder_context  # noqa: E402
from cinder import objects  # noqa: E402

objects.register_all()

from cinder.tests.unit import fake_volume  # noqa: E402
from cinder.volume import configuration  # noqa: E402
from cinder.volume import driver as cinder_driver  # noqa: E402
from cinder.volume.drivers import rbd as cinder_rbd  # noqa: E402
from oslo_config import cfg  # noqa: E402

from cairn_cinder import driver as cairn_driver  # noqa: E402
from cairn_cinder import wire  # noqa: E402

CONF = cfg.CONF
REPLICATED = {"replication_enabled": "<is> True"}
BACKEND_ID = "site-b"


def _env(path):
    out = {}
    with open(path) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.strip().split("=", 1)
                out[k] = v.strip('"')
    return out


@pytest.fixture(scope="session")
def testbed():
    given = os.environ.get("CAIRN_TESTBED")
    if given:
        yield _env(os.path.join(given, "env"))
        return
    d = tempfile.mkdtemp(prefix="cairn-cinder-")
    port = int(os.environ.get("CAIRN_TEST_BASE_PORT", "0")) or random.randrange(20000, 40000, 1000)
    r = subprocess.run([lib.TESTBED, "start", d, "--base-port", str(port)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run([lib.TESTBED, "stop", d], capture_output=True)
        pytest.fail(f"test bed did not start:\n{r.stdout}\n{r.stderr}")
    try:
        yield _env(os.path.join(d, "env"))
    finally:
        subprocess.run([lib.TESTBED, "stop", d, "--purge"], capture_output=True)


@pytest.fixture(scope="session")
def site_a(testbed):
    s = lib.Site(testbed["CEPH_CONF_A"])
    yield s
    s.close()


@pytest.fixture(scope="session")
def site_b(testbed):
    s = lib.Site(testbed["CEPH_CONF_B"])
    yield s
    s.close()


@pytest.fixture(autouse=True)
def healthy_testbed(request):
    """For tests on the clusters: fails fast, with the reason, if an OSD is
    (nearly) full or a daemon died (a full memstore hangs clients)."""
    if "testbed" not in request.fixturenames:
        return
    tb = request.getfixturevalue("testbed")
    d = os.path.dirname(os.path.dirname(tb["CEPH_CONF_A"]))  # DIR/a/ceph.conf
    r = subprocess.run([lib.TESTBED, "check", d], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"test bed is not healthy:\n{r.stdout}{r.stderr}")


@pytest.fixture
def ctx():
    return cinder_context.get_admin_context()


def source_config(conf, peer_port, interval="1s", extra=""):
    """cairnd.conf of site A: no [volume] sections; the driver registers
    volumes in the [source] pools."""
    return (f"[cairnd]\nsite = a\ncontrol_socket = @SOCKET@\n\n" +
            lib.ceph_config(conf) + lib.tls_config("a") +
            f"[source]\npools = rbd\npeer = 127.0.0.1:{peer_port}\n"
            f"interval = {interval}\n{extra}")


class Sites:
    """The two cairnd processes of a test; not started until asked."""

    def __init__(self, testbed, workdir, interval="1s"):
        self.port = lib.free_port()
        self.source = lib.Cairnd(workdir, "source-a", source_config(
            testbed["CEPH_CONF_A"], self.port, interval))
        self.sink = lib.Cairnd(workdir, "sink-b", lib.sink_config(
            "b", testbed["CEPH_CONF_B"], self.port, f"{workdir}/spool"))

    def start(self):
        self.sink.start()
        self.source.start()
        return self

    def source_client(self):
        return wire.ControlClient(self.source.socket, timeout=60)

    def sink_client(self):
        return wire.ControlClient(self.sink.socket, timeout=60)

    def logs(self):
        out = []
        for d in (self.source, self.sink):
            if os.path.exists(d.log):
                out.append(f"--- {d.name} ---\n{d.log_tail(30)}")
        return "\n".join(out)


@pytest.fixture
def cairn(testbed, tmp_path, volumes):
    """cairnd at both sites (start() them). At the end: every volume this
    test made is unregistered (a source cairnd is started for that if it is
    not running), the daemons stop, and the volumes' images go from both
    sites."""
    sites = Sites(testbed, str(tmp_path))
    yield sites
    try:
        if volumes.made:
            if sites.source.proc is None or sites.source.proc.poll() is not None:
                sites.source.start()
            client = sites.source_client()
            for v in volumes.made:
                try:
                    client.unregister(v.id, remove_snapshots=True)
                except wire.CairnError:
                    pass
    finally:
        sites.source.stop()
        sites.sink.stop()


class Volumes:
    """Cinder volume objects of one test (volume-<uuid>), built with
    Cinder's fake_volume helpers; their images are removed from both sites
    afterwards (standby, promoted and kept images included)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.made = []

    def new(self, replicated=True, size_gib=1, metadata=None, specs=None):
        """specs: more extra specs of its volume type."""
        vtype = fake_volume.fake_volume_type_obj(
            self.ctx, id=str(uuid.uuid4()), name="cairn-replicated" if replicated else "plain",
            extra_specs={**(REPLICATED if replicated else {}), **(specs or {})})
        vol = fake_volume.fake_volume_obj(
            self.ctx, id=str(uuid.uuid4()), size=size_gib, volume_type_id=vtype.id,
            host="cinder@cairn#cairn", status="available")
        vol.volume_type = vtype
        if metadata:
            vol.metadata = dict(metadata)
        self.made.append(vol)
        return vol


@pytest.fixture
def volumes(ctx, request):
    sites = ([request.getfixturevalue("site_a"), request.getfixturevalue("site_b")]
             if "testbed" in request.fixturenames else [])
    vs = Volumes(ctx)
    yield vs
    for v in vs.made:
        for site in sites:
            site.remove_all(v.name)


@pytest.fixture
def make_driver(request):
    """A CairnRBDDriver configured like a cinder.conf backend section, its
    own config group per driver; do_setup and check_for_setup_error run
    (setup=False: neither, for tests without clusters)."""
    testbed = (request.getfixturevalue("testbed") if "testbed" in request.fixturenames
               else {"CEPH_CONF_A": "/nonexistent/a/ceph.conf",
                     "CEPH_CONF_B": "/nonexistent/b/ceph.conf"})

    def make(source_socket, standby_socket="", timeout=20.0, setup=True, **more):
        group = f"cairn_{uuid.uuid4().hex[:8]}"
        conf = configuration.Configuration(
            cinder_rbd.RBD_OPTS + cairn_driver.CAIRN_OPTS + cinder_driver.volume_opts,
            config_group=group)
        values = dict(
            volume_backend_name="cairn",
            rbd_pool="rbd", rbd_user="admin", rbd_ceph_conf=testbed["CEPH_CONF_A"],
            rados_connect_timeout=30,
            replication_device=[{"backend_id": BACKEND_ID, "conf": testbed["CEPH_CONF_B"],
                                 "user": "admin"}],
            cairn_control_socket=source_socket,
            cairn_standby_control_socket=standby_socket,
            cairn_timeout=timeout)
        values.update(more)
        for k, v in values.items():
            CONF.set_override(k, v, group=group)
        d = cairn_driver.CairnRBDDriver(configuration=conf, host="cinder@cairn")
        if setup:
            d.do_setup(cinder_context.get_admin_context())
            d.check_for_setup_error()
        return d

    return make


def pytest_configure(config):
    # Cinder 21's dependencies warn about their own deprecations by the dozen.
    for what in ("DeprecationWarning", "PendingDeprecationWarning"):
        config.addinivalue_line("filterwarnings", f"ignore::{what}")
    config.addinivalue_line("filterwarnings", "ignore::sqlalchemy.exc.SADeprecationWarning")
