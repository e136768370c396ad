//! A real block device (a loop device the test creates over a file and
//! removes afterwards) as the card's physical device, driven through
//! io_uring with O_DIRECT.

mod common;

use std::process::Command;

use common::{file_bytes, pattern, Client, Daemon};

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn volumes_on_a_block_device() {
    let backing_dir = tempfile::tempdir().unwrap();
    let backing = backing_dir.path().join("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show", "--direct-io=on"])
        .arg(&backing)
        .output()
        .expect("losetup (util-linux)");
    assert!(
        out.status.success(),
        "cannot create a loop device (needs root and /dev/loop-control): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lo = Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned());

    let d = Daemon::start(&format!(
        "[[device]]\nname = \"nvme0\"\nkind = \"block\"\npath = \"{}\"\n",
        lo.0
    ));
    let devs: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "device", "list", "--json"])).unwrap();
    let dev = &devs[0];
    assert_eq!(dev["capacity_bytes"], 128 << 20, "{dev}");
    assert!(
        dev["detail"].as_str().unwrap().contains("O_DIRECT"),
        "{dev}"
    );

    d.ok(&[
        "card", "volume", "create", "a", "--device", "nvme0", "--size", "32MiB",
    ]);
    d.ok(&[
        "card", "volume", "create", "b", "--device", "nvme0", "--size", "32MiB",
    ]);
    let (off_a, off_b) = (d.offset_of("a"), d.offset_of("b"));
    let sock = d.path("b.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "b",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--queues",
        "2",
    ]);
    let mut c = Client::connect(&sock, 2).unwrap();
    let p = pattern(77, 1 << 20);
    assert_eq!(c.write(0, 0, &p), 0);
    assert_eq!(c.write(1, (32 << 20) - 4096, &p[..4096]), 0);
    assert_eq!(c.flush(1), 0);
    assert_eq!(c.read(0, 0, p.len()).unwrap(), p);
    assert_eq!(c.write_zeroes(0, 4096, 8192), 0);
    assert_eq!(c.discard(1, 65536, 65536), 0);
    assert_eq!(c.flush(0), 0);
    let got = c.read(0, 0, 1 << 20).unwrap();
    assert_eq!(&got[..4096], &p[..4096]);
    assert!(got[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&got[12288..65536], &p[12288..65536]);
    assert!(got[65536..131072].iter().all(|&b| b == 0));
    assert_eq!(&got[131072..], &p[131072..]);
    drop(c);

    // The bytes reached the file under the loop device, at b's offset,
    // and a's range stayed zero.
    let on_disk = file_bytes(&backing, off_b, 1 << 20);
    assert!(
        on_disk == got,
        "loop backing file differs from what the guest reads"
    );
    assert_eq!(
        file_bytes(&backing, off_b + (32 << 20) - 4096, 4096),
        p[..4096]
    );
    assert!(file_bytes(&backing, off_a, 32 << 20)
        .iter()
        .all(|&b| b == 0));
}
