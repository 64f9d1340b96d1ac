"""Real OpenStack Cinder services for the end-to-end test: a private
RabbitMQ, a private PostgreSQL, cinder-api (noauth), cinder-scheduler and
cinder-volume with Cairn's driver, all from Debian's packages, on loopback,
in one directory.

Why PostgreSQL and not sqlite: the three Cinder services share one database
and write to it concurrently (cinder-volume and cinder-scheduler heartbeat
every report_interval). oslo.db opens sqlite transactions with a deferred
BEGIN, and a sqlite transaction that has read and then writes while another
process holds the write lock fails at once with "database is locked" (SQLite
does not wait on its busy timeout there: that could deadlock). A volume create
(quota_reserve reads, then inserts) that overlapped a heartbeat was an HTTP
500. Cinder supports sqlite for unit tests only; a real server has row locks.

Nothing is installed system-wide and nothing outside `workdir` is written,
except PostgreSQL's data directory when running as root: the server refuses
root, so it runs as the `postgres` user from a directory of its own in the
temporary directory (workdir's parents are private), removed by stop().
Every process is started in a session of its own and stopped by process
group (cinder-volume forks a child per backend, postgres one per backend
connection); epmd, which daemonizes out of RabbitMQ's group, is found by its
private port in its environment.
"""
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import cairn_testlib as lib

PY = "/usr/bin/python3"


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pg_bin(name):
    """A PostgreSQL server program (Debian keeps them out of PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed "
                           "(/usr/lib/postgresql/*/bin): run ./deps.sh --cinder")
    return found[-1]


class CinderServices:
    BACKEND = "cairn"
    HOST = "cairn-host"
    # Loopback ports from base_port on: RabbitMQ, its distribution port, epmd,
    # cinder-api, PostgreSQL.
    PORTS = 5
    PG_USER = "cinder"

    def __init__(self, workdir, base_port, conf_a, conf_b, socket_a, socket_b, pool="rbd"):
        self.dir = workdir
        self.rabbit_port = base_port
        self.api_port = base_port + 3
        self.epmd_port = base_port + 2
        self.pg_port = base_port + 4
        self.pg_data = None
        self.pg_owner = None  # (uid, gid) the server runs as; None: as we are
        self.conf_a, self.conf_b = conf_a, conf_b
        self.socket_a, self.socket_b = socket_a, socket_b
        self.pool = pool
        self.procs = {}
        os.makedirs(os.path.join(workdir, "log"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "state"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "locks"), exist_ok=True)
        self.conf = os.path.join(workdir, "cinder.conf")

    # -- processes -------------------------------------------------------------

    def _spawn(self, name, argv, env=None, cwd=None, owner=None):
        with open(os.path.join(self.dir, "log", f"{name}.out"), "w") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=cwd or self.dir, env={**os.environ, **(env or {})},
                                 start_new_session=True, **self._as(owner))
        self.procs[name] = p
        return p

    @staticmethod
    def _as(owner):
        if owner is None:
            return {}
        return {"user": owner[0], "group": owner[1], "extra_groups": []}

    # -- PostgreSQL ------------------------------------------------------------

    def _start_postgres(self, timeout):
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("no `postgres` user to run PostgreSQL as (it refuses "
                                   "root): run ./deps.sh --cinder") from None
            self.pg_owner = (pw.pw_uid, pw.pw_gid)
            self.pg_data = tempfile.mkdtemp(prefix="cairn-cinder-pg-")
            os.chown(self.pg_data, *self.pg_owner)
        else:
            self.pg_data = os.path.join(self.dir, "pgdata")
            os.makedirs(self.pg_data, mode=0o700)
        r = subprocess.run([_pg_bin("initdb"), "-D", self.pg_data, "-U", self.PG_USER,
                            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                           capture_output=True, text=True, timeout=120, cwd=self.pg_data,
                           **self._as(self.pg_owner))
        if r.returncode != 0:
            raise RuntimeError(f"initdb {self.pg_data} failed:\n{r.stdout}{r.stderr}")
        # Loopback TCP only (no socket directory to share with the postgres
        # user); a throwaway database needs no durability.
        self._spawn("postgresql", [
            _pg_bin("postgres"), "-D", self.pg_data, "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.pg_port}", "-c", "unix_socket_directories=",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200"], cwd=self.pg_data, owner=self.pg_owner)
        import psycopg2

        def created():
            self._died("postgresql")
            conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=self.PG_USER,
                                    dbname="postgres", connect_timeout=5)
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = 'cinder'")
                    if cur.fetchone() is None:
                        cur.execute("CREATE DATABASE cinder")
            finally:
                conn.close()
            return True
        try:
            lib.wait_for(f"PostgreSQL accepting connections on 127.0.0.1:{self.pg_port} "
                         "and the cinder database created", created, timeout=timeout,
                         interval=0.2)
        except TimeoutError as e:
            raise RuntimeError(f"{e}\n{self.log_tail('postgresql')}") from None

    def _db_url(self):
        return f"postgresql+psycopg2://{self.PG_USER}@127.0.0.1:{self.pg_port}/cinder"

    def _rabbit_env(self):
        return {
            "HOME": self.dir,
            "RABBITMQ_NODENAME": f"cairn{self.rabbit_port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.rabbit_port),
            "RABBITMQ_DIST_PORT": str(self.rabbit_port + 1),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq"),
            "RABBITMQ_PID_FILE": os.path.join(self.dir, "rabbitmq.pid"),
        }

    def write_conf(self, extra_backend=""):
        d = self.dir
        text = f"""[DEFAULT]
