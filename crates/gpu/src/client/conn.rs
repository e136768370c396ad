//! The client's connection to a GPU server: a buffered writer that
//! pipelines requests, and a reader thread that routes replies to whoever
//! waits for them and reports errors the server found.

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::proto::{self, GpuError, Id, Message, Reply, Request};

/// Requests that waited for an answer, over all connections of the process.
pub(crate) static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);

/// A reply and its payload.
pub(crate) type Answer = (Reply, Vec<u8>);

type Callback = Box<dyn FnOnce(Result<Answer, String>) + Send>;

/// A waiting answer: its callback, and where its payload may land.
type Waiter = (Callback, Option<Box<[u8]>>);

/// State the reader thread shares with the API objects.
#[derive(Default)]
pub(crate) struct Shared {
    /// Answer callbacks by request, each with the buffer its payload
    /// should land in when the sizes match (a readback into the buffer's
    /// previous mapping, so no fresh allocation is faulted in).
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Sequence number (plus one) of the last answer whose callback has
    /// run; answers come in request order.
    done: Mutex<u64>,
    done_cv: Condvar,
    /// `done`, readable without the lock (for a short spin before a
    /// waiter sleeps).
    done_fast: AtomicU64,
    lost: Mutex<Option<String>>,
    pub(crate) on_error: Mutex<Option<Arc<dyn wgpu::UncapturedErrorHandler>>>,
    pub(crate) on_lost: Mutex<Option<wgpu::custom::BoxDeviceLostCallback>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("lost", &self.lost.lock().ok())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lose(&self, why: String) {
        let first = {
            let mut l = self.lost.lock().expect("lost");
            let first = l.is_none();
            if first {
                *l = Some(why.clone());
            }
            first
        };
        let pending: Vec<Callback> = self
            .pending
            .lock()
            .expect("pending")
            .drain()
            .map(|(_, (c, _))| c)
            .collect();
        for cb in pending {
            cb(Err(why.clone()));
        }
        *self.done.lock().expect("done") = u64::MAX;
        self.done_fast.store(u64::MAX, Ordering::Release);
        self.done_cv.notify_all();
        if first {
            if let Some(cb) = self.on_lost.lock().expect("on_lost").take() {
                cb(wgpu::DeviceLostReason::Unknown, why);
            }
        }
    }

    fn uncaptured(&self, e: GpuError) {
        let handler = self.on_error.lock().expect("on_error").clone();
        let err = to_wgpu_error(e);
        match handler {
            Some(h) => h(err),
            None => log::error!("vGPU error nobody captured: {err}"),
        }
    }
}

#[derive(Debug)]
struct RemoteError(String);
impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for RemoteError {}

/// Converts a server-side error into wgpu's.
pub(crate) fn to_wgpu_error(e: GpuError) -> wgpu::Error {
    let source: wgpu::ErrorSource = Box::new(RemoteError(e.description.clone()));
    match e.kind {
        proto::ErrorFilter::OutOfMemory => wgpu::Error::OutOfMemory { source },
        proto::ErrorFilter::Validation => wgpu::Error::Validation {
            source,
            description: e.description,
        },
        proto::ErrorFilter::Internal => wgpu::Error::Internal {
            source,
            description: e.description,
        },
    }
}

struct Out {
    w: BufWriter<Box<dyn Write + Send>>,
    seq: u64,
    /// Sequence number of the last answered request sent, if any.
    last_answered: Option<u64>,
}

