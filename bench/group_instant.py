#!/usr/bin/python3
"""What a consistency group's instant costs (issue 26): N volumes (200 by
default) of one RBD group at site A replicated by one source cairnd to one
sink cairnd on the two local test clusters (tests/cluster/testbed.sh), as
`[volume]` sections with `group = G`, against the peer the same run
measures: every member's `rbd snap create`, then `rbd export-diff
--from-snap` piped into `rbd import-diff` at site B (a script's way; the
rbd CLI does not reach a group snapshot's shares), and
`rbd group snap create` alone, the floor of a consistent instant.

What it measures, in order:
  1. setup: N images of 4 MiB at site A with 256 KiB of random data, in
     RBD group G; sink, then source started;
  2. the first instant: `cairn group replicate G --wait` (every member's
     full sync);
  3. ROUNDS rounds of: 64 KiB written at a random offset of every member,
     then one instant (`cairn group replicate G --wait`: the members'
     snapshots, the group snapshot, every member's delta shipped, verified
     and its point made); then the same writes and the peer: a group
     snapshot and N export-diff | import-diff pipes (one at a time, as a
     script does; the peer's first round is a full export-diff into fresh
     images, not timed);
  4. every member of the last group point compared with its share of the
     group snapshot at site A by whole-image hash.
Then seconds per instant, Cairn against the peer (ratio), and the time of
`rbd group snap create` alone (the floor both pay).

Results: OUT/group_instant.json and OUT/group_instant.md. It measures; it
does not test (though it fails if a point differs from its source).

Usage:
  bench/group_instant.py [--volumes N] [--rounds R] [--out DIR]
                         [--testbed DIR] [--base-port P]
Without --testbed it starts its own test bed and purges it at the end.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "tools"))
import cairn_testlib as lib  # noqa: E402
import rbd  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
IMAGE_SIZE = 4 * MiB


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rbd_cmd(conf, keyring, *args):
    return ["rbd", "--conf", conf, "--keyring", keyring, "--id", "admin", *args]


def quiet(cmd, shell=False):
    """Runs an rbd command (or pipeline) with its progress lines kept out
    of the log, shown only if it fails."""
    r = subprocess.run(cmd, shell=shell, capture_output=True, text=True,
                       executable="/bin/bash" if shell else None)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} exited {r.returncode}: {r.stderr[-2000:]}")


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="cairn-group-bench-")
        self.tb = args.testbed or os.path.join(self.work, "tb")
        if not args.testbed:
            subprocess.run([os.path.join(lib.ROOT, "tests", "cluster", "testbed.sh"), "start",
                            self.tb, "--base-port", str(args.base_port)], check=True)
        env = {}
        with open(os.path.join(self.tb, "env")) as f:
            for line in f:
                if "=" in line and not line.startswith("#"):
                    k, v = line.strip().split("=", 1)
                    env[k] = v.strip('"')
        self.env = env
        self.a = lib.Site(env["CEPH_CONF_A"])
        self.b = lib.Site(env["CEPH_CONF_B"])
        tag = f"gb{os.getpid()}"
        self.group = f"{tag}-g"
        self.images = [f"{tag}-{i:04}" for i in range(args.volumes)]
        self.rng = random.Random(26)
        self.daemons = []
        self.results = {"volumes": args.volumes, "rounds": args.rounds,
                        "image_bytes": IMAGE_SIZE}

    def setup(self):
        log(f"creating {len(self.images)} images in RBD group {self.group}")
        rbd.RBD().group_create(self.a.ioctx, self.group)
        g = rbd.Group(self.a.ioctx, self.group)
        for image in self.images:
            self.a.create(image, IMAGE_SIZE)
            with rbd.Image(self.a.ioctx, image) as img:
                img.write(self.rng.randbytes(256 * KiB), 0)
            g.add_image(self.a.ioctx, image)
        port = lib.free_port()
        self.sink = lib.Cairnd(self.work, "sink", lib.sink_config(
            "b", self.b.conf, port, os.path.join(self.work, "spool"),
            extra="keep_points = 3\n"))
        self.source = lib.Cairnd(self.work, "source", lib.source_config(
            "a", self.a.conf, port, {i: (i, i + "-standby") for i in self.images},
            keep=1, extra=f"group = {self.group}\n"))
        for d in (self.sink, self.source):
            d.start(timeout=600)
            self.daemons.append(d)

    def write_round(self):
        for image in self.images:
            with rbd.Image(self.a.ioctx, image) as img:
                img.write(self.rng.randbytes(64 * KiB),
                          self.rng.randrange(IMAGE_SIZE // (64 * KiB)) * 64 * KiB)

    def instant(self):
        t0 = time.monotonic()
        seq = self.source.json("group", "replicate", self.group, "--wait", "--timeout",
                               "3600")["seq"]
        return seq, time.monotonic() - t0

    def group_snap(self, name):
        t0 = time.monotonic()
        quiet(rbd_cmd(self.a.conf, self.env["CEPH_KEYRING_A"], "group", "snap", "create",
                      f"rbd/{self.group}@{name}"))
        return time.monotonic() - t0

    def peer_round(self, prev, snap):
        """Every member's own snapshot, export-diff from the last one piped
        into import-diff at site B: what a script does without group
        snapshots (the rbd CLI does not reach a group snapshot's shares;
        `rbd group snap create` is timed apart as the floor)."""
        t0 = time.monotonic()
        ka, kb = self.env["CEPH_KEYRING_A"], self.env["CEPH_KEYRING_B"]
        for image in self.images:
            quiet(rbd_cmd(self.a.conf, ka, "snap", "create", f"rbd/{image}@{snap}"))
            frm = ["--from-snap", prev] if prev else []
            cmd = (" ".join(rbd_cmd(self.a.conf, ka, "export-diff", *frm,
                                    f"rbd/{image}@{snap}", "-"))
                   + " | " + " ".join(rbd_cmd(self.b.conf, kb, "import-diff", "-",
                                              f"rbd/{image}-peer")))
            quiet("set -o pipefail; " + cmd, shell=True)
        return time.monotonic() - t0

    def run(self):
        self.setup()
        seq, first = self.instant()
        self.results["first_instant_s"] = first
        log(f"first instant {seq} (full sync of {len(self.images)} volumes): {first:.1f} s")
        for image in self.images:
            self.b.create(f"{image}-peer", IMAGE_SIZE)
        self.peer_round(None, "peer0")  # the peer's full sync, not timed
        cairn, peer, floor = [], [], []
        for r in range(1, self.args.rounds + 1):
            self.write_round()
            seq, s = self.instant()
            cairn.append(s)
            self.write_round()
            peer.append(self.peer_round(f"peer{r - 1}", f"peer{r}"))
            floor.append(self.group_snap(f"floor{r}"))
            log(f"round {r}: cairn {s:.2f} s, peer {peer[-1]:.2f} s, "
                f"group snapshot alone {floor[-1]:.2f} s")
        self.results.update(
            cairn_instant_s=statistics.median(cairn), peer_instant_s=statistics.median(peer),
            group_snap_s=statistics.median(floor), cairn_rounds_s=cairn, peer_rounds_s=peer,
            ratio=statistics.median(peer) / statistics.median(cairn), last_seq=seq)
        log("checking every member of the last group point by hash")
        bad = [i for i in self.images
               if self.b.digest(i + "-standby", f"cairn.{seq}") !=
               self.a.digest(i, snap_id=self.a.group_snap_id(i, f"cairn.{seq}"))]
        self.results["members_differing"] = len(bad)
        if bad:
            raise AssertionError(f"{len(bad)} members of point {seq} differ: {bad[:5]}")

    def close(self):
        for d in reversed(self.daemons):
            d.stop()
        try:
            rbd.RBD().group_remove(self.a.ioctx, self.group)
        except rbd.ObjectNotFound:
            pass
        for site in (self.a, self.b):
            for image in self.images:
                for name in (image, image + "-standby", image + "-peer"):
                    try:
                        site.remove_all(name)
                    except Exception:
                        pass
            site.close()
        if not self.args.testbed:
            subprocess.run([os.path.join(lib.ROOT, "tests", "cluster", "testbed.sh"), "stop",
                            self.tb, "--purge"], check=False)


def report(r):
    lines = [f"# A consistency group's instant: {r['volumes']} volumes, {r['rounds']} rounds",
             ""]
    if "cairn_instant_s" in r:
        lines += [
            "| | seconds per instant (median) |",
            "|---|---:|",
            f"| Cairn (`cairn group replicate --wait`: snapshots, deltas, verified points) "
            f"| {r['cairn_instant_s']:.2f} |",
            f"| peer (per member: `rbd snap create`, export-diff \\| import-diff) "
            f"| {r['peer_instant_s']:.2f} |",
            f"| `rbd group snap create` alone | {r['group_snap_s']:.2f} |",
            "",
            f"Cairn is {r['ratio']:.1f}x faster than the peer; first instant (full sync of "
            f"every member): {r['first_instant_s']:.1f} s; members of the last point "
            f"differing from their source: {r.get('members_differing', '?')}."]
    if "failed" in r:
        lines += ["", f"FAILED: {r['failed']}"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(lib.ROOT, "bench", "results"))
    ap.add_argument("--testbed")
    ap.add_argument("--base-port", type=int, default=28789)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    b = Bench(args)
    failed = None
    try:
        b.run()
    except BaseException as e:
        failed = e
        b.results["failed"] = f"{type(e).__name__}: {e}"[:4000]
    finally:
        md = report(b.results)
        with open(os.path.join(args.out, "group_instant.json"), "w") as f:
            json.dump(b.results, f, indent=1)
        with open(os.path.join(args.out, "group_instant.md"), "w") as f:
            f.write(md + "\n")
        print(md, flush=True)
        b.close()
        if failed is None:
            shutil.rmtree(b.work, ignore_errors=True)
    if failed is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
