//! The one gate every request passes: the TLS peer must present a
//! certificate with exactly the controller role and a clientAuth EKU (TLS
//! has already checked the chain, and the EKU where there is one: TLS
//! stacks accept a certificate with none), and, once the controller has
//! sent a list of the controller certificates it accepts, be one of them.
//!
//! The list comes with requests (a header), signed by the fleet CA; the
//! newest one verified is kept in `etc/controllers.list` and an older one is
//! ignored, so a revoked controller certificate stays refused whatever its
//! holder sends. The admitted caller is attached to the request for the
//! audit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use imfleet_certs::{ControllerList, Role, controllers::HEADER};
use imfleet_proto::model::layout::Layout;
use tonic::{Request, Status};

use crate::audit::Caller;
use crate::serving::Credentials;

#[derive(Debug)]
pub struct ControllerGate {
    credentials: Arc<Credentials>,
    path: PathBuf,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    list: Option<ControllerList>,
    /// The header of the list held, so it is not verified again.
    last_header: Option<String>,
    /// Every revocation seen in any list taken (serial, not-after), kept
    /// until the certificate expires: a later list cannot undo one.
    revoked: Vec<(String, i64)>,
}

impl ControllerGate {
    /// The gate for an agent trusting what `credentials` trust, with the
    /// list it kept, if that still verifies.
    pub fn open(layout: &Layout, credentials: Arc<Credentials>) -> ControllerGate {
        let path = layout.controllers_list();
        let ca_pem = credentials.ca_pem();
        let list =
            std::fs::read_to_string(&path).ok().and_then(|text| {
                match ControllerList::verify(text.trim(), &ca_pem) {
                    Ok(list) => Some(list),
                    Err(e) => {
                        tracing::warn!("ignoring {}: {e}", path.display());
                        None
                    }
                }
            });
        let revoked = list.as_ref().map(|l| l.revoked.clone()).unwrap_or_default();
        let revoked = merge_revoked(revoked, read_revoked(&revoked_path(&path)));
        ControllerGate {
            credentials,
            path,
            held: Mutex::new(Held {
                list,
                last_header: None,
                revoked,
            }),
        }
    }

    /// The version of the list held (0: none yet).
    pub fn version(&self) -> u64 {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.list.as_ref().map_or(0, |l| l.version)
    }

    #[allow(clippy::result_large_err)]
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let info = imfleet_certs::check_peer(leaf, Role::Controller)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let header = request
            .metadata()
            .get(HEADER)
            .map(|v| v.to_str().map(str::to_owned));
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match header {
            Some(Ok(header)) => self.offer(&mut held, header)?,
            Some(Err(_)) => {
                return Err(Status::permission_denied(
                    "the controller list sent is not valid text",
                ));
            }
            None => {}
        }
        let revoked = held.revoked.iter().any(|(s, _)| *s == info.serial_hex);
        if let Some(list) = &held.list
            && (revoked || !list.admits(&info.serial_hex))
        {
            return Err(Status::permission_denied(format!(
                "this host no longer accepts controller certificate {}: it was revoked, or the controller has not told this host of it (list version {}); if this is the controller's own certificate (its state restored from an older backup?), `controller certs revoke {}` on the controller issues a new one",
                info.serial_hex, list.version, info.serial_hex
            )));
        }
        drop(held);
        let caller = Caller::new(&info, request.remote_addr());
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    /// Takes `header`'s list if the CA signed it and it is newer than the
    /// one held.
    #[allow(clippy::result_large_err)]
    fn offer(&self, held: &mut Held, header: String) -> Result<(), Status> {
        if held.last_header.as_deref() == Some(header.as_str()) {
            return Ok(());
        }
        // A list no newer than the one held changes nothing: not even worth
        // verifying (a caller cannot make the agent verify at every request).
        let claimed = ControllerList::claimed_version(&header)
            .ok_or_else(|| Status::permission_denied("the controller list sent is malformed"))?;
        if held.list.as_ref().is_some_and(|l| claimed <= l.version) {
            return Ok(());
        }
        let list = ControllerList::verify(&header, &self.credentials.ca_pem())
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let revoked = merge_revoked(held.revoked.clone(), list.revoked.clone());
        // Kept before it is used: a restart must not forget a revocation.
        let keep = |path: &std::path::Path, text: &[u8]| {
            imfleet_certs::storage::write_atomically(path, text, 0o644)
                .map_err(|e| Status::internal(format!("cannot keep the controller list: {e}")))
        };
        keep(
            &revoked_path(&self.path),
            write_revoked(&revoked).as_bytes(),
        )?;
        keep(&self.path, header.as_bytes())?;
        tracing::info!(
            version = list.version,
            accepted = list.serials.len(),
            revoked = revoked.len(),
            "took a new list of accepted controller certificates"
        );
        held.list = Some(list);
        held.revoked = revoked;
        held.last_header = Some(header);
        Ok(())
    }
}

/// Where the revocations seen are kept, beside the list.
fn revoked_path(list: &std::path::Path) -> PathBuf {
    list.with_extension("revoked")
}

fn read_revoked(path: &std::path::Path) -> Vec<(String, i64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (serial, not_after) = line.split_once(' ')?;
            Some((serial.to_owned(), not_after.parse().ok()?))
        })
        .collect()
}

fn write_revoked(revoked: &[(String, i64)]) -> String {
    revoked
        .iter()
        .map(|(serial, not_after)| format!("{serial} {not_after}\n"))
        .collect()
}

/// The union of two sets of revocations, without the expired ones and at
/// most [`MAX_REVOKED`] (the latest to expire kept).
fn merge_revoked(mut a: Vec<(String, i64)>, b: Vec<(String, i64)>) -> Vec<(String, i64)> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    a.extend(b);
    a.retain(|(_, not_after)| *not_after > now);
    a.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    a.dedup_by(|x, y| x.0 == y.0);
    a.truncate(MAX_REVOKED);
    a
}

/// Most revocations remembered.
const MAX_REVOKED: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_accumulate_until_they_expire() {
        let later = time::OffsetDateTime::now_utc().unix_timestamp() + 86_400;
        let merged = merge_revoked(
            vec![("0a".into(), later), ("0b".into(), 1)],
            vec![("0a".into(), later), ("0c".into(), later + 1)],
        );
        assert_eq!(merged, vec![("0c".into(), later + 1), ("0a".into(), later)]);
        assert_eq!(read_revoked_text(&write_revoked(&merged)), merged);
    }

    fn read_revoked_text(text: &str) -> Vec<(String, i64)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.revoked");
        std::fs::write(&path, text).unwrap();
        read_revoked(&path)
    }
}
