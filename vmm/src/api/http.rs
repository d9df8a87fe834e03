//! The HTTP/1.1 subset the API speaks, over any `Read + Write`: read one
//! request, write one response. No sockets or threads here (those are in
//! `server`), so the tests drive it with byte buffers.
//!
//! ```text
//! request   = METHOD SP /path[?query] SP HTTP/1.x CRLF *(name ":" value CRLF) CRLF body
//! body      = exactly Content-Length bytes (0 when absent); no Transfer-Encoding
//! response  = HTTP/1.1 SP status SP reason CRLF
//!             [Content-Type: application/json CRLF Content-Length: n CRLF]
//!             [Allow: methods CRLF] Connection: close CRLF CRLF [body]
//! ```
//!
//! Bare LF line ends are accepted. Limits: [`MAX_HEAD`] for the request
//! line and headers together, [`MAX_BODY`] for the body; the caller bounds
//! the time.

use std::io::{self, Read, Write};

/// Largest request line plus headers, in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// A request as read off the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ... (uppercase letters only).
    pub method: String,
    /// The target without its query string.
    pub path: String,
    /// Exactly `Content-Length` bytes.
    pub body: Vec<u8>,
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed the connection before sending anything.
    #[error("the connection closed before a request")]
    Closed,
    /// The read deadline passed.
    #[error("the request took too long to arrive")]
    Timeout,
    /// The connection failed.
    #[error("cannot read the request: {0}")]
    Io(io::Error),
    /// Not HTTP/1.x as this server reads it.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Request line and headers over [`MAX_HEAD`].
    #[error("the request line and headers exceed {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// `Content-Length` over [`MAX_BODY`].
    #[error("a body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    BodyTooLarge(u64),
    /// Body bytes arrived without a `Content-Length`.
    #[error("a request body needs a Content-Length header")]
    LengthRequired,
    /// A `Transfer-Encoding` header (chunked bodies are not supported).
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    TransferEncoding,
    /// `HTTP/2.0` and the like.
    #[error("HTTP version {0:?} is not supported")]
    Version(String),
}

impl HttpError {
    /// The status to answer with, `None` when there is no one to answer.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            HttpError::Closed | HttpError::Io(_) => return None,
            HttpError::Timeout => 408,
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::LengthRequired => 411,
            HttpError::TransferEncoding => 501,
            HttpError::Version(_) => 505,
        })
    }
}

/// Reads into `buf` (appending up to `room` bytes); 0 at end of stream.
fn read_some(conn: &mut impl Read, buf: &mut Vec<u8>, room: usize) -> Result<usize, HttpError> {
    let mut chunk = [0u8; 1024];
    let want = room.min(chunk.len());
    loop {
        match conn.read(&mut chunk[..want]) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::Timeout)
            }
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// Where the head ends: (head length, body start), `\r\n\r\n` or `\n\n`.
fn head_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, i + 4))
        } else if buf[i..].starts_with(b"\n\n") {
            Some((i, i + 2))
        } else if buf[i..].starts_with(b"\n\r\n") {
            Some((i, i + 3))
        } else {
            None
        }
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The parsed request line and the headers that matter here.
struct Head {
    method: String,
    path: String,
    content_length: Option<u64>,
    expect_continue: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let head = std::str::from_utf8(head)
        .ok()
        .filter(|h| h.is_ascii())
        .ok_or(HttpError::Malformed("non-ASCII bytes in the request head"))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "the request line is not METHOD SP TARGET SP VERSION",
        ));
    };
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Malformed("bad method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(HttpError::Malformed("the target is not an absolute path"));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/")
            && v.len() == 8
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(HttpError::Version(v.to_string()))
        }
        _ => return Err(HttpError::Malformed("bad HTTP version")),
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let mut content_length = None;
    let mut expect_continue = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed("folded header lines are not allowed"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("a header line without ':'"))?;
        if !is_token(name) {
            return Err(HttpError::Malformed("bad header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Malformed("Content-Length is not a number"));
            }
            // Over 19 digits is over u64; any such length is too large.
            let n = value.parse::<u64>().unwrap_or(u64::MAX);
            if content_length.is_some_and(|c| c != n) {
                return Err(HttpError::Malformed("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        content_length,
        expect_continue,
    })
}

/// Reads one request. Writes only an interim `100 Continue` when the
/// client asked for one.
pub fn read_request(conn: &mut (impl Read + Write)) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let (head_len, body_start) = loop {
        let scanned = buf.len().saturating_sub(3);
        let room = (MAX_HEAD + 4).saturating_sub(buf.len());
        if room == 0 {
            return Err(HttpError::HeadTooLarge);
        }
        if read_some(conn, &mut buf, room)? == 0 {
            return Err(if buf.is_empty() {
                HttpError::Closed
            } else {
                HttpError::Malformed("the connection closed inside the head")
            });
        }
        if let Some((h, b)) = head_end(&buf[scanned..]) {
            break (scanned + h, scanned + b);
        }
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let head = parse_head(&buf[..head_len])?;
    let mut body = buf.split_off(body_start);
    let len = match head.content_length {
        None if body.is_empty() => 0,
        None => return Err(HttpError::LengthRequired),
        Some(n) if n > MAX_BODY as u64 => return Err(HttpError::BodyTooLarge(n)),
        Some(n) => n as usize,
    };
    // Anything past the body would be a second request: one per
    // connection, so it is dropped.
    body.truncate(len);
    if body.len() < len && head.expect_continue {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(HttpError::Io)?;
    }
    while body.len() < len {
        let room = len - body.len();
        if read_some(conn, &mut body, room)? == 0 {
            return Err(HttpError::Malformed(
                "the body is shorter than Content-Length",
            ));
        }
    }
    Ok(Request {
        method: head.method,
        path: head.path,
        body,
    })
}

/// The reason phrase for the statuses this API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A response: the status and, unless 204, a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body; `None` for 204.
    pub body: Option<String>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    /// 200 with `value` as JSON.
    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Response {
                status: 200,
                body: Some(body),
                allow: None,
            },
            Err(e) => Response::error(500, &format!("cannot encode the response: {e}")),
        }
    }

    /// 204 No Content.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "error": message }).to_string();
        Response {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// The whole response as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if let Some(body) = &self.body {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        if let Some(body) = &self.body {
            out.push_str(body);
        }
        out.into_bytes()
    }
}

