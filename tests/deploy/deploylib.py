"""cairnd run as its installed systemd unit says, on a machine without
systemd as PID 1: the test plays systemd's part (the user, the runtime
directory, the notify socket)."""
import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

UNIT = "/usr/lib/systemd/system/cairnd@.service"


class Unit:
    """The installed template unit, as systemd reads it (for instance
    `instance`)."""

    def __init__(self, instance):
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        cp.read(UNIT)
        self.svc = {k: v.replace("%i", instance) for k, v in cp["Service"].items()}
        assert self.svc["type"] == "notify", self.svc

    def argv(self):
        return self.svc["execstart"].split()

    def seconds(self, key):
        return float(self.svc[key].rstrip("s"))


class Instance:
    """cairnd@NAME started as systemd would start it: as User=/Group= with
    UMask=, its RuntimeDirectory made, NOTIFY_SOCKET set; ready when it
    says READY=1."""

    def __init__(self, name, config_text, notify_dir):
        """config_text: written to /etc/cairn/NAME.conf (and removed at
        stop); None: the file there (rendered by Ansible) is used."""
        self.name = name
        self.unit = Unit(name)
        self.conf = f"/etc/cairn/{name}.conf"
        self.wrote_conf = config_text is not None
        if self.wrote_conf:
            with open(self.conf, "w") as f:
                f.write(config_text)
            shutil.chown(self.conf, "root", "cairn")
            os.chmod(self.conf, 0o640)
        user = self.unit.svc["user"]
        run = f"/run/{self.unit.svc['runtimedirectory']}"
        os.makedirs(run, exist_ok=True)
        shutil.chown(run, user, self.unit.svc["group"])
        os.chmod(run, int(self.unit.svc["runtimedirectorymode"], 8))
        self.notify_path = os.path.join(notify_dir, f"notify-{name}")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        os.chmod(self.notify_path, 0o777)
        self.log = open(os.path.join(notify_dir, f"{name}.log"), "w")
        self.proc = subprocess.Popen(
            self.unit.argv(), user=user, group=self.unit.svc["group"], extra_groups=[],
            umask=int(self.unit.svc["umask"], 8), stdout=self.log, stderr=subprocess.STDOUT,
            env={"NOTIFY_SOCKET": self.notify_path, "PATH": "/usr/bin:/bin"}, cwd="/")
        self.said = []

    def wait_said(self, what, timeout):
        deadline = time.monotonic() + timeout
        while not any(what in m for m in self.said):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.notify.setblocking(False)
                try:  # what it said before it exited
                    while True:
                        self.said.append(self.notify.recv(4096).decode())
                except BlockingIOError:
                    pass
                if any(what in m for m in self.said):
                    break
                with open(self.log.name) as f:
                    log = f.read()[-3000:]
                pytest.fail(f"cairnd@{self.name} did not say {what} within {timeout} s "
                            f"(exit {self.proc.poll()}; said {self.said}):\n{log}")
            self.notify.settimeout(min(max(left, 0.01), 1.0))
            try:
                self.said.append(self.notify.recv(4096).decode())
            except socket.timeout:
                pass
        return next(m for m in self.said if what in m)

    def cli(self, *args):
        sock = configparser.ConfigParser(interpolation=None, inline_comment_prefixes="#")
        sock.read_string(open(self.conf).read())
        r = subprocess.run(["/usr/bin/cairn", "--socket", sock["cairnd"]["control_socket"],
                            "--json", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"cairn {' '.join(args)} at {self.name}: {r.stderr}"
        return json.loads(r.stdout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.wait_said("STOPPING=1", self.unit.seconds("timeoutstopsec"))
            self.proc.wait(timeout=self.unit.seconds("timeoutstopsec"))
        self.notify.close()
        self.log.close()
        if self.wrote_conf:
            os.remove(self.conf)
