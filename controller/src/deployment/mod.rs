//! Deployments of the PortSIP IM service: the spec the agent applies (built
//! here, as data, by a pure function), and the deploy procedure.

pub mod portsip;
pub mod run;

pub use portsip::{DEPLOYMENT_NAME, PortsipParams, portsip_spec};
pub use run::{DeployError, DeployReport, DeployRequest, ImToken, TokenSource, deploy};