/// A response as the client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedResponse {
    /// The status.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes, or all to the end).
    pub body: Vec<u8>,
}

/// Parses a whole response read to the end of the connection, skipping
/// interim 1xx responses.
pub fn parse_response(mut bytes: &[u8]) -> Result<ParsedResponse, &'static str> {
    loop {
        let (head_len, body_start) = head_end(bytes).ok_or("no end of the response head")?;
        let head = std::str::from_utf8(&bytes[..head_len]).map_err(|_| "non-UTF-8 head")?;
        let mut lines = head.split('\n').map(|l| l.trim_end_matches('\r'));
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err("not an HTTP/1.x response");
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or("bad status code")?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &bytes[body_start..];
        if (100..200).contains(&status) {
            bytes = rest;
            continue;
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse::<usize>().map_err(|_| "bad Content-Length"))
            .transpose()?;
        let body = match length {
            Some(n) if n > rest.len() => return Err("the body is shorter than Content-Length"),
            Some(n) => rest[..n].to_vec(),
            None => rest.to_vec(),
        };
        return Ok(ParsedResponse {
            status,
            headers,
            body,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that replays `input` in `chunk`-byte reads and
    /// records what is written.
    struct Script {
        input: Vec<u8>,
        pos: usize,
        chunk: usize,
        written: Vec<u8>,
    }

    impl Script {
        fn new(input: &[u8], chunk: usize) -> Self {
            Script {
                input: input.to_vec(),
                pos: 0,
                chunk,
                written: Vec::new(),
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk).min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read(input: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut Script::new(input, 7))
    }

    fn status(input: &[u8]) -> Option<u16> {
        read(input).err().and_then(|e| e.status())
    }

    #[test]
    fn api_http_reads_a_request_in_small_pieces() {
        let r = read(b"PUT /vm/snapshot?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/vm/snapshot");
        assert_eq!(r.body, b"hello");
        let r = read(b"GET /vm HTTP/1.0\n\n").unwrap();
        assert_eq!((r.method.as_str(), r.body.len()), ("GET", 0));
    }

    #[test]
    fn api_http_drops_bytes_past_the_body() {
        let r =
            read(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.body, b"ab");
    }

    #[test]
    fn api_http_rejects_malformed_heads() {
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /vm\r\n\r\n",
            b"GET  /vm HTTP/1.1\r\n\r\n",
            b"get /vm HTTP/1.1\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1 extra\r\n\r\n",
            b"GET /vm FTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\x00\x01\x02\r\n\r\n",
            b"PUT /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"GET /vm HTTP/1.1\r\nHost: x",
        ] {
            assert_eq!(status(bad), Some(400), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn api_http_maps_each_limit_to_its_status() {
        assert_eq!(status(b"GET /vm HTTP/2.0\r\n\r\n"), Some(505));
        let huge = format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(huge.as_bytes()), Some(431));
        let endless = "a".repeat(3 * MAX_HEAD);
        assert_eq!(status(endless.as_bytes()), Some(431));
        assert_eq!(
            status(b"PUT /vm HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            status(b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Some(413)
        );
        assert_eq!(status(b"PUT /vm HTTP/1.1\r\n\r\n{}"), Some(411));
        assert_eq!(
            status(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(501)
        );
        assert!(matches!(read(b""), Err(HttpError::Closed)));
    }

    #[test]
    fn api_http_answers_expect_continue() {
        let mut conn = Script::new(
            b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
            61, // the head alone, so the body is still to come
        );
        assert_eq!(read_request(&mut conn).unwrap().body, b"{}");
        assert_eq!(conn.written, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn api_http_response_round_trips() {
        let bytes = Response::error(409, "already paused").to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        let parsed = parse_response(&bytes).unwrap();
        assert_eq!(parsed.status, 409);
        assert_eq!(parsed.body, br#"{"error":"already paused"}"#);
        let bytes = Response::no_content().to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
        let mut with_continue = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        with_continue.extend_from_slice(&bytes);
        let parsed = parse_response(&with_continue).unwrap();
        assert_eq!((parsed.status, parsed.body.len()), (204, 0));
        assert!(parse_response(b"garbage").is_err());
    }
}
