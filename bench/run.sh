#!/usr/bin/env bash
# The end-to-end bench: Cairn against rbd-mirror (snapshot mode),
# `rbd export | import` and `rbd export-diff | import-diff`, in the same run,
# on two local Ceph clusters it starts (and stops) itself, and the
# microbenchmarks of the hot paths. Installs what it needs (apt), builds.
#
#   bench/run.sh [--runs N] [--rpo-seconds S] [--only SECTION,...] [--no-mirror]
#                [--penalty-placements per-site,shared] [--merge RESULTS_JSON]
#                [--update-docs]
#
# (every option goes to bench/compare.py; see its --help)
# Results: bench/results/results.{md,json}, bench/results/performance.png and
# bench/results/micro.json; --update-docs also writes the table and chart into
# docs/PERFORMANCE.md. Takes about an hour with the defaults (3 runs each; 56
# min on the VM of 2026-11-30, round 6).
# It measures; it does not test: the test suite is ./test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
./deps.sh --bench
./build.sh >/dev/null
OUT=bench/results
mkdir -p "$OUT"
tb=$(mktemp -d /tmp/cairn-bench.XXXXXX)
cleanup() { tests/cluster/testbed.sh stop "$tb" --purge >/dev/null 2>&1 || true; }
trap cleanup EXIT
echo "== microbenchmarks (Google Benchmark): hashing, framing, spool writes, epochs"
build/bench/micro_bench --benchmark_min_time=0.5 --benchmark_out="$OUT/micro.json" \
  --benchmark_out_format=json
echo "== starting two Ceph clusters (site A, site B) in $tb"
# Each site holds up to three 1 GiB images with their snapshots at once; memstore
# counts a snapshot clone as a whole new object (used bytes run ahead of what is
# stored), hence the room.
tests/cluster/testbed.sh start "$tb" --base-port "${CAIRN_BENCH_BASE_PORT:-24789}" --store-mib 12288
/usr/bin/python3 bench/compare.py --testbed "$tb" --out "$OUT" "$@"
