//! Network interfaces, their addresses, and whether each address is static
//! or DHCP-assigned, judged from the network configuration the host keeps
//! (netplan, systemd-networkd, ifupdown, NetworkManager) and the kernel's
//! lease lifetimes.

use std::net::IpAddr;

use imfleet_proto::agent::v1::{AddressOrigin, InterfaceAddress, NetworkInterface};

/// A network configuration file and what wrote it.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub kind: ConfigKind,
    pub path: String,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Netplan,
    Networkd,
    Ifupdown,
    NetworkManager,
}

impl ConfigKind {
    fn label(self) -> &'static str {
        match self {
            ConfigKind::Netplan => "netplan",
            ConfigKind::Networkd => "systemd-networkd",
            ConfigKind::Ifupdown => "ifupdown",
            ConfigKind::NetworkManager => "NetworkManager",
        }
    }
}

/// Where each kind keeps its files.
const CONFIG_SOURCES: &[(ConfigKind, &str, &str)] = &[
    (ConfigKind::Netplan, "/etc/netplan", ".yaml"),
    (ConfigKind::Networkd, "/etc/systemd/network", ".network"),
    (ConfigKind::Networkd, "/run/systemd/network", ".network"),
    (ConfigKind::Ifupdown, "/etc/network/interfaces.d", ""),
    (
        ConfigKind::NetworkManager,
        "/etc/NetworkManager/system-connections",
        ".nmconnection",
    ),
];

/// Reads every network configuration file present on this host.
pub fn read_configs() -> Vec<NetConfig> {
    let mut configs = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/network/interfaces") {
        configs.push(NetConfig {
            kind: ConfigKind::Ifupdown,
            path: "/etc/network/interfaces".into(),
            text,
        });
    }
    for (kind, dir, suffix) in CONFIG_SOURCES {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        paths.sort();
        for path in paths {
            if let Ok(text) = std::fs::read_to_string(&path) {
                configs.push(NetConfig {
                    kind: *kind,
                    path: path.display().to_string(),
                    text,
                });
            }
        }
    }
    configs
}

/// Decides whether `ip` on `iface` is static, DHCP or unknown, and says why.
/// `kernel_dynamic` is the kernel's view: `Some(true)` when the address has a
/// finite lifetime (a lease), `Some(false)` when it is permanent.
pub fn classify(
    iface: &str,
    ip: IpAddr,
    configs: &[NetConfig],
    kernel_dynamic: Option<bool>,
) -> (AddressOrigin, String) {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local {
        return (AddressOrigin::LinkLocal, "link-local address".into());
    }
    if ip.is_loopback() {
        return (AddressOrigin::Static, "loopback address".into());
    }
    if let Some(c) = configs.iter().find(|c| names_static_address(c, ip)) {
        return (
            AddressOrigin::Static,
            format!("{} {}", c.kind.label(), c.path),
        );
    }
    if let Some(c) = configs
        .iter()
        .find(|c| enables_dhcp(c, iface, ip.is_ipv4()))
    {
        return (
            AddressOrigin::Dhcp,
            format!("{} {}", c.kind.label(), c.path),
        );
    }
    match kernel_dynamic {
        Some(true) => (
            AddressOrigin::Dhcp,
            "kernel: the address has a lease lifetime".into(),
        ),
        Some(false) => (
            AddressOrigin::Unknown,
            "permanent in the kernel but in no network configuration (set by hand? lost at reboot)"
                .into(),
        ),
        None => (AddressOrigin::Unknown, "no configuration names it".into()),
    }
}

/// True when the file assigns `ip` as a fixed address.
fn names_static_address(config: &NetConfig, ip: IpAddr) -> bool {
    let ip = ip.to_string();
    let cidr = format!("{ip}/");
    config.text.lines().any(|raw| {
        let line = raw.split('#').next().unwrap_or_default();
        match config.kind {
            // Interface addresses are CIDR; bare IPs (nameservers) do not count.
            ConfigKind::Netplan | ConfigKind::Networkd | ConfigKind::NetworkManager => {
                line.contains(&cidr)
                    && (config.kind != ConfigKind::Networkd
                        || line.trim_start().starts_with("Address"))
            }
            ConfigKind::Ifupdown => {
                let mut words = line.split_whitespace();
                words.next() == Some("address")
                    && words
                        .next()
                        .is_some_and(|a| a == ip || a.starts_with(&cidr))
            }
        }
    })
}

