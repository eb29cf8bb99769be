//! Preflight: judging an IM host against PortSIP's requirements. A pure
//! function from observed facts (the agent's inventory and the controller's
//! own OS) to one result per check, so every branch is unit-tested offline.

pub mod sizing;

use std::net::IpAddr;

use imfleet_proto::agent::v1::{AddressOrigin, HostInventory, PathInfo};
use imfleet_proto::model::os_release::OsRelease;
use imfleet_proto::model::packages;
use serde::Serialize;

pub use sizing::Sizing;

pub use imfleet_proto::model::portsip::{
    DATABASE_PORT, DEFAULT_DATA_PATH, IM_CLIENT_PORT, IM_STATS_PORT, SERVICE_GID, SERVICE_UID,
};

/// What the operator is about to deploy.
#[derive(Debug, Clone)]
pub struct PreflightParams {
    pub private_ip: IpAddr,
    pub public_ip: IpAddr,
    /// `-f`: an existing directory for IM file storage.
    pub storage_dir: Option<String>,
    pub data_path: String,
    pub sizing: Sizing,
    /// The IM deployment already runs on the host: its own listeners on the
    /// IM ports are expected (deploy replaces them), not conflicts.
    pub redeploy: bool,
}

impl PreflightParams {
    /// The directory whose disk holds the IM's data: `-f` if given.
    pub fn storage_path(&self) -> &str {
        self.storage_dir.as_deref().unwrap_or(&self.data_path)
    }

    /// Paths the agent must examine.
    pub fn paths(&self) -> Vec<String> {
        let mut paths = vec![self.data_path.clone()];
        if let Some(dir) = &self.storage_dir {
            paths.push(dir.clone());
        }
        paths
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Fail,
    Warn,
    Pass,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub verdict: Verdict,
    pub observed: String,
    pub required: String,
    /// One line saying how to fix it (empty when it passed).
    pub remedy: String,
}

fn check(
    id: &'static str,
    verdict: Verdict,
    observed: impl Into<String>,
    required: impl Into<String>,
    remedy: impl Into<String>,
) -> Check {
    let remedy = if verdict == Verdict::Pass {
        String::new()
    } else {
        remedy.into()
    };
    Check {
        id,
        verdict,
        observed: observed.into(),
        required: required.into(),
        remedy,
    }
}

fn pass_if(ok: bool) -> Verdict {
    if ok { Verdict::Pass } else { Verdict::Fail }
}

/// Counts of each verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

impl Summary {
    pub fn of(checks: &[Check]) -> Summary {
        let count = |v| checks.iter().filter(|c| c.verdict == v).count();
        Summary {
            pass: count(Verdict::Pass),
            warn: count(Verdict::Warn),
            fail: count(Verdict::Fail),
        }
    }

