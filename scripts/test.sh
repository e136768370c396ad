#!/usr/bin/env bash
# Sets up a fresh Debian machine for softcard's tests and runs all of them:
# formatting, lints, unit and integration tests (libblkio, a hostile raw
# vhost-user frontend, QEMU guests, Soft-RoCE, wgpu on lavapipe, headless
# Chromium), and a short fuzzing run.
#
# System packages the tests need are installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# qemu-storage-daemon (qemu-system-common) and qemu-img (qemu-utils) are
# what `softcard bench storage` compares against.
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v qemu-img >/dev/null || need+=(qemu-utils)
# NBD clients of the host-side export: qemu-io (qemu-utils) and libnbd's
# nbdinfo and nbdcopy.
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx insmod || need+=(busybox-static)
python3 -c 'import cryptography' 2>/dev/null || need+=(python3-cryptography)
command -v losetup >/dev/null || need+=(mount)
# Soft-RoCE peer in a guest: rdma-core tools, perftest and the rxe provider.
command -v ibv_rc_pingpong >/dev/null || need+=(ibverbs-utils)
command -v ib_write_bw >/dev/null || need+=(perftest)
[ -e /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ] || need+=(ibverbs-providers)
command -v rdma >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
# vGPU: Mesa's lavapipe gives wgpu a Vulkan device on the CPU; headless
# Chromium is the viewer the browser test drives.
compgen -G '/usr/share/vulkan/icd.d/lvp_icd*.json' >/dev/null || need+=(mesa-vulkan-drivers)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

log "rustfmt"
cargo fmt --all -- --check
log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "tests"
cargo test --workspace --locked

log "fuzz (virtio-blk request parser, RoCEv2 receive path, vGPU session, NBD connection: ${FUZZ_SECONDS:=30} s each)"
if rustup toolchain list | grep -q '^nightly'; then
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    for target in request rdma_receive gpu_session nbd_session; do
        # Hand-made seeds (fuzz/seeds/TARGET) get a target past magic
        # numbers it would take long to guess.
        if [ -d "fuzz/seeds/$target" ]; then
            mkdir -p "fuzz/corpus/$target"
            cp -n "fuzz/seeds/$target"/* "fuzz/corpus/$target/"
        fi
        # gpu_session drives Mesa's lavapipe, whose own leaks are not ours.
        (cd fuzz && LSAN_OPTIONS="suppressions=$PWD/lsan-lavapipe.supp" \
            cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS")
    done
else
    echo "no nightly toolchain: cargo fuzz cannot build here. The parser's"
    echo "invariants were still checked by the proptest in the tests above."
    exit 1
fi
log "all tests passed"
