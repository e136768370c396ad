//! The built-in images a host boots instances from. `default`: the host's
//! own Debian kernel and a busybox initramfs built here. Its init reports
//! on the serial console every virtio disk it sees appear and go, and
//! stamps a disk's first sector (`SOFTCARD-DEMO <disk> <instance>`) when
//! that sector is blank or already stamped, so a user can see each volume
//! work; a disk with other data is only reported, never written.

use std::io;
use std::path::{Path, PathBuf};

use crate::initramfs::{host_kernel, Initramfs, INIT_PRELUDE};

/// The default image's init, after the prelude.
const INIT: &str = r#"$B --install -s /bin
ID=$(sed -n 's/.*softcard\.instance=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "softcard: instance $ID booted"
# The metadata service: the NIC reaches 169.254.169.254:80 and nothing else.
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip addr add 169.254.169.15/24 dev eth0
    ip link set eth0 up
    # One GET with busybox's nc (its wget crashes in this static build);
    # the body follows the blank line.
    md() { printf 'GET /latest/meta-data/%s HTTP/1.0\r\n\r\n' "$1" | timeout 5 nc 169.254.169.254 80 | tr -d '\r' | sed '1,/^$/d'; }
    echo "softcard: metadata instance-id $(md instance-id)"
    v=$(md vgpu)
    case "$v" in
        "{"*) echo "softcard: metadata vgpu $(echo "$v" | sed 's/"credential":"[^"]*"/"credential":"(given)"/')" ;;
    esac
fi
stamp() {
    first=$(dd if=/dev/$1 bs=512 count=1 2>/dev/null | tr -d '\000' | head -c 13)
    if [ -z "$first" ] || [ "$first" = "SOFTCARD-DEMO" ]; then
        if printf 'SOFTCARD-DEMO %s %s\n' "$1" "$ID" | dd of=/dev/$1 bs=512 count=1 conv=sync,fsync 2>/dev/null; then
            echo "softcard: disk $1 stamped"
        else
            echo "softcard: disk $1 write failed"
        fi
    else
        echo "softcard: disk $1 holds data; left alone"
    fi
}
seen=""
while true; do
    now=""
    for d in /sys/block/vd*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        now="$now $n"
        case " $seen " in
            *" $n "*) ;;
            *) echo "softcard: disk $n appeared ($(cat $d/size) sectors)"; stamp $n ;;
        esac
    done
    for n in $seen; do
        case " $now " in
            *" $n "*) ;;
            *) echo "softcard: disk $n gone" ;;
        esac
    done
    seen="$now"
    usleep 100000
done
"#;

/// A built image: what QEMU boots.
#[derive(Debug, Clone)]
pub struct Image {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Builds (once per kernel) the `default` image under `dir`.
pub fn default_image(dir: &Path) -> io::Result<Image> {
    let kernel = host_kernel()?;
    let tag = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The name changes with the init script, so an image built by an older
    // release is not reused.
    let initrd = dir.join(format!(
        "default-{tag}-{:08x}.cpio",
        crc32fast::hash(INIT.as_bytes())
    ));
    if !initrd.exists() {
        std::fs::create_dir_all(dir)?;
        let mut i = Initramfs::new(&kernel, &format!("#!/bin/busybox sh\n{INIT_PRELUDE}{INIT}"))?;
        i.modules(&["virtio_pci", "virtio_blk", "virtio_net"])?;
        let tmp = dir.join(format!(".default-{tag}.{}", std::process::id()));
        std::fs::write(&tmp, i.finish()?)?;
        std::fs::rename(&tmp, &initrd)?;
    }
    Ok(Image { kernel, initrd })
}

/// The image named `name`.
pub fn image(name: &str, dir: &Path) -> io::Result<Image> {
    match name {
        "default" => default_image(dir),
        _ => Err(io::Error::other(format!("unknown image {name:?}"))),
    }
}
