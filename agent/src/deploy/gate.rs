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
            if ok
                && tokio::net::TcpStream::connect(("127.0.0.1", *port as u16))
                    .await
                    .is_err()
            {
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

/// GET of a loopback `http://host:port/path`: the status code and up to
/// `max_body` bytes of the body (chunked answers decoded). Each step is
/// bounded in time: a service that accepts and then hangs costs 3 s.
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
    let bounded = |what: &'static str| move |_| std::io::Error::other(what);
    let mut stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&connect),
    )
    .await
    .map_err(bounded("connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    // Head plus body, read until the peer closes or the limit is reached.
    let limit = max_body.max(64) + 16 * 1024;
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await?;
            answer.extend_from_slice(&buf[..n]);
            let head_done = max_body == 0 && answer.windows(2).any(|w| w == b"\r\n");
            if n == 0 || answer.len() >= limit || head_done {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .map_err(bounded("no answer within 3 s"))??;
    parse_answer(&answer, max_body)
}

/// Status code and body of a raw HTTP/1.1 answer.
fn parse_answer(answer: &[u8], max_body: usize) -> std::io::Result<(u16, Vec<u8>)> {
    let not_http = || {
        let start = String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
        std::io::Error::other(format!("not an HTTP answer: {start:?}"))
    };
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
}
