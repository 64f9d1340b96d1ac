#!/usr/bin/env python3
"""Cairn over a link between sites slower than its own speed: the first
sync of a 1 GiB file-system image through a shaping proxy
(tests/tools/wan_proxy.py; tc netem is not available here) at each RATE, with
each codec of `[volume] compression`, over mutual TLS as client.cairn.

For each rate and codec: seconds to the verified point, bytes the proxy
carried towards the sink, and both cairnds' CPU seconds. The image is an
ext4 file system that mke2fs fills from a directory: /usr/include (C
headers: text that compresses) and 256 MiB of random bytes (data that
does not), the rest of the 1 GiB unwritten. Every replica is compared with
its source by a hash of the whole image.

    bench/wan.py --testbed DIR [--out DIR] [--runs N] [--rates 1G,100M]
                 [--codecs none,lz4,zstd]

writes OUT/wan.json and OUT/wan.md (the table docs/PERFORMANCE.md quotes)
and prints the table.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the test bed, images, cairnds)
from wan_proxy import WanProxy, parse_rate  # noqa: E402  (tests/tools/, as cairn_testlib)

lib = compare.lib
MiB = 1 << 20
RANDOM_PART = 256 * MiB


def make_fs_image(bench):
    """OUT/work/fs-1g.img: ext4, /usr/include and RANDOM_PART random bytes."""
    path = os.path.join(bench.work, "fs-1g.img")
    if os.path.exists(path):
        return path
    root = os.path.join(bench.work, "fsroot")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    subprocess.run(["cp", "-a", "/usr/include", os.path.join(root, "include")], check=True)
    bench.ensure_random_file()
    with open(bench.randfile, "rb") as src, open(os.path.join(root, "random.bin"), "wb") as dst:
        dst.write(src.read(RANDOM_PART))
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", root, "-F", path + ".tmp", "1G"],
                   check=True)
    os.rename(path + ".tmp", path)
    shutil.rmtree(root)
    return path


def wan_round(bench, fs_image, rate_name, codec, run_no):
    tag = f"w{rate_name.lower()}{codec}{run_no}"
    vol, img, tgt = bench.names(tag, run_no)
    bench.remove(bench.a, img)
    bench.rbd_a("import", "--no-progress", "--image-feature",
                "layering,exclusive-lock,object-map,fast-diff", fs_image, f"rbd/{img}")
    sink = bench.start_sink(True)
    proxy = WanProxy(bench.port, parse_rate(rate_name)).start()
    src = lib.Cairnd(bench.work, f"src-{tag}", lib.source_config(
        "a", bench.conf_a, proxy.port, {vol: (img, tgt)}, interval="0", keep=0,
        extra=f"compression = {codec}\n")).start()
    try:
        c0 = compare.proc_cpu_seconds(src.proc.pid), compare.proc_cpu_seconds(sink.proc.pid)
        seconds, seq = bench.cairn_replicate(src, vol)
        c1 = compare.proc_cpu_seconds(src.proc.pid), compare.proc_cpu_seconds(sink.proc.pid)
        status = src.json("status", vol)[0]
        bench._verify(f"wan {rate_name} {codec} run {run_no}", bench.conf_a,
                      f"rbd/{img}@cairn.{seq}", bench.conf_b, f"rbd/{tgt}@cairn.{seq}")
    finally:
        src.stop()
        proxy.stop()
    bench.remove(bench.a, img)
    bench.remove(bench.b, tgt)
    return {"seconds": seconds, "wire_bytes": proxy.bytes_up, "data_bytes": status["bytes_total"],
            "source_cpu_s": c1[0] - c0[0], "sink_cpu_s": c1[1] - c0[1]}


def table(results, rates, codecs):
    med = statistics.median
    lines = ["| link | compression | seconds | MiB on the wire | ÷ uncompressed | data MiB/s "
             "| CPU s: source | CPU s: sink |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for rate in rates:
        plain = results.get(f"{rate}/none")
        for codec in codecs:
            rs = results[f"{rate}/{codec}"]
            wire = med([r["wire_bytes"] for r in rs])
            secs = med([r["seconds"] for r in rs])
            data = med([r["data_bytes"] for r in rs])
            ratio = f"{wire / med([r['wire_bytes'] for r in plain]):.2f}×" if plain else ""
            lines.append(
                f"| {rate}bit/s | {codec} | {secs:.1f} ({min(r['seconds'] for r in rs):.1f}-"
                f"{max(r['seconds'] for r in rs):.1f}) | {wire / MiB:.0f} | {ratio} | "
                f"{data / MiB / secs:.0f} | {med([r['source_cpu_s'] for r in rs]):.2f} | "
                f"{med([r['sink_cpu_s'] for r in rs]):.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", required=True)
    ap.add_argument("--out", default="bench/results/wan")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rates", default="1G,100M", help="bits per second, comma-separated")
    ap.add_argument("--codecs", default="none,lz4,zstd")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bench = compare.Bench(types.SimpleNamespace(
        testbed=args.testbed, out=args.out, runs=args.runs, sink_option=[], volume_option=[]))
    rates, codecs = args.rates.split(","), args.codecs.split(",")
    fs_image = make_fs_image(bench)
    results = {}
    try:
        for run_no in range(1, args.runs + 1):
            for rate in rates:
                # The order turns each run, as compare.py's: no codec always first.
                k = (run_no - 1) % len(codecs)
                for codec in codecs[k:] + codecs[:k]:
                    r = wan_round(bench, fs_image, rate, codec, run_no)
                    results.setdefault(f"{rate}/{codec}", []).append(r)
                    compare.log(f"run {run_no} {rate}bit/s {codec}: {r['seconds']:.1f} s, "
                                f"{r['wire_bytes'] / MiB:.0f} MiB on the wire for "
                                f"{r['data_bytes'] / MiB:.0f} MiB of data")
    finally:
        bench.close()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(args.out, "wan.json"), "w") as f:
        json.dump({"when": when, "results": results}, f, indent=1)
    text = (f"Measured {when}, {args.runs} runs each (median, with the range of seconds), "
            f"the first sync of a 1 GiB ext4 image through tests/tools/wan_proxy.py "
            f"(`bench/wan.py`):\n\n" + table(results, rates, codecs))
    with open(os.path.join(args.out, "wan.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
