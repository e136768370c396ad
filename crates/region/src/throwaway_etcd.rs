//! A throwaway single-member etcd (Debian's `etcd-server`) on loopback, in a
//! temporary data directory, for tests and benchmarks. It is killed and its
//! directory removed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer its first health check.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd.
#[derive(Debug)]
pub struct ThrowawayEtcd {
    child: Child,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ThrowawayEtcd {
    /// Starts etcd; `fsync: false` runs it with `--unsafe-no-fsync`.
    pub fn start(fsync: bool) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("softcard-etcd").tempdir()?;
        let data = dir.path().join("data");
        let client = free_port()?;
        let peer = free_port()?;
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=t0")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t0={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log"))?);
        if !fsync {
            cmd.arg("--unsafe-no-fsync");
        }
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("starting etcd (package etcd-server): {e}"),
            )
        })?;
        let mut me = ThrowawayEtcd {
            child,
            url,
            _dir: dir,
        };
        let begin = Instant::now();
        loop {
            if let Some(status) = me.child.try_wait()? {
                let log =
                    std::fs::read_to_string(me._dir.path().join("etcd.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "etcd exited ({status}): {log}"
                )));
            }
            let healthy = health(client).unwrap_or(false);
            if healthy {
                return Ok(me);
            }
            if begin.elapsed() > START_TIMEOUT {
                return Err(std::io::Error::other("etcd did not become healthy"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ThrowawayEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd's `/health` on loopback (a plain probe, usable from any context,
/// async or not).
fn health(port: u16) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    c.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(
        (out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"))
            && out.contains("true"),
    )
}
