#!/usr/bin/env bash
# Cairn's main job, end to end, on this machine:
#   two single-node Ceph clusters on loopback (site A, site B), an RBD image
#   at A with data on it, cairnd as source at A and as sink at B replicating
#   every second over mutual TLS while writes go on, the restore points listed at B, one of
#   them restored to a new image at B, and its content proven equal to the
#   source snapshot it stands for. Everything it started is stopped at the end.
# Usage: ./demo.sh     (installs what it needs with apt, builds, runs)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing dependencies (apt) and building"
./deps.sh
./build.sh

RUN=$(mktemp -d /tmp/cairn-demo.XXXXXX)
PIDS=()
cleanup() {
  say "cleaning up"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  tests/cluster/testbed.sh stop "$RUN" --purge >/dev/null 2>&1 || true
  echo "stopped cairnd, both clusters, removed $RUN"
}
trap cleanup EXIT

say "starting site A and site B (one mon, one mgr, one memstore OSD each)"
tests/cluster/testbed.sh start "$RUN" --base-port "${CAIRN_DEMO_BASE_PORT:-24789}"
# shellcheck disable=SC1091
source "$RUN/env"
A=$CEPH_CONF_A
B=$CEPH_CONF_B

say "creating image rbd/demo (256 MiB) at site A and writing 64 MiB to it"
rbd -c "$A" create rbd/demo --size 256M
rbd -c "$A" bench --io-type write --io-pattern rand --io-size 64K --io-total 64M rbd/demo >/dev/null

say "making a CA and the certificates of site-a and site-b (deploy/cairn-certs)"
PKI=$RUN/pki
deploy/cairn-certs ca "$PKI" >/dev/null
deploy/cairn-certs cert "$PKI" site-a IP:127.0.0.1 >/dev/null
deploy/cairn-certs cert "$PKI" site-b IP:127.0.0.1 >/dev/null

PORT=$(( ${CAIRN_DEMO_BASE_PORT:-24789} + 500 ))
cat > "$RUN/cairnd-b.conf" <<CONF
[cairnd]
site = b
control_socket = $RUN/b.sock
[ceph]
conf = $B
client = cairn
keyring = $CAIRN_KEYRING_B
[tls]
ca = $PKI/ca.pem
cert = $PKI/site-b.pem
key = $PKI/site-b.key
[peer site-a]
site = a
pools = rbd
[sink]
listen = 127.0.0.1:$PORT
spool_dir = $RUN/spool
pools = rbd
CONF
cat > "$RUN/cairnd-a.conf" <<CONF
[cairnd]
site = a
control_socket = $RUN/a.sock
[ceph]
conf = $A
client = cairn
keyring = $CAIRN_KEYRING_A
[tls]
ca = $PKI/ca.pem
cert = $PKI/site-a.pem
key = $PKI/site-a.key
[volume demo]
pool = rbd
image = demo
peer = 127.0.0.1:$PORT
interval = 1s
keep_snapshots = 100
CONF
CAIRN=build/engine/cairn
say "starting cairnd as client.cairn (caps: profile rbd): sink at site B (127.0.0.1:$PORT), source at site A (every 1 s), over mutual TLS"
build/engine/cairnd -c "$RUN/cairnd-b.conf" >"$RUN/cairnd-b.log" 2>&1 & PIDS+=($!)
build/engine/cairnd -c "$RUN/cairnd-a.conf" >"$RUN/cairnd-a.log" 2>&1 & PIDS+=($!)
# Both answer on their control sockets before anything is asked of them.
for sock in "$RUN/b.sock" "$RUN/a.sock"; do
  deadline=$((SECONDS + 30))
  until $CAIRN --socket "$sock" status >/dev/null 2>&1; do
    if (( SECONDS > deadline )); then
      echo "cairnd did not answer on $sock within 30 s; its logs:" >&2
      tail -n 20 "$RUN"/cairnd-*.log >&2
      exit 1
    fi
    sleep 0.1
  done
done

# How many restore points site B holds (0 before the first one).
points() {
  local out
  out=$($CAIRN --socket "$RUN/b.sock" --json points demo 2>/dev/null) || { echo 0; return; }
  /usr/bin/python3 -c 'import json,sys; print(len(json.loads(sys.argv[1])))' "$out"
}
say "writing to the primary while it replicates, until site B holds 5 restore points"
deadline=$((SECONDS + 180))
shown=-1
while (( (n = $(points)) < 5 )); do
  if (( n != shown )); then
    $CAIRN --socket "$RUN/a.sock" status demo | tail -n 1
    shown=$n
  fi
  if (( SECONDS > deadline )); then
    echo "site B did not reach 5 restore points within 180 s; cairnd logs:" >&2
    tail -n 20 "$RUN"/cairnd-*.log >&2
    exit 1
  fi
  rbd -c "$A" bench --io-type write --io-pattern rand --io-size 64K --io-total 4M rbd/demo >/dev/null
done

say "cairn status at site A and at site B"
$CAIRN --socket "$RUN/a.sock" status
$CAIRN --socket "$RUN/b.sock" status

say "restore points at site B"
$CAIRN --socket "$RUN/b.sock" points demo
POINT=$($CAIRN --socket "$RUN/b.sock" --json points demo |
        /usr/bin/python3 -c 'import json,sys; p=json.load(sys.stdin); print(p[len(p)//2]["seq"])')

say "restoring point $POINT to a new image rbd/demo-restored at site B (instant clone)"
$CAIRN --socket "$RUN/b.sock" restore demo "$POINT" --to demo-restored

say "proving it by content: whole-image hash at B vs the source snapshot cairn.$POINT at A"
want=$(/usr/bin/python3 tests/tools/imagehash.py "$A" rbd "demo@cairn.$POINT")
got=$(/usr/bin/python3 tests/tools/imagehash.py "$B" rbd demo-restored)
echo "site A demo@cairn.$POINT : $want"
echo "site B demo-restored    : $got"
if [[ "$want" != "$got" ]]; then
  echo "MISMATCH: the restored image differs from the source snapshot" >&2
  exit 1
fi
say "OK: restore point $POINT, restored at site B, equals the source snapshot byte for byte"