/// True when the file turns on DHCP for `iface`.
fn enables_dhcp(config: &NetConfig, iface: &str, v4: bool) -> bool {
    let yes = |v: &str| matches!(v.trim().trim_matches('"'), "true" | "yes" | "on");
    match config.kind {
        ConfigKind::Netplan => {
            let key = if v4 { "dhcp4" } else { "dhcp6" };
            netplan_block(&config.text, iface).is_some_and(|block| {
                block.iter().any(|l| {
                    l.trim()
                        .strip_prefix(key)
                        .and_then(|r| r.trim_start().strip_prefix(':'))
                        .is_some_and(yes)
                })
            })
        }
        ConfigKind::Networkd => {
            let matches_iface = config.text.lines().any(|l| {
                l.trim()
                    .strip_prefix("Name=")
                    .is_some_and(|pattern| glob_match(pattern.trim(), iface))
            });
            matches_iface
                && config.text.lines().any(|l| {
                    l.trim().strip_prefix("DHCP=").is_some_and(|v| {
                        let v = v.trim();
                        v == "yes" || v == "true" || (v4 && v == "ipv4") || (!v4 && v == "ipv6")
                    })
                })
        }
        ConfigKind::Ifupdown => {
            let family = if v4 { "inet" } else { "inet6" };
            config.text.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.len() >= 4
                    && words[0] == "iface"
                    && words[1] == iface
                    && words[2] == family
                    && words[3] == "dhcp"
            })
        }
        ConfigKind::NetworkManager => {
            let bound = config
                .text
                .lines()
                .any(|l| l.trim() == format!("interface-name={iface}"));
            let section = if v4 { "[ipv4]" } else { "[ipv6]" };
            let mut in_section = false;
            let auto = config.text.lines().any(|l| {
                let l = l.trim();
                if l.starts_with('[') {
                    in_section = l == section;
                }
                in_section && l == "method=auto"
            });
            bound && auto
        }
    }
}

/// The lines of netplan's block for `iface` (deeper-indented lines after `iface:`).
fn netplan_block<'t>(text: &'t str, iface: &str) -> Option<Vec<&'t str>> {
    let header = format!("{iface}:");
    let mut lines = text.lines();
    let indent = loop {
        let line = lines.next()?;
        if line.trim() == header {
            break line.len() - line.trim_start().len();
        }
    };
    Some(
        lines
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .collect(),
    )
}

fn glob_match(pattern: &str, name: &str) -> bool {
    pattern
        .split_whitespace()
        .any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
}