auth_strategy = noauth
transport_url = rabbit://guest:guest@127.0.0.1:{self.rabbit_port}/
enabled_backends = {self.BACKEND}
host = {self.HOST}
my_ip = 127.0.0.1
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {self.api_port}
osapi_volume_workers = 1
state_path = {d}/state
log_dir = {d}/log
report_interval = 2
periodic_interval = 5
scheduler_driver_init_wait_time = 3
debug = false

[database]
connection = {self._db_url()}

[oslo_concurrency]
lock_path = {d}/locks

[coordination]
backend_url = file://{d}/locks

[{self.BACKEND}]
volume_driver = cairn_cinder.driver.CairnRBDDriver
volume_backend_name = {self.BACKEND}
rbd_ceph_conf = {self.conf_a}
rbd_user = admin
rbd_pool = {self.pool}
replication_device = backend_id:site-b,conf:{self.conf_b},user:admin
cairn_control_socket = {self.socket_a}
cairn_standby_control_socket = {self.socket_b}
{extra_backend}"""
        with open(self.conf, "w") as f:
            f.write(text)

    def start(self, timeout=120):
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        self._spawn("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], self._rabbit_env())
        self._start_postgres(timeout=60)
        self.write_conf()
        r = subprocess.run(["cinder-manage", "--config-file", self.conf, "db", "sync"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"cinder-manage db sync failed: {r.stderr[-2000:]}\n"
                               f"{self.log_tail('cinder-manage')}")
        lib.wait_for(f"RabbitMQ listening on 127.0.0.1:{self.rabbit_port}",
                     lambda: _port_open(self.rabbit_port) or self._died("rabbitmq"),
                     timeout=60, interval=0.2)
        env = {"PYTHONPATH": lib.SHIM}
        for name in ("cinder-api", "cinder-scheduler", "cinder-volume"):
            self._spawn(name, [PY, f"/usr/bin/{name}", "--config-file", self.conf], env)
        lib.wait_for(f"cinder-api on 127.0.0.1:{self.api_port}",
                     lambda: _port_open(self.api_port) or self._died("cinder-api"),
                     timeout=timeout, interval=0.2)
        lib.wait_for("cinder-volume reporting up",
                     lambda: self._volume_up() or self._died("cinder-volume"),
                     timeout=timeout, interval=0.5)
        # A create is scheduled on the pools the scheduler knows, from the
        # capabilities cinder-volume publishes: until it has them, a volume
        # goes to error with "No valid backend".
        try:
            lib.wait_for(f"cinder-scheduler knowing pool {self.pool_name()} with replication",
                         lambda: self._pool_known() or self._died("cinder-scheduler")
                         or self._died("cinder-volume"),
                         timeout=timeout, interval=0.5)
        except TimeoutError as e:
            r = self.cli("get-pools", "--detail", check=False)
            raise RuntimeError(f"{e}\n{r.stdout}{r.stderr}\n{self.logs()}") from None
        return self

    def pool_name(self):
        return f"{self.HOST}@{self.BACKEND}#{self.BACKEND}"

    def _pool_known(self):
        r = self.cli("get-pools", "--detail", check=False)
        if r.returncode != 0 or self.pool_name() not in r.stdout:
            return False
        return re.search(r"\|\s*replication_enabled\s*\|\s*True\s*\|", r.stdout) is not None

    def _died(self, name):
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")
        return False

    def _volume_up(self):
        r = self.cli("service-list", "--binary", "cinder-volume", check=False)
        return r.returncode == 0 and " up " in r.stdout

    def log_tail(self, name, n=40):
        out = []
        for fname in (f"{name}.out", f"{name}.log"):
            path = os.path.join(self.dir, "log", fname)
            if os.path.exists(path) and os.path.getsize(path):
                with open(path, errors="replace") as f:
                    out += [f"--- {fname} ---"] + f.read().splitlines()[-n:]
        return "\n".join(out)

    def logs(self, n=40, request_id=None):
        """What went on in the services: the cinder-api log's lines of
        request_id (its error, if it failed), then the tails of cinder-api's,
        cinder-scheduler's and cinder-volume's logs."""
        out = []
        path = os.path.join(self.dir, "log", "cinder-api.log")
        if request_id and os.path.exists(path):
            with open(path, errors="replace") as f:
                lines = [line[:1000] for line in f if request_id in line]
            out += [f"--- cinder-api.log, lines of {request_id} ---"] + lines[-n:]
        for name in ("cinder-api", "cinder-scheduler", "cinder-volume"):
            out.append(self.log_tail(name, n))
        return "\n".join(x.rstrip("\n") for x in out if x)

    def stop(self):
        for name in ("cinder-volume", "cinder-scheduler", "cinder-api", "rabbitmq",
                     "postgresql"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            try:
                # postgres: SIGINT is its fast shutdown (SIGTERM waits for clients).
                os.killpg(p.pid, signal.SIGINT if name == "postgresql" else signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            # Children left in the group (cinder-volume's per-backend child).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # epmd daemonized out of RabbitMQ's group: ours has our private port.
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() != "epmd":
                        continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"ERL_EPMD_PORT={self.epmd_port}".encode() in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        if self.pg_data and self.pg_owner is not None:
            shutil.rmtree(self.pg_data, ignore_errors=True)
            self.pg_data = None

    # -- the cinder CLI -----------------------------------------------------------

    def env(self):
        return {**os.environ, "OS_AUTH_TYPE": "noauth", "OS_USER_ID": "admin",
                "OS_PROJECT_ID": "admin",
                "CINDER_ENDPOINT": f"http://127.0.0.1:{self.api_port}/v3",
                "OS_VOLUME_API_VERSION": "3.70"}

    def cli(self, *args, check=True, timeout=120):
        r = subprocess.run([PY, "/usr/bin/cinder", *args], capture_output=True, text=True,
                           env=self.env(), timeout=timeout)
        if check and r.returncode != 0:
            m = re.search(r"Request-ID: (req-[0-9a-f-]+)", r.stderr)
            raise RuntimeError(f"cinder {' '.join(args)} exited {r.returncode}: {r.stderr}"
                               f"\n{self.logs(request_id=m and m.group(1))}")
        return r

    def show(self, kind, ident):
        """`cinder KIND-show ID` as a dict of its Property | Value table."""
        out = {}
        for line in self.cli(f"{kind}-show" if kind else "show", ident).stdout.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 4 and cells[1] and cells[1] != "Property":
                out[cells[1]] = cells[2]
        return out
