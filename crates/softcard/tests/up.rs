//! `softcard up`: the provider network on one machine. The region answers
//! with the printed credential, this machine is a host, the demo instance
//! runs (a QEMU guest that boots and writes its boot volume), the vGPU
//! server takes clients; Ctrl-C stops the instance and everything, leaving
//! no QEMU; the next `up` starts the same instance again.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::net::wait_until;
use common::BIN;
use softcard_region::client::RegionClient;

fn free() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts `softcard up` on `dir` with every port free (the defaults may be
/// taken on a developer's machine).
fn spawn_up(dir: &Path) -> (Child, SocketAddr) {
    let gpu = free();
    let child = Command::new(BIN)
        .args(["up", "--data-dir"])
        .arg(dir)
        .args(["--region-listen", &free().to_string()])
        .args(["--gpu-listen", &gpu.to_string()])
        .args(["--gpu-frames", &free().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    (child, gpu)
}

/// Reads `up`'s report until its last line; returns the lines.
fn report(child: &mut Child) -> Vec<String> {
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for l in out.lines() {
        let l = l.unwrap();
        let last = l.starts_with("Press Ctrl-C");
        lines.push(l);
        if last {
            break;
        }
    }
    lines
}

fn field<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {lines:#?}"))
        .trim()
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("softcard up did not stop after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

fn qemu_of(dir: &Path) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("qemu-system-x86_64 .*{}", dir.display())])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn up_runs_a_provider_network_and_starts_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut first_id = String::new();
    for round in 0..2 {
        let (mut child, gpu) = spawn_up(dir.path());
        let lines = report(&mut child);
        let url = field(&lines, "console")
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches('/');
        let cred = field(&lines, "tenant   demo: credential");
        let t = RegionClient::new(url, cred, None).unwrap();
        let i = t.get("/v1/instances/demo1").unwrap();
        assert_eq!(i["state"]["name"], "running", "{lines:#?}");
        let id = i["id"].as_str().unwrap().to_owned();
        if round == 0 {
            first_id.clone_from(&id);
        } else {
            assert_eq!(id, first_id, "the second up made another instance");
        }
        // The guest boots and writes its boot volume.
        wait_until(
            "the guest stamps its boot disk",
            Duration::from_secs(90),
            || {
                t.get("/v1/instances/demo1/console").unwrap()["output"]
                    .as_str()
                    .unwrap()
                    .contains("disk vda stamped")
            },
        );
        // The vGPU server takes clients (the test command installs
        // lavapipe, so there is an adapter), and the region lists it.
        assert!(TcpStream::connect(gpu).is_ok(), "no vGPU server on {gpu}");
        let admin_file = field(&lines, "admin    credential in");
        let admin = RegionClient::new(
            url,
            std::fs::read_to_string(admin_file).unwrap().trim(),
            None,
        )
        .unwrap();
        wait_until("the GPU server registered", Duration::from_secs(20), || {
            admin
                .get("/v1/gpu-servers")
                .unwrap()
                .as_array()
                .is_some_and(|g| {
                    g.iter()
                        .any(|g| g["state"] == "up" && g["endpoint"] == gpu.to_string().as_str())
                })
        });
        assert!(qemu_of(dir.path()));
        stop(child);
        assert!(!qemu_of(dir.path()), "a QEMU outlived softcard up");
    }
}

/// `softcard up` stops on SIGTERM even after its data directory (with the
/// API and vhost-user sockets in it) was removed: stopping used to wake
/// the accepting threads by connecting to their socket paths, which then
/// woke nothing, and the daemon waited forever.
#[test]
fn up_stops_after_its_sockets_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = spawn_up(dir.path());
    report(&mut child);
    std::fs::remove_dir_all(dir.path()).unwrap();
    stop(child);
}