/// One session with a GPU server.
pub(crate) struct Conn {
    out: Mutex<Out>,
    pub(crate) shared: Arc<Shared>,
    next_id: AtomicU64,
    stream: TcpStream,
    pub(crate) session: u64,
    pub(crate) quota: u64,
    pub(crate) viewer_token: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("session", &self.session)
            .field("peer", &self.stream.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut o) = self.out.lock() {
            let _ = o.w.flush();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Conn {
    /// Connects (through TLS when `tls` says whom to trust) and says
    /// hello.
    pub(crate) fn connect(
        addr: impl ToSocketAddrs,
        credential: Option<String>,
        tls: Option<&crate::tls::ClientTls>,
    ) -> std::io::Result<Arc<Self>> {
        let stream = TcpStream::connect(addr)?;
        proto::tune_socket(&stream);
        let (rx, tx) = match tls {
            None => crate::tls::plain_halves(&stream)?,
            Some(t) => t.connect(&stream)?.boxed(),
        };
        let shared = Arc::new(Shared::default());
        let mut reader = BufReader::with_capacity(1 << 16, rx);
        let mut conn = Self {
            out: Mutex::new(Out {
                w: BufWriter::with_capacity(1 << 16, tx),
                seq: 0,
                last_answered: None,
            }),
            shared: shared.clone(),
            next_id: AtomicU64::new(1),
            stream,
            session: 0,
            quota: 0,
            viewer_token: String::new(),
        };
        // The hello is answered before the reader thread exists.
        {
            let mut o = conn.out.lock().expect("out");
            proto::write_frame(
                &mut o.w,
                &Request::Hello {
                    version: proto::VERSION,
                    credential,
                },
                &[],
            )?;
            o.w.flush()?;
            o.seq = 1;
        }
        *shared.done.lock().expect("done") = 1;
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        match proto::read_raw(&mut reader).map_err(|e| bad(e.to_string()))? {
            Some((h, _)) => match proto::decode::<Message>(&h).map_err(|e| bad(e.to_string()))? {
                Message::Reply {
                    reply:
                        Reply::Hello {
                            session,
                            quota,
                            viewer_token,
                            ..
                        },
                    ..
                } => {
                    conn.session = session;
                    conn.quota = quota;
                    conn.viewer_token = viewer_token;
                }
                Message::Lost(why) => return Err(bad(format!("server refused: {why}"))),
                other => return Err(bad(format!("unexpected hello answer {other:?}"))),
            },
            None => return Err(bad("server closed the connection".into())),
        }
        std::thread::Builder::new()
            .name("vgpu-client-rx".into())
            .spawn(move || read_loop(reader, shared))?;
        Ok(Arc::new(conn))
    }

    /// A fresh object id.
    pub(crate) fn id(&self) -> Id {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Why the connection is gone, if it is.
    pub(crate) fn lost(&self) -> Option<String> {
        self.shared.lost.lock().expect("lost").clone()
    }

    fn write(&self, req: &Request, payload: &[u8], cb: Option<Waiter>, flush: bool) {
        if let Some(why) = self.lost() {
            if let Some((cb, _)) = cb {
                cb(Err(why));
            }
            return;
        }
        let mut o = self.out.lock().expect("out");
        let seq = o.seq;
        o.seq += 1;
        if let Some(cb) = cb {
            self.shared.pending.lock().expect("pending").insert(seq, cb);
            o.last_answered = Some(seq);
        }
        let mut r = proto::write_frame(&mut o.w, req, payload);
        if r.is_ok() && flush {
            r = o.w.flush();
        }
        drop(o);
        if let Err(e) = r {
            self.shared
                .lose(format!("connection to the GPU server failed: {e}"));
        }
    }

    /// Sends a request that gets no answer; it leaves with the next flush.
    pub(crate) fn send(&self, req: &Request, payload: &[u8]) {
        self.write(req, payload, None, false);
    }

    /// Sends what is buffered.
    pub(crate) fn flush(&self) {
        let r = self.out.lock().expect("out").w.flush();
        if let Err(e) = r {
            self.shared
                .lose(format!("connection to the GPU server failed: {e}"));
        }
    }

    /// Sends an answered request; `cb` runs on the reader thread.
    /// Every call is one round trip to the server, counted in
    /// [`ROUND_TRIPS`].
    pub(crate) fn call_async(
        &self,
        req: &Request,
        payload: &[u8],
        cb: impl FnOnce(Result<Answer, String>) + Send + 'static,
    ) {
        self.call_async_into(req, payload, None, cb);
    }

    /// As [`call_async`](Self::call_async); an answer payload of exactly
    /// `into`'s length is read into it.
    pub(crate) fn call_async_into(
        &self,
        req: &Request,
        payload: &[u8],
        into: Option<Box<[u8]>>,
        cb: impl FnOnce(Result<Answer, String>) + Send + 'static,
    ) {
        ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
        self.write(req, payload, Some((Box::new(cb), into)), true);
    }

    /// Waits until the server has handled everything sent so far, when the
    /// last request sent is itself answered: its answer proves it (the
    /// server handles requests in order and finishes each submission
    /// before the next request). Returns false when a Poll must be sent.
    pub(crate) fn wait_if_last_answered(&self) -> bool {
        let target = {
            let mut o = self.out.lock().expect("out");
            match o.last_answered {
                Some(seq) if seq + 1 == o.seq => {
                    if let Err(e) = o.w.flush() {
                        drop(o);
                        self.shared
                            .lose(format!("connection to the GPU server failed: {e}"));
                        return true;
                    }
                    seq + 1
                }
                _ => return false,
            }
        };
        if spin_until(|| self.shared.done_fast.load(Ordering::Acquire) >= target) {
            return true;
        }
        let mut done = self.shared.done.lock().expect("done");
        while *done < target {
            done = self.shared.done_cv.wait(done).expect("done");
        }
        true
    }

    /// Sends an answered request and waits for the answer.
    pub(crate) fn call(&self, req: &Request, payload: &[u8]) -> Result<Answer, String> {
        let (tx, rx) = mpsc::channel();
        self.call_async(req, payload, move |r| {
            let _ = tx.send(r);
        });
        let mut early = None;
        spin_until(|| match rx.try_recv() {
            Ok(r) => {
                early = Some(r);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            Err(mpsc::TryRecvError::Disconnected) => true,
        });
        early.unwrap_or_else(|| {
            rx.recv()
                .unwrap_or_else(|_| Err("GPU server connection lost".into()))
        })
    }

    /// Sends an answered request; the future resolves with the answer.
    pub(crate) fn call_future(&self, req: &Request, payload: &[u8]) -> ReplyFuture {
        let slot: Arc<Mutex<Slot>> = Arc::default();
        let s = slot.clone();
        self.call_async(req, payload, move |r| {
            let waker = {
                let mut s = s.lock().expect("slot");
                s.value = Some(r);
                s.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        });
        ReplyFuture { slot }
    }
}

/// How long a thread waiting for an answer spins before it sleeps
/// (`SOFTCARD_VGPU_SPIN_US` overrides; 0 never spins). A small dispatch's
/// round trip on loopback fits in it, and a waiter that slept pays a
/// wake-up on top of the round trip (on the 2-core bench machine the
/// 256-byte dispatch loop went from about 1.9x local to 0.9x); a longer
/// wait costs at most this much CPU before the thread sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Spins until `ready` or the spin time has passed; whether it became
/// ready.
fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    static SPIN_US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let spin = std::time::Duration::from_micros(*SPIN_US.get_or_init(|| {
        std::env::var("SOFTCARD_VGPU_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SPIN.as_micros() as u64)
    }));
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= spin {
            return false;
        }
        std::hint::spin_loop();
    }
}

#[derive(Default)]
pub(crate) struct Slot {
    value: Option<Result<Answer, String>>,
    waker: Option<Waker>,
}

/// Resolves when the server answers.
pub(crate) struct ReplyFuture {
    slot: Arc<Mutex<Slot>>,
}

impl Future for ReplyFuture {
    type Output = Result<Answer, String>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.lock().expect("slot");
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn read_loop(mut r: BufReader<Box<dyn std::io::Read + Send>>, shared: Arc<Shared>) {
    use std::io::Read;
    let why = loop {
        let (h, plen) = match proto::read_head(&mut r) {
            Ok(Some(f)) => f,
            Ok(None) => break "GPU server closed the connection".to_string(),
            Err(e) => break format!("GPU server connection failed: {e}"),
        };
        let msg = match proto::decode::<Message>(&h) {
            Ok(m) => m,
            Err(e) => break format!("malformed message from the GPU server: {e}"),
        };
        let pending = match &msg {
            Message::Reply { seq, .. } => shared.pending.lock().expect("pending").remove(seq),
            _ => None,
        };
        let (cb, into) = match pending {
            Some((cb, into)) => (Some(cb), into),
            None => (None, None),
        };
        let payload = match into {
            Some(mut buf) if buf.len() == plen => match r.read_exact(&mut buf) {
                Ok(()) => Vec::from(buf),
                Err(e) => break format!("GPU server connection failed: {e}"),
            },
            _ => match proto::read_payload(&mut r, plen) {
                Ok(p) => p,
                Err(e) => break format!("GPU server connection failed: {e}"),
            },
        };
        match msg {
            Message::Reply { seq, reply } => {
                match cb {
                    Some(cb) => cb(Ok((reply, payload))),
                    None => {
                        break format!("GPU server answered request {seq}, which asked nothing")
                    }
                }
                let mut done = shared.done.lock().expect("done");
                *done = (*done).max(seq + 1);
                shared.done_fast.store(*done, Ordering::Release);
                drop(done);
                shared.done_cv.notify_all();
            }
            Message::Uncaptured(e) => shared.uncaptured(e),
            Message::Lost(why) => break format!("GPU server closed the session: {why}"),
        }
    };
    shared.lose(why);
}
