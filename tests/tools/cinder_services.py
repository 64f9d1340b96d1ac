"""Real OpenStack Cinder services for the end-to-end test: a private
RabbitMQ, cinder-api (noauth), cinder-scheduler and cinder-volume with
Cairn's driver, all from Debian's packages, on loopback, in one directory.

Nothing is installed system-wide and nothing outside `workdir` is written.
Every process is started in a session of its own and stopped by process
group (cinder-volume forks a child per backend); epmd, which daemonizes out
of RabbitMQ's group, is found by its private port in its environment.
"""
import os
import signal
import socket
import subprocess
import time

import cairn_testlib as lib

PY = "/usr/bin/python3"


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class CinderServices:
    BACKEND = "cairn"
    HOST = "cairn-host"

    def __init__(self, workdir, base_port, conf_a, conf_b, socket_a, socket_b, pool="rbd"):
        self.dir = workdir
        self.rabbit_port = base_port
        self.api_port = base_port + 3
        self.epmd_port = base_port + 2
        self.conf_a, self.conf_b = conf_a, conf_b
        self.socket_a, self.socket_b = socket_a, socket_b
        self.pool = pool
        self.procs = {}
        os.makedirs(os.path.join(workdir, "log"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "state"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "locks"), exist_ok=True)
        self.conf = os.path.join(workdir, "cinder.conf")

    # -- processes -------------------------------------------------------------

    def _spawn(self, name, argv, env=None):
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = p
        return p

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
connection = sqlite:///{d}/state/cinder.sqlite

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
        self.write_conf()
        r = subprocess.run(["cinder-manage", "--config-file", self.conf, "db", "sync"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"cinder-manage db sync failed: {r.stderr[-2000:]}")
        lib.wait_for(f"RabbitMQ listening on 127.0.0.1:{self.rabbit_port}",
                     lambda: _port_open(self.rabbit_port) or self._died("rabbitmq"),
                     timeout=60, interval=0.2)
        env = {"PYTHONPATH": lib.SHIM}
        for name in ("cinder-api", "cinder-scheduler", "cinder-volume"):
            self._spawn(name, [PY, f"/usr/bin/{name}", "--config-file", self.conf], env)
        lib.wait_for(f"cinder-api on 127.0.0.1:{self.api_port}",
                     lambda: _port_open(self.api_port) or self._died("cinder-api"),
                     timeout=timeout, interval=0.2)
        lib.wait_for("cinder-volume reporting up with replication",
                     lambda: self._volume_up() or self._died("cinder-volume"),
                     timeout=timeout, interval=0.5)
        return self

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
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out += [f"--- {fname} ---"] + f.read().splitlines()[-n:]
        return "\n".join(out)

    def stop(self):
        for name in ("cinder-volume", "cinder-scheduler", "cinder-api", "rabbitmq"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
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
            raise RuntimeError(f"cinder {' '.join(args)} exited {r.returncode}: {r.stderr}"
                               f"\n{self.log_tail('cinder-volume')}")
        return r

    def show(self, kind, ident):
        """`cinder KIND-show ID` as a dict of its Property | Value table."""
        out = {}
        for line in self.cli(f"{kind}-show" if kind else "show", ident).stdout.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 4 and cells[1] and cells[1] != "Property":
                out[cells[1]] = cells[2]
        return out
