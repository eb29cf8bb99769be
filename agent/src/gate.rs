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
use std::sync::Mutex;

use imfleet_certs::{ControllerList, Role, controllers::HEADER};
use imfleet_proto::model::layout::Layout;
use tonic::{Request, Status};

use crate::audit::Caller;

#[derive(Debug)]
pub struct ControllerGate {
    ca_pem: String,
    path: PathBuf,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    list: Option<ControllerList>,
    /// The last header verified, so the same one is not verified again.
    last_header: Option<String>,
}

impl ControllerGate {
    /// The gate for an agent trusting `ca_pem`, with the list it kept, if
    /// that still verifies.
    pub fn open(layout: &Layout, ca_pem: &str) -> ControllerGate {
        let path = layout.controllers_list();
        let list =
            std::fs::read_to_string(&path).ok().and_then(|text| {
                match ControllerList::verify(text.trim(), ca_pem) {
                    Ok(list) => Some(list),
                    Err(e) => {
                        tracing::warn!("ignoring {}: {e}", path.display());
                        None
                    }
                }
            });
        ControllerGate {
            ca_pem: ca_pem.to_owned(),
            path,
            held: Mutex::new(Held {
                list,
                last_header: None,
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
        if let Some(list) = &held.list
            && !list.admits(&info.serial_hex)
        {
            return Err(Status::permission_denied(format!(
                "this host no longer accepts controller certificate {}: it was revoked, or the controller has not told this host of it (list version {})",
                info.serial_hex, list.version
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
        let list = ControllerList::verify(&header, &self.ca_pem)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if held.list.as_ref().is_none_or(|l| list.version > l.version) {
            // Kept before it is used: a restart must not forget a revocation.
            imfleet_certs::storage::write_atomically(&self.path, header.as_bytes(), 0o644)
                .map_err(|e| Status::internal(format!("cannot keep the controller list: {e}")))?;
            tracing::info!(
                version = list.version,
                accepted = list.serials.len(),
                "took a new list of accepted controller certificates"
            );
            held.list = Some(list);
        }
        held.last_header = Some(header);
        Ok(())
    }
}
