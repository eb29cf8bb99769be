//! What both sides know without asking each other: where the agent keeps its
//! files, how a host names its OS, which packages matter, and PortSIP's fixed
//! numbers. The controller links this, never the agent crate (as brupop's
//! `models` crate serves its controller and agent).

pub mod firewall;
pub mod health;
pub mod layout;
pub mod names;
pub mod os_release;
pub mod packages;
pub mod portsip;
pub mod reference;
