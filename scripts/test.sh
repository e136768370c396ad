#!/usr/bin/env bash
# Sets up a fresh Debian machine for softcard's tests and runs all of them:
# formatting, lints, unit and integration tests (libblkio, a hostile raw
# vhost-user frontend, QEMU guests, Soft-RoCE, wgpu on lavapipe, headless
# Chromium), and a short fuzzing run.
#
# The system packages every test needs are installed by scripts/deps.sh,
# which checks each program the tests start by its own name. Every test
# runs even when an earlier one fails; the last line counts them.
set -uo pipefail
# A fresh build needs no incremental state; it only takes disk.
export CARGO_INCREMENTAL=0
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
failed_steps=()
step() {
    local name=$1
    shift
    log "$name"
    "$@" || failed_steps+=("$name")
}

log "system packages"
./scripts/deps.sh test || { echo "test.sh: the tests' programs could not be installed" >&2; exit 1; }

step rustfmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests"
out=$(mktemp)
# Each test binary runs under a time limit (scripts/test-limit.sh).
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/test-limit.sh" \
    cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed_steps+=(tests)
passed=$(awk '/^test result:/ {for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i} END {print s + 0}' "$out")
failed=$(awk '/^test result:/ {for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i} END {print s + 0}' "$out")
failures=$(grep -E '^    [A-Za-z0-9_:]+$' "$out" | sort -u || true)
# A test binary that does not build or dies before its summary (a crash)
# counts no test: cargo names it among the failed targets.
targets=$(grep -E '^    `-p ' "$out" || true)
if [ -n "$targets" ] && [ "$failed" -eq 0 ]; then failed=$(grep -cE '^    `-p ' "$out"); fi
rm -f "$out"

fuzz() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        echo "no nightly toolchain: cargo fuzz cannot build here."
        return 1
    fi
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked || return 1
    local target
    for target in request rdma_receive rdma_session gpu_session gpu_hello nbd_session; do
        # Hand-made seeds (fuzz/seeds/TARGET) get a target past magic
        # numbers it would take long to guess.
        if [ -d "fuzz/seeds/$target" ]; then
            mkdir -p "fuzz/corpus/$target"
            cp -n "fuzz/seeds/$target"/* "fuzz/corpus/$target/"
        fi
        # gpu_session drives Mesa's lavapipe, whose own leaks are not ours.
        (cd fuzz && LSAN_OPTIONS="suppressions=$PWD/lsan-lavapipe.supp" \
            cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS") || return 1
    done
}
: "${FUZZ_SECONDS:=30}"
step "fuzz (virtio-blk request parser, RoCEv2 receive path, RDMA sessions and rings, vGPU session, vGPU handshake and credentials, NBD connection: $FUZZ_SECONDS s each)" fuzz

echo
if [ -n "$failures" ]; then
    echo "failing tests:"
    echo "$failures"
fi
if [ -n "$targets" ]; then
    echo "failing test binaries:"
    echo "$targets"
fi
if [ ${#failed_steps[@]} -gt 0 ]; then
    echo "failed steps: ${failed_steps[*]}"
fi
echo "tests: $passed passed, $failed failed"
[ ${#failed_steps[@]} -eq 0 ]
