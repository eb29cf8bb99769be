//! The audit log: one JSON line per mutating request (apply, control, image
//! upload), saying who asked, what, and how it ended. Root-only (0600) in the
//! agent's log directory; never a secret value (request fields that carry
//! secrets are not logged, outcomes are already redacted).

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// Who made a request: the certificate's subject and serial, and the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub common_name: String,
    pub serial: String,
    pub address: String,
}

impl Caller {
    /// Who holds `certificate` and calls from `address`.
    pub fn new(certificate: &imfleet_certs::CertificateInfo, address: Option<SocketAddr>) -> Self {
        Caller {
            common_name: certificate.common_name.clone(),
            serial: certificate.serial_hex.clone(),
            address: address
                .as_ref()
                .map(SocketAddr::to_string)
                .unwrap_or_default(),
        }
    }

    /// The caller the mTLS gate recorded on a request it admitted.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default()
    }
}

/// One audit line (its time is taken when it is written).
#[derive(Debug, Clone, Serialize)]
pub struct Entry<'a> {
    pub caller: &'a Caller,
    pub rpc: &'a str,
    pub deployment: &'a str,
    /// What was asked, without secret values (action, images, paths).
    pub detail: String,
    /// "started", "ok", or "refused: ..." / "failed: ...".
    pub outcome: String,
}

/// Appends entries to the audit file; writes are serialised and flushed.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens `path` for appending: created 0600, never through a symlink.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(path)?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    /// Writes one entry. An audit write that fails is logged, not fatal:
    /// the request already happened.
    pub fn record(&self, entry: &Entry<'_>) {
        #[derive(Serialize)]
        struct Line<'a> {
            at: i64,
            #[serde(flatten)]
            entry: &'a Entry<'a>,
        }
        let line = Line {
            at: time::OffsetDateTime::now_utc().unix_timestamp(),
            entry,
        };
        let mut line = serde_json::to_string(&line).expect("entries serialise");
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
        {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn entries_are_json_lines_in_a_private_file_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let caller = Caller {
            common_name: "imfleet-controller".into(),
            serial: "01ab".into(),
            address: "127.0.0.1:5000".into(),
        };
        for outcome in ["started", "ok"] {
            log.record(&Entry {
                caller: &caller,
                rpc: "apply",
                deployment: "portsip-im",
                detail: "config abc".into(),
                outcome: outcome.into(),
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["outcome"], "ok");
        assert!(lines[1]["at"].as_i64().unwrap() > 1_700_000_000);
        assert_eq!(lines[0]["caller"]["common_name"], "imfleet-controller");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(AuditLog::open(&link).is_err());
    }
}
