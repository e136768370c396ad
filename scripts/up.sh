#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: installs what `softcard up`
# starts (QEMU, a Debian kernel, busybox, lavapipe; protoc for the build),
# builds softcard and runs `softcard up` with the arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh up
exec cargo run --release --locked -- up "$@"
