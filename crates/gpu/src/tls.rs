//! TLS on the vGPU port (rustls), and the byte streams a session runs on.
//!
//! A session reads and writes its connection from different places (the
//! client writes from the application's threads and reads on its reader
//! thread), so a TLS connection is split into a reader and a writer that
//! share the rustls state under a lock held only while bytes are encrypted
//! or decrypted, never while the socket blocks: a writer stalled on a full
//! socket never keeps the reader from draining its side, so two peers
//! writing to each other at once cannot deadlock.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How long a peer has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// ring, as the region's HTTPS uses: it builds with a C compiler alone.
/// rustls now prefers aws-lc-rs for its post-quantum key exchange; moving
/// both ends to it is a one-line change here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A GPU server's TLS identity; replaceable while the server runs (a
/// renewed certificate applies to the next connection).
#[derive(Debug)]
pub struct ServerTls(RwLock<Arc<rustls::ServerConfig>>);

/// Builds a server configuration from PEM.
fn server_config(chain_pem: &str, key_pem: &str) -> io::Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("no certificate in the PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| invalid(format!("private key: {e}")))?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(invalid)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(invalid)?;
    // No resumption: a session is long-lived and tickets would only be
    // more bytes the client has to take in.
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

impl ServerTls {
    /// The server's identity: its certificate chain (leaf first) and
    /// private key, both PEM.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self(RwLock::new(server_config(
            chain_pem, key_pem,
        )?))))
    }

    /// Replaces the identity (a renewed certificate).
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> io::Result<()> {
        let c = server_config(chain_pem, key_pem)?;
        *self.0.write().map_err(|_| invalid("tls config lock"))? = c;
        Ok(())
    }

    /// The current configuration.
    pub(crate) fn config(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        Ok(self
            .0
            .read()
            .map_err(|_| invalid("tls config lock"))?
            .clone())
    }

    /// Runs the handshake on an accepted connection.
    pub(crate) fn accept(&self, sock: &TcpStream) -> io::Result<Split> {
        let config = self
            .0
            .read()
            .map_err(|_| invalid("tls config lock"))?
            .clone();
        let conn = rustls::ServerConnection::new(config).map_err(invalid)?;
        Split::handshake(rustls::Connection::Server(conn), sock)
    }
}

/// What a client trusts: the authority's certificate and the name the
/// server's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The name in the server's certificate
    /// (`NAME.vgpu.softcard.internal`, from the instance metadata).
    pub server_name: String,
    /// PEM of the certificate authority (the region's).
    pub ca_pem: String,
}

impl ClientTls {
    /// Runs the handshake on a connected socket.
    pub(crate) fn connect(&self, sock: &TcpStream) -> io::Result<Split> {
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| invalid(format!("CA certificate: {e}")))?)
                .map_err(|e| invalid(format!("CA certificate: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(invalid("no CA certificate in the PEM"));
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(invalid)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(self.server_name.clone()).map_err(invalid)?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(invalid)?;
        Split::handshake(rustls::Connection::Client(conn), sock)
    }
}

/// One TLS connection, after its handshake, shared by its two halves.
#[derive(Debug)]
struct Shared {
    tls: Mutex<rustls::Connection>,
    /// The socket's sending side: held from encryption until the records
    /// are on the socket, so records leave in the order they were made.
    send: Mutex<TcpStream>,
}

/// A TLS connection ready to split.
#[derive(Debug)]
pub(crate) struct Split {
    shared: Arc<Shared>,
    recv: TcpStream,
}

impl Split {
    fn handshake(mut tls: rustls::Connection, sock: &TcpStream) -> io::Result<Self> {
        let mut s = sock.try_clone()?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut s)?;
        }
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        Ok(Self {
            recv: sock.try_clone()?,
            shared: Arc::new(Shared {
                tls: Mutex::new(tls),
                send: Mutex::new(s),
            }),
        })
    }

    /// The receiving and the sending half.
    pub(crate) fn boxed(self) -> Halves {
        (
            Box::new(TlsReader {
                shared: self.shared.clone(),
                sock: self.recv,
                raw: vec![0; 1 << 16].into_boxed_slice(),
                plain: Vec::new(),
                pos: 0,
            }),
            Box::new(TlsWriter {
                shared: self.shared,
                out: Vec::new(),
            }),
        )
    }
}

