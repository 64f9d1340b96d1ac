#!/usr/bin/env bash
# Installs everything Cairn needs on Debian 12, from Debian's packages only.
# Idempotent: packages already present are skipped by apt.
#   ./deps.sh            build + Ceph test bed + tests
#   ./deps.sh --cinder   also real OpenStack Cinder, RabbitMQ and PostgreSQL (the Cinder tests)
#   ./deps.sh --bench    also the peers and tools of bench/run.sh (rbd-mirror, fio, matplotlib)
set -euo pipefail

PKGS=(
  # build
  cmake ninja-build g++ pkg-config ccache
  # engine libraries
  librbd-dev librados-dev liburing-dev libxxhash-dev
  libboost1.81-dev libprotobuf-dev protobuf-compiler
  libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libinih-dev libssl-dev libsystemd-dev
  libjemalloc-dev liblz4-dev libzstd-dev
  # the Debian packages (cpack; dpkg-shlibdeps), the systemd unit's check,
  # and deploy/ansible (run and linted by tests/deploy)
  dpkg-dev systemd adduser ansible ansible-lint
  # metrics: a real Prometheus server and promtool, and a strict parser
  prometheus python3-prometheus-client
  # certificates for mutual TLS (deploy/cairn-certs)
  openssl
  # the Cinder driver shim (Python): frames and control messages
  python3-protobuf python3-xxhash
  # tests
  libgtest-dev libgmock-dev libbenchmark-dev python3-pytest clang libclang-rt-14-dev clang-format
  # the two-site Ceph test bed
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rbd python3-rados
  # helpers the scripts use
  procps iproute2 coreutils
)
if [[ "${1:-}" == "--cinder" ]]; then
  # real Cinder (Zed) for the driver and end-to-end tests, its bus, and its
  # database: the services write to it concurrently, which sqlite cannot take
  PKGS+=(python3-cinder cinder-api cinder-scheduler cinder-volume python3-cinderclient
         rabbitmq-server postgresql python3-psycopg2)
fi
if [[ "${1:-}" == "--bench" ]]; then
  PKGS+=(rbd-mirror fio python3-matplotlib)
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${#missing[@]} package(s): ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "deps: all packages present"
fi
