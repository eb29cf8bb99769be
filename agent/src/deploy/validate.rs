//! Checks on a deployment spec that need nothing but the spec (and whether a
//! path exists): run before anything on the host changes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use imfleet_proto::agent::v1::DeploymentSpec;

use super::PREVIOUS_SUFFIX;

pub use imfleet_proto::model::names::valid_container_name as valid_name;

/// The spec's own consistency: names, images, duplicates, nested mounts.
pub fn check(spec: &DeploymentSpec, exists: impl Fn(&Path) -> bool) -> Result<(), String> {
    if !valid_name(&spec.name) || spec.containers.is_empty() {
        return Err(format!(
            "deployment `{}`: needs a name of letters, digits, `_`, `.`, `-` and at least one container",
            spec.name
        ));
    }
    let mut names = HashSet::new();
    for c in &spec.containers {
        if !valid_name(&c.name) || c.name.ends_with(PREVIOUS_SUFFIX) || !names.insert(&c.name) {
            return Err(format!(
                "container `{}`: invalid or duplicate name (letters, digits, `_`, `.`, `-`; not ending in {PREVIOUS_SUFFIX})",
                c.name
            ));
        }
        if !imfleet_proto::model::reference::valid_image_reference(&c.image) {
            return Err(format!(
                "container `{}`: `{}` is not an image reference (name[:tag][@digest])",
                c.name,
                c.image.escape_debug()
            ));
        }
    }
    let declared: HashSet<PathBuf> = spec
        .directories
        .iter()
        .map(|d| normalise(Path::new(&d.path)))
        .collect();
    for (container, point) in nested_mount_points(spec) {
        if !declared.contains(&point) && !exists(&point) {
            return Err(format!(
                "container `{container}`: mount point {} lies inside another bind mount; the Docker Engine would create it as root:root, so the service could not write there. Declare it in the spec's directories with the service's owner",
                point.display()
            ));
        }
    }
    Ok(())
}

fn normalise(path: &Path) -> PathBuf {
    path.components().collect()
}

/// Host directories that must exist for bind mounts nested inside other bind
/// mounts of the same container: every directory from the outer mount's
/// source down to where the inner mount's target lands in it.
pub fn nested_mount_points(spec: &DeploymentSpec) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for c in &spec.containers {
        for inner in &c.mounts {
            let target = normalise(Path::new(&inner.target));
            // The deepest other mount that contains this one's target.
            let outer = c
                .mounts
                .iter()
                .map(|m| (m, normalise(Path::new(&m.target))))
                .filter(|(_, t)| *t != target && target.starts_with(t))
                .max_by_key(|(_, t)| t.components().count());
            let Some((outer, outer_target)) = outer else {
                continue;
            };
            let Ok(rest) = target.strip_prefix(&outer_target) else {
                continue;
            };
            let mut host = normalise(Path::new(&outer.source));
            for part in rest.components() {
                host.push(part);
                out.push((c.name.clone(), host.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::{BindMount, ContainerSpec, DirectorySpec};

    fn mount(source: &str, target: &str) -> BindMount {
        BindMount {
            source: source.into(),
            target: target.into(),
            read_only: false,
        }
    }

    fn spec(mounts: Vec<BindMount>, dirs: &[&str]) -> DeploymentSpec {
        DeploymentSpec {
            name: "portsip-im".into(),
            containers: vec![ContainerSpec {
                name: "portsip.instantmessage".into(),
                image: "portsip/pbx:22".into(),
                mounts,
                ..Default::default()
            }],
            directories: dirs
                .iter()
                .map(|p| DirectorySpec {
                    path: p.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn nested_mount_points_map_into_the_outer_source() {
        let s = spec(
            vec![
                mount("/srv/im", "/var/lib/portsip/pbx/im/storage"),
                mount("/data/im-data", "/var/lib/portsip/pbx/"),
            ],
            &[],
        );
        let points: Vec<PathBuf> = nested_mount_points(&s).into_iter().map(|p| p.1).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/data/im-data/im"),
                PathBuf::from("/data/im-data/im/storage")
            ]
        );
        let flat = spec(vec![mount("/a", "/x"), mount("/b", "/y")], &[]);
        assert!(nested_mount_points(&flat).is_empty());
    }

    #[test]
    fn undeclared_nested_mount_points_are_refused_unless_they_exist() {
        let mounts = || {
            vec![
                mount("/data/im-data", "/var/lib/portsip/pbx"),
                mount("/srv/im", "/var/lib/portsip/pbx/im/storage"),
            ]
        };
        let err = check(&spec(mounts(), &["/data/im-data"]), |_| false).unwrap_err();
        assert!(err.contains("/data/im-data/im "), "{err}");
        assert!(err.contains("root:root"), "{err}");
        let declared = spec(
            mounts(),
            &[
                "/data/im-data",
                "/data/im-data/im",
                "/data/im-data/im/storage/",
            ],
        );
        assert_eq!(check(&declared, |_| false), Ok(()));
        assert_eq!(check(&spec(mounts(), &[]), |_| true), Ok(()));
    }

    #[test]
    fn names_that_could_reach_into_engine_urls_are_refused() {
        for bad in ["", "../../version#", "a/b", "x y", ".hidden", "im.previous"] {
            let mut s = spec(vec![], &[]);
            s.containers[0].name = bad.into();
            assert!(check(&s, |_| true).is_err(), "{bad:?}");
        }
        let mut s = spec(vec![], &[]);
        s.name = "portsip im".into();
        assert!(check(&s, |_| true).is_err());
        assert!(valid_name("portsip.instantmessage") && valid_name("portsip-im"));
    }
}
