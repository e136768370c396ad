#!/usr/bin/env bash
# Builds SPDK's vhost target for `softcard bench storage --spdk`, from
# source trees the operator brings (SPDK is not packaged for Debian):
#
#   scripts/spdk-peer.sh SPDK_SRC DPDK_SRC OUT
#
# SPDK_SRC: an SPDK tree (26.09-pre was used); its git submodules are not
#   needed. DPDK_SRC: a DPDK tree of 26.07 or later, the first whose vhost
#   library offers CONFIGURE_MEM_SLOTS, which libblkio's vhost-user client
#   requires (Debian's DPDK 22.11 and SPDK's own DPDK fork up to 23.11
#   lack it: "Backend doesn't support required protocol features").
# OUT: a new directory; the vhost binary ends up in OUT/spdk/build/bin.
#
# Only what the vhost target needs is built: a minimal DPDK (its vhost
# library, two buses, the ring mempool) and SPDK without ISA-L, crypto,
# RDMA, io_uring and the other optional modules. SPDK's check of the DPDK
# version it accepts is widened to all of 26.x (it guards the private PCI
# ABI, and the bench uses no PCI device). Takes ~5 minutes on 2 cores.
#
# Running it needs huge pages, which the bench checks for:
#   echo 800 > /proc/sys/vm/nr_hugepages
#   mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages
set -euo pipefail

if [ $# -ne 3 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
spdk_src=$(readlink -f "$1")
dpdk_src=$(readlink -f "$2")
out=$3
[ -f "$spdk_src/configure" ] || { echo "$spdk_src is not an SPDK tree" >&2; exit 2; }
[ -f "$dpdk_src/meson.build" ] || { echo "$dpdk_src is not a DPDK tree" >&2; exit 2; }
[ ! -e "$out" ] || { echo "$out exists; give a new directory" >&2; exit 2; }

"$(dirname "$0")/deps.sh" spdk
# Distribution Python (meson, pyelftools, jinja2, tabulate come from apt),
# not a user's own first on PATH.
export PATH=/usr/bin:/bin:/usr/sbin:/sbin

mkdir -p "$out"
out=$(readlink -f "$out")
cp -a "$dpdk_src" "$out/dpdk-src"
cp -a "$spdk_src" "$out/spdk"

cd "$out/dpdk-src"
meson setup build --prefix="$out/dpdk" -Dtests=false -Denable_docs=false \
    -Dexamples= -Denable_apps=none \
    -Denable_libs=vhost,ring,mempool,pci,kvargs,telemetry,argparse,log,eal,hash,net,mbuf,ethdev,cryptodev,dmadev,rcu,timer,power,meter \
    -Denable_drivers=bus/pci,bus/vdev,mempool/ring
ninja -C build install

cd "$out/spdk"
pci=lib/env_dpdk/pci_dpdk.c
grep -q 'Only 26.03.0 is supported' "$pci" || {
    echo "$pci: the DPDK version check has changed; review it by hand" >&2
    exit 1
}
# Accept every 26.x release: replace the 26.03-only condition.
sed -i '/Only 26.03.0 is supported/{n;s/if (month != 3 || minor != 0) {/if (0) {/}' "$pci"
# No ISA-L (a submodule, and only needed for crypto and compression):
# configure skips it when nasm is older than 2.14, after looking for the
# submodule's autogen.sh; a stand-in nasm answers for the check.
mkdir -p isa-l "$out/shim" && touch isa-l/autogen.sh
printf '#!/bin/sh\necho "NASM version 2.0"\n' > "$out/shim/nasm"
chmod +x "$out/shim/nasm"
PATH="$out/shim:$PATH" ./configure --with-dpdk="$out/dpdk" --without-isal-crypto --without-crypto \
    --without-vfio-user --without-xnvme --without-ocf --without-fio \
    --without-uring --without-fsdev --without-nvme-cuse --without-idxd \
    --without-rdma --without-usdt --disable-tests --disable-unit-tests \
    --disable-examples
make -j"$(nproc)"
echo "SPDK's vhost target: $out/spdk/build/bin/vhost"
