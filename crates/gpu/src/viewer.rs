//! Output to a client device: frames that sessions present are read back
//! from the GPU and streamed as JPEG over a WebSocket to a viewer page.
//!
//! Frames are kept per session under the session's secret viewer token:
//! `GET /?s=TOKEN` serves the page; `GET /ws?s=TOKEN` upgrades to a
//! WebSocket that carries one binary message per frame (a JPEG), newest
//! frame first, dropping frames the viewer is too slow for rather than
//! queueing them; `GET /frame.jpg?s=TOKEN` is the latest frame. Without a
//! token that names a session there is nothing to see (404).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A frame read back from the GPU, RGBA8.
#[derive(Debug)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
    pub presented: Instant,
    /// Its JPEG at [`VIEWER_QUALITY`], made once for every viewer.
    shared_jpeg: std::sync::OnceLock<Result<Arc<Vec<u8>>, String>>,
}

/// JPEG quality of the frames viewers receive.
pub const VIEWER_QUALITY: u8 = 80;

impl Frame {
    /// A frame of `width` x `height` RGBA8 pixels.
    pub fn new(width: u32, height: u32, rgba: Vec<u8>) -> Self {
        Self {
            width,
            height,
            rgba,
            presented: Instant::now(),
            shared_jpeg: std::sync::OnceLock::new(),
        }
    }

    /// Its JPEG at [`VIEWER_QUALITY`], encoded by the first viewer that
    /// asks and shared with the others (however many watch, a frame costs
    /// one encoding).
    pub fn viewer_jpeg(&self) -> Result<Arc<Vec<u8>>, String> {
        self.shared_jpeg
            .get_or_init(|| self.jpeg(VIEWER_QUALITY).map(Arc::new))
            .clone()
    }

