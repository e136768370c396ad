//! An attachment's frames for the region's console, over HTTPS with the
//! GPU server's certificate.
//!
//! `GET /v1/attachments/ID/frame?after=SEQ` with `Authorization: Bearer
//! CREDENTIAL` (the attachment's own credential, which the region holds)
//! waits up to [`WAIT`] for a frame newer than `SEQ` and answers it as a
//! JPEG (`X-Frame-Seq` says its number), or 204 when none came. Anything
//! else, and any credential that is not the attachment's, is refused: a
//! URL alone shows nothing. The session data path never runs here; this
//! is a small tokio runtime of its own.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

use crate::server::Admission;
use crate::tls::ServerTls;
use crate::viewer::FrameHub;

/// Longest a request waits for a new frame.
pub const WAIT: Duration = Duration::from_secs(2);

/// What the frames endpoint needs.
#[derive(Debug, Clone)]
pub struct FramesEndpoint {
    pub hub: Arc<FrameHub>,
    pub admission: Arc<dyn Admission>,
    pub tls: Arc<ServerTls>,
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// The attachment id of a frame path, and the `after` parameter.
fn parse(path: &str, query: Option<&str>) -> Option<(String, u64)> {
    let id = path
        .strip_prefix("/v1/attachments/")?
        .strip_suffix("/frame")?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let after = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .map_or(Some(0), |v| v.parse().ok())?;
    Some((id.to_owned(), after))
}

async fn handle(ep: FramesEndpoint, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let Some((id, after)) = parse(req.uri().path(), req.uri().query()) else {
        return reply(StatusCode::NOT_FOUND, "not found\n");
    };
    let credential = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match ep.admission.admit(credential) {
        Ok(g) if g.attachment == id => {}
        Ok(_) => {
            log::warn!("frames of {id} refused: the credential is another attachment's");
            return reply(StatusCode::FORBIDDEN, "not this attachment's credential\n");
        }
        Err(why) => {
            log::warn!("frames of {id} refused: {why}");
            return reply(StatusCode::UNAUTHORIZED, format!("{why}\n"));
        }
    }
    let got = tokio::task::spawn_blocking(move || {
        let (seq, frame) = ep.hub.next_after(&id, after, WAIT)?;
        Some(
            frame
                .viewer_jpeg()
                .map(|j| (seq, frame.width, frame.height, j)),
        )
    })
    .await;
    match got {
        Ok(Some(Ok((seq, w, h, jpeg)))) => {
            let mut r = reply(StatusCode::OK, jpeg.to_vec());
            let hd = r.headers_mut();
            hd.insert(
                hyper::header::CONTENT_TYPE,
                "image/jpeg".parse().expect("static"),
            );
            hd.insert(
                hyper::header::CACHE_CONTROL,
                "no-store".parse().expect("static"),
            );
            hd.insert("x-frame-seq", seq.into());
            hd.insert("x-frame-size", format!("{w}x{h}").parse().expect("digits"));
            r
        }
        Ok(Some(Err(e))) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Ok(None) => reply(StatusCode::NO_CONTENT, ""),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Serves `listener` on a thread of its own until it fails.
pub fn serve(listener: TcpListener, ep: FramesEndpoint) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()?;
    std::thread::Builder::new()
        .name("vgpu-frames".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return log::error!("frames endpoint: {e}"),
                };
                loop {
                    let Ok((sock, peer)) = listener.accept().await else {
                        continue;
                    };
                    let ep = ep.clone();
                    tokio::spawn(async move {
                        let config = match ep.tls.config() {
                            Ok(c) => c,
                            Err(e) => return log::warn!("frames endpoint: {e}"),
                        };
                        let acceptor = tokio_rustls::TlsAcceptor::from(config);
                        let tls = match tokio::time::timeout(
                            crate::tls::HANDSHAKE_TIMEOUT,
                            acceptor.accept(sock),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                return log::warn!(
                                    "frames connection from {peer} refused: {}",
                                    crate::tls::handshake_failure(&e)
                                )
                            }
                            Err(_) => return,
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let ep = ep.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(ep, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn only_frame_paths_of_plain_ids_parse() {
        assert_eq!(
            parse("/v1/attachments/egpu-1f/frame", Some("after=7")),
            Some(("egpu-1f".into(), 7))
        );
        assert_eq!(
            parse("/v1/attachments/egpu-1f/frame", None),
            Some(("egpu-1f".into(), 0))
        );
        assert_eq!(parse("/v1/attachments//frame", None), None);
        assert_eq!(parse("/v1/attachments/../x/frame", None), None);
        assert_eq!(parse("/v1/attachments/a/frame", Some("after=x")), None);
        assert_eq!(parse("/?s=00ff", None), None);
    }
}
