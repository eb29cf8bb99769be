//! Generated gRPC types for the imfleet controller <-> agent protocol.
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

/// Protocol revision spoken by this build. Bump when RPCs or fields are added,
/// so a controller can tell which features an older agent lacks.
pub const PROTOCOL_REVISION: u32 = 4;

/// TCP port the agent listens on unless configured otherwise. Chosen to avoid
/// every port PortSIP uses (5060-5067, 5432, 8881-8904, 10000+ RTP).
pub const DEFAULT_AGENT_PORT: u16 = 7443;
