//! Installed packages of interest (`/var/lib/dpkg/status`) and pending
//! updates (`/var/lib/update-notifier/updates-available`).

use imfleet_proto::agent::v1::{Package, PendingUpdates};
use imfleet_proto::model::packages::{PACKAGES_OF_INTEREST, matches};

fn interesting(name: &str) -> bool {
    PACKAGES_OF_INTEREST
        .iter()
        .flat_map(|group| group.iter())
        .any(|p| matches(p, name))
}

/// Installed (status `install ok installed`) packages of interest.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        };
        let (Some(name), Some(status)) = (field("Package"), field("Status")) else {
            continue;
        };
        if status == "install ok installed" && interesting(&name) {
            out.push(Package {
                name,
                version: field("Version").unwrap_or_default(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Parses update-notifier's summary ("17 updates can be applied immediately.
/// 5 of these updates are standard security updates.").
pub fn parse_updates_available(text: &str) -> PendingUpdates {
    let leading_number = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u32>().ok())
    };
    let total = leading_number("can be applied immediately")
        .or_else(|| leading_number("updates can be installed"));
    let security = leading_number("security update");
    match (
        total,
        text.contains("can be applied") || text.trim().is_empty(),
    ) {
        (Some(total), _) => PendingUpdates {
            known: true,
            total,
            security: security.unwrap_or(0),
        },
        // update-notifier writes an empty-ish file when nothing is pending.
        (None, true) => PendingUpdates {
            known: true,
            total: 0,
            security: 0,
        },
        (None, false) => PendingUpdates::default(),
    }
}

pub fn installed() -> Vec<Package> {
    std::fs::read_to_string("/var/lib/dpkg/status")
        .map(|t| parse_dpkg_status(&t))
        .unwrap_or_default()
}

pub fn pending_updates() -> PendingUpdates {
    std::fs::read_to_string("/var/lib/update-notifier/updates-available")
        .map(|t| parse_updates_available(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_of_interest_are_kept() {
        let pkgs = parse_dpkg_status(include_str!("fixtures/dpkg-status"));
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        // postgresql-16 is removed (config-files only); libpq5 and openssh are not of interest.
        assert_eq!(
            names,
            vec!["anydesk", "docker-ce", "ufw", "wireguard-tools"]
        );
        assert_eq!(pkgs[1].version, "5:27.3.1-1~ubuntu.24.04~noble");
    }

    #[test]
    fn update_notifier_summary() {
        let u = parse_updates_available(include_str!("fixtures/updates-available"));
        assert_eq!((u.known, u.total, u.security), (true, 17, 5));
        assert!(parse_updates_available("").known);
        assert!(!parse_updates_available("something else entirely").known);
    }
}
