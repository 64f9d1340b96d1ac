"""deploy/ansible for real: ansible-playbook (Debian's ansible) runs the
roles against this machine for both sites of the test bed (connection
local): the package built from this checkout, the least-privilege cephx
user made on each cluster, the TLS material, the configuration, the Cinder
backend. Then cairnd starts exactly as the installed unit's ExecStart
says, for each site, replicates a volume from A to B, and a restore point
is restored and compared by hash. A second run changes nothing, and
ansible-lint finds nothing."""
import configparser
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import urllib.request

import rbd

import cairn_testlib as lib
from deploylib import Instance

ANSIBLE = os.path.join(lib.ROOT, "deploy", "ansible")
MiB = 1 << 20


def _inventory(d, testbed, pki, ports, name, cinder_conf, packages):
    deb, driver = packages["cairn"], packages["python3-cairn-cinder"]
    ceph_user = f"cairn-ansible-{os.getpid()}"
    hosts = {}
    for site, other in (("a", "b"), ("b", "a")):
        up = site.upper()
        hosts[f"site-{site}"] = {
            "ansible_connection": "local",
            "cairn_site": site,
            "cairn_package_deb": deb,
            "cairn_control_socket": f"/run/cairn/site-{site}.sock",
            "cairn_ceph_user": ceph_user,
            "cairn_ceph_conf": f"/etc/cairn/site-{site}/ceph.conf",
            "cairn_cephx_conf_source": testbed[f"CEPH_CONF_{up}"],
            "cairn_cephx_admin_conf": testbed[f"CEPH_CONF_{up}"],
            "cairn_cephx_admin_keyring": testbed[f"CEPH_KEYRING_{up}"],
            "cairn_cephx_pools": ["rbd"],
            "cairn_tls_source_dir": pki,
            "cairn_sink_listen": f"127.0.0.1:{ports[site]}",
            "cairn_metrics_listen": f"127.0.0.1:{ports['metrics-' + site]}",
            "cairn_sink_pools": ["rbd"],
            "cairn_sink_keep_points": 1,
            "cairn_peers": [{"name": f"site-{other}", "site": other, "pools": ["rbd"]}],
            "cairn_source_pools": ["rbd"],
            "cairn_source_peer": f"127.0.0.1:{ports[other]}",
            "cairn_source_peer_name": f"site-{other}",
            "cairn_source_interval": "0",
            "cairn_source_retention": {"keep_points": 2, "retention": "1d*7",
                                       "snapshot_retention": "1h*24"},
            "cairn_volumes": [] if site == "b" else [
                {"id": name, "pool": "rbd", "image": name, "target_image": name + "-standby",
                 "interval": "0", "keep_points": 2}],
        }
    inv = {"all": {"children": {
        "cairn_nodes": {"hosts": hosts},
        "cinder_volume": {"hosts": {"cinder-a": {
            "ansible_connection": "local", "cairn_cinder_site": "a",
            "cairn_cinder_peer_site": "b", "cairn_cinder_conf": cinder_conf,
            "cairn_cinder_package_deb": driver, "cairn_cinder_rbd_pool": "rbd",
            "cairn_cinder_rbd_ceph_conf": "/etc/ceph/site-a.conf"}}},
    }}}
    path = os.path.join(d, "hosts.yml")
    with open(path, "w") as f:
        json.dump(inv, f)  # JSON is YAML
    return path, ceph_user


