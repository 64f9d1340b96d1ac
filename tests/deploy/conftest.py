"""Fixtures for the deployment tests: the Debian packages built from this
checkout (test.sh runs cpack into build/packages, or CAIRN_PACKAGES=DIR),
installed for real with dpkg, and the two-site Ceph test bed
(CAIRN_TESTBED=DIR, started by test.sh)."""
import glob
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import cairn_testlib as lib  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="session")
def packages():
    """{package name: path} of the .deb files built from this checkout."""
    d = os.environ.get("CAIRN_PACKAGES", os.path.join(REPO, "build", "packages"))
    debs = {}
    for path in glob.glob(os.path.join(d, "*.deb")):
        name = subprocess.run(["dpkg-deb", "-f", path, "Package"], capture_output=True,
                              text=True, check=True).stdout.strip()
        if name in debs:
            pytest.fail(f"two builds of {name} in {d} ({debs[name]}, {path}): remove the "
                        f"older (test.sh empties {d} before cpack)")
        debs[name] = path
    if set(debs) != {"cairn", "python3-cairn-cinder"}:
        pytest.fail(f"expected the cairn and python3-cairn-cinder packages in {d} "
                    f"(cpack --config build/CPackConfig.cmake -B {d}); found {sorted(debs)}")
    return debs


@pytest.fixture(scope="session")
def installed(packages):
    """The packages, installed on this machine with dpkg (as root)."""
    if os.geteuid() != 0:
        pytest.fail("the deployment tests install packages: run them as root (CI does)")
    r = subprocess.run(["dpkg", "-i", *packages.values()], capture_output=True, text=True)
    assert r.returncode == 0, f"dpkg -i failed:\n{r.stdout}\n{r.stderr}"
    return packages


@pytest.fixture(scope="session")
def testbed():
    given = os.environ.get("CAIRN_TESTBED")
    if not given:
        pytest.fail("set CAIRN_TESTBED to a running test bed (tests/cluster/testbed.sh start DIR)")
    out = {}
    with open(os.path.join(given, "env")) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.strip().split("=", 1)
                out[k] = v.strip('"')
    return out
