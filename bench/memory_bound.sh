#!/usr/bin/env bash
# Peak RSS (VmHWM) of the source and sink cairnd while they replicate a
# sparse image with 64 MiB written, for a 1 GiB and a 1 TiB image: memory
# must not grow with the image size. Starts its own two-site test bed.
# Usage: bench/memory_bound.sh     (after ./deps.sh && ./build.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$(mktemp -d /tmp/cairn-membench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  tests/cluster/testbed.sh stop "$RUN" --purge >/dev/null 2>&1 || true
}
trap cleanup EXIT
tests/cluster/testbed.sh start "$RUN" --base-port "${CAIRN_BENCH_BASE_PORT:-23789}" >/dev/null
# shellcheck disable=SC1091
source "$RUN/env"
CAIRN=$ROOT/build/engine/cairn
CAIRND=$ROOT/build/engine/cairnd

wait_socket() {  # SOCKET: until cairnd answers, 30 s at most
  local deadline=$((SECONDS + 30))
  until "$CAIRN" --socket "$1" status >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { echo "cairnd at $1 did not answer within 30 s" >&2; exit 1; }
    sleep 0.1
  done
}

printf '| image | written | time to first point | source peak RSS | sink peak RSS |\n|---|---|---|---|---|\n'
port=$(( ${CAIRN_BENCH_BASE_PORT:-23789} + 500 ))
PKI=$RUN/pki  # the links are mutual TLS, as deployed
deploy/cairn-certs ca "$PKI" >/dev/null
for s in a b; do deploy/cairn-certs cert "$PKI" "site-$s" IP:127.0.0.1 >/dev/null; done
tls() { printf '[tls]\nca=%s/ca.pem\ncert=%s/site-%s.pem\nkey=%s/site-%s.key\n' "$PKI" "$PKI" "$1" "$PKI" "$1"; }
for size in 1G 1T; do
  name=mem-$size; w=$RUN/$name; mkdir -p "$w"; port=$((port + 1))
  rbd -c "$CEPH_CONF_A" create "rbd/$name" --size "$size"
  rbd -c "$CEPH_CONF_A" bench --io-type write --io-pattern rand --io-size 1M --io-total 64M \
    "rbd/$name" >/dev/null
  printf '[cairnd]\nsite=b\ncontrol_socket=%s/b.sock\n[ceph]\nconf=%s\nclient=cairn\nkeyring=%s\n[sink]\nlisten=127.0.0.1:%s\nspool_dir=%s/spool\n' \
    "$w" "$CEPH_CONF_B" "$CAIRN_KEYRING_B" "$port" "$w" >"$w/b.conf"
  { tls b; printf '[peer site-a]\nsite=a\n'; } >>"$w/b.conf"
  printf '[cairnd]\nsite=a\ncontrol_socket=%s/a.sock\n[ceph]\nconf=%s\nclient=cairn\nkeyring=%s\n[volume %s]\nimage=%s\npeer=127.0.0.1:%s\ninterval=0\n' \
    "$w" "$CEPH_CONF_A" "$CAIRN_KEYRING_A" "$name" "$name" "$port" >"$w/a.conf"
  tls a >>"$w/a.conf"
  "$CAIRND" -c "$w/b.conf" >"$w/b.log" 2>&1 & b=$!; PIDS+=("$b")
  "$CAIRND" -c "$w/a.conf" >"$w/a.log" 2>&1 & a=$!; PIDS+=("$a")
  wait_socket "$w/a.sock"; wait_socket "$w/b.sock"
  t0=$(date +%s.%N)
  "$CAIRN" --socket "$w/a.sock" replicate "$name" --wait --timeout 300 >/dev/null
  t1=$(date +%s.%N)
  rss_a=$(awk '/VmHWM/ {print $2}' "/proc/$a/status")
  rss_b=$(awk '/VmHWM/ {print $2}' "/proc/$b/status")
  printf '| %s sparse | 64 MiB | %.2f s | %d MiB | %d MiB |\n' "$size" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" \
    $((rss_a / 1024)) $((rss_b / 1024))
  kill "$a" "$b"; wait "$a" "$b" 2>/dev/null || true
done
