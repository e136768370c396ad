//! The card's RDMA function: its devices (a RoCEv2 engine each, on one
//! IPv4 address, driven by its progress thread) and the unix socket
//! applications' verbs library (`softcard-verbs`, a drop-in
//! `libibverbs.so.1`) reaches them on. The daemon holds the raw sockets and
//! their privilege; applications need none.
//!
//! The control protocol is lines of text, one request and its answer at a
//! time; a request or an answer may carry descriptors (`SCM_RIGHTS`):
//!
//! | request | answer |
//! |---|---|
//! | `DEVICES` | one `DEVICE NAME GUID GID ADDRESS MTU` line per device (GUID: 16 hex digits; GID: 32), then `END` |
//! | `OPEN NAME VERSION` | `OK`, with the device's doorbell (an eventfd); the connection is now the application's session on that device |
//! | `PD` / `FREEPD h` | `OK h` / `OK` |
//! | `MR pd VA LEN ACCESS PIECE...`: `OFF:LEN` of the next memfd attached, or `SSTART-END:OFF:LEN` of the System V segment the application maps at `START-END` (hex; [`segment`]) | `OK h key`: the pages of `VA..VA+LEN` are those pieces, mapped here too |
//! | `FREEMR h` | `OK` |
//! | `CHANNEL`, with a socket | `OK h`: completion events (the CQ's cookie, 8 bytes) are sent on it |
//! | `CQ ENTRIES CHANNEL COOKIE` / `FREECQ h` | `OK h ENTRIES BYTES` with the ring's memfd / `OK` |
//! | `QP pd SCQ RCQ SWR RWR SSGE RSGE INLINE SIGALL TYPE` (2 RC, 4 UD) | `OK h QPN SQ RQ BYTES VERSION` with the rings' memfd |
//! | `MODIFY h STATE MTU DQPN RQPSN SQPSN DGID [QKEY [MIN_RNR_TIMER]]` / `QUERYQP h` / `FREEQP h` | `OK ...` |
//! | a request that fails | `ERR ERRNO reason` |
//! | garbage, a line over [`MAX_LINE`] bytes, two requests at once | `ERR ...`, and the connection closes |
//!
//! Work requests and completions do not travel here: they are on
//! shared-memory rings ([`crate::ring`]) that the progress thread of each
//! device serves (`datapath`). When a session's connection ends, its
//! queue pairs, regions and queues are destroyed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::progress::Progress;
use crate::rc::{Engine, PathStats};

mod datapath;
mod fuzzing;
mod node;
mod segment;
mod session;

pub use fuzzing::fuzz_session;
pub use node::{dev_name, node_path};

use datapath::{DataPath, Port};
use session::{Refusal, Session};

/// Where the control socket is unless configured (the card's
/// `rdma_socket`, the library's `SOFTCARD_RDMA_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/softcard/rdma.sock";

/// The longest control line taken.
pub const MAX_LINE: usize = 4096;
/// The version of the session protocol and the ring layout.
pub const PROTOCOL: u32 = crate::ring::VERSION;
/// The path MTU the devices report.
pub const MTU: u32 = 1024;

/// What an application sees of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its verbs name (`softcard0`).
    pub name: String,
    /// Node GUID, as a number (sent big-endian by verbs).
    pub guid: u64,
    /// The address it serves.
    pub address: Ipv4Addr,
    /// Its one GID: the IPv4-mapped address (RoCE v2).
    pub gid: [u8; 16],
    /// Path MTU in bytes.
    pub mtu: u32,
}

impl DeviceInfo {
    /// The device `name` serving `address`.
    pub fn new(name: &str, address: Ipv4Addr) -> Self {
        let a = address.octets();
        Self {
            name: name.to_owned(),
            // A locally administered EUI-64: 02:53:43 ("SC"), ff, then the
            // address.
            guid: u64::from_be_bytes([0x02, 0x53, 0x43, 0xff, a[0], a[1], a[2], a[3]]),
            address,
            gid: address.to_ipv6_mapped().octets(),
            mtu: MTU,
        }
    }

