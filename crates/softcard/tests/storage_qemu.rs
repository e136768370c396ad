//! End to end with a real guest: QEMU (TCG) boots Debian's kernel with a
//! busybox initramfs built here, attaches two volumes of one device over
//! vhost-user-blk, and the guest writes distinct data to each with
//! O_DIRECT and reads it back. The test then checks the bytes on the
//! physical device file at each partition's offset (volume b is encrypted:
//! its bytes are decrypted independently with Python's `cryptography`),
//! and that every byte between and around the partitions is untouched.
//! A second guest keeps its disk while the card daemon is stopped and
//! started three times under it (QEMU reconnects to the vhost-user socket;
//! the card's record of attachments brings the socket back).
//!
//! Needs qemu-system-x86, linux-image-amd64 and busybox-static (the README's
//! test command installs them).

mod common;

use std::time::Duration;

use common::guest::{build_initramfs, Guest};
use common::{file_bytes, pattern, python_decrypt, wrapped_key_on_device, Daemon};

const MIB: u64 = 1 << 20;
const DEVICE_BYTES: u64 = 96 * MIB;
/// The partition map's area at the front of the device.
const MAP_AREA: u64 = 2 * MIB;
const SENTINEL_SEED: u64 = 0x5e47;

const INIT: &str = r#"
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
  i=$((i+1)); [ $i -gt 200 ] && { echo "SOFTCARD-FAIL no disks"; $B poweroff -f; }
  $B sleep 0.1
done
echo "SOFTCARD-SIZE vda $($B cat /sys/block/vda/size) vdb $($B cat /sys/block/vdb/size)"
echo "SOFTCARD-SERIAL vda $($B cat /sys/block/vda/serial) vdb $($B cat /sys/block/vdb/serial)"
ok=1
# vda: 64 KiB at the start, 64 KiB at the very end; vdb: 256 KiB at 1 MiB.
$B dd if=/pat_a0 of=/dev/vda bs=65536 seek=0 oflag=direct conv=fsync 2>/dev/null || ok=0
last=$(( $($B cat /sys/block/vda/size) / 128 - 1 ))
$B dd if=/pat_a1 of=/dev/vda bs=65536 seek=$last oflag=direct conv=fsync 2>/dev/null || ok=0
$B dd if=/pat_b of=/dev/vdb bs=65536 seek=16 oflag=direct conv=fsync 2>/dev/null || ok=0
# One write past the end must fail and change nothing.
$B dd if=/pat_a0 of=/dev/vda bs=65536 seek=$((last+1)) count=1 oflag=direct 2>/dev/null && { echo "SOFTCARD-FAIL write past end accepted"; ok=0; }
$B dd if=/dev/vda of=/r_a0 bs=65536 count=1 iflag=direct 2>/dev/null || ok=0
$B dd if=/dev/vda of=/r_a1 bs=65536 skip=$last count=1 iflag=direct 2>/dev/null || ok=0
$B dd if=/dev/vdb of=/r_b bs=65536 skip=16 count=4 iflag=direct 2>/dev/null || ok=0
$B cmp /pat_a0 /r_a0 || ok=0
$B cmp /pat_a1 /r_a1 || ok=0
$B cmp /pat_b /r_b || ok=0
$B sync
[ $ok = 1 ] && echo "SOFTCARD-RESULT ok" || echo "SOFTCARD-RESULT fail"
$B poweroff -f
"#;

