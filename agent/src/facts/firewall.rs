//! Which firewall is in charge, and whether it admits the IM client port.

use imfleet_proto::agent::v1::{FirewallInfo, Package};

/// TCP port IM clients connect to; the only one PortSIP opens to the outside.
pub const IM_CLIENT_PORT: u16 = 8887;

/// Evidence read from the host.
#[derive(Debug, Default, Clone)]
pub struct FirewallEvidence {
    pub ufw_conf: Option<String>,
    pub ufw_user_rules: Option<String>,
    pub firewalld_running: bool,
    pub firewalld_zones: Vec<String>,
    pub nft_ruleset: Option<String>,
}

/// Decides the active firewall and whether 8887/tcp is admitted.
pub fn judge(evidence: &FirewallEvidence, packages: &[Package]) -> FirewallInfo {
    let installed: Vec<String> = ["ufw", "firewalld", "nftables", "iptables"]
        .iter()
        .filter(|n| packages.iter().any(|p| p.name == **n))
        .map(|n| n.to_string())
        .collect();
    let port = IM_CLIENT_PORT.to_string();
    let ufw_enabled = evidence
        .ufw_conf
        .as_deref()
        .is_some_and(|c| c.lines().any(|l| l.trim() == "ENABLED=yes"));
    if ufw_enabled {
        let allowed = evidence.ufw_user_rules.as_deref().is_some_and(|rules| {
            rules.lines().any(|l| {
                l.contains("-p tcp")
                    && l.contains(&format!("--dport {port} "))
                    && l.contains("-j ACCEPT")
            })
        });
        return FirewallInfo {
            active: "ufw".into(),
            installed,
            im_port_allowed: Some(allowed),
        };
    }
    if evidence.firewalld_running {
        let needle = format!("port=\"{port}\"");
        let allowed = evidence.firewalld_zones.iter().any(|z| {
            z.lines()
                .any(|l| l.contains(&needle) && l.contains("protocol=\"tcp\""))
        });
        return FirewallInfo {
            active: "firewalld".into(),
            installed,
            im_port_allowed: Some(allowed),
        };
    }
    if let Some(ruleset) = evidence.nft_ruleset.as_deref() {
        let filters_input = ruleset.lines().any(|l| {
            l.contains("hook input") && (l.contains("policy drop") || l.contains("policy reject"))
        });
        if filters_input {
            let allowed = ruleset.lines().any(|l| {
                l.contains(&format!("tcp dport {port} accept"))
                    || l.contains(&format!("tcp dport {{ {port}"))
            });
            return FirewallInfo {
                active: "nftables".into(),
                installed,
                im_port_allowed: Some(allowed),
            };
        }
    }
    FirewallInfo {
        active: "none".into(),
        installed,
        im_port_allowed: Some(true),
    }
}

pub fn collect(packages: &[Package]) -> FirewallInfo {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let firewalld_zones = std::fs::read_dir("/etc/firewalld/zones")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    let firewalld_running = std::fs::read_dir("/proc").is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "firewalld")
        })
    });
    // The ruleset lives only in the kernel; `nft` is how to read it.
    let nft_ruleset = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    judge(
        &FirewallEvidence {
            ufw_conf: read("/etc/ufw/ufw.conf"),
            ufw_user_rules: read("/etc/ufw/user.rules"),
            firewalld_running,
            firewalld_zones,
            nft_ruleset,
        },
        packages,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ufw_with_and_without_the_im_port() {
        let mut e = FirewallEvidence {
            ufw_conf: Some("ENABLED=yes\nLOGLEVEL=low\n".into()),
            ufw_user_rules: Some(include_str!("fixtures/ufw-user.rules").into()),
            ..Default::default()
        };
        let info = judge(&e, &[]);
        assert_eq!(
            (info.active.as_str(), info.im_port_allowed),
            ("ufw", Some(true))
        );
        e.ufw_user_rules = Some(include_str!("fixtures/ufw-user.rules").replace("8887", "8888"));
        assert_eq!(judge(&e, &[]).im_port_allowed, Some(false));
        e.ufw_conf = Some("ENABLED=no\n".into());
        assert_eq!(judge(&e, &[]).active, "none");
    }

    #[test]
    fn firewalld_and_nftables() {
        let e = FirewallEvidence {
            firewalld_running: true,
            firewalld_zones: vec!["<zone><port protocol=\"tcp\" port=\"8887\"/></zone>".into()],
            ..Default::default()
        };
        assert_eq!(judge(&e, &[]).im_port_allowed, Some(true));
        let nft = FirewallEvidence {
            nft_ruleset: Some("table inet filter {\n chain input {\n  type filter hook input priority filter; policy drop;\n  tcp dport 22 accept\n }\n}\n".into()),
            ..Default::default()
        };
        let info = judge(&nft, &[]);
        assert_eq!(
            (info.active.as_str(), info.im_port_allowed),
            ("nftables", Some(false))
        );
        let open = FirewallEvidence {
            nft_ruleset: Some("table inet filter {\n chain input {\n  type filter hook input priority filter; policy accept;\n }\n}\n".into()),
            ..Default::default()
        };
        assert_eq!(judge(&open, &[]).active, "none");
    }
}
