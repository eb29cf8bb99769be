//! Which firewall is in charge, and which TCP ports it admits. The agent
//! measures; the controller decides whether that is enough for a deployment.

use imfleet_proto::agent::v1::{FirewallInfo, Package, PortRange};
#[cfg(test)]
use imfleet_proto::model::firewall::admits;

/// Evidence read from the host.
#[derive(Debug, Default, Clone)]
pub struct FirewallEvidence {
    pub ufw_conf: Option<String>,
    pub ufw_user_rules: Option<String>,
    pub firewalld_running: bool,
    pub firewalld_zones: Vec<String>,
    pub nft_ruleset: Option<String>,
}

/// Decides the active firewall and the TCP ports it admits.
pub fn judge(evidence: &FirewallEvidence, packages: &[Package]) -> FirewallInfo {
    let installed: Vec<String> = ["ufw", "firewalld", "nftables", "iptables"]
        .iter()
        .filter(|n| packages.iter().any(|p| p.name == **n))
        .map(|n| n.to_string())
        .collect();
    let info = |active: &str, admitted_tcp: Vec<PortRange>| FirewallInfo {
        active: active.into(),
        installed: installed.clone(),
        admitted_tcp: normalise(admitted_tcp),
        ..Default::default()
    };
    let ufw_enabled = evidence
        .ufw_conf
        .as_deref()
        .is_some_and(|c| c.lines().any(|l| l.trim() == "ENABLED=yes"));
    if ufw_enabled {
        let rules = evidence.ufw_user_rules.as_deref().unwrap_or_default();
        return info("ufw", rules.lines().flat_map(ufw_rule).collect());
    }
    if evidence.firewalld_running {
        let ports = evidence
            .firewalld_zones
            .iter()
            .flat_map(|zone| zone.lines())
            .flat_map(firewalld_port)
            .collect();
        return info("firewalld", ports);
    }
    if let Some(ruleset) = evidence.nft_ruleset.as_deref() {
        let filters_input = ruleset.lines().any(|l| {
            l.contains("hook input") && (l.contains("policy drop") || l.contains("policy reject"))
        });
        if filters_input {
            return info("nftables", ruleset.lines().flat_map(nft_rule).collect());
        }
    }
    info("none", Vec::new())
}

/// `8887`, `8000:8100` (iptables) or `8000-8100` (firewalld, nft).
fn range(text: &str) -> Option<PortRange> {
    let text = text.trim();
    let (first, last) = text.split_once([':', '-']).unwrap_or((text, text));
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last && last <= 65535).then_some(PortRange { first, last })
}

/// An accepting ufw rule for TCP (`--dport P` or `-m multiport --dports A,B:C`).
fn ufw_rule(line: &str) -> Vec<PortRange> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let has = |w: &str| words.contains(&w);
    let tcp = words.windows(2).any(|w| w == ["-p", "tcp"]);
    if !tcp || !has("ACCEPT") || !words.windows(2).any(|w| w == ["-j", "ACCEPT"]) {
        return Vec::new();
    }
    words
        .windows(2)
        .filter(|w| w[0] == "--dport" || w[0] == "--dports")
        .flat_map(|w| w[1].split(','))
        .filter_map(range)
        .collect()
}

/// `<port protocol="tcp" port="8887"/>` in a firewalld zone file.
fn firewalld_port(line: &str) -> Vec<PortRange> {
    let attribute = |name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let end = line[start..].find('"')? + start;
        Some(&line[start..end])
    };
    if !line.contains("<port") || attribute("protocol") != Some("tcp") {
        return Vec::new();
    }
    attribute("port").and_then(range).into_iter().collect()
}

/// `tcp dport 8887 accept`, `tcp dport { 22, 8000-8100 } accept`.
fn nft_rule(line: &str) -> Vec<PortRange> {
    let line = line.trim();
    let Some(rest) = line.split("tcp dport").nth(1) else {
        return Vec::new();
    };
    if !line.ends_with("accept") {
        return Vec::new();
    }
    let rest = rest.trim_start();
    let ports = match rest.strip_prefix('{') {
        Some(set) => set.split('}').next().unwrap_or_default(),
        None => rest.split_whitespace().next().unwrap_or_default(),
    };
    ports.split(',').filter_map(range).collect()
}

