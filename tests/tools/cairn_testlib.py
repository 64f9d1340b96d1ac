"""Shared helpers for Cairn's integration tests, demo and benchmarks.

Real parts only: python3-rbd/python3-rados against the clusters started by
tests/cluster/testbed.sh, real cairnd processes, the real `cairn` CLI.
Waiting is always on a condition with a deadline and a message that says
what did not happen; never a bare sleep.
"""
import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import rados
import rbd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("CAIRN_BUILD", os.path.join(ROOT, "build"))
CAIRND = os.path.join(BUILD, "engine", "cairnd")
CAIRN = os.path.join(BUILD, "engine", "cairn")
TESTBED = os.path.join(ROOT, "tests", "cluster", "testbed.sh")
SHIM = os.path.join(ROOT, "cinder_driver_shim")  # cairn_cinder: frames, control client
CERTS = os.path.join(ROOT, "deploy", "cairn-certs")

_pki = None


def pki():
    """The certificates of this test run, made once by deploy/cairn-certs:
    DIR/ca.pem with site-a and site-b (both name 127.0.0.1 and localhost),
    and DIR/rogue/, another CA with its own site-a."""
    global _pki
    if _pki is None:
        d = tempfile.mkdtemp(prefix="cairn-pki.")
        atexit.register(shutil.rmtree, d, True)
        for args in (["ca", d], ["cert", d, "site-a", "IP:127.0.0.1", "DNS:localhost"],
                     ["cert", d, "site-b", "IP:127.0.0.1", "DNS:localhost"],
                     ["ca", f"{d}/rogue", "--name", "Rogue CA"],
                     ["cert", f"{d}/rogue", "site-a", "IP:127.0.0.1", "DNS:localhost"]):
            subprocess.run([CERTS, *args], check=True, capture_output=True, text=True)
        _pki = d
    return _pki


def ceph_config(conf, extra=""):
    """The [ceph] section of a cairnd on the cluster of `conf`: as the
    least-privilege user client.cairn (mon and osd 'profile rbd') that
    testbed.sh start makes at each site, never client.admin."""
    keyring = os.path.join(os.path.dirname(conf), "ceph.client.cairn.keyring")
    return f"[ceph]\nconf = {conf}\nclient = cairn\nkeyring = {keyring}\n{extra}\n"


def tls_config(site, pki_dir=None):
    """The [tls] section of site `site`'s cairnd: mutual TLS with the
    certificate of site-<site>."""
    d = pki_dir or pki()
    return f"[tls]\nca = {d}/ca.pem\ncert = {d}/site-{site}.pem\nkey = {d}/site-{site}.key\n\n"


def grant_config(source_site, pools="", volumes=""):
    """A sink's [peer site-<source_site>] grant: that site's source may write
    `pools` (default: all of [sink] pools) and `volumes` (default: all)."""
    return (f"[peer site-{source_site}]\nsite = {source_site}\n"
            + (f"pools = {pools}\n" if pools else "")
            + (f"volumes = {volumes}\n" if volumes else "") + "\n")


def tls_client(sock, site="a", pki_dir=None, cert=True, server_name="127.0.0.1"):
    """`sock` wrapped in TLS 1.3 as cairnd's source does: it trusts DIR/ca.pem
    and presents site-<site>'s certificate (none if not `cert`)."""
    import ssl
    d = pki_dir or pki()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(f"{d}/ca.pem")
    if cert:
        ctx.load_cert_chain(f"{d}/site-{site}.pem", f"{d}/site-{site}.key")
    return ctx.wrap_socket(sock, server_hostname=server_name)


