#!/usr/bin/env bash
# Configures and builds Cairn into ./build (Ninja, ccache when installed).
#   ./build.sh [extra cmake args]
set -euo pipefail
cd "$(dirname "$0")"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
ninja -C build
# The shim's control messages, generated from the same proto/cairn.proto.
protoc -Iproto --python_out=cinder_driver_shim/cairn_cinder proto/cairn.proto
