//! The built-in images a host boots instances from. `default`: the host's
//! own Debian kernel and a busybox initramfs built here. Its init reports
//! on the serial console every virtio disk it sees appear and go, and
//! stamps a disk's first sector (`SOFTCARD-DEMO <disk> <instance>`) when
//! that sector is blank or already stamped, so a user can see each volume
//! work; a disk with other data is only reported, never written.

use std::io;
use std::path::{Path, PathBuf};

use crate::initramfs::{host_kernel, Initramfs, INIT_PRELUDE};

/// The default image's init: network and metadata.
macro_rules! INIT_NET {
    () => {
        r#"$B --install -s /bin
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
"#
    };
}

/// The default image's init: report and stamp disks, forever.
macro_rules! INIT_DISKS {
    () => {
        r#"stamp() {
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
"#
    };
}

/// The default image's init, after the prelude.
const INIT: &str = concat!(INIT_NET!(), INIT_DISKS!());

/// The `gpu-demo` image's init: the network and metadata, then the
/// project's wgpu render loop on the instance's vGPU (its endpoint and
/// credential from the metadata service): a compute workload whose digest
/// it prints, 60 frames as fast as the vGPU goes, then the still scene at
/// 30 fps for the console's viewer.
const GPU_DEMO_INIT: &str = concat!(
    INIT_NET!(),
    r#"# A vGPU reaches the metadata once its GPU server admits it.
case "$v" in "{"*) ;; *) v="" ;; esac
n=0
while [ -z "$v" ] && [ $n -lt 60 ] && [ -e /sys/class/net/eth0 ]; do
    usleep 500000
    n=$((n + 1))
    v=$(md vgpu)
    case "$v" in "{"*) ;; *) v="" ;; esac
done
if [ -n "$v" ]; then
    echo "softcard: running the wgpu demo on the vGPU the metadata names"
    RUST_LOG=warn /bin/softcard gpu demo --server metadata --compute 65536 --frames 60 --width 320 --height 240 --fps 0 2>&1
    echo "softcard: demo exited with $?"
    echo "softcard: rendering at 30 fps for the console"
    RUST_LOG=warn /bin/softcard gpu demo --server metadata --frames 0 --still --width 320 --height 240 --fps 30 >/dev/null 2>&1 &
else
    echo "softcard: no vGPU in the metadata"
fi
while true; do sleep 3600; done
"#
);

/// A built image: what QEMU boots.
#[derive(Debug, Clone)]
pub struct Image {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Builds (once per kernel, init script and program) an image under
/// `dir`: busybox, the virtio modules, the init, and `program` as
/// `/bin/softcard` with the libraries it needs (its debug information
/// stripped: it would not fit a small instance's memory).
fn build(dir: &Path, name: &str, init: &str, program: Option<&Path>) -> io::Result<Image> {
    let kernel = host_kernel()?;
    let tag = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut key = crc32fast::Hasher::new();
    key.update(init.as_bytes());
    if let Some(p) = program {
        let m = std::fs::metadata(p)?;
        key.update(&m.len().to_le_bytes());
        key.update(&format!("{:?}", m.modified().ok()).into_bytes());
    }
    // The name changes with what goes in, so an image built by an older
    // release is not reused.
    let initrd = dir.join(format!("{name}-{tag}-{:08x}.cpio", key.finalize()));
    if !initrd.exists() {
        std::fs::create_dir_all(dir)?;
        let mut i = Initramfs::new(&kernel, &format!("#!/bin/busybox sh\n{INIT_PRELUDE}{init}"))?;
        i.modules(&["virtio_pci", "virtio_blk", "virtio_net"])?;
        if let Some(p) = program {
            let stripped = dir.join(format!(".softcard.{}", std::process::id()));
            let st = std::process::Command::new("objcopy")
                .arg("--strip-debug")
                .arg(p)
                .arg(&stripped)
                .status()
                .map_err(|e| io::Error::other(format!("objcopy (package binutils): {e}")))?;
            if !st.success() {
                return Err(io::Error::other(format!(
                    "objcopy --strip-debug {}: {st}",
                    p.display()
                )));
            }
            let data = std::fs::read(&stripped)?;
            let _ = std::fs::remove_file(&stripped);
            i.file("bin/softcard", &data, 0o755)?;
            i.libraries_of(&p.to_string_lossy())?;
        }
        let tmp = dir.join(format!(".{name}-{tag}.{}", std::process::id()));
        std::fs::write(&tmp, i.finish()?)?;
        std::fs::rename(&tmp, &initrd)?;
    }
    Ok(Image { kernel, initrd })
}

/// Builds (once per kernel) the `default` image under `dir`.
pub fn default_image(dir: &Path) -> io::Result<Image> {
    build(dir, "default", INIT, None)
}

/// The image named `name`.
pub fn image(name: &str, dir: &Path) -> io::Result<Image> {
    match name {
        "default" => default_image(dir),
        // The program the card daemon runs is the one the guest runs.
        "gpu-demo" => build(
            dir,
            "gpu-demo",
            GPU_DEMO_INIT,
            Some(&std::env::current_exe()?),
        ),
        _ => Err(io::Error::other(format!("unknown image {name:?}"))),
    }
}
