//! Talking to the PBX's REST API: whitelisting the IM host, the IM token,
//! registering the IM server's addresses (steps 2, 3 and 6 of the HA guide).

pub mod client;
pub mod tls;

pub use client::{ImAddresses, PbxClient, PbxError, PbxOptions, Secret, Whitelisted};
pub use tls::{PbxTrust, parse_fingerprint};