    /// 0 all pass, 1 warnings only, 2 any failure.
    pub fn exit_code(&self) -> u8 {
        if self.fail > 0 {
            2
        } else if self.warn > 0 {
            1
        } else {
            0
        }
    }
}

/// Sorts failures first, then warnings, keeping check order within each.
pub fn failures_first(checks: &mut [Check]) {
    checks.sort_by_key(|c| c.verdict);
}

/// Judges the host. `controller_os` is pbx01's own os-release.
pub fn judge(
    inv: &HostInventory,
    params: &PreflightParams,
    controller_os: &OsRelease,
) -> Vec<Check> {
    let mut out = Vec::new();
    os_checks(inv, controller_os, &mut out);
    hardware_checks(inv, params, &mut out);
    address_checks(inv, params, &mut out);
    host_state_checks(inv, &mut out);
    conflict_checks(inv, params.redeploy, &mut out);
    platform_checks(inv, &mut out);
    out
}

fn os_checks(inv: &HostInventory, controller_os: &OsRelease, out: &mut Vec<Check>) {
    let os = inv.os.clone().unwrap_or_default();
    let described = if os.pretty_name.is_empty() {
        format!("{} {}", os.id, os.version_id)
    } else {
        os.pretty_name.clone()
    };
    out.push(check(
        "os.release",
        pass_if(os.id == "ubuntu" && os.version_id == "24.04"),
        &described,
        "Ubuntu 24.04",
        "install Ubuntu 24.04 LTS (64-bit) on the IM host",
    ));
    out.push(check(
        "os.arch",
        pass_if(os.arch == "x86_64"),
        &os.arch,
        "x86_64 (64-bit)",
        "PortSIP images are built for x86_64; use a 64-bit x86 host",
    ));
    let same = os.id == controller_os.id && os.version_id == controller_os.version_id;
    out.push(check(
        "os.same-as-pbx",
        pass_if(same),
        format!(
            "{} {} (pbx01: {} {})",
            os.id, os.version_id, controller_os.id, controller_os.version_id
        ),
        "the same OS version as the PBX nodes",
        "run the IM host on the same Ubuntu release as the PBX HA nodes",
    ));
}

fn hardware_checks(inv: &HostInventory, params: &PreflightParams, out: &mut Vec<Check>) {
    let s = params.sizing;
    let cpu = inv.cpu.clone().unwrap_or_default();
    out.push(check(
        "cpu.cores",
        pass_if(cpu.logical_cores >= s.min_cores),
        format!(
            "{} logical CPUs ({} physical cores)",
            cpu.logical_cores, cpu.physical_cores
        ),
        format!(">= {} cores for {} users", s.min_cores, s.users),
        format!(
            "give the host at least {} cores, or size for fewer users with --users",
            s.min_cores
        ),
    ));
    let memory = inv.memory.map(|m| m.total_bytes).unwrap_or(0);
    // Firmware and the kernel keep a little of the installed memory.
    let enough = memory as f64 >= s.min_memory_bytes as f64 * 0.97;
    out.push(check(
        "memory.total",
        pass_if(enough),
        sizing::gb(memory),
        format!(
            ">= {} for {} users",
            sizing::gb(s.min_memory_bytes),
            s.users
        ),
        format!(
            "give the host at least {} of RAM",
            sizing::gb(s.min_memory_bytes)
        ),
    ));

    let storage_path = params.storage_path();
    let storage = inv.paths.iter().find(|p| p.path == storage_path);
    let rotational = storage.and_then(|p| p.rotational);
    let disks = storage.map(|p| p.disks.join(", ")).unwrap_or_default();
    out.push(check(
        "disk.ssd",
        match rotational {
            Some(false) => Verdict::Pass,
            Some(true) => Verdict::Fail,
            None => Verdict::Warn,
        },
        match rotational {
            Some(false) => format!("{storage_path} is on SSD ({disks})"),
            Some(true) => format!("{storage_path} is on a rotational disk ({disks})"),
            None => format!("cannot tell which disk holds {storage_path}"),
        },
        "SSD storage",
        "put the IM data on an SSD (high I/O)",
    ));
    let total = storage.map(|p| p.total_bytes).unwrap_or(0);
    if s.min_disk_bytes > 0 {
        let verdict = if total < s.min_disk_bytes {
            Verdict::Fail
        } else if total < s.recommended_disk_bytes {
            Verdict::Warn
        } else {
            Verdict::Pass
        };
        out.push(check(
            "disk.size",
            verdict,
            format!("{} filesystem at {storage_path}", sizing::gb(total)),
            format!(
                ">= {} ({} recommended) for {} users",
                sizing::gb(s.min_disk_bytes),
                sizing::gb(s.recommended_disk_bytes),
                s.users
            ),
            format!(
                "grow the storage to {} or more",
                sizing::gb(s.recommended_disk_bytes)
            ),
        ));
    }
    let free = storage.map(|p| p.available_bytes).unwrap_or(0);
    out.push(check(
        "disk.free",
        pass_if(free >= s.min_free_bytes),
        format!("{} free at {storage_path}", sizing::gb(free)),
        format!(">= {} free", sizing::gb(s.min_free_bytes)),
        "free space on the storage filesystem or choose another directory with -f",
    ));

    if let Some(dir) = &params.storage_dir {
        out.push(storage_dir_check(
            inv.paths.iter().find(|p| &p.path == dir),
            dir,
        ));
    }
    out.push(data_path_check(
        inv.paths.iter().find(|p| p.path == params.data_path),
        &params.data_path,
    ));
}

fn storage_dir_check(info: Option<&PathInfo>, dir: &str) -> Check {
    let required = format!("an existing directory writable by {SERVICE_UID}:{SERVICE_GID}");
    match info {
        Some(p) if !p.error.is_empty() => check(
            "storage.dir",
            Verdict::Fail,
            &p.error,
            required,
            format!("check the path {dir}"),
        ),
        Some(p) if !p.exists => check(
            "storage.dir",
            Verdict::Fail,
            format!("{dir} does not exist"),
            required,
            format!("create it first: mkdir -p {dir} (on a disk with enough space)"),
        ),
        Some(p) if !p.is_dir => check(
            "storage.dir",
            Verdict::Fail,
            format!("{dir} is not a directory"),
            required,
            "pass a directory with -f",
        ),
        Some(p) if !p.writable_by_service => check(
            "storage.dir",
            Verdict::Warn,
            format!("{dir} is owned by {}:{} mode {:o}", p.uid, p.gid, p.mode),
            required,
            format!(
                "deploy sets the owner to {SERVICE_UID}:{SERVICE_GID}; or run chown -R {SERVICE_UID}:{SERVICE_GID} {dir}"
            ),
        ),
        Some(p) => check(
            "storage.dir",
            Verdict::Pass,
            format!("{dir} owned by {}:{}", p.uid, p.gid),
            required,
            "",
        ),
        None => check(
            "storage.dir",
            Verdict::Warn,
            "not examined",
            required,
            "re-run preflight",
        ),
    }
}

fn data_path_check(info: Option<&PathInfo>, path: &str) -> Check {
    let required = "a directory, or a path deploy can create";
    match info {
        Some(p) if !p.error.is_empty() => check(
            "storage.data-path",
            Verdict::Fail,
            &p.error,
            required,
            format!("check the path {path}"),
        ),
        Some(p) if p.exists && !p.is_dir => check(
            "storage.data-path",
            Verdict::Fail,
            format!("{path} exists and is not a directory"),
            required,
            "move it aside or choose another --data-path",
        ),
        Some(p) if p.exists => check(
            "storage.data-path",
            Verdict::Pass,
            format!("{path} exists"),
            required,
            "",
        ),
        Some(_) => check(
            "storage.data-path",
            Verdict::Pass,
            format!("{path} will be created"),
            required,
            "",
        ),
        None => check(
            "storage.data-path",
            Verdict::Warn,
            "not examined",
            required,
            "re-run preflight",
        ),
    }
}

/// Where `ip` lives on the host: the interface, the address entry and
/// whether it is merely covered by a loopback prefix (127/8 on `lo`).
fn find_address(inv: &HostInventory, ip: IpAddr) -> Option<(String, AddressOrigin, String, bool)> {
    for iface in &inv.interfaces {
        for a in &iface.addresses {
            if a.address.parse::<IpAddr>().ok() == Some(ip) {
                let origin = AddressOrigin::try_from(a.origin).unwrap_or(AddressOrigin::Unknown);
                return Some((iface.name.clone(), origin, a.origin_source.clone(), false));
            }
        }
    }
    // Linux answers for every address of a loopback interface's prefix.
    for iface in inv.interfaces.iter().filter(|i| i.loopback) {
        for a in &iface.addresses {
            if let Ok(net) = a.address.parse::<IpAddr>()
                && in_prefix(ip, net, a.prefix)
            {
                return Some((
                    iface.name.clone(),
                    AddressOrigin::Unknown,
                    "loopback prefix".into(),
                    true,
                ));
            }
        }
    }
    None
}

fn in_prefix(ip: IpAddr, net: IpAddr, prefix: u32) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix.min(32))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix.min(128))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn address_checks(inv: &HostInventory, params: &PreflightParams, out: &mut Vec<Check>) {
    let ip = params.private_ip;
    let required = "assigned to an interface and statically configured";
    out.push(match find_address(inv, ip) {
        None => check(
            "net.private-ip",
            Verdict::Fail,
            format!("{ip} is not assigned to any interface"),
            required,
            "check -a: it must be an address of the IM host itself",
        ),
        Some((iface, _, _, true)) => check(
            "net.private-ip",
            Verdict::Warn,
            format!("{ip} is only covered by the loopback prefix of {iface}"),
            required,
            "use the host's private LAN address (loopback is for local testing only)",
        ),
        Some((iface, AddressOrigin::Static, source, _)) => check("net.private-ip", Verdict::Pass, format!("{ip} on {iface}, static ({source})"), required, ""),
        Some((iface, AddressOrigin::Dhcp, source, _)) => check(
            "net.private-ip",
            Verdict::Fail,
            format!("{ip} on {iface} is DHCP-assigned ({source})"),
            required,
            "configure the address statically (netplan: dhcp4: false, addresses: [...]) so it cannot change",
        ),
        Some((iface, AddressOrigin::LinkLocal, _, _)) => check(
            "net.private-ip",
            Verdict::Fail,
            format!("{ip} on {iface} is link-local"),
            required,
            "use a routable private address",
        ),
        Some((iface, _, source, _)) => check(
            "net.private-ip",
            Verdict::Warn,
            format!("{ip} on {iface}; origin unknown: {source}"),
            required,
            "make the address permanent in the host's network configuration (netplan)",
        ),
    });
    let public = params.public_ip;
    out.push(match find_address(inv, public) {
        Some((iface, ..)) => check("net.public-ip", Verdict::Pass, format!("{public} on {iface}"), "assigned, or reachable through NAT", ""),
        None => check(
            "net.public-ip",
            Verdict::Warn,
            format!("{public} is not on any interface"),
            "assigned, or reachable through NAT",
            format!("fine behind NAT or a cloud 1:1 mapping: make sure {public}:{IM_CLIENT_PORT}/tcp reaches this host"),
        ),
    });
}

fn host_state_checks(inv: &HostInventory, out: &mut Vec<Check>) {
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

fn installed<'a>(inv: &'a HostInventory, group: &[&str]) -> Vec<&'a str> {
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

fn listeners(inv: &HostInventory, port: u32, tcp: bool) -> Vec<String> {
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

fn absent_check(id: &'static str, found: Vec<String>, what: &str, remedy: &str) -> Check {
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

fn conflict_checks(inv: &HostInventory, redeploy: bool, out: &mut Vec<Check>) {
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

fn platform_checks(inv: &HostInventory, out: &mut Vec<Check>) {
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

#[cfg(test)]
pub(crate) mod tests;

/// Runs preflight on a connected agent: the agent measures, the controller
/// judges against pbx01's own OS. Failures first.
pub async fn assess(
    agent: &impl crate::deployment::api::AgentApi,
    params: &PreflightParams,
) -> Result<Vec<Check>, crate::agent_client::AgentError> {
    let inv = agent
        .inventory(params.paths(), SERVICE_UID, SERVICE_GID)
        .await?;
    let pbx = imfleet_proto::model::os_release::read_os_release();
    let mut checks = judge(&inv, params, &pbx);
    failures_first(&mut checks);
    Ok(checks)
}