/// Kernel lifetimes per (interface, address) from `ip -j addr`: `true` when
/// the address is dynamic (has a finite valid lifetime).
pub fn parse_ip_json(json: &str) -> Vec<(String, IpAddr, bool)> {
    let Ok(serde_json::Value::Array(links)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for link in links {
        let name = link["ifname"].as_str().unwrap_or_default().to_owned();
        for info in link["addr_info"].as_array().into_iter().flatten() {
            let Some(ip) = info["local"].as_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let forever = info["valid_life_time"].as_u64() == Some(u64::from(u32::MAX));
            let dynamic = info["dynamic"].as_bool().unwrap_or(false) || !forever;
            out.push((name.clone(), ip, dynamic));
        }
    }
    out
}

/// Interfaces and addresses (from sysinfo), each address classified.
pub fn interfaces(configs: &[NetConfig]) -> Vec<NetworkInterface> {
    let kernel = std::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| parse_ip_json(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    let Ok(networks) = sysinfo::Networks::new_with_refreshed_list() else {
        return Vec::new();
    };
    let mut out: Vec<NetworkInterface> = networks
        .iter()
        .map(|(name, data)| {
            let name = name.to_string_lossy().into_owned();
            let addresses = data
                .ip_networks()
                .iter()
                .map(|net| {
                    let dynamic = kernel
                        .iter()
                        .find(|(n, ip, _)| *n == name && *ip == net.addr)
                        .map(|(_, _, d)| *d);
                    let (origin, source) = classify(&name, net.addr, configs, dynamic);
                    InterfaceAddress {
                        address: net.addr.to_string(),
                        prefix: u32::from(net.prefix),
                        origin: origin as i32,
                        origin_source: source,
                    }
                })
                .collect::<Vec<_>>();
            NetworkInterface {
                mac: data.mac_address().to_string(),
                up: matches!(
                    data.operational_state(),
                    sysinfo::InterfaceOperationalState::Up
                        | sysinfo::InterfaceOperationalState::Unknown
                ),
                loopback: name == "lo"
                    || (!addresses.is_empty()
                        && data.ip_networks().iter().all(|n| n.addr.is_loopback())),
                addresses,
                name,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: ConfigKind, path: &str, text: &str) -> NetConfig {
        NetConfig {
            kind,
            path: path.into(),
            text: text.into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn netplan_static_and_dhcp_interfaces() {
        let c = [cfg(
            ConfigKind::Netplan,
            "/etc/netplan/01.yaml",
            include_str!("fixtures/netplan-static.yaml"),
        )];
        let (o, src) = classify("ens18", ip("192.168.1.20"), &c, Some(false));
        assert_eq!(o, AddressOrigin::Static);
        assert_eq!(src, "netplan /etc/netplan/01.yaml");
        // A nameserver address is not an interface address.
        assert_eq!(
            classify("ens18", ip("1.1.1.1"), &c, None).0,
            AddressOrigin::Unknown
        );
        assert_eq!(
            classify("ens19", ip("192.168.2.7"), &c, Some(true)).0,
            AddressOrigin::Dhcp
        );
        // ens18 says dhcp4: false, so only the kernel could call it DHCP.
        assert_eq!(
            classify("ens18", ip("192.168.1.99"), &c, Some(false)).0,
            AddressOrigin::Unknown
        );
    }

    #[test]
    fn cloud_init_netplan_is_dhcp() {
        let c = [cfg(
            ConfigKind::Netplan,
            "/etc/netplan/50-cloud-init.yaml",
            include_str!("fixtures/netplan-cloud-dhcp.yaml"),
        )];
        assert_eq!(
            classify("eth0", ip("10.0.0.4"), &c, None).0,
            AddressOrigin::Dhcp
        );
        assert_eq!(
            classify("eth1", ip("10.0.0.5"), &c, None).0,
            AddressOrigin::Unknown
        );
    }

    #[test]
    fn ifupdown_networkd_and_network_manager() {
        let ifupdown = [cfg(
            ConfigKind::Ifupdown,
            "/etc/network/interfaces",
            include_str!("fixtures/interfaces-ifupdown"),
        )];
        assert_eq!(
            classify("eno1", ip("10.20.30.40"), &ifupdown, None).0,
            AddressOrigin::Static
        );
        assert_eq!(
            classify("eno2", ip("10.20.31.5"), &ifupdown, None).0,
            AddressOrigin::Dhcp
        );

        let networkd = [cfg(
            ConfigKind::Networkd,
            "/etc/systemd/network/10.network",
            include_str!("fixtures/networkd-dhcp.network"),
        )];
        assert_eq!(
            classify("enp2s0", ip("10.1.1.1"), &networkd, None).0,
            AddressOrigin::Dhcp
        );
        assert_eq!(
            classify("enp3s0", ip("10.1.1.2"), &networkd, None).0,
            AddressOrigin::Unknown
        );

        let nm = [cfg(
            ConfigKind::NetworkManager,
            "/etc/NetworkManager/system-connections/w.nmconnection",
            include_str!("fixtures/nm-static.nmconnection"),
        )];
        assert_eq!(
            classify("enp1s0", ip("172.16.5.9"), &nm, None).0,
            AddressOrigin::Static
        );
    }

    #[test]
    fn kernel_lifetime_and_link_local_decide_when_configs_are_silent() {
        assert_eq!(
            classify("eth0", ip("10.0.0.9"), &[], Some(true)).0,
            AddressOrigin::Dhcp
        );
        assert_eq!(
            classify("eth0", ip("10.0.0.9"), &[], Some(false)).0,
            AddressOrigin::Unknown
        );
        assert_eq!(
            classify("eth0", ip("169.254.3.4"), &[], None).0,
            AddressOrigin::LinkLocal
        );
        assert_eq!(
            classify("eth0", ip("fe80::1"), &[], None).0,
            AddressOrigin::LinkLocal
        );
    }

    #[test]
    fn ip_json_lifetimes() {
        let json = r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"valid_life_time":4294967295}]},
                       {"ifname":"eth0","addr_info":[{"family":"inet","local":"10.0.0.9","prefixlen":24,"dynamic":true,"valid_life_time":86000}]}]"#;
        let parsed = parse_ip_json(json);
        assert_eq!(
            parsed,
            vec![
                ("lo".into(), ip("127.0.0.1"), false),
                ("eth0".into(), ip("10.0.0.9"), true)
            ]
        );
    }
}
