//! The vGPU an instance was given, from its provider's instance metadata
//! service (softcard's region answers at 169.254.169.254, as EC2 does), so
//! that the application's one-line change stays one line.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

/// Where the metadata service answers, unless `SOFTCARD_METADATA_URL`
/// says otherwise.
pub const METADATA_URL: &str = "http://169.254.169.254:80";

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The instance's vGPU: where to connect (the address the guest reaches
/// it at), the credential, and whom to trust (TLS when the metadata names
/// an authority).
pub fn vgpu_from_metadata() -> std::io::Result<super::Endpoint> {
    let base = std::env::var("SOFTCARD_METADATA_URL").unwrap_or_else(|_| METADATA_URL.into());
    let uri: hyper::Uri = format!("{}/latest/meta-data/vgpu", base.trim_end_matches('/'))
        .parse()
        .map_err(err)?;
    let host = uri
        .host()
        .ok_or_else(|| err("metadata URL without a host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(async {
        let get = async {
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(err)?;
            tokio::spawn(conn);
            let req = hyper::Request::get(uri.path())
                .header(hyper::header::HOST, host.as_str())
                .body(Empty::<Bytes>::new())
                .map_err(err)?;
            let resp = sender.send_request(req).await.map_err(err)?;
            if !resp.status().is_success() {
                return Err(err(format!(
                    "the metadata service has no vGPU for this instance ({})",
                    resp.status()
                )));
            }
            Ok::<_, std::io::Error>(resp.into_body().collect().await.map_err(err)?.to_bytes())
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), get)
            .await
            .map_err(|_| err("the metadata service did not answer"))?
    })?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(err)?;
    let at = v["guest_endpoint"]
        .as_str()
        .or(v["endpoint"].as_str())
        .ok_or_else(|| err("no vGPU endpoint in the metadata"))?;
    let credential = v["credential"]
        .as_str()
        .ok_or_else(|| err("no vGPU credential in the metadata"))?;
    let tls = match (v["ca"].as_str(), v["server_name"].as_str()) {
        (Some(ca), Some(name)) => Some(crate::tls::ClientTls {
            server_name: name.to_owned(),
            ca_pem: ca.to_owned(),
        }),
        (None, None) => None,
        _ => {
            return Err(err(
                "the metadata names a vGPU authority without a server name",
            ))
        }
    };
    Ok(super::Endpoint {
        addr: at.to_owned(),
        credential: Some(credential.to_owned()),
        tls,
    })
}

/// A wgpu instance on the vGPU the provider attached to this instance:
/// endpoint and credential from the metadata service.
pub fn remote_instance_from_metadata() -> std::io::Result<wgpu::Instance> {
    super::remote_instance_at(&vgpu_from_metadata()?)
}
