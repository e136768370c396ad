//! The instance metadata service: what an instance learns from the
//! provider, not from its user (EC2 answers at 169.254.169.254). Each
//! instance's QEMU forwards the guest's connections to 169.254.169.254:80
//! (user networking restricted to that forward: the guest reaches nothing
//! else) to `softcard metadata --file DIR/metadata.json`, one process per
//! connection with the connection on its standard streams, which answers
//! from the instance's own file: no instance can ask for another's.
//!
//! | path | answer |
//! |---|---|
//! | `/latest/meta-data/` | the names below, one a line |
//! | `/latest/meta-data/instance-id` | the instance's id |
//! | `/latest/meta-data/vgpu` | JSON: the vGPU's id, type, endpoint and credential (404 without one) |

use std::path::Path;

use serde_json::Value;

/// The document an instance's metadata is answered from. The vGPU gains
/// `guest_endpoint`: where the guest reaches it (relayed by the host).
pub fn document(id: &str, vgpu: Option<&Value>) -> Value {
    let vgpu = vgpu.map(|v| {
        let mut v = v.clone();
        v["guest_endpoint"] = Value::from(format!("169.254.169.254:{GUEST_VGPU_PORT}"));
        v
    });
    serde_json::json!({"instance-id": id, "vgpu": vgpu})
}

/// Writes an instance's metadata file (atomically: a reader sees the old
/// or the new document, never half of one).
pub fn write(dir: &Path, doc: &Value) -> std::io::Result<()> {
    let tmp = dir.join(".metadata.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(doc).unwrap_or_default())?;
    std::fs::rename(tmp, dir.join("metadata.json"))
}

/// The answer to `GET path`: status and body.
pub fn answer(doc: &Value, path: &str) -> (u16, String) {
    match path.trim_end_matches('/') {
        "/latest/meta-data" => (200, "instance-id\nvgpu\n".into()),
        "/latest/meta-data/instance-id" => match doc["instance-id"].as_str() {
            Some(id) => (200, id.to_owned()),
            None => (404, "not found\n".into()),
        },
        "/latest/meta-data/vgpu" if !doc["vgpu"].is_null() => (200, doc["vgpu"].to_string()),
        _ => (404, "not found\n".into()),
    }
}

/// Serves one connection on standard input and output (QEMU's guestfwd
/// `cmd:` gives each guest connection to a process this way), answering
/// from the file at `file` as it is when each request arrives.
pub fn serve_stdio(file: &Path) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    let file = file.to_owned();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let file = file.clone();
        async move {
            let doc: Value = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let (status, body) = answer(&doc, uri.path());
            (
                axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::NOT_FOUND),
                body,
            )
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        let svc = hyper_util::service::TowerToHyperService::new(app);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(io), svc),
        )
        .await;
    });
    Ok(())
}

/// The port of 169.254.169.254 at which a guest reaches its vGPU: each
/// connection is relayed to the endpoint in the instance's metadata file
/// as it is at that moment (so a vGPU attached after boot is reachable).
pub const GUEST_VGPU_PORT: u16 = 7070;

/// Relays one guest connection (on standard input and output) to the
/// instance's vGPU endpoint, both ways, until either side closes.
pub fn relay_stdio(file: &Path) -> std::io::Result<()> {
    let doc: Value = serde_json::from_slice(&std::fs::read(file)?).unwrap_or_default();
    let endpoint = doc["vgpu"]["endpoint"]
        .as_str()
        .ok_or_else(|| std::io::Error::other("this instance has no vGPU"))?;
    let up = std::net::TcpStream::connect(endpoint)?;
    let mut down = up.try_clone()?;
    let to_gpu = std::thread::spawn(move || {
        let mut up = up;
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    // Standard output is line-buffered: every chunk is flushed, or a frame
    // without a newline byte would wait in the buffer forever.
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        use std::io::{Read, Write};
        let n = match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    let _ = to_gpu.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_from_the_document() {
        let v =
            serde_json::json!({"id": "egpu-1", "endpoint": "127.0.0.1:7070", "credential": "sc_x"});
        let d = document("i-1", Some(&v));
        assert_eq!(
            answer(&d, "/latest/meta-data/instance-id"),
            (200, "i-1".into())
        );
        assert_eq!(
            answer(&d, "/latest/meta-data/"),
            (200, "instance-id\nvgpu\n".into())
        );
        let (s, body) = answer(&d, "/latest/meta-data/vgpu");
        assert_eq!(s, 200);
        let got: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(got["endpoint"], v["endpoint"]);
        assert_eq!(got["credential"], v["credential"]);
        assert_eq!(got["guest_endpoint"], "169.254.169.254:7070");
        assert_eq!(
            answer(&document("i-1", None), "/latest/meta-data/vgpu").0,
            404
        );
        assert_eq!(answer(&d, "/etc/passwd").0, 404);
        assert_eq!(answer(&d, "/latest/meta-data/../../x").0, 404);
    }
}
