//! Images staged before a rollout touches anything: present ones reported
//! with their ids, missing ones pulled, and the space left where the Engine
//! keeps images. No container is touched.

use imfleet_proto::agent::v1::{PreparedImage, PreparedImages};

use super::containers::Containers;
use super::{DeployError, Deployer};

/// At most this many references per request.
pub const MAX_IMAGES: usize = 8;

/// Docker's reference grammar: nothing else reaches an Engine URL.
pub use imfleet_proto::model::reference::valid_image_reference as valid_reference;

/// The request's references, checked.
pub fn check(images: &[String]) -> Result<(), String> {
    if images.len() > MAX_IMAGES {
        return Err(format!("at most {MAX_IMAGES} images per request"));
    }
    match images.iter().find(|i| !valid_reference(i)) {
        Some(bad) => Err(format!(
            "`{}` is not an image reference",
            bad.escape_debug()
        )),
        None => Ok(()),
    }
}

impl<C: Containers> Deployer<C> {
    pub async fn prepare_images(&self, images: &[String]) -> Result<PreparedImages, DeployError> {
        check(images).map_err(DeployError::Invalid)?;
        let mut prepared = Vec::new();
        for image in images {
            let mut pulled = false;
            let mut id = self.containers.image_id(image).await?;
            if id.is_none() {
                self.containers
                    .pull(image, &mut |_, _| {})
                    .await
                    .map_err(|e| {
                        DeployError::Invalid(format!(
                            "image {image} is not on the host and could not be pulled ({e}); stage it with --image-file"
                        ))
                    })?;
                pulled = true;
                id = self.containers.image_id(image).await?;
            }
            let id = id.ok_or_else(|| {
                DeployError::Invalid(format!("image {image} was pulled but cannot be found"))
            })?;
            prepared.push(PreparedImage {
                reference: image.clone(),
                id,
                pulled,
            });
        }
        let (docker_root, available) = self.docker_root_space().await;
        Ok(PreparedImages {
            images: prepared,
            docker_root,
            docker_root_available_bytes: available,
        })
    }

    /// The Engine's data root and the bytes free on it (0 when unknown).
    async fn docker_root_space(&self) -> (String, u64) {
        let Ok(info) = self.docker.info().await else {
            return (String::new(), 0);
        };
        let root = info.docker_root_dir.unwrap_or_default();
        let available = nix::sys::statvfs::statvfs(root.as_str())
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(0);
        (root, available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_image_references_pass() {
        for good in [
            "portsip/pbx:22",
            "registry.example.com:5000/portsip/pbx:23.1",
            "pbx@sha256:0123456789abcdef0123456789abcdef",
            "imfleet-test/pbx:23-never-healthy",
        ] {
            assert!(valid_reference(good), "{good}");
        }
        for bad in [
            "",
            "-x",
            "--help",
            "a b",
            "pbx:22\n",
            "/etc/passwd",
            "pbx;rm",
            "x/../../containers/victim",
            &"a".repeat(256),
        ] {
            assert!(!valid_reference(bad), "{bad:?}");
        }
        assert!(check(&vec!["pbx:1".to_owned(); 9]).is_err());
        assert!(check(&["pbx:1".to_owned(), "bad ref".to_owned()]).is_err());
        assert!(check(&[]).is_ok());
    }
}
