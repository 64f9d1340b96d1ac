#!/usr/bin/env bash
# Installs what the tests need, builds, and runs every test:
#   1. format and layer checks; unit tests (GoogleTest, in-memory volume,
#      real spool files), the seeded fault simulator, and the same under
#      ASan + UBSan and under TSan;
#   2. libFuzzer targets, each for a bounded time;
#   3. Ceph tests: the Volume and catalog conformance suites on a real cluster;
#   4. integration tests (pytest): two real Ceph clusters on loopback,
#      real cairnd processes over TCP, every restore point checked by hash;
#   5. Cinder: Cairn's driver on real python3-cinder classes, and real
#      cinder-api/scheduler/volume with RabbitMQ driven by the cinder CLI;
#   6. deployment: the Debian packages built (cpack) and installed, and
#      cairnd run exactly as its systemd unit says.
# Usage: ./test.sh            (CI sets CI=true: warnings are errors)
set -euo pipefail
cd "$(dirname "$0")"
./deps.sh --cinder
werror=OFF; [[ "${CI:-}" == "true" ]] && werror=ON
./build.sh -DCAIRN_WERROR=$werror

echo "== format: the C++ is as clang-format leaves it (.clang-format)"
find engine tests bench -name '*.cc' -print0 -o -name '*.h' -print0 |
  xargs -0 clang-format --dry-run --Werror

echo "== unit tests (with the seeded fault simulator, ${CAIRN_SIM_SEEDS:=2000} schedules)"
export CAIRN_SIM_SEEDS
ctest --test-dir build --output-on-failure

echo "== unit tests under AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCAIRN_SANITIZE=ON \
  -DCAIRN_WERROR=$werror >/dev/null
ninja -C build-asan unit_tests
CAIRN_SIM_SEEDS=200 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1 build-asan/tests/unit_tests --gtest_brief=1

echo "== unit tests under ThreadSanitizer"
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCAIRN_TSAN=ON \
  -DCAIRN_WERROR=$werror >/dev/null
ninja -C build-tsan unit_tests
CAIRN_SIM_SEEDS=25 \
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=tests/tsan.supp \
  build-tsan/tests/unit_tests --gtest_brief=1

echo "== fuzzing: frames, spool, control, the sink's session, the source's replies (libFuzzer, bounded)"
tests/fuzz/run.sh "${CAIRN_FUZZ_SECONDS:-30}"

tb=$(mktemp -d /tmp/cairn-test.XXXXXX)
cleanup() { tests/cluster/testbed.sh stop "$tb" --purge >/dev/null 2>&1 || true; }
trap cleanup EXIT
echo "== starting two Ceph clusters (site A, site B) in $tb"
tests/cluster/testbed.sh start "$tb" --base-port "${CAIRN_TEST_BASE_PORT:-21789}"
# shellcheck disable=SC1091
source "$tb/env"

echo "== Ceph tests (site A)"
CAIRN_TEST_CEPH_CONF="$CEPH_CONF_A" build/tests/ceph_tests --gtest_brief=1

echo "== integration tests"
CAIRN_TESTBED="$tb" /usr/bin/python3 -m pytest -v -p no:cacheprovider tests/integration

echo "== Cinder: the driver on real python3-cinder classes, then real Cinder services"
CAIRN_TESTBED="$tb" /usr/bin/python3 -m pytest -v -p no:cacheprovider tests/cinder

echo "== deployment: the Debian packages installed, cairnd run as its systemd unit says"
rm -rf build/packages  # one version of each package: this checkout's
(cd build && cpack -G DEB -B packages >/dev/null)
CAIRN_TESTBED="$tb" /usr/bin/python3 -m pytest -v -p no:cacheprovider tests/deploy
