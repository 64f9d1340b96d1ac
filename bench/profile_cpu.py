#!/usr/bin/env python3
"""Where the CPU of Cairn's two cairnds goes, per GiB replicated.

The same work as bench/compare.py's sync section (a 1 GiB image of random
data synced in full, then 128 MiB of random 64 KiB writes as an
incremental), over mutual TLS as client.cairn, with both cairnds sampled
by `perf record -e cpu-clock` (the kernel's software clock: this VM has no
hardware counters). Each process's CPU seconds come from /proc; its
samples say how those seconds split: the link's crypto, copies, the
kernel's TCP and system calls, librados/librbd, XXH3, protobuf, Cairn's
own code. Every replica is compared with its source by a hash of the
whole image.

    bench/profile_cpu.py --testbed DIR [--out DIR] [--runs N] [--volume-option LINE]

writes OUT/profile.json and OUT/profile.md (the table docs/PERFORMANCE.md
quotes) and prints the table.
"""
import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (bench/compare.py: the test bed, images, cairnds)

lib = compare.lib
GiB = 1 << 30

KERNEL = "[kernel.kallsyms]"

# What a kernel frame says the CPU was doing, by the first frame of the
# chain (leaf first) that says something: the leaf alone is often a
# generic helper, or pvm_irq_enable, where this VM's clock interrupt lands
# once a section with interrupts off ends.
KERNEL_WORK = [
    ("kernel: page faults (new pages zeroed, freed)",
     ("page_fault", "handle_mm_fault", "clear_page", "munmap", "unmap_", "do_anonymous",
      "__x64_sys_munmap", "__x64_sys_mmap", "zap_", "free_pages", "folio")),
    ("kernel: copies to and from user space",
     ("copy_user", "_copy_to_iter", "_copy_from_iter", "copy_page_", "copyout", "copyin",
      "skb_copy_datagram")),
    ("kernel: TCP and loopback",
     ("tcp", "skb", "ip_", "ipv4", "net_rx", "netif", "loopback", "sock", "napi", "dev_",
      "inet", "do_softirq", "__softirq")),
    ("kernel: scheduling, futexes, epoll",
     ("schedule", "futex", "switch", "wake", "finish_task", "pick_next", "enqueue",
      "dequeue", "ttwu", "epoll", "poll")),
    ("kernel: io_uring and files (the spool)",
     ("io_uring", "io_", "ext4", "iomap", "blk", "vfs_", "filemap", "dio", "fdatasync")),
]

# (category, predicate over the leaf's (dso, symbol)) for user space.
USER_WORK = [
    ("TLS: crypto (libcrypto, libssl)", lambda d, s: "libcrypto" in d or "libssl" in d),
    ("XXH3 (block and frame digests)", lambda d, s: "xxhash" in d or "XXH" in s),
    ("libc copies (memcpy, memmove)",
     lambda d, s: "libc" in d and ("memcpy" in s or "memmove" in s)),
    ("ceph: crc32c (the messenger's checksums)", lambda d, s: "crc32" in s),
    ("ceph: librados, librbd, messenger", lambda d, s: "librados" in d or "librbd" in d
     or "ceph" in d),
    ("protobuf", lambda d, s: "protobuf" in d),
    ("libc: allocation and other", lambda d, s: "libc" in d or "libstdc++" in d),
    ("Cairn's own code (cairnd)", lambda d, s: d.endswith("cairnd")),
]

CATEGORIES = [c for c, _ in USER_WORK] + [c for c, _ in KERNEL_WORK] + [
    "kernel: other (system calls)", "other"]


def category(chain):
    """chain: [(dso, symbol)], leaf first."""
    dso, sym = chain[0]
    if dso != KERNEL:
        for name, match in USER_WORK:
            if match(os.path.basename(dso), sym):
                return name
        return "other"
    for d, s in chain:
        if d != KERNEL:
            break
        for name, words in KERNEL_WORK:
            if any(w in s for w in words):
                return name
    return "kernel: other (system calls)"


def proc_cpu(pid):
    return compare.proc_cpu_seconds(pid)


class Sampler:
    """perf record of the given processes until stop()."""

    def __init__(self, out, pids, freq):
        self.out = out
        if os.path.exists(out):
            os.remove(out)
        self.proc = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-g", "-p",
             ",".join(str(p) for p in pids), "-o", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lib.wait_for("perf record attached (its file started)",
                     lambda: os.path.exists(out) and os.path.getsize(out) > 0
                     or self.proc.poll() is not None, 30)
        if self.proc.poll() is not None:
            raise RuntimeError(f"perf record failed: {self.proc.stderr.read()}")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=120)

    def samples(self):
        """{pid: Counter(category -> samples)} and {pid: Counter(thread -> samples)}."""
        r = subprocess.run(["perf", "script", "-i", self.out, "-F", "comm,pid,ip,sym,dso"],
                           capture_output=True, text=True, check=True)
        cats = collections.defaultdict(collections.Counter)
        threads = collections.defaultdict(collections.Counter)
        # A sample: "comm PID" (comm may hold spaces), then one line per
        # frame, a tab and "ADDR sym (dso)", leaf first; a blank line ends it.
        head, chain = None, []

        def flush():
            if head and chain:
                cats[head[0]][category(chain)] += 1
                threads[head[0]][head[1]] += 1

        for line in r.stdout.splitlines() + [""]:
            if not line.strip():
                flush()
                head, chain = None, []
            elif not line.startswith("\t"):  # frames are indented by a tab
                flush()  # (without -g a sample is this one line)
                head, chain = None, []
                fields = line.split()
                idx = next((i for i, f in enumerate(fields) if f.isdigit()), None)
                head = (int(fields[idx]), " ".join(fields[:idx])) if idx else None
                if head and line.rstrip().endswith(")") and len(fields) > idx + 2:
                    text = " ".join(fields[idx + 1:])
                    sym = text[:text.rindex("(")].split(None, 1)[1:] or ["?"]
                    chain.append((text[text.rindex("(") + 1:-1], sym[0].strip()))
            elif line.rstrip().endswith(")"):
                text = line.strip()
                dso = text[text.rindex("(") + 1:-1]
                sym = text[:text.rindex("(")].split(None, 1)[1:] or ["?"]
                chain.append((dso, sym[0].strip()))
        return cats, threads


