//! The contract between the imfleet controller and its agents: the generated
//! gRPC types ([`agent`]) and the model both sides share ([`model`]).
//!
//! The `.proto` sources live in `proto/imfleet/` and are compiled by `build.rs`
//! with protox, so building needs no system `protoc`.
#![forbid(unsafe_code)]

/// Version 1 of the agent service.
pub mod agent {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("imfleet.agent.v1");
    }
}

pub mod model;

/// JSON forms of enum fields (names, not numbers).
pub mod json {
    use crate::agent::v1::AddressOrigin;

    pub fn address_origin<S: serde::Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
        let name = match AddressOrigin::try_from(*value) {
            Ok(AddressOrigin::Static) => "static",
            Ok(AddressOrigin::Dhcp) => "dhcp",
            Ok(AddressOrigin::LinkLocal) => "link-local",
            _ => "unknown",
        };
        s.serialize_str(name)
    }
}

/// "0.4 of 1234.5 MB": transfer progress, readable for archives of any size
/// (both sides report uploads and pulls this way).
pub fn megabytes(done: u64, total: u64) -> String {
    let mb = |b: u64| b as f64 / 1_000_000.0;
    format!("{:.1} of {:.1} MB", mb(done), mb(total))
}

/// Protocol revision spoken by this build. Bump when RPCs or fields are added,
/// so a controller can tell which features an older agent lacks.
pub const PROTOCOL_REVISION: u32 = 11;

/// TCP port the agent listens on unless configured otherwise. Chosen to avoid
/// every port PortSIP uses (5060-5067, 5432, 8881-8904, 10000+ RTP).
pub const DEFAULT_AGENT_PORT: u16 = 7443;

#[cfg(test)]
mod tests {
    #[test]
    fn transfer_progress_shows_small_and_large_archives() {
        // An archive under 1 MB used to show as "0 of 0 MB".
        assert_eq!(super::megabytes(400_000, 900_000), "0.4 of 0.9 MB");
        assert_eq!(
            super::megabytes(1_500_000_000, 2_147_483_648),
            "1500.0 of 2147.5 MB"
        );
    }
}
