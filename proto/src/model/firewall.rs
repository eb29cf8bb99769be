//! Reading a host's firewall fact: the agent reports which TCP ports the
//! active firewall admits, and both the controller's preflight and the
//! agent's firewall step ask the same question of it.

use crate::agent::v1::FirewallInfo;

/// Whether `info` says `port`/tcp gets in (a host without a filtering
/// firewall admits everything).
pub fn admits(info: &FirewallInfo, port: u32) -> bool {
    matches!(info.active.as_str(), "none" | "")
        || info.im_port_allowed_legacy(port)
        || info
            .admitted_tcp
            .iter()
            .any(|r| r.first <= port && port <= r.last)
}

impl FirewallInfo {
    /// What an agent before protocol revision 7 said about 8887, its only
    /// answer (it reported no port list).
    #[allow(deprecated)]
    fn im_port_allowed_legacy(&self, port: u32) -> bool {
        port == crate::model::portsip::IM_CLIENT_PORT
            && self.admitted_tcp.is_empty()
            && self.im_port_allowed == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::v1::PortRange;

    #[test]
    #[allow(deprecated)]
    fn ports_ranges_and_old_agents() {
        let ufw = |admitted_tcp: Vec<PortRange>| FirewallInfo {
            active: "ufw".into(),
            admitted_tcp,
            ..Default::default()
        };
        let info = ufw(vec![PortRange {
            first: 8880,
            last: 8890,
        }]);
        assert!(admits(&info, 8887) && !admits(&info, 5432));
        assert!(!admits(&ufw(vec![]), 8887));
        let none = FirewallInfo {
            active: "none".into(),
            ..Default::default()
        };
        assert!(admits(&none, 5432));
        let old = FirewallInfo {
            im_port_allowed: Some(true),
            ..ufw(vec![])
        };
        assert!(admits(&old, 8887) && !admits(&old, 5432));
    }
}