/// Sorted, merged ranges.
fn normalise(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_by_key(|r| (r.first, r.last));
    let mut out: Vec<PortRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.first <= last.last.saturating_add(1) => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

pub fn collect(packages: &[Package]) -> FirewallInfo {
    judge(&evidence(), packages)
}

/// Reads the firewalls' configuration (and the kernel's nftables ruleset).
pub fn evidence() -> FirewallEvidence {
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
    FirewallEvidence {
        ufw_conf: read("/etc/ufw/ufw.conf"),
        ufw_user_rules: read("/etc/ufw/user.rules"),
        firewalld_running,
        firewalld_zones,
        nft_ruleset: nft_ruleset(),
    }
}

/// The kernel's nftables ruleset (`nft list ruleset`; it lives nowhere else).
fn nft_ruleset() -> Option<String> {
    std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(info: &FirewallInfo) -> Vec<(u32, u32)> {
        info.admitted_tcp
            .iter()
            .map(|r| (r.first, r.last))
            .collect()
    }

    #[test]
    fn ufw_reports_what_it_admits() {
        let mut e = FirewallEvidence {
            ufw_conf: Some("ENABLED=yes\nLOGLEVEL=low\n".into()),
            ufw_user_rules: Some(include_str!("fixtures/ufw-user.rules").into()),
            ..Default::default()
        };
        let info = judge(&e, &[]);
        assert_eq!(info.active, "ufw");
        assert_eq!(ports(&info), vec![(22, 22), (8887, 8887)]);
        assert!(admits(&info, 8887) && !admits(&info, 5432));
        e.ufw_user_rules = Some(
            "-A ufw-user-input -p tcp -m multiport --dports 80,8000:8900 -j ACCEPT\n\
             -A ufw-user-input -p udp --dport 5432 -j ACCEPT\n\
             -A ufw-user-input -p tcp --dport 5432 -j DROP\n"
                .into(),
        );
        let info = judge(&e, &[]);
        assert_eq!(ports(&info), vec![(80, 80), (8000, 8900)]);
        assert!(admits(&info, 8887) && !admits(&info, 5432));
        e.ufw_conf = Some("ENABLED=no\n".into());
        let off = judge(&e, &[]);
        assert_eq!(off.active, "none");
        assert!(admits(&off, 5432));
    }

    #[test]
    fn firewalld_and_nftables() {
        let e = FirewallEvidence {
            firewalld_running: true,
            firewalld_zones: vec![
                "<zone>\n<port protocol=\"tcp\" port=\"8887\"/>\n<port port=\"5000-5100\" protocol=\"tcp\"/>\n<port protocol=\"udp\" port=\"53\"/>\n</zone>".into(),
            ],
            ..Default::default()
        };
        assert_eq!(ports(&judge(&e, &[])), vec![(5000, 5100), (8887, 8887)]);
        let nft = FirewallEvidence {
            nft_ruleset: Some("table inet filter {\n chain input {\n  type filter hook input priority filter; policy drop;\n  tcp dport 22 accept\n  tcp dport { 80, 8880-8890 } accept\n  tcp dport 5432 drop\n }\n}\n".into()),
            ..Default::default()
        };
        let info = judge(&nft, &[]);
        assert_eq!(info.active, "nftables");
        assert_eq!(ports(&info), vec![(22, 22), (80, 80), (8880, 8890)]);
        assert!(admits(&info, 8887) && !admits(&info, 5432));
        let open = FirewallEvidence {
            nft_ruleset: Some("table inet filter {\n chain input {\n  type filter hook input priority filter; policy accept;\n }\n}\n".into()),
            ..Default::default()
        };
        assert_eq!(judge(&open, &[]).active, "none");
    }

    #[test]
    fn ranges_merge_and_nonsense_is_dropped() {
        let merged = normalise(vec![
            PortRange {
                first: 10,
                last: 20,
            },
            PortRange {
                first: 21,
                last: 25,
            },
            PortRange { first: 5, last: 12 },
            PortRange {
                first: 100,
                last: 100,
            },
        ]);
        assert_eq!(
            merged.iter().map(|r| (r.first, r.last)).collect::<Vec<_>>(),
            vec![(5, 25), (100, 100)]
        );
        assert!(range("9:1").is_none() && range("70000").is_none() && range("x").is_none());
    }
}
