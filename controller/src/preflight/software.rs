//! What runs on the host: clock, updates, power, conflicting software and
//! ports, Docker, the firewall, the agent's privileges.

use super::*;

pub(super) fn host_state_checks(inv: &HostInventory, out: &mut Vec<Check>) {
    let clock = inv.clock.clone().unwrap_or_default();
    out.push(check(
        "clock.sync",
        match clock.synchronized {
            Some(true) => Verdict::Pass,
            Some(false) => Verdict::Fail,
            None => Verdict::Warn,
        },
        match clock.synchronized {
            Some(true) => format!("synchronised ({})", clock.source),
            Some(false) => format!("not synchronised ({})", clock.source),
            None => clock.source.clone(),
        },
        "NTP-synchronised clock",
        "enable time sync: timedatectl set-ntp true (or configure chrony)",
    ));
    let updates = inv.updates.unwrap_or_default();
    out.push(check(
        "updates.security",
        if !updates.known || updates.security > 0 {
            Verdict::Warn
        } else {
            Verdict::Pass
        },
        if updates.known {
            format!("{} pending, {} security", updates.total, updates.security)
        } else {
            "unknown (no update-notifier data)".into()
        },
        "no pending security updates",
        "install updates: apt update && apt full-upgrade",
    ));
    let power = inv.power.clone().unwrap_or_default();
    let (verdict, observed) = if power.governor.is_empty() {
        (
            Verdict::Pass,
            "no CPU frequency scaling exposed (typical for VMs)".to_owned(),
        )
    } else if power.governor == "performance" {
        (Verdict::Pass, "governor performance".to_owned())
    } else {
        (Verdict::Warn, format!("governor {}", power.governor))
    };
    out.push(check(
        "power.performance",
        verdict,
        observed,
        "power saving off (governor performance)",
        "set the performance governor (cpupower frequency-set -g performance) and disable power saving in firmware",
    ));
}

pub(super) fn installed<'a>(inv: &'a HostInventory, group: &[&str]) -> Vec<&'a str> {
    inv.packages
        .iter()
        .filter(|p| {
            group
                .iter()
                .any(|pattern| packages::matches(pattern, &p.name))
        })
        .map(|p| p.name.as_str())
        .collect()
}

pub(super) fn listeners(inv: &HostInventory, port: u32, tcp: bool) -> Vec<String> {
    inv.listening
        .iter()
        .filter(|s| s.port == port && s.protocol.starts_with(if tcp { "tcp" } else { "udp" }))
        .map(|s| {
            if s.process.is_empty() {
                format!("{}:{}", s.address, s.port)
            } else {
                format!("{} ({}:{})", s.process, s.address, s.port)
            }
        })
        .collect()
}

pub(super) fn absent_check(
    id: &'static str,
    found: Vec<String>,
    what: &str,
    remedy: &str,
) -> Check {
    if found.is_empty() {
        check(id, Verdict::Pass, "none found", format!("no {what}"), "")
    } else {
        check(
            id,
            Verdict::Fail,
            found.join(", "),
            format!("no {what}"),
            remedy,
        )
    }
}

