//! Volumes presented to the host system as NBD exports, through real NBD
//! clients: QEMU's (`qemu-io`, `qemu-img`) and libnbd's (`nbdinfo`,
//! `nbdcopy`). Every byte is checked where it must land on the device,
//! an encrypted volume's ciphertext is decrypted with Python's
//! `cryptography`, and a hostile client gets errors or a closed connection
//! while nothing outside its volume changes.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use common::{file_bytes, pattern, python_decrypt, wrapped_key_on_device, Daemon};

const MIB: u64 = 1 << 20;

fn uri(volume: &str, socket: &Path) -> String {
    format!("nbd+unix:///{volume}?socket={}", socket.display())
}

/// Runs a tool; panics with its output unless it succeeds.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tool} {args:?} failed: {text}");
    text
}

/// `qemu-io` commands against an export.
fn qemu_io(target: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

#[test]
fn nbd_exports_serve_qemu_and_libnbd_and_survive_hostile_clients() {
    let kek = "3c".repeat(32);
    let d = Daemon::start_with(
        r#"
[[device]]
name = "nvme0"
kind = "file"
path = "@DIR@/nvme0.img"
size = "128MiB"

[[tenant]]
name = "acme"
kek_file = "@DIR@/acme.kek"
"#,
        |dir| std::fs::write(dir.join("acme.kek"), format!("{kek}\n")).unwrap(),
    );
    let dev = d.path("nvme0.img");
    d.ok(&[
        "card", "volume", "create", "h", "--device", "nvme0", "--size", "16MiB",
    ]);
    d.ok(&[
        "card",
        "volume",
        "create",
        "e",
        "--device",
        "nvme0",
        "--size",
        "8MiB",
        "--encrypt",
        "--tenant",
        "acme",
    ]);
    d.ok(&[
        "card", "volume", "create", "n", "--device", "nvme0", "--size", "4MiB",
    ]);
    let (off_h, off_e, off_n) = (d.offset_of("h"), d.offset_of("e"), d.offset_of("n"));
    let (sock_h, sock_e, sock_n) = (d.path("h.nbd"), d.path("e.nbd"), d.path("n.nbd"));
    let out = d.ok(&[
        "card",
        "volume",
        "attach",
        "h",
        "--nbd",
        sock_h.to_str().unwrap(),
    ]);
    assert!(out.contains("exported over NBD"), "{out}");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "e",
        "--nbd",
        sock_e.to_str().unwrap(),
    ]);
    // The neighbour, written once and checked at the end.
    d.ok(&[
        "card",
        "volume",
        "attach",
        "n",
        "--nbd",
        sock_n.to_str().unwrap(),
    ]);
    let neighbour = pattern(77, 4 * MIB as usize);
    std::fs::write(d.path("n.in"), &neighbour).unwrap();
    run(
        "nbdcopy",
        &[d.path("n.in").to_str().unwrap(), &uri("n", &sock_n)],
    );
    assert_eq!(file_bytes(&dev, off_n, neighbour.len()), neighbour);

    // libnbd sees the export as negotiated.
    let info = run("nbdinfo", &["--json", &uri("h", &sock_h)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &v["exports"][0];
    assert_eq!(export["export-size"], 16 * MIB, "{info}");
    assert_eq!(export["block_size_minimum"], 512, "{info}");
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[cap], true, "{cap}: {info}");
    }

    // QEMU's client: writes (one with FUA), reads, zeroes, discard, flush;
    // every byte where it belongs on the device.
    let h = uri("h", &sock_h);
    qemu_io(
        &h,
        &[
            "write -P 0x5a 0 1M",
            "write -f -P 0xc3 15M 1M",
            "read -P 0x5a 0 1M",
            "read -P 0xc3 15M 1M",
            "write -z 4096 8192",
            "read -P 0 4096 8192",
            "read -P 0x5a 12288 4096",
            "flush",
        ],
    );
    let mut want = vec![0x5au8; MIB as usize];
    want[4096..12288].fill(0);
    assert_eq!(file_bytes(&dev, off_h, want.len()), want);
    assert_eq!(
        file_bytes(&dev, off_h + 15 * MIB, MIB as usize),
        vec![0xc3u8; MIB as usize]
    );
    // Past the end: refused (qemu checks the size itself; the raw client
    // below shows the server's own check), nothing written.
    let past = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 16M 4096", &h])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&past.stdout).into_owned() + &String::from_utf8_lossy(&past.stderr);
    assert!(!text.contains("wrote 4096"), "{text}");

    // nbdcopy both ways, and qemu-img's view.
    let img = pattern(5, 2 * MIB as usize);
    std::fs::write(d.path("in.img"), &img).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            d.path("in.img").to_str().unwrap(),
            &format!(
                "json:{{\"file.driver\":\"nbd\",\"file.path\":\"{}\",\"file.export\":\"h\"}}",
                sock_h.display()
            ),
        ],
    );
    assert_eq!(file_bytes(&dev, off_h, img.len()), img);
    run("nbdcopy", &[&h, d.path("out.img").to_str().unwrap()]);
    let out = std::fs::read(d.path("out.img")).unwrap();
    assert_eq!(out.len() as u64, 16 * MIB);
    assert_eq!(&out[..img.len()], &img[..]);
    assert_eq!(&out[(15 * MIB) as usize..], &vec![0xc3u8; MIB as usize][..]);

    // The encrypted volume: plaintext through NBD, AES-XTS plain64 on the
    // device, zeroes that read back as zeroes.
    let e = uri("e", &sock_e);
    let secret = pattern(9, 256 << 10);
    std::fs::write(d.path("secret.in"), &secret).unwrap();
    run("nbdcopy", &[d.path("secret.in").to_str().unwrap(), &e]);
    qemu_io(&e, &["write -z 1M 64k", "read -P 0 1M 64k"]);
    let raw = file_bytes(&dev, off_e, secret.len());
    assert!(raw != secret, "plaintext on the device");
    let wrapped = wrapped_key_on_device(&dev, "e");
    assert_eq!(python_decrypt(&kek, &wrapped, 0, &raw).unwrap(), secret);
    let raw_zeroes = file_bytes(&dev, off_e + MIB, 65536);
    assert!(
        raw_zeroes.iter().any(|&b| b != 0),
        "raw zeroes on the device"
    );
    assert_eq!(
        python_decrypt(&kek, &wrapped, MIB / 512, &raw_zeroes).unwrap(),
        vec![0u8; 65536]
    );

    // A hostile client, byte by byte.
    hostile(&sock_h);

    // The volume's throttle holds NBD requests too (set live): 40 reads
    // at 100 IOPS with a burst of 2 must wait for it.
    d.ok(&[
        "card",
        "volume",
        "set-qos",
        "h",
        "--iops",
        "100",
        "--iops-burst",
        "2",
    ]);
    let throttled = |d: &Daemon| {
        let v: serde_json::Value =
            serde_json::from_str(&d.ok(&["card", "volume", "show", "h"])).unwrap();
        v["attachment"]["metrics"]["throttled_requests"]
            .as_u64()
            .unwrap()
    };
    let before = throttled(&d);
    let reads: Vec<String> = (0..40).map(|i| format!("read {} 4096", i * 4096)).collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io(&h, &reads);
    assert!(
        throttled(&d) > before,
        "no NBD request waited for the throttle"
    );
    d.ok(&["card", "volume", "set-qos", "h"]);

    // The daemon and the other exports carry on; nothing outside the
    // volumes moved.
    qemu_io(&h, &["read -P 0xc3 15M 1M"]);
    assert_eq!(file_bytes(&dev, off_n, neighbour.len()), neighbour);
    let stats: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "volume", "show", "h"])).unwrap();
    let m = &stats["attachment"]["metrics"];
    assert_eq!(stats["attachment"]["interface"], "nbd", "{stats}");
    assert!(m["write_ops"].as_u64().unwrap() >= 3, "{m}");
    assert!(m["read_ops"].as_u64().unwrap() >= 4, "{m}");
    assert!(m["invalid_requests"].as_u64().unwrap() >= 4, "{m}");
    assert!(m["write_zeroes_ops"].as_u64().unwrap() >= 1, "{m}");

    // Detach with a client connected: its connection ends, the socket goes.
    let mut idle = UnixStream::connect(&sock_h).unwrap();
    let mut hello = [0u8; 18];
    idle.read_exact(&mut hello).unwrap();
    d.ok(&["card", "volume", "detach", "h"]);
    assert!(!sock_h.exists());
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    assert!(rest.is_empty(), "data after detach: {rest:?}");
}

