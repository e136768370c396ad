#!/usr/bin/env bash
# Installs the system packages a softcard job needs on a fresh Debian 12
# machine, checked by the name of every program that job starts, then checks
# again and stops naming whatever is still missing.
#
#   scripts/deps.sh test    what ./scripts/test.sh's tests start
#   scripts/deps.sh bench   the benchmarks' peers (softcard bench ...)
#   scripts/deps.sh up      what softcard up starts
#   scripts/deps.sh spdk    what scripts/spdk-peer.sh builds SPDK with
#
# Several names may be given at once. Runs apt-get (one update) only when
# something is missing. Needs root, or sudo.
set -euo pipefail

# Each entry is "CHECK PACKAGE": CHECK is a program looked up on PATH, or a
# path (starting with /) or glob that must exist, or py:MODULE for a Python
# module.
common=(
    "qemu-system-x86_64 qemu-system-x86"
    "qemu-img qemu-utils"
    "qemu-io qemu-utils"
    "/boot/vmlinuz-* linux-image-amd64"
    "busybox busybox-static"
    "ip iproute2"
    "ss iproute2"
    # The region's etcd store is built on etcd-client, whose build compiles
    # etcd's protocol files with protoc and protobuf's own .proto files.
    "protoc protobuf-compiler"
    # The gpu-demo image carries softcard with its debug information
    # stripped.
    "objcopy binutils"
    "/usr/include/google/protobuf/descriptor.proto libprotobuf-dev"
    # The drop-in libibverbs takes its struct layouts from rdma-core's own
    # headers through bindgen, which needs libclang.
    "/usr/include/infiniband/verbs.h libibverbs-dev"
    "/usr/lib/llvm-*/lib/libclang.so libclang-dev"
    "ibv_devices ibverbs-utils"
)
test_deps=(
    "${common[@]}"
    "qemu-storage-daemon QEMU"
    "nbdcopy libnbd-bin"
    "nbdinfo libnbd-bin"
    "losetup mount"
    "mount mount"
    "umount mount"
    "ldd libc-bin"
    "python3 python3"
    "py:cryptography python3-cryptography"
    "rdma iproute2"
    # Soft-RoCE peers in guests: rdma-core's tools, perftest, the rxe provider.
    "ibv_rc_pingpong ibverbs-utils"
    "ibv_devinfo ibverbs-utils"
    "ibv_ud_pingpong ibverbs-utils"
    "ibv_srq_pingpong ibverbs-utils"
    "ibv_xsrq_pingpong ibverbs-utils"
    # A small verbs application of the extended CQ API, compiled by a test
    # against rdma-core's header and linked with -libverbs.
    "cc gcc"
    "/usr/lib/x86_64-linux-gnu/libibverbs.so libibverbs-dev"
    "ib_write_bw perftest"
    "ib_send_bw perftest"
    "ib_read_bw perftest"
    "ib_atomic_bw perftest"
    "ib_write_lat perftest"
    "ib_send_lat perftest"
    "ib_read_lat perftest"
    "ib_atomic_lat perftest"
    "/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ibverbs-providers"
    # UCX's own tools over the card's device.
    "ucx_info ucx-utils"
    "ucx_perftest ucx-utils"
    # vGPU: Mesa's lavapipe gives wgpu a Vulkan device on the CPU.
    "/usr/share/vulkan/icd.d/lvp_icd*.json mesa-vulkan-drivers"
    "chromium chromium"
    # The region's tests start a throwaway etcd on loopback, and make a
    # certificate for its HTTPS listener.
    "etcd etcd-server"
    "openssl openssl"
)
bench_deps=(
    "etcd etcd-server"
    "qemu-storage-daemon QEMU"
    "qemu-img qemu-utils"
    "sockperf sockperf"
    "iperf3 iperf3"
    "openssl openssl"
    "ip iproute2"
)
# scripts/spdk-peer.sh: building SPDK's vhost target and a minimal DPDK
# (its code generators run on the distribution's Python, hence the paths).
spdk_deps=(
    "cc gcc"
    "g++ g++"
    "make make"
    "pkg-config pkgconf"
    "meson meson"
    "ninja ninja-build"
    "/usr/lib/python3/dist-packages/elftools python3-pyelftools"
    "/usr/lib/python3/dist-packages/jinja2 python3-jinja2"
    "/usr/lib/python3/dist-packages/tabulate* python3-tabulate"
    "/usr/include/numa.h libnuma-dev"
    "/usr/include/uuid/uuid.h uuid-dev"
    "/usr/include/openssl/ssl.h libssl-dev"
    "/usr/include/libaio.h libaio-dev"
    "/usr/include/json-c/json.h libjson-c-dev"
    "/usr/include/ncurses.h libncurses-dev"
    "/usr/include/keyutils.h libkeyutils-dev"
)
up_deps=(
    "${common[@]}"
    "/usr/share/vulkan/icd.d/lvp_icd*.json mesa-vulkan-drivers"
)

present() {
    local check=$1
    case "$check" in
        py:*) python3 -c "import ${check#py:}" 2>/dev/null ;;
        /*) compgen -G "$check" >/dev/null ;;
        # grep reads the whole list: with -q it would stop early, busybox
        # would die of SIGPIPE, and pipefail would call the check failed.
        busybox) [ -x /bin/busybox ] && /bin/busybox --list | grep -x insmod >/dev/null ;;
        *) command -v "$check" >/dev/null ;;
    esac
}

entries=()
for job in "${@:-test}"; do
    case "$job" in
        test) entries+=("${test_deps[@]}") ;;
        bench) entries+=("${bench_deps[@]}") ;;
        up) entries+=("${up_deps[@]}") ;;
        spdk) entries+=("${spdk_deps[@]}") ;;
        *) echo "deps.sh: unknown job '$job' (test, bench, up, spdk)" >&2; exit 2 ;;
    esac
done

missing() {
    local e
    for e in "${entries[@]}"; do
        present "${e%% *}" || echo "$e"
    done
}

mapfile -t absent < <(missing)
if [ ${#absent[@]} -gt 0 ]; then
    pkgs=()
    qemu=0
    for e in "${absent[@]}"; do
        pkg=${e#* }
        case "$pkg" in
            QEMU | qemu-*) qemu=1 ;;
            *) pkgs+=("$pkg") ;;
        esac
    done
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    if [ $qemu -eq 1 ]; then
        # QEMU's packages must come from one release: installing the
        # distribution's qemu-system-x86 next to a newer qemu-utils (the
        # machine image ships one from backports) removes qemu-utils, and
        # qemu-img and qemu-io with it. So all of them are asked for at the
        # version of qemu-system-x86 the archive offers, downgrading
        # qemu-utils where needed. qemu-storage-daemon lives in
        # qemu-system-common at that version.
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "deps.sh: apt offers no qemu-system-x86" >&2; exit 1; }
        pkgs+=("qemu-system-x86=$v" "qemu-system-common=$v" "qemu-utils=$v" "qemu-system-data")
    fi
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    printf '\n== installing %s\n' "${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        --allow-downgrades "${pkgs[@]}"
fi

mapfile -t still < <(missing)
if [ ${#still[@]} -gt 0 ]; then
    for e in "${still[@]}"; do
        pkg=${e#* }
        [ "$pkg" = QEMU ] && pkg=qemu-system-common
        echo "deps.sh: '${e%% *}' is still missing after installing (package $pkg)" >&2
    done
    exit 1
fi