def _playbook(inventory):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ANSIBLE, "ansible.cfg"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=os.path.dirname(inventory))
    # One host at a time: the two sites' hosts are this one machine, and
    # two dpkg runs at once would collide on its lock.
    r = subprocess.run(["ansible-playbook", "--forks", "1", "-i", inventory,
                        os.path.join(ANSIBLE, "playbooks", "site.yml")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"ansible-playbook failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    recap = {m.group(1): int(m.group(2)) for m in
             re.finditer(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)", r.stdout, re.M)}
    assert set(recap) == {"site-a", "site-b", "cinder-a"}, r.stdout[-3000:]
    return recap, r.stdout


def test_the_roles_deploy_both_sites_and_a_second_run_changes_nothing(packages, testbed):
    work = tempfile.mkdtemp(prefix="cairn-ansible.")
    os.chmod(work, 0o755)  # cairnd (user cairn) reaches its notify socket here
    pki = os.path.join(work, "pki")
    for args in (["ca", pki], ["cert", pki, "site-a", "IP:127.0.0.1"],
                 ["cert", pki, "site-b", "IP:127.0.0.1"]):
        subprocess.run([lib.CERTS, *args], check=True, capture_output=True)
    cinder_conf = os.path.join(work, "cinder.conf")
    with open(cinder_conf, "w") as f:
        f.write("[DEFAULT]\nenabled_backends = lvm\n\n[lvm]\nvolume_driver = x\n")
    ports = {k: lib.free_port() for k in ("a", "b", "metrics-a", "metrics-b")}
    name = f"ansible-{os.getpid()}"
    inventory, ceph_user = _inventory(work, testbed, pki, ports, name, cinder_conf, packages)
    site_a = lib.Site(testbed["CEPH_CONF_A"])
    site_b = lib.Site(testbed["CEPH_CONF_B"])
    # The packages as Ansible installs them, not as an earlier test did.
    subprocess.run(["dpkg", "--purge", "cairn", "python3-cairn-cinder"], capture_output=True)
    started = []
    try:
        first, out = _playbook(inventory)
        assert first["site-a"] > 0 and first["cinder-a"] > 0, out[-3000:]
        again, out = _playbook(inventory)
        assert again == {"site-a": 0, "site-b": 0, "cinder-a": 0}, out[-6000:]

        # The cephx user has the least-privilege caps, on both clusters.
        for site in "ab":
            r = subprocess.run(
                ["ceph", "--conf", testbed[f"CEPH_CONF_{site.upper()}"], "--keyring",
                 testbed[f"CEPH_KEYRING_{site.upper()}"], "--name", "client.admin", "auth",
                 "get", f"client.{ceph_user}", "--format", "json"],
                capture_output=True, text=True, check=True)
            caps = json.loads(r.stdout)[0]["caps"]
            assert caps == {"mon": "profile rbd", "osd": "profile rbd pool=rbd"}, caps
            st = os.stat(f"/etc/cairn/site-{site}/ceph.client.{ceph_user}.keyring")
            assert oct(st.st_mode & 0o777) == "0o640"

        # The Cinder backend, beside the one already there.
        cp = configparser.ConfigParser(interpolation=None)
        cp.read(cinder_conf)
        assert cp["DEFAULT"]["enabled_backends"] == "lvm,cairn"
        assert cp["cairn"]["volume_driver"] == "cairn_cinder.driver.CairnRBDDriver"
        assert cp["cairn"]["replication_device"].startswith("backend_id:site-b,")
        assert cp["cairn"]["cairn_standby_control_socket"] == "/run/cairn/site-b.sock"

        # Retention rules of the volume's own and of registered volumes.
        conf = configparser.ConfigParser(interpolation=None)
        conf.read("/etc/cairn/site-a.conf")
        assert conf[f"volume {name}"]["keep_points"] == "2"
        assert (conf["source"]["keep_points"], conf["source"]["retention"],
                conf["source"]["snapshot_retention"]) == ("2", "1d*7", "1h*24")

        # cairnd at each site, exactly as the installed unit starts it.
        site_a.create(name, 32 * MiB)
        rng = random.Random(26)
        with rbd.Image(site_a.ioctx, name) as img:
            for _ in range(5):
                img.write(rng.randbytes(MiB), rng.randrange(0, 31) * MiB)
        for site in "ba":
            inst = Instance(f"site-{site}", None, work)
            started.append(inst)
            inst.wait_said("READY=1", inst.unit.seconds("timeoutstartsec"))
        a = started[1]
        b = started[0]
        seqs = []
        for offset in range(3):
            with rbd.Image(site_a.ioctx, name) as img:
                img.write(rng.randbytes(MiB), offset * MiB)
            seqs.append(a.cli("replicate", name, "--wait", "--timeout", "120")["seq"])
        seq = seqs[-1]
        # Its own rule (keep_points 2) beside the sink's (1).
        point = lib.wait_for(
            f"site B keeping points {seqs[1:]} of {name} (its keep_points = 2)",
            lambda: (lambda ps: ps[-1] if [p["seq"] for p in ps] == seqs[1:] else None)(
                b.cli("points", name)), 60)
        assert site_b.digest(point["image"], point["snap"]) == site_a.digest(name, f"cairn.{seq}")
        restored = b.cli("restore", name, str(seq), "--to", f"{name}-restored", "--full")
        assert site_b.digest(restored["image"]) == site_a.digest(name, f"cairn.{seq}")
        # And its metrics, where the role put them.
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics-b']}/metrics",
                                    timeout=10) as r:
            page = r.read().decode()
        assert f'cairn_volume_last_point_seq{{site="b",volume="{name}",role="sink"}} {seq}' \
            in page, page[:2000]
    finally:
        stopped = [_quietly(inst.stop) for inst in started]
        site_a.remove_all(name)
        site_b.remove_all(name)
        for site in "ab":
            os.remove(f"/etc/cairn/site-{site}.conf") if os.path.exists(
                f"/etc/cairn/site-{site}.conf") else None
            shutil.rmtree(f"/etc/cairn/site-{site}", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    for inst, err in zip(started, stopped):
        assert err is None, f"cairnd@{inst.name} did not stop as the unit says: {err}"
        assert inst.proc.returncode == 0, f"cairnd@{inst.name} exited {inst.proc.returncode}"


def _quietly(fn):
    """Runs fn; returns what it raised (None if nothing), so that one
    failed stop does not leave the rest running."""
    try:
        fn()
    except BaseException as e:  # noqa: B902 (pytest.fail raises a BaseException)
        return e
    return None


def test_ansible_lint_finds_nothing():
    r = subprocess.run(["ansible-lint", "--offline", "--nocolor", "playbooks/site.yml"],
                       cwd=ANSIBLE, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, ANSIBLE_CONFIG=os.path.join(ANSIBLE, "ansible.cfg")))
    assert r.returncode == 0, f"ansible-lint:\n{r.stdout}\n{r.stderr}"
