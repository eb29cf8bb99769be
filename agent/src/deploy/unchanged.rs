//! Whether a spec already runs exactly as asked: applying it again then
//! changes nothing (no container is stopped for an identical one).

use std::collections::HashMap;

use imfleet_proto::agent::v1::DeploymentSpec;

use super::PREVIOUS_SUFFIX;
use super::docker::Managed;

/// True when `found` is exactly the spec's long-running containers, each
/// running with the spec's config hash and the image id its image reference
/// resolves to now (`image_ids`: reference -> id), and no set is aside.
pub fn same(spec: &DeploymentSpec, found: &[Managed], image_ids: &HashMap<String, String>) -> bool {
    let wanted: Vec<_> = spec.containers.iter().filter(|c| !c.one_shot).collect();
    if spec.config_hash.is_empty()
        || wanted.is_empty()
        || found.len() != wanted.len()
        || found.iter().any(|m| m.name.ends_with(PREVIOUS_SUFFIX))
    {
        return false;
    }
    wanted.iter().all(|c| {
        found.iter().any(|m| {
            m.name == c.name
                && m.running
                && m.config_hash == spec.config_hash
                && image_ids.get(&c.image).is_some_and(|id| *id == m.image_id)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::ContainerSpec;

    fn spec() -> DeploymentSpec {
        let c = |name: &str, image: &str, one_shot: bool| ContainerSpec {
            name: name.into(),
            image: image.into(),
            one_shot,
            ..Default::default()
        };
        DeploymentSpec {
            name: "portsip-im".into(),
            containers: vec![
                c("db", "pg:14", false),
                c("db-init", "pg:14", true),
                c("im", "pbx:22", false),
            ],
            config_hash: "h1".into(),
            ..Default::default()
        }
    }

    fn running(name: &str, image_id: &str) -> Managed {
        Managed {
            name: name.into(),
            order: 0,
            config_hash: "h1".into(),
            image_id: image_id.into(),
            running: true,
        }
    }

    fn ids() -> HashMap<String, String> {
        [
            ("pg:14".into(), "sha256:pg".into()),
            ("pbx:22".into(), "sha256:im".into()),
        ]
        .into()
    }

    #[test]
    fn the_same_spec_on_the_same_images_is_unchanged() {
        let found = vec![running("db", "sha256:pg"), running("im", "sha256:im")];
        assert!(same(&spec(), &found, &ids()));
    }

    #[test]
    fn anything_different_is_a_change() {
        let good = vec![running("db", "sha256:pg"), running("im", "sha256:im")];
        // The tag now points at a new image.
        let mut retagged = ids();
        retagged.insert("pbx:22".into(), "sha256:new".into());
        assert!(!same(&spec(), &good, &retagged));
        // Another configuration.
        let mut other = spec();
        other.config_hash = "h2".into();
        assert!(!same(&other, &good, &ids()));
        // A stopped container, a missing one, a set left aside.
        let mut stopped = good.clone();
        stopped[1].running = false;
        assert!(!same(&spec(), &stopped, &ids()));
        assert!(!same(&spec(), &good[..1], &ids()));
        let mut aside = good.clone();
        aside.push(running("im.previous", "sha256:im"));
        assert!(!same(&spec(), &aside, &ids()));
        // The image is not even on the host.
        assert!(!same(&spec(), &good, &HashMap::new()));
    }
}
