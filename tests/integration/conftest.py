"""Fixtures for the integration tests: two real Ceph clusters (site A and
site B) started on loopback by tests/cluster/testbed.sh, and real cairnd
processes. Set CAIRN_TESTBED=DIR to use a test bed that is already running
(it is then left running)."""
import os
import random
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import cairn_testlib as lib  # noqa: E402


def pytest_collection_finish(session):
    """Refuses a session that also collected tests/cinder: its conftest
    imports cinder.tests.unit, which monkey-patches threading with eventlet,
    and the threads of these tests (guest writers, fault proxies, clients)
    then run as greenlets in one OS thread. A librbd call never yields, so
    a thread that loops on librbd starves the test for good (seen:
    test_no_write_is_lost_... hung), and every timing is off. test.sh runs
    the two directories as two sessions."""
    try:
        from eventlet import patcher
    except ImportError:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    ours = any(str(item.fspath).startswith(here + os.sep) for item in session.items)
    if ours and patcher.is_monkey_patched("thread"):
        raise pytest.UsageError(
            "tests/integration cannot run in a session that loaded eventlet's monkey patching "
            "(tests/cinder's conftest does): run `pytest tests/integration` and "
            "`pytest tests/cinder` as two sessions, as test.sh does")


def _env(path):
    out = {}
    with open(path) as f:
        for line in f:
            if "=" in line:
                k, v = line.strip().split("=", 1)
                out[k] = v.strip('"')
    return out


@pytest.fixture(scope="session")
def testbed():
    given = os.environ.get("CAIRN_TESTBED")
    if given:
        yield _env(os.path.join(given, "env"))
        return
    d = tempfile.mkdtemp(prefix="cairn-it-")
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


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path)


@pytest.fixture
def daemons(name):  # needs `name` so that daemons stop before its images go
    started = []

    def start(d):
        started.append(d)
        return d.start()

    yield start
    for d in reversed(started):
        d.stop()


@pytest.fixture
def name(request, site_a, site_b):
    """A name unique to this test run, for images and volume ids. Every
    image whose name starts with it is removed from both sites afterwards
    (after the daemons stopped), so the memstores do not fill up, and so
    is every registration of a volume named so."""
    n = f"{request.node.name[5:29]}-{os.getpid()}".replace("[", "-").replace("]", "")
    yield n
    for site in (site_a, site_b):
        site.forget_registrations(n)
        site.remove_all(n)


@pytest.fixture(autouse=True)
def healthy_testbed(testbed):
    """Fails fast, with the reason, if an OSD is (nearly) full or a daemon
    died: a full memstore makes every client call hang instead."""
    d = os.path.dirname(os.path.dirname(testbed["CEPH_CONF_A"]))  # DIR/a/ceph.conf
    r = subprocess.run([lib.TESTBED, "check", d], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"test bed is not healthy:\n{r.stdout}{r.stderr}")