pub(super) fn conflict_checks(inv: &HostInventory, redeploy: bool, out: &mut Vec<Check>) {
    let pg = installed(inv, packages::POSTGRESQL);
    out.push(absent_check(
        "postgresql.absent",
        pg.iter().map(|s| s.to_string()).collect(),
        "PostgreSQL installed on the host (the IM database container uses port 5432)",
        "remove it: apt purge 'postgresql*'",
    ));
    for (id, port, what) in [
        ("port.5432", DATABASE_PORT, "database"),
        ("port.8887", IM_CLIENT_PORT, "IM clients"),
        ("port.8902", IM_STATS_PORT, "IM health/stats"),
    ] {
        let users = listeners(inv, port, true);
        out.push(if users.is_empty() {
            check(
                id,
                Verdict::Pass,
                "free",
                format!("TCP {port} free for {what}"),
                "",
            )
        } else if redeploy {
            check(
                id,
                Verdict::Pass,
                format!("held by the running IM deployment ({})", users.join(", ")),
                format!("TCP {port} free for {what}"),
                "",
            )
        } else {
            check(
                id,
                Verdict::Fail,
                format!("in use by {}", users.join(", ")),
                format!("TCP {port} free for {what}"),
                format!("stop whatever listens on {port}"),
            )
        });
    }
    let remote = installed(inv, packages::REMOTE_ACCESS);
    out.push(absent_check(
        "remote-access.absent",
        remote.iter().map(|s| s.to_string()).collect(),
        "remote-access tools",
        "uninstall remote-access tools (TeamViewer, AnyDesk, VNC, ...) from the IM host",
    ));
    let vpn = installed(inv, packages::VPN);
    out.push(absent_check(
        "vpn.absent",
        vpn.iter().map(|s| s.to_string()).collect(),
        "VPN software",
        "uninstall VPN software (OpenVPN, WireGuard, strongSwan, ...) from the IM host",
    ));
    let mut dns: Vec<String> = installed(inv, packages::DNS_SERVERS)
        .iter()
        .map(|s| s.to_string())
        .collect();
    // systemd-resolved's stub listeners on 127.0.0.53/54 are a client, not a server.
    dns.extend(
        inv.listening
            .iter()
            .filter(|s| s.port == 53 && !s.address.starts_with("127.0.0.5"))
            .map(|s| {
                format!(
                    "{} listening on {}:53",
                    if s.process.is_empty() {
                        "a process"
                    } else {
                        &s.process
                    },
                    s.address
                )
            }),
    );
    dns.dedup();
    out.push(absent_check(
        "dns.not-server",
        dns,
        "DNS server",
        "the IM host must not be a DNS server: remove bind9/dnsmasq/unbound",
    ));
    let mut dhcp: Vec<String> = installed(inv, packages::DHCP_SERVERS)
        .iter()
        .map(|s| s.to_string())
        .collect();
    dhcp.extend(
        listeners(inv, 67, false)
            .into_iter()
            .map(|l| format!("{l} (DHCP)")),
    );
    out.push(absent_check(
        "dhcp.not-server",
        dhcp,
        "DHCP server",
        "the IM host must not be a DHCP server: remove isc-dhcp-server/kea",
    ));
}

pub(super) fn platform_checks(inv: &HostInventory, out: &mut Vec<Check>) {
    let docker = inv.docker.clone().unwrap_or_default();
    out.push(if docker.running {
        check(
            "docker.engine",
            Verdict::Pass,
            format!("Docker Engine {} running", docker.version),
            "Docker Engine present or installable",
            "",
        )
    } else if docker.installed {
        check(
            "docker.engine",
            Verdict::Warn,
            "installed but not answering",
            "Docker Engine present or installable",
            "deploy starts it; check `systemctl status docker` if it fails",
        )
    } else {
        check(
            "docker.engine",
            Verdict::Warn,
            "not installed",
            "Docker Engine present or installable",
            "deploy installs Docker Engine with the host's package manager",
        )
    });
    let fw = inv.firewall.clone().unwrap_or_default();
    let admitted = imfleet_proto::model::firewall::admits(&fw, IM_CLIENT_PORT);
    out.push(match (fw.active.as_str(), admitted) {
        ("none" | "", _) => check(
            "firewall.im-port",
            Verdict::Pass,
            "no host firewall active",
            "8887/tcp admitted",
            "",
        ),
        (name, true) => check(
            "firewall.im-port",
            Verdict::Pass,
            format!("{name} admits 8887/tcp"),
            "8887/tcp admitted",
            "",
        ),
        (name, _) => check(
            "firewall.im-port",
            Verdict::Warn,
            format!("{name} does not admit 8887/tcp yet"),
            "8887/tcp admitted",
            format!("deploy opens 8887/tcp in {name}; open it on external firewalls too"),
        ),
    });
    let agent = inv.agent.clone().unwrap_or_default();
    out.push(check(
        "agent.privileges",
        pass_if(agent.root),
        format!("agent runs as {} (uid {})", agent.user, agent.uid),
        "agent runs as root (Docker, data ownership, firewall)",
        "re-run controller bootstrap so the agent runs as root",
    ));
}