/// An initramfs running `script` (after the prelude), with `pats` as files.
#[test]
fn guest_writes_land_in_their_partitions_only() {
    let k = softcard_testkit::kernel();
    // The device file: a blank map area, then sentinel bytes everywhere,
    // so that any stray write shows.
    let dir_devices = r#"
[[device]]
name = "nvme0"
kind = "file"
path = "@DIR@/nvme0.img"

[[tenant]]
name = "acme"
kek_file = "@DIR@/acme.kek"
"#;
    let kek = "3c".repeat(32);
    let pre = tempfile::tempdir().unwrap();
    let sentinel = pattern(SENTINEL_SEED, (DEVICE_BYTES - MAP_AREA) as usize);
    let mut image = vec![0u8; MAP_AREA as usize];
    image.extend_from_slice(&sentinel);
    let img_src = pre.path().join("nvme0.img");
    std::fs::write(&img_src, &image).unwrap();
    drop(image);

    // The daemon opens the device at its configured path: place it first.
    let mut d = Daemon::start_with(dir_devices, |dir| {
        std::fs::copy(&img_src, dir.join("nvme0.img")).unwrap();
        std::fs::write(dir.join("acme.kek"), &kek).unwrap();
    });
    let dev = d.path("nvme0.img");
    d.ok(&[
        "card", "volume", "create", "a", "--device", "nvme0", "--size", "16MiB",
    ]);
    d.ok(&[
        "card", "volume", "create", "gap", "--device", "nvme0", "--size", "4MiB",
    ]);
    // b is encrypted: the guest sees plaintext, the device ciphertext.
    d.ok(&[
        "card",
        "volume",
        "create",
        "b",
        "--device",
        "nvme0",
        "--size",
        "16MiB",
        "--encrypt",
        "--tenant",
        "acme",
    ]);
    d.ok(&["card", "volume", "delete", "gap"]);
    let (off_a, off_b) = (d.offset_of("a"), d.offset_of("b"));
    let (sa, sb) = (d.path("a.sock"), d.path("b.sock"));
    d.ok(&[
        "card",
        "volume",
        "attach",
        "a",
        "--vhost-user",
        sa.to_str().unwrap(),
        "--queues",
        "2",
    ]);
    d.ok(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        sb.to_str().unwrap(),
    ]);

    let pat_a0 = pattern(100, 65536);
    let pat_a1 = pattern(101, 65536);
    let pat_b = pattern(102, 262144);
    let initrd = d.path("initrd.cpio");
    build_initramfs(
        &k,
        &initrd,
        INIT,
        &[("pat_a0", &pat_a0), ("pat_a1", &pat_a1), ("pat_b", &pat_b)],
    );

    let guest = Guest::boot(
        &k,
        &initrd,
        &[
            (
                format!("socket,path={}", sa.display()),
                "num-queues=2".into(),
            ),
            // Without EVENT_IDX: the driver's NO_INTERRUPT flag decides
            // which answers it is told of.
            (
                format!("socket,path={}", sb.display()),
                "num-queues=1,event_idx=off".into(),
            ),
        ],
    );
    let console = guest.console();
    let line = |key: &str| {
        console
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line in the console:\n{console}"))
            .to_owned()
    };
    assert!(!console.contains("SOFTCARD-FAIL"), "{console}");
    assert_eq!(line("SOFTCARD-SIZE"), "SOFTCARD-SIZE vda 32768 vdb 32768");
    assert_eq!(line("SOFTCARD-SERIAL"), "SOFTCARD-SERIAL vda a vdb b");
    assert_eq!(line("SOFTCARD-RESULT"), "SOFTCARD-RESULT ok", "{console}");

    // The bytes on the physical device.
    let vol = 16 * MIB;
    let got = file_bytes(&dev, 0, DEVICE_BYTES as usize);
    assert_eq!(&got[off_a as usize..][..65536], &pat_a0[..]);
    assert_eq!(&got[(off_a + vol - 65536) as usize..][..65536], &pat_a1[..]);
    let b_raw = &got[(off_b + MIB) as usize..][..262144];
    assert!(
        b_raw != &pat_b[..],
        "plaintext on the device of an encrypted volume"
    );
    let wrapped = wrapped_key_on_device(&dev, "b");
    let b_plain = python_decrypt(&kek, &wrapped, MIB / 512, b_raw).unwrap();
    assert!(
        b_plain == pat_b,
        "guest data on b does not decrypt to what the guest wrote"
    );
    let written = [
        (off_a, 65536u64),
        (off_a + vol - 65536, 65536),
        (off_b + MIB, 262144),
    ];
    // Everything else past the map area is the sentinel, byte for byte:
    // the gap between a and b, the space after b, and the unwritten parts
    // of both volumes.
    let mut at = MAP_AREA;
    let mut stray = Vec::new();
    while at < DEVICE_BYTES {
        if let Some(&(_, len)) = written.iter().find(|(o, _)| *o == at) {
            at += len;
            continue;
        }
        let next = written
            .iter()
            .map(|(o, _)| *o)
            .filter(|&o| o > at)
            .min()
            .unwrap_or(DEVICE_BYTES);
        let range = at as usize..next as usize;
        let sent = &sentinel[(at - MAP_AREA) as usize..(next - MAP_AREA) as usize];
        if &got[range.clone()] != sent {
            stray.push(range);
        }
        at = next;
    }
    assert!(
        stray.is_empty(),
        "bytes changed outside the written ranges: {stray:?}"
    );
    d.stop();
}

