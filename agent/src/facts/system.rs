//! Host-wide facts: virtualisation, clock synchronisation, power settings and
//! the agent's own privileges.

use std::path::Path;

use imfleet_proto::agent::v1::{AgentPrivileges, ClockInfo, PowerInfo};

/// Container, then hypervisor, from the files systemd-detect-virt reads.
pub fn virtualization() -> String {
    if let Ok(c) = std::fs::read_to_string("/run/systemd/container") {
        return c.trim().to_owned();
    }
    if Path::new("/.dockerenv").exists() {
        return "docker".into();
    }
    let dmi = |f: &str| {
        std::fs::read_to_string(format!("/sys/class/dmi/id/{f}"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    virtualization_from(&dmi("sys_vendor"), &dmi("product_name"), &cpuinfo)
}

/// Pure part of [`virtualization`]: DMI vendor/product and the CPU flags.
pub fn virtualization_from(vendor: &str, product: &str, cpuinfo: &str) -> String {
    let known = [
        ("QEMU", "kvm"),
        ("KVM", "kvm"),
        ("VMware", "vmware"),
        ("Microsoft Corporation", "microsoft"),
        ("Xen", "xen"),
        ("innotek GmbH", "oracle"),
        ("Amazon EC2", "amazon"),
        ("Google", "google"),
        ("Firecracker", "firecracker"),
    ];
    for (marker, name) in known {
        if vendor.contains(marker) || product.contains(marker) {
            return name.into();
        }
    }
    let hypervisor = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    if hypervisor {
        "unknown-vm".into()
    } else {
        "none".into()
    }
}

/// Clock synchronisation as systemd-timesyncd or timedatectl reports it.
pub fn clock() -> ClockInfo {
    if Path::new("/run/systemd/timesync/synchronized").exists() {
        return ClockInfo {
            synchronized: Some(true),
            source: "systemd-timesyncd".into(),
        };
    }
    // No file tells about chrony/ntpd; timedatectl asks the kernel (adjtimex).
    let answer = std::process::Command::new("timedatectl")
        .args(["show", "--property=NTPSynchronized", "--value"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match answer.as_deref() {
        Some(v @ ("yes" | "no")) => ClockInfo {
            synchronized: Some(v == "yes"),
            source: "timedatectl".into(),
        },
        _ => ClockInfo {
            synchronized: None,
            source: "unknown (no systemd-timesyncd state, no timedatectl)".into(),
        },
    }
}

/// The cpufreq governor of CPU 0 and the active power profile, if any.
pub fn power() -> PowerInfo {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).ok();
    let governor =
        read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").unwrap_or_default();
    let profile = read("/var/lib/power-profiles-daemon/state.ini")
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Profile=").map(str::to_owned))
        })
        .or_else(|| read("/etc/tuned/active_profile"))
        .unwrap_or_default();
    PowerInfo { governor, profile }
}

pub fn privileges() -> AgentPrivileges {
    let uid = nix::unistd::geteuid();
    AgentPrivileges {
        uid: uid.as_raw(),
        user: nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_default(),
        root: uid.is_root(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisors_are_named() {
        assert_eq!(
            virtualization_from("QEMU", "Standard PC (Q35 + ICH9, 2009)", ""),
            "kvm"
        );
        assert_eq!(
            virtualization_from("VMware, Inc.", "VMware Virtual Platform", ""),
            "vmware"
        );
        assert_eq!(
            virtualization_from("Dell Inc.", "PowerEdge R640", "flags\t: fpu vme"),
            "none"
        );
        assert_eq!(
            virtualization_from("", "", "flags\t: fpu hypervisor vme"),
            "unknown-vm"
        );
    }
}