/// Encrypts what rustls has pending into `out`.
fn drain_tls(tls: &mut rustls::Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(out)?;
    }
    Ok(())
}

/// The receiving half.
#[derive(Debug)]
pub(crate) struct TlsReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    raw: Box<[u8]>,
    plain: Vec<u8>,
    pos: usize,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.plain.len() {
                let n = buf.len().min(self.plain.len() - self.pos);
                buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            self.plain.clear();
            self.pos = 0;
            // Records that came with the handshake's last read are in
            // rustls already.
            {
                let mut tls = self.shared.tls.lock().map_err(|_| invalid("tls lock"))?;
                tls.process_new_packets().map_err(invalid)?;
                match tls.reader().read_to_end(&mut self.plain) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                    Err(e) => return Err(e),
                }
            }
            if !self.plain.is_empty() {
                continue;
            }
            let n = self.sock.read(&mut self.raw)?;
            let mut reply = Vec::new();
            let closed = {
                let mut tls = self.shared.tls.lock().map_err(|_| invalid("tls lock"))?;
                let mut input = &self.raw[..n];
                let mut closed = n == 0;
                loop {
                    if !input.is_empty() {
                        tls.read_tls(&mut input)?;
                    }
                    let state = tls.process_new_packets().map_err(invalid)?;
                    closed |= state.peer_has_closed();
                    // Take the plaintext out before more records go in:
                    // rustls holds only so much.
                    match tls.reader().read_to_end(&mut self.plain) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => closed = true,
                        Err(e) => return Err(e),
                    }
                    if input.is_empty() {
                        break;
                    }
                }
                drain_tls(&mut tls, &mut reply)?;
                closed
            };
            // Rarely anything (a key update's answer): sent only when no
            // writer is mid-send; otherwise the writer's next send takes it.
            if !reply.is_empty() {
                if let Ok(mut s) = self.shared.send.try_lock() {
                    s.write_all(&reply)?;
                }
            }
            if self.plain.is_empty() && closed {
                return Ok(0);
            }
        }
    }
}

/// Plaintext encrypted at a time (rustls buffers up to 64 KiB unsent).
const WRITE_PIECE: usize = 32 * 1024;

/// The sending half: every write is encrypted and on the socket when it
/// returns (wrap it in a `BufWriter` to make records large).
#[derive(Debug)]
pub(crate) struct TlsWriter {
    shared: Arc<Shared>,
    out: Vec<u8>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sock = self.shared.send.lock().map_err(|_| invalid("tls lock"))?;
        // In pieces, so a large payload is on the wire while the rest is
        // encrypted, and rustls's own buffer limit is never reached.
        for piece in buf.chunks(WRITE_PIECE) {
            self.out.clear();
            {
                let mut tls = self.shared.tls.lock().map_err(|_| invalid("tls lock"))?;
                tls.writer().write_all(piece)?;
                drain_tls(&mut tls, &mut self.out)?;
            }
            sock.write_all(&self.out)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a handshake failed, in words an operator can act on.
pub fn handshake_failure(e: &io::Error) -> String {
    let m = e.to_string();
    if m.contains("InvalidContentType") || m.contains("corrupt message") {
        format!("not a TLS client (plain TCP to the TLS port?): {m}")
    } else if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut {
        format!("TLS handshake not completed within {HANDSHAKE_TIMEOUT:?}")
    } else {
        format!("TLS handshake failed: {m}")
    }
}

/// A session's transport: plain TCP, or TLS over it.
pub(crate) type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

/// The halves of plain `sock`.
pub(crate) fn plain_halves(sock: &TcpStream) -> io::Result<Halves> {
    Ok((Box::new(sock.try_clone()?), Box::new(sock.try_clone()?)))
}