/// The guest's side of the restart test: 32 writes of 1 MiB with O_DIRECT
/// and a flush each, a pause between them (the test restarts the card
/// meanwhile), then every MiB read back and compared.
const RESTART_INIT: &str = r#"
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 200 ] && { echo "SOFTCARD-FAIL no disk"; $B poweroff -f; }
  $B sleep 0.1
done
ok=1
echo "SOFTCARD-START"
n=0
while [ $n -lt 32 ]; do
  $B dd if=/pat of=/dev/vda bs=1048576 seek=$n count=1 oflag=direct conv=fsync 2>/dev/null || { echo "SOFTCARD-FAIL write $n"; ok=0; }
  n=$((n+1))
  $B sleep 0.2
done
n=0
while [ $n -lt 32 ]; do
  $B dd if=/dev/vda of=/r bs=1048576 skip=$n count=1 iflag=direct 2>/dev/null || { echo "SOFTCARD-FAIL read $n"; ok=0; }
  $B cmp /pat /r || { echo "SOFTCARD-FAIL data $n"; ok=0; }
  n=$((n+1))
done
[ $ok = 1 ] && echo "SOFTCARD-RESULT ok" || echo "SOFTCARD-RESULT fail"
$B poweroff -f
"#;

/// A running guest's disk across card restarts: QEMU reconnects to the
/// vhost-user socket (`reconnect=1`) while the card daemon is stopped and
/// started three times (SIGTERM: each interface is quiesced, what its
/// queues took is reported before the connection closes; the record of
/// attachments brings the socket back). The guest writes and flushes
/// 32 MiB meanwhile, sees no I/O error, and reads every MiB back; the
/// device file holds them too.
#[test]
fn a_guest_keeps_its_disk_across_card_restarts() {
    let k = softcard_testkit::kernel();
    let mut d = Daemon::start(
        "state_file = \"@DIR@/attachments.json\"\nrdma_socket = \"@DIR@/rdma.sock\"\n\
         [[device]]\nname = \"nvme0\"\nkind = \"file\"\npath = \"@DIR@/disk.img\"\nsize = \"96MiB\"\n",
    );
    d.ok(&[
        "card", "volume", "create", "a", "--device", "nvme0", "--size", "48MiB",
    ]);
    let sa = d.path("a.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "a",
        "--vhost-user",
        sa.to_str().unwrap(),
    ]);
    let pat = pattern(7, 1 << 20);
    let initrd = d.path("initrd.cpio");
    build_initramfs(&k, &initrd, RESTART_INIT, &[("pat", &pat)]);

    let guest = Guest::boot(
        &k,
        &initrd,
        &[(
            format!("socket,path={},reconnect=1", sa.display()),
            "num-queues=1".into(),
        )],
    );
    // Once the guest writes, restart the card three times.
    guest.wait_line("SOFTCARD-START");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        d.restart();
    }
    let console = guest.console();
    assert!(!console.contains("SOFTCARD-FAIL"), "{console}");
    assert!(console.contains("SOFTCARD-RESULT ok"), "{console}");
    let off = d.offset_of("a");
    d.stop();
    let disk = file_bytes(&d.path("disk.img"), off, 32 << 20);
    for n in 0..32 {
        assert!(
            disk[n << 20..(n + 1) << 20] == pat[..],
            "MiB {n} on the device"
        );
    }
}