def tls_server_context(site="b", pki_dir=None):
    """A TLS 1.3 server context as cairnd's sink has: site-<site>'s
    certificate, and a client certificate from DIR/ca.pem required."""
    import ssl
    d = pki_dir or pki()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(f"{d}/site-{site}.pem", f"{d}/site-{site}.key")
    ctx.load_verify_locations(f"{d}/ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def other_site(site):
    return {"a": "b", "b": "a"}.get(site, "a")

BLOCK = 64 * 1024


def wait_for(what, predicate, timeout=60.0, interval=0.05):
    """Polls predicate() until it returns a truthy value; fails after timeout
    with a message naming what did not happen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the condition may not be checkable yet
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s"
                               + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


class Site:
    """One Ceph cluster: a rados connection and an ioctx on a pool."""

    def __init__(self, conf, pool="rbd"):
        self.conf = conf
        self.pool = pool
        # Deadlines on every call: a test bed daemon that died (a memstore
        # OSD once crashed in snapshot trimming) fails the test that needs
        # it instead of hanging the run. Outage tests freeze a cluster for
        # far less.
        self.cluster = rados.Rados(conffile=conf, conf={
            "admin_socket": "", "rados_osd_op_timeout": "300", "rados_mon_op_timeout": "300"})
        self.cluster.connect(timeout=30)
        self.ioctx = self.cluster.open_ioctx(pool)

    def close(self):
        self.ioctx.close()
        self.cluster.shutdown()

    def create(self, name, size):
        rbd.RBD().create(self.ioctx, name, size, old_format=False,
                         features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                         | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)

    def remove(self, name):
        with rbd.Image(self.ioctx, name) as img:
            for s in list(img.list_snaps()):
                if img.is_protected_snap(s["name"]):
                    img.unprotect_snap(s["name"])
                img.remove_snap(s["name"])
        rbd.RBD().remove(self.ioctx, name)

    def remove_all(self, prefix):
        """Removes every image named prefix*, clones before their parents."""
        left = [i for i in self.images() if i.startswith(prefix)]
        for _ in range(len(left) + 1):
            if not left:
                return
            still = []
            for image in left:
                try:
                    self.remove(image)
                except (rbd.ImageBusy, rbd.ImageHasSnapshots, rbd.InvalidArgument):
                    still.append(image)  # a clone of one of its snapshots is left
            left = still
        if left:
            raise RuntimeError(f"images not removed: {left}")

    def forget_registrations(self, prefix):
        """Drops the entries of volumes named prefix* from cairnd's registry
        (cairn.registry) in this pool: a test's cairnd stopped with them
        registered, and the next test's cairnd would start them."""
        with rados.ReadOpCtx() as op:
            keys, _ = self.ioctx.get_omap_vals(op, "", "volume/" + prefix, 10000)
            try:
                self.ioctx.operate_read_op(op, "cairn.registry")
            except rados.ObjectNotFound:
                return
            mine = [k for k, _ in keys if k.startswith("volume/" + prefix)]
        if mine:
            with rados.WriteOpCtx() as op:
                self.ioctx.remove_omap_keys(op, tuple(mine))
                self.ioctx.operate_write_op(op, "cairn.registry")

    def images(self):
        return rbd.RBD().list(self.ioctx)

    def snaps(self, name):
        with rbd.Image(self.ioctx, name, read_only=True) as img:
            return [s["name"] for s in img.list_snaps()]

    def group_snap_id(self, name, group_snap):
        """The id of image NAME's share of group snapshot GROUP_SNAP (its
        name in the group namespace is librbd's own, not GROUP_SNAP)."""
        with rbd.Image(self.ioctx, name, read_only=True) as img:
            for s in img.list_snaps():
                if s.get("namespace") == rbd.RBD_SNAP_NAMESPACE_TYPE_GROUP and \
                        s["group"]["snap_name"] == group_snap:
                    return s["id"]
        raise KeyError(f"{name} has no share of group snapshot {group_snap}")

    def digest(self, name, snap=None, snap_id=None):
        """Content hash of the whole image (holes read as zeros) and its size.

        Equal digests <=> equal sizes and equal bytes everywhere. Sparse-aware:
        the allocated extents (from diff_iterate, parents included) are read in
        64 KiB blocks and every block that is not all zeros enters the hash with
        its offset; holes and zero blocks contribute nothing on either side, so
        a 10 GiB sparse image hashes in the time of its data. snap_id: a
        snapshot by id (a group snapshot's share, which has no usable name)."""
        with rbd.Image(self.ioctx, name, snapshot=snap, read_only=True) as img:
            if snap_id is not None:
                img.set_snap_by_id(snap_id)
            size = img.size()
            blocks = set()

            def cb(offset, length, exists):
                if exists:
                    first = offset // BLOCK
                    last = (offset + length - 1) // BLOCK
                    blocks.update(range(first, last + 1))
                return 0

            img.diff_iterate(0, size, None, cb, include_parent=True, whole_object=False)
            h = hashlib.blake2b(digest_size=16)
            h.update(size.to_bytes(8, "little"))
            zero = bytes(BLOCK)
            for b in sorted(blocks):
                off = b * BLOCK
                n = min(BLOCK, size - off)
                data = img.read(off, n)
                if data != zero[:n]:
                    h.update(off.to_bytes(8, "little"))
                    h.update(data)
            return f"{h.hexdigest()}/{size}"


class Cairnd:
    """A real cairnd process with its own config file and control socket."""

    def __init__(self, workdir, name, config_text):
        self.workdir = workdir
        self.name = name
        os.makedirs(workdir, exist_ok=True)
        self.config = os.path.join(workdir, f"{name}.conf")
        self.socket = os.path.join(workdir, f"{name}.sock")
        self.log = os.path.join(workdir, f"{name}.log")
        with open(self.config, "w") as f:
            f.write(config_text.replace("@SOCKET@", self.socket))
        self.proc = None

    def start(self, timeout=30):
        logf = open(self.log, "a")
        self.proc = subprocess.Popen([CAIRND, "-c", self.config], stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"cairnd {self.name} answering on {self.socket}",
                 lambda: self._alive() and self.cli("status").returncode == 0, timeout)
        return self

    def _alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"cairnd {self.name} exited with {self.proc.returncode}:\n"
                               + self.log_tail())
        return True

    def log_tail(self, n=40):
        with open(self.log) as f:
            return "".join(f.readlines()[-n:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self):
        """SIGKILL, as a crash: no clean stop, nothing flushed. start() again
        (same config) brings it back."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()
        self.proc = None

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def cli(self, *args, check=False, timeout=600):
        r = subprocess.run([CAIRN, "--socket", self.socket, *args], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0 and self.proc is not None and self.proc.poll() is not None:
            # Died under the test (not stopped by it): say how, whatever
            # the caller expected of the command.
            raise RuntimeError(f"cairnd {self.name} died (exit {self.proc.returncode}) before "
                               f"`cairn {' '.join(args)}`\n--- {self.name} log ---\n"
                               f"{self.log_tail(80)}")
        if check and r.returncode != 0:
            raise RuntimeError(f"cairn {' '.join(args)} exited {r.returncode}: {r.stderr}"
                               f"{r.stdout}"
                               f"\n--- {self.name} log ---\n{self.log_tail()}")
        return r

    def json(self, *args):
        return json.loads(self.cli("--json", *args, check=True).stdout)


INSECURE = "[tls]\ninsecure = true\n\n"


def source_config(site, conf, peer_port, volumes, interval="0", keep=1000, extra="",
                  ceph_extra="", tls=True):
    """cairnd.conf of a source node; volumes: {id: (image, target_image)};
    extra: more "key = value" lines for every [volume] section; ceph_extra:
    for [ceph] (e.g. "op_timeout = 5s\n"). tls=False: plaintext links
    (insecure = true), only for the bench's TLS on/off row."""
    text = (f"[cairnd]\nsite = {site}\ncontrol_socket = @SOCKET@\n\n"
            + ceph_config(conf, ceph_extra) + (tls_config(site) if tls else INSECURE))
    for vid, (image, target) in volumes.items():
        text += (f"[volume {vid}]\npool = rbd\nimage = {image}\ntarget_image = {target}\n"
                 f"peer = 127.0.0.1:{peer_port}\ninterval = {interval}\n"
                 f"keep_snapshots = {keep}\n{extra}\n")
    return text


def sink_config(site, conf, port, spool_dir, pools="rbd", extra="", ceph_extra="", grants=None,
                tls=True):
    """cairnd.conf of a sink node; extra: more "key = value" lines for
    [sink] (e.g. "spool_max_bytes = 8M\n"); ceph_extra: for [ceph].
    Every point is kept (keep_points = 0) unless extra says otherwise: the
    tests compare each point with its source snapshot. grants: the [peer]
    sections (default: the other site's source may write anything). tls:
    as source_config's."""
    if "keep_points" not in extra:
        extra = "keep_points = 0\n" + extra
    if grants is None:
        grants = grant_config(other_site(site)) if tls else ""
    return (f"[cairnd]\nsite = {site}\ncontrol_socket = @SOCKET@\n\n"
            + ceph_config(conf, ceph_extra)
            + (tls_config(site) if tls else INSECURE) + grants +
            f"[sink]\nlisten = 127.0.0.1:{port}\nspool_dir = {spool_dir}\npools = {pools}\n"
            f"{extra}")


def free_port_block(n=4):
    """The first of n consecutive loopback ports that are free now."""
    import random as _random
    import socket
    for _ in range(200):
        base = _random.randrange(40000, 60000 - n)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_changes_on(img, rng, ops, size, max_len=512 * 1024):
    """Random writes, discards and zero-writes on an open rbd.Image, in the
    style of test_replication.random_changes (there the image is opened per
    call); max_len bounds each change."""
    for _ in range(ops):
        n = rng.randint(1, max_len)
        off = rng.randrange(0, size - n)
        kind = rng.random()
        if kind < 0.15:
            img.discard(off, n)
        elif kind < 0.3:
            img.write(bytes(n), off)
        else:
            img.write(rng.randbytes(n), off)


class GuestWriter:
    """A guest writing to a primary image in a thread: random_changes_on()
    `ops` changes every `period` seconds (pacing, not synchronisation).

    hold_open=True keeps the image open for the whole run, as a VM does
    (it then owns the image's exclusive lock); False opens it for every
    batch. `batches` counts completed batches; `max_batch_seconds` is the
    longest batch, so a stalled primary shows up. stop() joins the thread
    and re-raises what the writer hit.

    start(paused=True) opens the image (hold_open) and returns once it is
    open; the writes begin at go(). A VM's image is open before replication
    starts: a client that opens the image while it is being replicated
    costs an epoch of whole objects (the source cannot tell whether it
    wrote with a snapshot context that lacks the newest snapshot), which
    the tests that bound each point's size would misread."""

    def __init__(self, site, image, size, seed, ops=3, max_len=64 * 1024, period=0.1,
                 hold_open=True):
        import threading
        self.site, self.image, self.size = site, image, size
        self.rng = __import__("random").Random(seed)
        self.ops, self.max_len, self.period, self.hold_open = ops, max_len, period, hold_open
        self.batches = 0
        self.batch_ends = []  # wall-clock time each batch completed
        self.max_batch_seconds = 0.0
        self.errors = []
        self._stop = threading.Event()
        self._go = threading.Event()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"guest-writer-{image}",
                                        daemon=True)

    def start(self, paused=False, timeout=30):
        if not paused:
            self._go.set()
        self._thread.start()
        if paused and self.hold_open:
            wait_for(f"the guest writer opening {self.image}",
                     lambda: self._opened.is_set() or self.errors, timeout)
            if self.errors:
                raise self.errors[0]
        return self

    def go(self):
        self._go.set()

    def _run(self):
        try:
            if self.hold_open:
                with rbd.Image(self.site.ioctx, self.image) as img:
                    self._opened.set()
                    if not self._wait_go():
                        return
                    while not self._stop.wait(self.period):
                        t0 = time.monotonic()
                        random_changes_on(img, self.rng, self.ops, self.size, self.max_len)
                        self._done(t0)
            else:
                if not self._wait_go():
                    return
                while not self._stop.wait(self.period):
                    t0 = time.monotonic()
                    with rbd.Image(self.site.ioctx, self.image) as img:
                        random_changes_on(img, self.rng, self.ops, self.size, self.max_len)
                    self._done(t0)
        except Exception as e:  # re-raised by stop()
            self.errors.append(e)

    def _wait_go(self):
        """Waits for go() (paused start); False if stopped first."""
        while not self._go.wait(self.period):
            if self._stop.is_set():
                return False
        return True

    def _done(self, t0):
        self.max_batch_seconds = max(self.max_batch_seconds, time.monotonic() - t0)
        self.batch_ends.append(time.time())
        self.batches += 1

    def most_written(self, after, until):
        """At most how many bytes the batches that may have landed between
        wall-clock times AFTER and UNTIL wrote (a batch counts if it ended
        after AFTER and began before UNTIL; the slack covers its length)."""
        slack = self.period + self.max_batch_seconds + 1.0
        n = sum(1 for t in self.batch_ends if after < t < until + slack)
        return n * self.ops * self.max_len

    def stop(self, timeout=60):
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"guest writer on {self.image} did not stop within {timeout} s "
                               "(a write is blocked)")
        if self.errors:
            raise self.errors[0]