def split(cpu_s, counter, per):
    """CPU seconds per GiB of each key, in proportion to its samples."""
    total = sum(counter.values()) or 1
    return {k: cpu_s * v / total / per for k, v in counter.items()}


def profile_round(bench, run_no, freq):
    vol, img, tgt = bench.names("prof", run_no)
    bench.make_full_image(img)
    sink = bench.start_sink(True)
    src = bench.start_source(f"src-prof-{run_no}", {vol: (img, tgt)})
    out = {}
    try:
        for phase, size, prepare in (
                ("full", compare.FULL_SIZE, lambda: None),
                ("incremental", compare.INCR_BYTES,
                 lambda: bench.incremental_writes(img, seed=200 + run_no))):
            prepare()
            sampler = Sampler(os.path.join(bench.work, f"perf-{phase}-{run_no}.data"),
                              (src.proc.pid, sink.proc.pid), freq)
            c0 = {p: proc_cpu(p) for p in (src.proc.pid, sink.proc.pid)}
            seconds, seq = bench.cairn_replicate(src, vol)
            c1 = {p: proc_cpu(p) for p in (src.proc.pid, sink.proc.pid)}
            sampler.stop()
            bench._verify(f"profile {phase} run {run_no}", bench.conf_a,
                          f"rbd/{img}@cairn.{seq}", bench.conf_b, f"rbd/{tgt}@cairn.{seq}")
            cats, threads = sampler.samples()
            per = size / GiB
            out[phase] = {"seconds": seconds, "mib_s": size / (1 << 20) / seconds}
            for role, pid in (("source", src.proc.pid), ("sink", sink.proc.pid)):
                cpu = c1[pid] - c0[pid]
                out[phase][role] = {"cpu_s_per_gib": cpu / per,
                                    "categories": split(cpu, cats[pid], per),
                                    "threads": split(cpu, threads[pid], per),
                                    "samples": sum(cats[pid].values())}
    finally:
        src.stop()
    bench.remove(bench.a, img)
    bench.remove(bench.b, tgt)
    return out


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if v else 0.0


def table(runs):
    lines = []
    for phase in ("full", "incremental"):
        what = ("full sync of 1 GiB" if phase == "full"
                else "incremental, 128 MiB of 64 KiB writes (per GiB: x8)")
        rs = [r[phase] for r in runs]
        lines.append(f"\n{what}: {median([r['mib_s'] for r in rs]):.0f} MiB/s; CPU s per GiB, "
                     f"median of {len(rs)}:\n")
        lines.append("| where | source (site A) | sink (site B) |")
        lines.append("|---|---:|---:|")
        for c in CATEGORIES:
            vals = [median([r[role]["categories"].get(c, 0.0) for r in rs])
                    for role in ("source", "sink")]
            if max(vals) >= 0.005:
                lines.append(f"| {c} | {vals[0]:.2f} | {vals[1]:.2f} |")
        totals = [median([r[role]["cpu_s_per_gib"] for r in rs]) for role in ("source", "sink")]
        lines.append(f"| **all (/proc)** | **{totals[0]:.2f}** | **{totals[1]:.2f}** |")
        lines.append("\nby thread (CPU s per GiB):\n")
        for role in ("source", "sink"):
            th = collections.Counter()
            for r in rs:
                for k, v in r[role]["threads"].items():
                    th[k] += v / len(rs)
            top = ", ".join(f"{k} {v:.2f}" for k, v in th.most_common(6) if v >= 0.005)
            lines.append(f"- {role}: {top}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", required=True)
    ap.add_argument("--out", default="bench/results/profile")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--freq", type=int, default=1999, help="samples a second a thread")
    ap.add_argument("--volume-option", action="append", default=[],
                    help="a [volume] line for the source (e.g. 'block_size = 1M'); repeatable")
    ap.add_argument("--sink-option", action="append", default=[],
                    help="a [sink] line; repeatable")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bench = compare.Bench(types.SimpleNamespace(
        testbed=args.testbed, out=args.out, runs=args.runs, sink_option=args.sink_option,
        volume_option=args.volume_option))
    bench.ensure_random_file()
    runs = []
    try:
        for run_no in range(args.runs):
            runs.append(profile_round(bench, run_no, args.freq))
            compare.log(f"profile run {run_no}: full {runs[-1]['full']['mib_s']:.0f} MiB/s, "
                        f"incremental {runs[-1]['incremental']['mib_s']:.0f} MiB/s")
    finally:
        if bench.sink is not None:
            bench.sink.stop()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump({"when": when, "runs": runs}, f, indent=1)
    text = (f"Measured {when}, {args.runs} runs, both cairnds over mutual TLS "
            f"(`bench/profile_cpu.py`):\n" + table(runs))
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
