//! `/etc/os-release` (freedesktop os-release format): the agent reports its
//! host's, the controller compares it with pbx01's own.

use std::collections::HashMap;

/// The fields imfleet needs from os-release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    pub id: String,
    pub version_id: String,
    pub pretty_name: String,
    pub codename: String,
}

/// Parses os-release text: `KEY=value` lines, values optionally quoted.
pub fn parse_os_release(text: &str) -> OsRelease {
    let fields: HashMap<&str, String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), unquote(v.trim())))
        .collect();
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    OsRelease {
        id: get("ID"),
        version_id: get("VERSION_ID"),
        pretty_name: get("PRETTY_NAME"),
        codename: get("VERSION_CODENAME"),
    }
}

fn unquote(v: &str) -> String {
    let v = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v);
    v.replace("\\\"", "\"")
}

/// Reads this host's os-release (`/etc`, then `/usr/lib` as the spec says).
pub fn read_os_release() -> OsRelease {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| parse_os_release(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_os_releases_parse() {
        let noble = parse_os_release(include_str!("fixtures/os-release-ubuntu-24.04"));
        assert_eq!(
            noble,
            OsRelease {
                id: "ubuntu".into(),
                version_id: "24.04".into(),
                pretty_name: "Ubuntu 24.04.1 LTS".into(),
                codename: "noble".into(),
            }
        );
        let jammy = parse_os_release(include_str!("fixtures/os-release-ubuntu-22.04"));
        assert_eq!(
            (jammy.id.as_str(), jammy.version_id.as_str()),
            ("ubuntu", "22.04")
        );
        let bookworm = parse_os_release(include_str!("fixtures/os-release-debian-12"));
        assert_eq!(
            (bookworm.id.as_str(), bookworm.version_id.as_str()),
            ("debian", "12")
        );
        assert_eq!(bookworm.codename, "bookworm");
    }
}
