//! The service-level health gate: an HTTP URL answering 200 and TCP ports
//! accepting, checked from the host after every container is ready.

use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::HealthGate;

use super::DeployError;

/// Waits until the HTTP URL answers 200 and every TCP port accepts.
pub async fn wait(gate: &HealthGate, default_timeout: Duration) -> Result<(), DeployError> {
    let timeout = match gate.timeout_seconds {
        0 => default_timeout,
        s => Duration::from_secs(u64::from(s)),
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not checked yet");
    loop {
        let mut ok = true;
        if !gate.http_url.is_empty() {
            match http_get_status(&gate.http_url).await {
                Ok(200) => {}
                Ok(code) => {
                    ok = false;
                    last = format!("{} answered HTTP {code}", gate.http_url);
                }
                Err(e) => {
                    ok = false;
                    last = format!("{}: {e}", gate.http_url);
                }
            }
        }
        for port in &gate.tcp_ports {
            if ok && !port_open(*port).await {
                ok = false;
                last = format!("nothing accepts connections on TCP {port}");
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DeployError::Failed {
                message: format!(
                    "the service did not pass its health gate within {} s: {last}",
                    timeout.as_secs()
                ),
                diagnostics: Vec::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Minimal HTTP/1.1 GET to a loopback `http://host:port/path`; the status code.
pub async fn http_get_status(url: &str) -> std::io::Result<u16> {
    Ok(http_get(url, 0).await?.0)
}

/// The most of an answer's body [`http_get`] keeps.
pub const MAX_BODY: usize = 64 * 1024;

/// Whether something accepts TCP connections on 127.0.0.1:`port` (2 s at most).
pub async fn port_open(port: u32) -> bool {
    let Ok(port) = u16::try_from(port) else {
        return false;
    };
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Ok(_))
    )
}

/// The whole of one GET (connect, request, answer) takes at most this.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(3);

/// GET of a loopback `http://host:port/path`: the status code and up to
/// `max_body` bytes of the body (chunked answers decoded). One deadline for
/// the whole exchange; the answer ends at its length, its last chunk or
/// when the peer closes, whichever comes first.
pub async fn http_get(url: &str, max_body: usize) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// URLs are supported"))?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a.to_owned(), format!("/{p}")))
        .unwrap_or((rest.to_owned(), "/".into()));
    let connect = authority.replace("localhost", "127.0.0.1");
    let limit = max_body + 16 * 1024;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&connect).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await?;
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.len() >= limit || complete(&answer, max_body) {
                return Ok::<_, std::io::Error>(answer);
            }
        }
    };
    let answer = tokio::time::timeout(EXCHANGE_DEADLINE, exchange)
        .await
        .map_err(|_| std::io::Error::other("no complete answer within 3 s"))??;
    parse_answer(&answer, max_body)
}

/// Whether `answer` holds a whole response (only the status line when no
/// body is wanted).
fn complete(answer: &[u8], max_body: usize) -> bool {
    if max_body == 0 {
        return answer.windows(2).any(|w| w == b"\r\n");
    }
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let body = &answer[head_end + 4..];
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    match length {
        Some(length) => body.len() >= length,
        None if head.contains("transfer-encoding: chunked") => body.ends_with(b"0\r\n\r\n"),
        None => false,
    }
}

/// Status code and body of a raw HTTP/1.1 answer.
fn parse_answer(answer: &[u8], max_body: usize) -> std::io::Result<(u16, Vec<u8>)> {
    // What the peer sent is not repeated: it ends up in events and logs.
    let not_http = || std::io::Error::other("the answer is not HTTP");
    let line_end = answer
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(answer.len());
    let line = String::from_utf8_lossy(&answer[..line_end]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(not_http)?;
    if max_body == 0 {
        return Ok((code, Vec::new()));
    }
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok((code, Vec::new()));
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let raw = &answer[head_end + 4..];
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let mut body = if chunked { dechunk(raw) } else { raw.to_vec() };
    body.truncate(max_body);
    Ok((code, body))
}

/// The data of a chunked body, as far as it is complete.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&raw[..end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return out;
        };
        raw = &raw[end + 2..];
        if size == 0 || raw.len() < size {
            out.extend_from_slice(&raw[..size.min(raw.len())]);
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"users\":3}";
        assert_eq!(
            parse_answer(plain, MAX_BODY).unwrap(),
            (200, b"{\"users\":3}".to_vec())
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_answer(chunked, MAX_BODY).unwrap(),
            (200, b"{\"a\":1}".to_vec())
        );
        assert_eq!(parse_answer(b"HTTP/1.0 503 x\r\n", 0).unwrap().0, 503);
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n", MAX_BODY).is_err());
        // A body beyond the limit is cut, not kept whole.
        let big = [b"HTTP/1.1 200 OK\r\n\r\n".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(parse_answer(&big, 10).unwrap().1.len(), 10);
    }

    #[test]
    fn an_answer_is_complete_at_its_length_or_last_chunk() {
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            100
        ));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",
            100
        ));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            100
        ));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
            100
        ));
        assert!(!complete(b"HTTP/1.1 200 OK\r\n\r\nuntil close", 100));
        assert!(complete(b"HTTP/1.1 503 x\r\n", 0));
    }

    #[tokio::test]
    async fn a_server_that_keeps_the_connection_open_is_read_to_its_length() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"users\":7}")
                .await
                .unwrap();
            // Ignores `Connection: close` and holds the socket open.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let started = std::time::Instant::now();
        let (code, body) = http_get(&format!("http://127.0.0.1:{port}/svr_stats"), MAX_BODY)
            .await
            .unwrap();
        assert_eq!((code, body.as_slice()), (200, b"{\"users\":7}".as_slice()));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(port_open(u32::from(port)).await);
        assert!(!port_open(70_000).await);
    }
}
