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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// URLs are supported"))?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a.to_owned(), format!("/{p}")))
        .unwrap_or((rest.to_owned(), "/".into()));
    let connect = authority.replace("localhost", "127.0.0.1");
    let mut stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&connect),
    )
    .await
    .map_err(|_| std::io::Error::other("connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut head))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}