    /// Its `DEVICE` line.
    pub fn line(&self) -> String {
        let gid: String = self.gid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "DEVICE {} {:016x} {gid} {} {}",
            self.name, self.guid, self.address, self.mtu
        )
    }

    /// Parses a `DEVICE` line.
    pub fn parse(line: &str) -> Option<Self> {
        let mut w = line.split_ascii_whitespace();
        if w.next()? != "DEVICE" {
            return None;
        }
        let name = w.next()?;
        if name.is_empty() || name.len() >= 64 {
            return None;
        }
        let guid = u64::from_str_radix(w.next()?, 16).ok()?;
        let g = w.next()?;
        if g.len() != 32 {
            return None;
        }
        let mut gid = [0u8; 16];
        for (i, b) in gid.iter_mut().enumerate() {
            *b = u8::from_str_radix(g.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let address = w.next()?.parse().ok()?;
        let mtu = w.next()?.parse().ok()?;
        w.next().is_none().then_some(Self {
            name: name.to_owned(),
            guid,
            address,
            gid,
            mtu,
        })
    }
}

/// A device: its description, its engine and its applications.
#[derive(Debug)]
struct Device {
    info: DeviceInfo,
    engine: Progress,
    port: Arc<Mutex<Port>>,
    /// The doorbell applications ring when the progress thread sleeps.
    doorbell: OwnedFd,
}

/// What `softcard rdma list` and `stats` show of a device.
#[derive(Debug, Clone)]
pub struct DeviceStatus {
    pub info: DeviceInfo,
    /// Queue pairs open on its engine.
    pub qps: usize,
    /// The applications that have it open: the queue pairs of each.
    pub applications: Vec<usize>,
    /// Fast-path and software-path counters.
    pub stats: PathStats,
}

/// The card's RDMA devices and their control socket.
#[derive(Debug)]
pub struct RdmaService {
    devices: std::sync::Arc<Vec<Device>>,
    socket: PathBuf,
}

impl RdmaService {
    /// Opens an engine per `(name, address)` (each needs `CAP_NET_RAW` and
    /// the address on an interface) and serves the control socket at
    /// `socket`, open to every local user: the socket is how unprivileged
    /// applications reach the devices. A stale socket there is replaced;
    /// one another daemon still answers on, or a file that is not a
    /// socket, is refused (`AddrInUse`, `AlreadyExists`) and left alone.
    pub fn start(devices: &[(String, Ipv4Addr)], socket: &Path) -> io::Result<Self> {
        let listener = bind_control_socket(socket)?;
        let mut open = Vec::with_capacity(devices.len());
        for (name, address) in devices {
            let engine = Engine::open(*address).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("rdma device {name}: an engine on {address}: {e}"),
                )
            })?;
            match node::make_node(name) {
                Ok(p) => log::debug!("rdma device {name}: node {}", p.display()),
                Err(e) => log::warn!(
                    "rdma device {name}: no node in /dev/infiniband ({e}): applications that \
                     look for one (UCX) will not list the device"
                ),
            }
            let port = Arc::new(Mutex::new(Port::default()));
            let doorbell = crate::shm::eventfd()?;
            let hook = Box::new(DataPath::new(port.clone()));
            open.push(Device {
                info: DeviceInfo::new(name, *address),
                engine: Progress::spawn_with(engine, Some(hook), Some(doorbell.try_clone()?))?,
                port,
                doorbell,
            });
        }
        let devices = std::sync::Arc::new(open);
        let served = devices.clone();
        std::thread::Builder::new()
            .name("rdma-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let served = served.clone();
                    let _ = std::thread::Builder::new()
                        .name("rdma-client".into())
                        .spawn(move || {
                            if let Err(e) = serve(conn, &served) {
                                log::debug!("rdma control connection: {e}");
                            }
                        });
                }
            })?;
        Ok(Self {
            devices,
            socket: socket.to_owned(),
        })
    }

    /// The devices with their queue pairs and counters.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .map(|d| {
                let e = d.engine.lock();
                DeviceStatus {
                    info: d.info.clone(),
                    qps: e.qp_count(),
                    applications: datapath::lock(&d.port)
                        .sessions
                        .values()
                        .map(|s| s.qps.len())
                        .collect(),
                    stats: e.stats,
                }
            })
            .collect()
    }

    /// Injects `faults` into what device `name` sends (tests of the
    /// protocol's recovery).
    pub fn set_faults(&self, name: &str, faults: crate::net::Faults) -> io::Result<()> {
        let d = self
            .devices
            .iter()
            .find(|d| d.info.name == name)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no rdma device {name}"))
            })?;
        d.engine.lock().set_faults(faults);
        Ok(())
    }

    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// Binds the control socket at `socket` (creating its directory), open to
