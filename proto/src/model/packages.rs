//! The packages preflight cares about, grouped by why: the agent reports
//! which of them are installed, the controller judges.

/// Package names (or prefixes ending in `*`), grouped by why preflight asks.
pub const POSTGRESQL: &[&str] = &["postgresql*"];
pub const REMOTE_ACCESS: &[&str] = &[
    "teamviewer*",
    "anydesk",
    "rustdesk",
    "xrdp",
    "x11vnc",
    "tightvncserver",
    "tailscale",
    "zerotier-one",
];
pub const VPN: &[&str] = &[
    "openvpn",
    "wireguard",
    "wireguard-tools",
    "strongswan*",
    "libreswan",
    "openconnect",
];
/// dnsmasq-base is a library for NetworkManager and libvirt, not a server.
pub const DNS_SERVERS: &[&str] = &["bind9", "dnsmasq", "unbound", "pdns-server"];
pub const DHCP_SERVERS: &[&str] = &["isc-dhcp-server", "kea*"];
/// Context for the inventory: container engine, firewalls, time sync, power.
pub const CONTEXT: &[&str] = &[
    "docker-ce",
    "docker.io",
    "containerd",
    "containerd.io",
    "docker-compose-plugin",
    "docker-compose-v2",
    "ufw",
    "firewalld",
    "nftables",
    "iptables",
    "chrony",
    "ntp",
    "ntpsec",
    "systemd-timesyncd",
    "unattended-upgrades",
    "power-profiles-daemon",
    "tuned",
    "tlp",
];

/// Every group the agent reports on.
pub const PACKAGES_OF_INTEREST: &[&[&str]] = &[
    POSTGRESQL,
    REMOTE_ACCESS,
    VPN,
    DNS_SERVERS,
    DHCP_SERVERS,
    CONTEXT,
];

/// Whether `name` matches `pattern` (exact, or a prefix ending in `*`).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}
