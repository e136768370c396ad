//! Encrypted volumes, checked with an independent implementation: data
//! written through vhost-user (libblkio) is read raw from the device and
//! decrypted with Python's `cryptography` (OpenSSL underneath): the data
//! key is unwrapped there with RFC 3394 from the record on the device, and
//! each sector decrypted with AES-256-XTS and the plain64 tweak.

mod common;

use common::{file_bytes, pattern, python_decrypt, wrapped_key_on_device, Client, Daemon};

const MIB: u64 = 1 << 20;

#[test]
fn encrypted_volume_is_aes_xts_plain64_under_the_tenants_key() {
    let kek1 = "11".repeat(16) + &"2f".repeat(16);
    let kek2 = "a5".repeat(32);
    let mut d = Daemon::start_with(
        r#"
[[device]]
name = "nvme0"
kind = "file"
path = "@DIR@/nvme0.img"
size = "64MiB"

[[tenant]]
name = "acme"
kek_file = "@DIR@/acme.kek"

[[tenant]]
name = "ghost"
kek_env = "SOFTCARD_TEST_GHOST_KEK_UNSET"
"#,
        |dir| std::fs::write(dir.join("acme.kek"), format!("{kek1}\n")).unwrap(),
    );
    let dev = d.path("nvme0.img");
    d.ok(&[
        "card",
        "volume",
        "create",
        "e",
        "--device",
        "nvme0",
        "--size",
        "16MiB",
        "--encrypt",
        "--tenant",
        "acme",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["card", "volume", "show", "e"])).unwrap();
    assert_eq!(v["encrypted"], true, "{v}");
    assert_eq!(v["tenant"], "acme", "{v}");
    let off = d.offset_of("e");

    // A tenant without a key cannot get an encrypted volume.
    let before = std::fs::read(&dev).unwrap();
    let err = d.fails(&[
        "card",
        "volume",
        "create",
        "g",
        "--device",
        "nvme0",
        "--size",
        "1MiB",
        "--encrypt",
        "--tenant",
        "ghost",
    ]);
    assert!(
        err.contains("no key-encryption key for tenant \"ghost\""),
        "{err}"
    );
    let err = d.fails(&[
        "card",
        "volume",
        "create",
        "g",
        "--device",
        "nvme0",
        "--size",
        "1MiB",
        "--encrypt",
        "--tenant",
        "nobody",
    ]);
    assert!(err.contains("not in the configuration"), "{err}");
    assert!(
        std::fs::read(&dev).unwrap() == before,
        "refused create changed the device"
    );

    // Write known data: a pattern, and repeated identical sectors.
    let sock = d.path("e.sock");
    d.ok(&[
        "card",
        "volume",
        "attach",
        "e",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--queues",
        "2",
    ]);
    let mut c = Client::connect(&sock, 2).unwrap();
    let p = pattern(3, 256 << 10);
    let same = b"SOFTCARD PLAINTEXT MARKER 0123456789abcdef".repeat(100)[..4096].to_vec();
    assert_eq!(c.write(0, 0, &p), 0);
    assert_eq!(c.write(1, 8 * MIB, &same), 0);
    assert_eq!(c.write(0, 16 * MIB - 4096, &same), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(1, 0, p.len()).unwrap(), p);
    assert_eq!(c.read(0, 8 * MIB, 4096).unwrap(), same);
    assert_eq!(c.read(1, 16 * MIB - 4096, 4096).unwrap(), same);
    // WRITE_ZEROES is not offered on an encrypted volume (zeroes on the
    // device would read back as the decryption of zeroes): the request
    // fails and the data stays.
    let rc = c.write_zeroes(0, 8 * MIB, 4096);
    assert!(rc < 0, "write-zeroes on an encrypted volume returned {rc}");
    assert_eq!(c.read(0, 8 * MIB, 4096).unwrap(), same);
    drop(c);
    d.ok(&["card", "volume", "detach", "e"]);

    // No plaintext sector on the device, and no two equal ciphertext
    // sectors where the plaintext repeats.
    let raw = file_bytes(&dev, off, (16 * MIB) as usize);
    for (i, s) in p.chunks(512).chain(same.chunks(512)).enumerate() {
        assert!(
            !raw.windows(512).step_by(512).any(|w| w == s),
            "plaintext sector {i} on the device"
        );
    }
    let ct = &raw[(8 * MIB) as usize..(8 * MIB) as usize + 4096];
    assert_ne!(&ct[..512], &ct[512..1024]);

    // Independent decryption with the tenant's KEK from the device record.
    let wrapped = wrapped_key_on_device(&dev, "e");
    let got = python_decrypt(&kek1, &wrapped, 0, &raw[..p.len()]).unwrap();
    assert!(
        got == p,
        "Python's AES-XTS plain64 does not give back the data"
    );
    let got = python_decrypt(
        &kek1,
        &wrapped,
        (16 * MIB - 4096) / 512,
        &raw[(16 * MIB - 4096) as usize..],
    )
    .unwrap();
    assert_eq!(got, same);
    assert!(
        python_decrypt(&kek2, &wrapped, 0, &raw[..512]).is_err(),
        "a wrong KEK unwrapped the key"
    );

    // A wrong KEK: attach refused, nothing written.
    d.stop();
    std::fs::write(d.path("acme.kek"), &kek2).unwrap();
    d.restart();
    let before = std::fs::read(&dev).unwrap();
    let err = d.fails(&[
        "card",
        "volume",
        "attach",
        "e",
        "--vhost-user",
        sock.to_str().unwrap(),
    ]);
    assert!(
        err.contains("does not unwrap") || err.contains("wrong key"),
        "{err}"
    );
    assert!(!sock.exists(), "a refused attach left a socket");
    assert!(
        std::fs::read(&dev).unwrap() == before,
        "refused attach changed the device"
    );

    // Rotation: back to the right key, then re-wrap under a new one. The
    // data is not re-encrypted; the record changes; Python confirms.
    d.stop();
    std::fs::write(d.path("acme.kek"), &kek1).unwrap();
    d.restart();
    let new_kek = d.path("acme.kek.new");
    std::fs::write(&new_kek, &kek2).unwrap();
    let out = d.ok(&[
        "card",
        "tenant",
        "rotate-key",
        "acme",
        "--new-kek-file",
        new_kek.to_str().unwrap(),
    ]);
    assert!(out.contains("re-wrapped 1 data key"), "{out}");
    let raw_after = file_bytes(&dev, off, (16 * MIB) as usize);
    assert!(raw_after == raw, "rotation touched the data");
    let wrapped2 = wrapped_key_on_device(&dev, "e");
    assert_ne!(wrapped2, wrapped);
    assert_eq!(
        python_decrypt(&kek2, &wrapped2, 0, &raw[..p.len()]).unwrap(),
        p
    );
    assert!(python_decrypt(&kek1, &wrapped2, 0, &raw[..512]).is_err());
    // With the configuration pointing at the new key, the volume serves
    // the same data after a restart.
    d.stop();
    std::fs::rename(&new_kek, d.path("acme.kek")).unwrap();
    d.restart();
    let tenants = d.ok(&["card", "tenant", "list"]);
    assert!(
        tenants.contains("acme") && tenants.contains("key available"),
        "{tenants}"
    );
    assert!(
        tenants.contains("ghost") && tenants.contains("unavailable"),
        "{tenants}"
    );
    d.ok(&[
        "card",
        "volume",
        "attach",
        "e",
        "--vhost-user",
        sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&sock, 1).unwrap();
    assert_eq!(c.read(0, 0, p.len()).unwrap(), p);
    drop(c);
    d.stop();
}
