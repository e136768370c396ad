//! A small, strict HTTP/1.1 subset for the management API: one request per
//! connection, `Content-Length` bodies only, bounded header and body sizes,
//! and a read timeout, so that a slow or hostile client cannot tie up the
//! daemon or make it allocate without bound.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::time::Duration;

/// Largest header block accepted.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// Largest body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, upper case.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (JSON unless `text` is set).
    pub body: Vec<u8>,
    /// The body is Prometheus text rather than JSON.
    pub text: bool,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Socket error or timeout.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// Malformed or over-sized request; answered with this status.
    #[error("{1}")]
    Bad(u16, String),
}

fn bad(status: u16, msg: impl Into<String>) -> HttpError {
    HttpError::Bad(status, msg.into())
}

/// Reads one request from `stream`.
pub fn read_request<R: Read>(stream: R) -> Result<Request, HttpError> {
    let mut r = BufReader::new(stream.take((MAX_HEADER_BYTES + MAX_BODY_BYTES + 1) as u64));
    let mut header_bytes = 0usize;
    let mut line = String::new();
    let mut next_line = |r: &mut BufReader<_>, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n = (&mut *r)
            .take((MAX_HEADER_BYTES - header_bytes.min(MAX_HEADER_BYTES)) as u64 + 1)
            .read_line(line)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => bad(400, "request header is not UTF-8"),
                _ => HttpError::Io(e),
            })?;
        header_bytes += n;
        if header_bytes > MAX_HEADER_BYTES {
            return Err(bad(431, "request header too large"));
        }
        if n == 0 || !line.ends_with('\n') {
            return Err(bad(400, "request ended inside the header"));
        }
        while line.ends_with('\n') || line.ends_with('\r') {
            line.pop();
        }
        Ok(())
    };
    next_line(&mut r, &mut line)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(400, "malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(505, "only HTTP/1.x is spoken here"));
    }
    if !method.chars().all(|c| c.is_ascii_uppercase()) || method.is_empty() {
        return Err(bad(400, "malformed method"));
    }
    if !target.starts_with('/') {
        return Err(bad(400, "request target must be an absolute path"));
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    let (method, mut content_length) = (method.to_owned(), None::<usize>);
    loop {
        next_line(&mut r, &mut line)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(400, "malformed header line"));
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        match name.as_str() {
            "content-length" => {
                let n: usize = value.parse().map_err(|_| bad(400, "bad Content-Length"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(bad(400, "conflicting Content-Length headers"));
                }
                if n > MAX_BODY_BYTES {
                    return Err(bad(413, format!("body over {MAX_BODY_BYTES} bytes")));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(bad(
                    501,
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            _ => {}
        }
    }
    let mut body = vec![0u8; content_length.unwrap_or(0)];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad(400, "request body shorter than Content-Length"),
        _ => HttpError::Io(e),
    })?;
    Ok(Request { method, path, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Writes a response and closes the exchange.
pub fn write_response<W: Write>(mut w: W, resp: &Response) -> io::Result<()> {
    let ctype = if resp.text {
        "text/plain; version=0.0.4"
    } else {
        "application/json"
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len()
    );
    w.write_all(head.as_bytes())?;
    w.write_all(&resp.body)?;
    w.flush()
}

/// Reads a response (client side): status and body.
pub fn read_response<R: Read>(stream: R) -> io::Result<Response> {
    let mut r = BufReader::new(stream.take((MAX_HEADER_BYTES + 64 * MAX_BODY_BYTES) as u64));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut len = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            if n.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        body,
        text: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(raw)
    }

    #[test]
    fn parses_a_request_with_body() {
        let r = parse(b"POST /v1/volumes?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/volumes");
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn refuses_malformed_and_oversized_requests() {
        let status = |raw: &[u8]| match parse(raw) {
            Err(HttpError::Bad(s, _)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"GET\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2\r\n\r\n"), 505);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            400
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x"), 400);
        assert_eq!(status(b"GET x HTTP/1.1\r\n\r\n"), 400);
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..2000 {
            huge.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaa\r\n");
        }
        huge.extend_from_slice(b"\r\n");
        assert_eq!(status(&huge), 431);
        assert_eq!(status(b"GET / HTTP/1.1\r\nBad\xff: x\r\n\r\n"), 400);
    }

    #[test]
    fn response_round_trips() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            &Response {
                status: 409,
                body: b"{\"error\":\"x\"}".to_vec(),
                text: false,
            },
        )
        .unwrap();
        let back = read_response(&out[..]).unwrap();
        assert_eq!(back.status, 409);
        assert_eq!(back.body, b"{\"error\":\"x\"}");
    }
}