/// every local user. Replaces a socket nobody answers on (a daemon that
/// died); refuses a live one, so a second daemon cannot take the devices'
/// applications from the first, and any other kind of file.
fn bind_control_socket(socket: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    socket.display()
                ),
            ));
        }
        if UnixStream::connect(socket).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another daemon is serving RDMA applications on {} (give this one its own \
                     rdma_socket, or stop that one)",
                    socket.display()
                ),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

impl Drop for RdmaService {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Reads one request: a line, with the descriptors that came with it.
/// `None` at the end of the stream.
fn read_request(conn: &UnixStream, fds: &mut Vec<OwnedFd>) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = crate::shm::recv_with_fds(conn.as_fd(), &mut chunk, fds)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            if end + 1 != buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a second request before the answer to the first",
                ));
            }
            buf.pop();
            return String::from_utf8(buf).map(Some).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "a request that is not text")
            });
        }
        if buf.len() > MAX_LINE || fds.len() > crate::shm::MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request line too long",
            ));
        }
    }
}

fn answer(conn: &UnixStream, line: &str, fds: &[OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    crate::shm::send_with_fds(conn.as_fd(), format!("{line}\n").as_bytes(), &borrowed)
}

/// Answers one application until it leaves or misbehaves.
fn serve(conn: UnixStream, devices: &[Device]) -> io::Result<()> {
    loop {
        let mut fds = Vec::new();
        let line = match read_request(&conn, &mut fds) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = answer(&conn, &format!("ERROR {e}"), &[]);
                return Err(e);
            }
        };
        let mut w = line.split_ascii_whitespace();
        match (w.next(), w.next(), w.next(), w.next()) {
            (Some("DEVICES"), None, ..) => {
                let mut out = String::new();
                for d in devices {
                    out.push_str(&d.info.line());
                    out.push('\n');
                }
                out.push_str("END");
                answer(&conn, &out, &[])?;
            }
            (Some("OPEN"), Some(name), Some(version), None) => {
                let Some(d) = devices.iter().find(|d| d.info.name == name) else {
                    answer(
                        &conn,
                        &format!("ERR {} no device {name:?}", libc::ENODEV),
                        &[],
                    )?;
                    continue;
                };
                if version.parse() != Ok(PROTOCOL) {
                    answer(
                        &conn,
                        &format!(
                            "ERR {} the card speaks version {PROTOCOL}, not {version}",
                            libc::EPROTO
                        ),
                        &[],
                    )?;
                    return Ok(());
                }
                return run_session(conn, d);
            }
            _ => {
                let shown: String = line.chars().take(32).collect();
                answer(&conn, &format!("ERROR unknown request {shown:?}"), &[])?;
                return Ok(());
            }
        }
    }
}