    /// JPEG encoding of the frame.
    pub fn jpeg(&self, quality: u8) -> Result<Vec<u8>, String> {
        let (w, h) = (
            u16::try_from(self.width).map_err(|_| "frame too wide for JPEG")?,
            u16::try_from(self.height).map_err(|_| "frame too tall for JPEG")?,
        );
        let mut out = Vec::with_capacity(self.rgba.len() / 8);
        jpeg_encoder::Encoder::new(&mut out, quality)
            .encode(&self.rgba, w, h, jpeg_encoder::ColorType::Rgba)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

#[derive(Debug, Default)]
struct Latest {
    seq: u64,
    frame: Option<Arc<Frame>>,
}

/// The latest presented frame of each session, by the session's viewer
/// token, for any number of viewers.
#[derive(Debug, Default)]
pub struct FrameHub {
    latest: Mutex<std::collections::HashMap<String, Latest>>,
    changed: Condvar,
    published: std::sync::atomic::AtomicU64,
}

impl FrameHub {
    /// Publishes a frame of the session named by `token`.
    pub fn publish(&self, token: &str, frame: Frame) {
        let mut m = self.latest.lock().expect("frame hub");
        let l = m.entry(token.to_string()).or_default();
        l.seq += 1;
        l.frame = Some(Arc::new(frame));
        drop(m);
        self.published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Forgets a session's frames (it ended).
    pub fn forget(&self, token: &str) {
        self.latest.lock().expect("frame hub").remove(token);
        self.changed.notify_all();
    }

    /// Frames published so far, all sessions together.
    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits up to `timeout` for a frame of `token`'s session newer than
    /// `seen`.
    pub fn next_after(
        &self,
        token: &str,
        seen: u64,
        timeout: Duration,
    ) -> Option<(u64, Arc<Frame>)> {
        let newer = |m: &std::collections::HashMap<String, Latest>| {
            m.get(token)
                .and_then(|l| l.frame.clone().filter(|_| l.seq > seen).map(|f| (l.seq, f)))
        };
        let m = self.latest.lock().expect("frame hub");
        let (m, _) = self
            .changed
            .wait_timeout_while(m, timeout, |m| newer(m).is_none())
            .expect("frame hub");
        newer(&m)
    }
}

/// Reads a texture back as RGBA8 (BGRA formats are swizzled).
pub(crate) fn capture(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    texture: &wgpu::Texture,
) -> Result<Frame, String> {
    use wgpu::TextureFormat as F;
    let bgra = match texture.format() {
        F::Rgba8Unorm | F::Rgba8UnormSrgb => false,
        F::Bgra8Unorm | F::Bgra8UnormSrgb => true,
        f => {
            return Err(format!(
                "cannot present a {f:?} texture; use an 8-bit RGBA or BGRA format"
            ))
        }
    };
    if !texture.usage().contains(wgpu::TextureUsages::COPY_SRC) {
        return Err("a presented texture needs COPY_SRC usage".into());
    }
    let (width, height) = (texture.width(), texture.height());
    let row = width * 4;
    let padded =
        row.div_ceil(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT) * wgpu::COPY_BYTES_PER_ROW_ALIGNMENT;
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("vgpu present readback"),
        size: u64::from(padded) * u64::from(height),
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
    enc.copy_texture_to_buffer(
        texture.as_image_copy(),
        wgpu::TexelCopyBufferInfo {
            buffer: &readback,
            layout: wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(padded),
                rows_per_image: Some(height),
            },
        },
        wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
    );
    queue.submit([enc.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    readback.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    let _ = device.poll(wgpu::PollType::wait_indefinitely());
    rx.try_recv()
        .map_err(|_| "frame readback did not complete".to_string())?
        .map_err(|e| e.to_string())?;
    let view = readback.get_mapped_range(..).map_err(|e| e.to_string())?;
    let mut rgba = Vec::with_capacity((row * height) as usize);
    for y in 0..height as usize {
        let start = y * padded as usize;
        rgba.extend_from_slice(&view[start..start + row as usize]);
    }
    drop(view);
    readback.unmap();
    if bgra {
        for px in rgba.chunks_exact_mut(4) {
            px.swap(0, 2);
        }
    }
    Ok(Frame::new(width, height, rgba))
}

const PAGE: &str = include_str!("viewer.html");

/// Serves the viewer page and its WebSocket until the listener fails.
pub fn serve(listener: TcpListener, hub: Arc<FrameHub>) -> std::io::Result<()> {
    for conn in listener.incoming() {
        let conn = conn?;
        let hub = hub.clone();
        std::thread::Builder::new()
            .name("vgpu-viewer".into())
            .spawn(move || {
                if let Err(e) = viewer_conn(conn, &hub) {
                    log::debug!("viewer connection: {e}");
                }
            })?;
    }
    Ok(())
}

/// The session token in a request path's `s` query parameter.
fn token_of(path: &str) -> Option<&str> {
    let query = path.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("s="))
        .filter(|t| !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn viewer_conn(mut conn: TcpStream, hub: &FrameHub) -> Result<(), String> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // Look at the request head without consuming it (the WebSocket
    // handshake reads it again), waiting until all of it has arrived.
    let mut head = [0u8; 2048];
    let started = std::time::Instant::now();
    let n = loop {
        let n = conn.peek(&mut head).map_err(|e| e.to_string())?;
        let complete = head[..n].windows(4).any(|w| w == b"\r\n\r\n");
        if n == 0 || complete || n == head.len() {
            break n;
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err("request head never completed".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let line = String::from_utf8_lossy(&head[..n]);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let route = path.split('?').next().unwrap_or("/");
    let token = token_of(&path).map(str::to_string);
    if let (Some(token), "/ws") = (&token, route) {
        conn.set_read_timeout(None).map_err(|e| e.to_string())?;
        conn.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut ws = tungstenite::accept(conn).map_err(|e| e.to_string())?;
        let mut seen = 0;
        loop {
            let Some((seq, frame)) = hub.next_after(token, seen, Duration::from_secs(1)) else {
                // Keep idle viewers alive and notice closed ones.
                ws.send(tungstenite::Message::Ping(Vec::new().into()))
                    .map_err(|e| e.to_string())?;
                continue;
            };
            seen = seq;
            let jpeg = frame.viewer_jpeg()?;
            ws.send(tungstenite::Message::Binary(jpeg.to_vec().into()))
                .map_err(|e| e.to_string())?;
        }
    }
    // Drain the request head, then answer.
    let mut buf = vec![0u8; n];
    conn.read_exact(&mut buf).map_err(|e| e.to_string())?;
    let not_found = (
        "404 Not Found",
        "text/plain",
        b"not found (name a session: ?s=TOKEN)\n".to_vec(),
    );
    let (status, ctype, body) = match (route, &token) {
        ("/", Some(_)) => (
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
        ),
        ("/frame.jpg", Some(t)) => match hub.next_after(t, 0, Duration::from_secs(5)) {
            Some((_, f)) => ("200 OK", "image/jpeg", f.jpeg(90)?),
            None => not_found,
        },
        _ => not_found,
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    conn.write_all(&body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: u8) -> Frame {
        Frame::new(1, 1, vec![v, v, v, 255])
    }

    #[test]
    fn viewers_share_one_encoding_of_a_frame() {
        let f = frame(7);
        let a = f.viewer_jpeg().unwrap();
        let b = f.viewer_jpeg().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&a[..2], &[0xFF, 0xD8]);
    }

    #[test]
    fn a_session_token_sees_only_its_own_frames() {
        let hub = FrameHub::default();
        hub.publish("aa", frame(1));
        hub.publish("bb", frame(2));
        hub.publish("bb", frame(3));
        let (seq, f) = hub.next_after("aa", 0, Duration::ZERO).unwrap();
        assert_eq!((seq, f.rgba[0]), (1, 1));
        let (seq, f) = hub.next_after("bb", 0, Duration::ZERO).unwrap();
        assert_eq!((seq, f.rgba[0]), (2, 3));
        assert!(hub.next_after("bb", 2, Duration::ZERO).is_none());
        assert!(hub.next_after("cc", 0, Duration::ZERO).is_none());
        assert_eq!(hub.published(), 3);
        hub.forget("aa");
        assert!(hub.next_after("aa", 0, Duration::ZERO).is_none());
    }

    #[test]
    fn tokens_come_only_from_the_s_parameter_and_are_hex() {
        assert_eq!(token_of("/?s=00ff"), Some("00ff"));
        assert_eq!(token_of("/ws?x=1&s=abc"), Some("abc"));
        assert_eq!(token_of("/"), None);
        assert_eq!(token_of("/?s="), None);
        assert_eq!(token_of("/?s=../etc"), None);
        assert_eq!(token_of(&format!("/?s={}", "a".repeat(65))), None);
    }
}
