#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) into build-fuzz and
# runs each for a bounded time. A crash leaves its input in build-fuzz/
# (crash-*) and fails the run; replay with: build-fuzz/tests/fuzz/TARGET FILE
#   tests/fuzz/run.sh [SECONDS_PER_TARGET]     (default 30)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-30}
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCAIRN_FUZZ=ON -DCAIRN_TESTS=OFF >/dev/null
ninja -C build-fuzz frame_fuzz spool_fuzz control_fuzz session_fuzz source_fuzz
for t in frame_fuzz spool_fuzz control_fuzz session_fuzz source_fuzz; do
  corpus=build-fuzz/corpus/$t
  mkdir -p "$corpus"
  # session_fuzz and source_fuzz write their seeds (a real session, a
  # sink's real answers) into the corpus as they start.
  export CAIRN_FUZZ_SEED_DIR=$PWD/$corpus
  echo "== fuzzing $t for $secs s"
  (cd build-fuzz && tests/fuzz/$t -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 \
     -print_final_stats=1 "corpus/$t" 2>&1 | grep -E "^(stat::number_of_executed_units|==|SUMMARY|Done)" | tail -n 4)
done