/// Fixed-newstyle negotiation to transmission with NBD_OPT_GO.
fn go(s: &mut UnixStream, export: &[u8]) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export);
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, 7, &data);
    loop {
        let (kind, _) = option_reply(s);
        if kind == 1 {
            return;
        }
        assert_eq!(kind, 3, "GO answered {kind:#x}");
    }
}

fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        0x3e889045565a9
    );
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (kind, d)
}

fn request(s: &mut UnixStream, magic: u32, flags: u16, cmd: u16, offset: u64, len: u32) {
    let mut r = magic.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&0xfeed_u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).unwrap();
}

/// The error of a simple reply.
fn reply(s: &mut UnixStream) -> u32 {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x67446698);
    assert_eq!(u64::from_be_bytes(r[8..].try_into().unwrap()), 0xfeed);
    u32::from_be_bytes(r[4..8].try_into().unwrap())
}

/// Whether the server has closed the connection.
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn hostile(sock: &Path) {
    const MAGIC: u32 = 0x2560_9513;
    // Client flags the server does not know: closed.
    let mut s = UnixStream::connect(sock).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "unknown client flags were accepted");

    // An option claiming a megabyte of data: closed before reading it.
    let mut s = UnixStream::connect(sock).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&m).unwrap();
    assert!(closed(&mut s), "a 1 MiB option was accepted");

    // Malformed GO data, an unknown export, an unknown option: error
    // replies, and the negotiation goes on.
    let mut s = UnixStream::connect(sock).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut s, 7, &[0, 0, 0, 200, b'x']);
    assert_eq!(option_reply(&mut s).0, (1 << 31) | 3);
    send_option(&mut s, 7, &[0, 0, 0, 2, b'z', b'z', 0, 0]);
    assert_eq!(option_reply(&mut s).0, (1 << 31) | 6);
    send_option(&mut s, 99, &[]);
    assert_eq!(option_reply(&mut s).0, (1 << 31) | 1);
    drop(s);

    // In transmission: out of range, unaligned, unknown flags, unknown
    // command, an oversized read: error replies, connection kept. A write
    // past the end: ENOSPC, its payload consumed.
    let mut s = UnixStream::connect(sock).unwrap();
    go(&mut s, b"h");
    request(&mut s, MAGIC, 0, 0, 16 * MIB, 512);
    assert_eq!(reply(&mut s), 22);
    request(&mut s, MAGIC, 0, 0, u64::MAX - 100, 512);
    assert_eq!(reply(&mut s), 22);
    request(&mut s, MAGIC, 0, 0, 100, 512);
    assert_eq!(reply(&mut s), 22);
    request(&mut s, MAGIC, 0x80, 0, 0, 512);
    assert_eq!(reply(&mut s), 22);
    request(&mut s, MAGIC, 0, 42, 0, 512);
    assert_eq!(reply(&mut s), 22);
    request(&mut s, MAGIC, 0, 0, 0, 64 << 20);
    assert_eq!(reply(&mut s), 22);
    request(&mut s, MAGIC, 0, 1, 16 * MIB - 512, 1024);
    s.write_all(&[0xee; 1024]).unwrap();
    assert_eq!(reply(&mut s), 28);
    // Still serving: a good read.
    request(&mut s, MAGIC, 0, 0, 15 * MIB, 512);
    assert_eq!(reply(&mut s), 0);
    let mut data = [0u8; 512];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0xc3; 512]);
    // A write larger than any payload: closed (it cannot be skipped).
    request(&mut s, MAGIC, 0, 1, 0, 64 << 20);
    assert!(closed(&mut s), "a 64 MiB write was accepted");

    // Bad request magic: closed.
    let mut s = UnixStream::connect(sock).unwrap();
    go(&mut s, b"");
    request(&mut s, 0xdead_beef, 0, 0, 0, 512);
    assert!(closed(&mut s), "bad request magic was accepted");
}
