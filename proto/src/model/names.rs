//! The shapes names may take on both sides. The agent refuses a request
//! that breaks them; the controller drops what an agent reports that breaks
//! them (root on an IM host may answer anything), so a name that reaches a
//! URL, a metric label or a terminal is one of these.

/// Docker-safe names (deployments, containers): they end up in Engine API
/// URLs and container names.
pub fn valid_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A network interface or block device as the kernel lists it in
/// `/proc/net/dev` and `/proc/diskstats`.
pub fn valid_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-@:+".contains(c))
}

/// A figure of the IM's stats answer as the agent names it: lower case,
/// digits and `_`, nested keys joined with `_`.
pub fn valid_stat_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_STAT_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Longest stat name the agent makes.
pub const MAX_STAT_NAME: usize = 64;

/// A filesystem type as `/proc/self/mounts` names it (`ext4`, `fuse.sshfs`).
pub fn valid_fs_type(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_each_kind() {
        assert!(valid_container_name("portsip.instantmessage"));
        assert!(!valid_container_name("-x"));
        assert!(!valid_container_name("a/b"));
        assert!(!valid_container_name(&"a".repeat(129)));
        for d in [
            "eth0",
            "enp0s31f6",
            "nvme0n1",
            "dm-0",
            "br-1a2b",
            "veth@if3",
            "wg0.1",
        ] {
            assert!(valid_device_name(d), "{d}");
        }
        for d in ["", "a b", "x\u{1b}[2J", "../x", &"e".repeat(65)] {
            assert!(!valid_device_name(d), "{d:?}");
        }
        assert!(valid_stat_name("online_users"));
        assert!(!valid_stat_name("Online"));
        assert!(!valid_stat_name("a\"b"));
        assert!(valid_fs_type("fuse.sshfs") && !valid_fs_type("ext4 rw"));
    }
}