/// Serves one application's session on device `d` until it ends, then
/// destroys what it left.
fn run_session(conn: UnixStream, d: &Device) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    {
        let _e = d.engine.lock();
        let peer = segment::Peer::of(&conn)
            .map_err(|e| log::warn!("session {id}: who connected is unknown ({e}): its System V segments cannot be registered"))
            .ok();
        let session = Session {
            conn: Some(OwnedFd::from(conn.try_clone()?)),
            peer,
            ..Session::default()
        };
        datapath::lock(&d.port).sessions.insert(id, session);
    }
    let r = (|| {
        answer(&conn, "OK", &[d.doorbell.try_clone()?])?;
        loop {
            let mut fds = Vec::new();
            let Some(line) = read_request(&conn, &mut fds)? else {
                return Ok(());
            };
            let result = {
                let mut e = d.engine.lock();
                let mut port = datapath::lock(&d.port);
                let s = port
                    .sessions
                    .get_mut(&id)
                    .expect("sessions leave only here");
                if let Some(why) = &s.broken {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
                }
                s.request(&mut e, &line, fds)
            };
            match result {
                Ok((text, fds)) => answer(&conn, &text, &fds)?,
                Err(Refusal(errno, why)) => answer(&conn, &format!("ERR {errno} {why}"), &[])?,
            }
        }
    })();
    let mut e = d.engine.lock();
    if let Some(mut s) = datapath::lock(&d.port).sessions.remove(&id) {
        s.destroy(&mut e);
    }
    r
}

/// Asks the control socket at `socket` for its devices.
pub fn query_devices(socket: &Path) -> io::Result<Vec<DeviceInfo>> {
    let mut c = UnixStream::connect(socket)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(b"DEVICES\n")?;
    // The answer is lines up to END.
    let mut out = Vec::new();
    for line in BufReader::new(c).take(1 << 20).lines() {
        let line = line?;
        if line == "END" {
            return Ok(out);
        }
        out.push(DeviceInfo::parse(&line).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the card answered {line:?}"),
            )
        })?);
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the card closed the control connection",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lines_round_trip_and_garbage_does_not_parse() {
        let d = DeviceInfo::new("softcard0", Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(
            d.gid,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7]
        );
        assert_eq!(DeviceInfo::parse(&d.line()), Some(d.clone()));
        for bad in [
            "",
            "DEVICE",
            "DEVICE x 1",
            &d.line().replace("DEVICE", "DEV"),
            &format!("{} extra", d.line()),
            &d.line().replace(" 1024", " -1"),
        ] {
            assert_eq!(DeviceInfo::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_control_socket_lists_devices_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("rdma.sock");
        // No engines (they need CAP_NET_RAW): the socket alone.
        let svc = RdmaService::start(&[], &sock).unwrap();
        assert_eq!(query_devices(&sock).unwrap(), vec![]);
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(&[b'x'; 4096]).unwrap();
        c.write_all(b"\n").unwrap();
        let mut answer = String::new();
        BufReader::new(c).read_line(&mut answer).unwrap();
        assert!(answer.starts_with("ERROR"), "{answer}");
        // The daemon still answers others.
        assert_eq!(query_devices(&sock).unwrap(), vec![]);
        drop(svc);
        assert!(!sock.exists());
    }

    #[test]
    fn a_live_control_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("rdma.sock");
        let first = RdmaService::start(&[], &sock).unwrap();
        let e = RdmaService::start(&[], &sock).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("another daemon"), "{e}");
        // The first still owns the path and answers on it.
        assert_eq!(query_devices(&sock).unwrap(), vec![]);
        drop(first);
        // A socket left by a process that died: nobody answers, replaced.
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let second = RdmaService::start(&[], &sock).unwrap();
        assert_eq!(query_devices(&sock).unwrap(), vec![]);
        drop(second);
        // Not a socket: refused and left as it was.
        std::fs::write(&sock, b"keep me").unwrap();
        let e = RdmaService::start(&[], &sock).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&sock).unwrap(), b"keep me");
    }
}
