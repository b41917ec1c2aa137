//! Plain HTTP on the WebSocket port: reading a request head, the captions
//! page, the health endpoint, error responses, and the checks made before a
//! WebSocket upgrade (token, origin).
//!
//! Every connection carries one request. The head is read here (bounded in
//! size and time by the caller) rather than by tungstenite, so that one
//! listener can route plain requests and upgrades alike.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The captions page, served at `/`.
pub const PAGE: &str = include_str!("page.html");

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before a complete request head")]
    Incomplete,
    #[error("request head over {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct RequestHead {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Bytes received after the head (a client may send its first
    /// WebSocket frame right behind the upgrade request).
    pub rest: Vec<u8>,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// A WebSocket upgrade request (RFC 6455 §4.2.1).
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET"
            && self.header_has_token("upgrade", "websocket")
            && self.header_has_token("connection", "upgrade")
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == key).then(|| percent_decode(v))
        })
    }
}

/// Reads the request head: bytes up to the blank line, at most
/// [`MAX_HEAD_BYTES`].
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<RequestHead, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Incomplete);
        }
        // Only the new bytes (and the three before them) can complete the terminator.
        let search_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[search_from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = search_from + pos + 4;
            if end > MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
            let mut head = parse_head(&buf[..end])?;
            head.rest = buf[end..].to_vec();
            return Ok(head);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

fn parse_head(bytes: &[u8]) -> Result<RequestHead, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Incomplete),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let headers = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    Ok(RequestHead {
        method: req.method.unwrap_or("").to_string(),
        path,
        query,
        headers,
        rest: Vec::new(),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries `token` (`Authorization: Bearer` or `?token=`).
pub fn authorized(head: &RequestHead, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let bearer = head.header("authorization").and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    if bearer.is_some_and(|b| constant_time_eq(b.as_bytes(), token.as_bytes())) {
        return true;
    }
    head.query_param("token")
        .is_some_and(|q| constant_time_eq(q.as_bytes(), token.as_bytes()))
}

/// Whether a browser page of another site may open this connection. Browsers
/// let any page open WebSockets to loopback, so without this check any web
/// site a user visits could read their captions. Non-browser clients send
/// no `Origin` and are not affected.
pub fn origin_allowed(head: &RequestHead, allowed: &[String]) -> bool {
    let Some(origin) = head.header("origin") else {
        return true;
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    // Same origin: the page this server served (http://HOST).
    let host = head.header("host").unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// The 101 response completing a WebSocket handshake, or why the request
/// is not a valid one.
pub fn upgrade_response(head: &RequestHead) -> Result<String, &'static str> {
    if head.header("sec-websocket-version") != Some("13") {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let key = head
        .header("sec-websocket-key")
        .ok_or("Sec-WebSocket-Key is missing")?;
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    ))
}

/// Writes a complete response and ends the connection.
pub async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    extra_headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\
         {extra_headers}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

pub async fn respond_text<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    body: &str,
) -> std::io::Result<()> {
    respond(stream, status, "text/plain; charset=utf-8", "", body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> RequestHead {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut bytes = raw.as_bytes();
        rt.block_on(read_head(&mut bytes)).unwrap()
    }

    #[test]
    fn heads_are_parsed_with_query_and_trailing_bytes() {
        let h = head(
            "GET /v1/subscribe?token=a%2Bb+c&x=1 HTTP/1.1\r\nHost: 127.0.0.1:8765\r\n\
             Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\r\n\x01\x02",
        );
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/v1/subscribe");
        assert_eq!(h.query_param("token").as_deref(), Some("a+b c"));
        assert_eq!(h.query_param("x").as_deref(), Some("1"));
        assert_eq!(h.query_param("y"), None);
        assert!(h.is_websocket_upgrade());
        assert_eq!(h.rest, b"\x01\x02");
        assert!(!head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_websocket_upgrade());
    }

    #[test]
    fn incomplete_and_oversized_heads_are_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut short = &b"GET / HTTP/1.1\r\nHost: x\r\n"[..];
        assert!(matches!(
            rt.block_on(read_head(&mut short)),
            Err(HeadError::Incomplete)
        ));
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let mut big = big.as_bytes();
        assert!(matches!(
            rt.block_on(read_head(&mut big)),
            Err(HeadError::TooLarge)
        ));
        let mut junk = &b"\x00\x01\x02 nonsense\r\n\r\n"[..];
        assert!(matches!(
            rt.block_on(read_head(&mut junk)),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn tokens_are_accepted_from_header_or_query_only_when_equal() {
        let t = Some("s3cret");
        assert!(authorized(&head("GET / HTTP/1.1\r\n\r\n"), None));
        assert!(!authorized(&head("GET / HTTP/1.1\r\n\r\n"), t));
        assert!(authorized(
            &head("GET / HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n"),
            t
        ));
        assert!(!authorized(
            &head("GET / HTTP/1.1\r\nAuthorization: Bearer s3cre\r\n\r\n"),
            t
        ));
        assert!(!authorized(
            &head("GET / HTTP/1.1\r\nAuthorization: Basic s3cret\r\n\r\n"),
            t
        ));
        assert!(authorized(&head("GET /?token=s3cret HTTP/1.1\r\n\r\n"), t));
        assert!(!authorized(&head("GET /?token=wrong HTTP/1.1\r\n\r\n"), t));
    }

    #[test]
    fn only_same_origin_or_listed_origins_may_connect() {
        let h = |origin: &str| {
            head(&format!(
                "GET / HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nOrigin: {origin}\r\n\r\n"
            ))
        };
        assert!(origin_allowed(
            &head("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            &[]
        ));
        assert!(origin_allowed(&h("http://127.0.0.1:8765"), &[]));
        assert!(!origin_allowed(&h("https://evil.example"), &[]));
        assert!(!origin_allowed(&h("http://127.0.0.1:9999"), &[]));
        assert!(origin_allowed(
            &h("https://captions.example"),
            &["https://captions.example".into()]
        ));
        assert!(origin_allowed(&h("https://any.example"), &["*".into()]));
    }

    #[test]
    fn the_accept_key_follows_rfc_6455() {
        // The example handshake of RFC 6455 §1.3.
        let h = head(
            "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
        );
        let r = upgrade_response(&h).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        let old =
            head("GET / HTTP/1.1\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 8\r\n\r\n");
        assert!(upgrade_response(&old).is_err());
    }
}