def site_daemon_pids(conf, kinds=("mon", "osd")):
    """PIDs of the test bed daemons (tests/cluster/testbed.sh) of the site
    whose ceph.conf is `conf`, from DIR/SITE/run/<kind>.<id>.pid: {"mon.a":
    PID, ...}. Each is checked to still run with that conf, so a reused PID
    is never signalled."""
    run = os.path.join(os.path.dirname(conf), "run")
    pids = {}
    for f in sorted(os.listdir(run)):
        if not f.endswith(".pid") or f.split(".")[0] not in kinds:
            continue
        with open(os.path.join(run, f)) as p:
            pid = int(p.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as c:
            args = c.read().split(b"\0")
        if os.fsencode(conf) not in args:
            raise RuntimeError(f"PID {pid} of {f} does not run with {conf}: {args}")
        pids[f[:-len(".pid")]] = pid
    if not pids:
        raise RuntimeError(f"no {kinds} pid files in {run}")
    return pids


class Frozen:
    """A context that freezes processes (SIGSTOP) and always thaws them
    (SIGCONT) on exit: a cluster that stops answering without closing a
    single connection, as a hung or partitioned site does. thaw() may be
    called earlier; `frozen_at`/`thawed_at` are time.monotonic() stamps,
    `thawed_wall` the time.time() of the thaw."""

    def __init__(self, pids):
        self.pids = list(pids)
        self.frozen_at = self.thawed_at = self.thawed_wall = None

    def __enter__(self):
        try:
            for pid in self.pids:
                os.kill(pid, signal.SIGSTOP)
        except BaseException:
            self.thaw()
            raise
        self.frozen_at = time.monotonic()
        return self

    def thaw(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if self.thawed_at is None:
            self.thawed_at = time.monotonic()
            self.thawed_wall = time.time()

    def __exit__(self, *exc):
        self.thaw()
        return False


def _ceph_json(conf, *args, timeout=30):
    r = subprocess.run(["ceph", "-c", conf, "--connect-timeout", "10", *args, "-f", "json"],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ceph {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def heal_laggy_pgs(conf, grace=10.0):
    """After a test bed OSD was frozen (SIGSTOP) longer than a PG read lease
    (16 s by default), a PG may stay `laggy` for good on Ceph 16 with one
    OSD per pool, every op on it parked: a Ceph limitation
    (ceph/ceph-container#1682), not a client's. Waits up to `grace` s for
    the laggy PGs to clear by themselves; any that stays is unstuck by
    marking the OSDs down (they re-peer and mark themselves up again within
    seconds). Returns the PGs that had to be unstuck ([] if none)."""
    def laggy():
        return [p["pgid"] for p in _ceph_json(conf, "pg", "ls", "laggy").get("pg_stats", [])]

    start = time.monotonic()
    clear = 0
    stuck = []
    while time.monotonic() - start < grace:
        time.sleep(1)  # PG states reach the mgr every second (mgr stats period)
        stuck = laggy()
        clear = clear + 1 if not stuck else 0
        if clear >= 2:
            return []
    if not stuck:
        return []
    osds = _ceph_json(conf, "osd", "ls")
    subprocess.run(["ceph", "-c", conf, "--connect-timeout", "10", "osd", "down",
                    *map(str, osds)], check=True, capture_output=True, timeout=30)

    def healthy():
        st = _ceph_json(conf, "status")
        m = st["osdmap"].get("osdmap", st["osdmap"])  # the layout differs between releases
        return m["num_up_osds"] == m["num_osds"] and not laggy()

    wait_for(f"the test bed OSDs re-peering laggy PGs {stuck}", healthy, timeout=60, interval=0.5)
    return stuck
