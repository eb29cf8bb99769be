//! The PortSIP sizing table (HA guide and FAQ), as data.

use serde::Serialize;

const GB: u64 = 1_000_000_000;

/// What a deployment for a number of concurrent users needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sizing {
    pub users: u32,
    pub min_cores: u32,
    pub min_memory_bytes: u64,
    /// Size of the storage filesystem; 0 where PortSIP states none.
    pub min_disk_bytes: u64,
    pub recommended_disk_bytes: u64,
    /// Free space imfleet asks for on the storage filesystem. The guide is
    /// silent below 50,000 users; these are imfleet's conservative choices.
    pub min_free_bytes: u64,
}

/// Profiles operators can pick with `--users`.
pub const PROFILES: &[Sizing] = &[
    Sizing {
        users: 5_000,
        min_cores: 10,
        min_memory_bytes: 8 * GB,
        min_disk_bytes: 0,
        recommended_disk_bytes: 0,
        min_free_bytes: 20 * GB,
    },
    Sizing {
        users: 20_000,
        min_cores: 16,
        min_memory_bytes: 10 * GB,
        min_disk_bytes: 0,
        recommended_disk_bytes: 0,
        min_free_bytes: 50 * GB,
    },
    Sizing {
        users: 50_000,
        min_cores: 20,
        min_memory_bytes: 16 * GB,
        min_disk_bytes: 128 * GB,
        recommended_disk_bytes: 256 * GB,
        min_free_bytes: 128 * GB,
    },
];

/// The default profile: the largest row of the guide.
pub const DEFAULT_USERS: u32 = 50_000;

pub fn profile(users: u32) -> Option<Sizing> {
    PROFILES.iter().copied().find(|p| p.users == users)
}

/// "16 GB" style text for byte counts (decimal units, as vendors size disks).
pub fn gb(bytes: u64) -> String {
    if bytes >= 10 * GB {
        format!("{} GB", bytes / GB)
    } else {
        format!("{:.1} GB", bytes as f64 / GB as f64)
    }
}
