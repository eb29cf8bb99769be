//! Deployments of the PortSIP IM service: the spec the agent applies (built
//! here, as data, by a pure function), and the deploy procedure as named
//! steps over small agent and PBX traits.

pub mod api;
pub mod portsip;
pub mod run;
pub mod token;
pub(crate) mod upload;

pub use portsip::{DEPLOYMENT_NAME, PortsipParams, portsip_spec};
pub use run::{DeployError, DeployReport, DeployRequest, deploy};
pub use token::{ImToken, TokenSource};
