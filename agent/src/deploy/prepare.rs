//! What must be on disk before a deployment's containers start: its
//! directories with their owners (the whole tree where the spec says so, to
//! repair drift after a restore) and its generated secrets. Everything goes
//! through [`hostfs`], because the service users write in these trees.

use std::path::Path;

use imfleet_proto::agent::v1::{DirectorySpec, GeneratedSecret, SecretFile, secret_file::Format};

use super::DeployError;
use super::hostfs::{self, FsError, Ownership};
use super::secrets;

impl From<FsError> for DeployError {
    fn from(e: FsError) -> Self {
        DeployError::Invalid(e.to_string())
    }
}

/// Creates each directory (parents as root 0755), sets its owner and mode,
/// and for `own_tree` directories re-owns whatever below has drifted.
/// Returns how many entries had their owner repaired.
pub fn directories(dirs: &[DirectorySpec]) -> Result<u64, DeployError> {
    let mut repaired = 0;
    for dir in dirs {
        let path = Path::new(&dir.path);
        let fd = hostfs::open_dir(path, !dir.must_exist)?;
        let owner = Ownership {
            uid: dir.uid,
            gid: dir.gid,
        };
        hostfs::set_owner_and_mode(&fd, owner, (dir.mode != 0).then_some(dir.mode), path)?;
        if dir.own_tree {
            repaired += hostfs::own_tree(fd, owner, path)?;
        }
    }
    Ok(repaired)
}

fn format(f: &SecretFile) -> Format {
    Format::try_from(f.format).unwrap_or(Format::Raw)
}

fn owner(f: &SecretFile) -> Ownership {
    Ownership {
        uid: f.uid,
        gid: f.gid,
    }
}

/// Reuses the secret held by its authoritative (first) file, else generates
/// it; then writes every file. Only the first file is ever read, and only
/// from a directory no one but root can change.
pub fn secret(secret: &GeneratedSecret) -> Result<String, DeployError> {
    let Some(authority) = secret.files.first() else {
        return Err(DeployError::Invalid(format!(
            "secret `{}` names no file to keep it in",
            secret.id
        )));
    };
    let authority_path = Path::new(&authority.path);
    hostfs::open_dir(authority_path.parent().unwrap_or(Path::new("/")), true)?;
    if !hostfs::in_root_only_dir(authority_path)? {
        return Err(DeployError::Invalid(format!(
            "secret `{}`: {} must lie in a directory only root can write",
            secret.id, authority.path
        )));
    }
    let existing = hostfs::read_file(authority_path)?.and_then(|text| match format(authority) {
        Format::Raw => Some(text.trim().to_owned()).filter(|s| !s.is_empty()),
        Format::Ini => secrets::ini_get(&text, &authority.ini_section, &authority.ini_key),
    });
    let value = match existing {
        Some(v) => v,
        None if let Some(user) = first_existing(&secret.in_use_if_exists)? => {
            return Err(DeployError::Invalid(format!(
                "secret `{}`: {user} shows it is already in use (data restored?), but its authoritative copy {} is missing; a new value would lock the service out. Restore that file from the backup, or write the value in use into it (root, 0600)",
                secret.id, authority.path
            )));
        }
        None => {
            secrets::generate(secret.length.max(16) as usize).map_err(|source| DeployError::Io {
                what: "generate a secret".into(),
                source,
            })?
        }
    };
    for f in &secret.files {
        let path = Path::new(&f.path);
        let contents = match format(f) {
            Format::Raw => format!("{value}\n"),
            Format::Ini => {
                // Other settings in the file are the service's own: kept.
                let current = match hostfs::read_file(path) {
                    Ok(text) => text.unwrap_or_default(),
                    Err(FsError::NotAFile { .. }) => String::new(),
                    Err(e) => return Err(e.into()),
                };
                secrets::ini_set(&current, &f.ini_section, &f.ini_key, &value)
            }
        };
        hostfs::write_file(path, contents.as_bytes(), owner(f), f.mode.max(0o400))?;
    }
    Ok(value)
}

/// The first of `paths` that exists (never following a link to decide).
fn first_existing(paths: &[String]) -> Result<Option<&str>, DeployError> {
    for path in paths {
        if hostfs::exists(Path::new(path))? {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    /// A directory the service (888) owns, as `im-data` is.
    fn service_dir(tmp: &tempfile::TempDir) -> std::path::PathBuf {
        let dir = tmp.path().join("im-data");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(888), Some(888)).unwrap();
        dir
    }

    fn file(path: &Path, format: Format, uid: u32, mode: u32) -> SecretFile {
        SecretFile {
            path: path.display().to_string(),
            format: format as i32,
            ini_section: "database".into(),
            ini_key: "superuser_password".into(),
            uid,
            gid: uid,
            mode,
        }
    }

    /// The database password as PortSIP keeps it: root's copy, then the IM's.
    fn db_secret(
        secrets_dir: &Path,
        im_data: &Path,
        in_use_if_exists: Vec<String>,
    ) -> GeneratedSecret {
        GeneratedSecret {
            id: "db".into(),
            length: 20,
            files: vec![
                file(&secrets_dir.join("db"), Format::Raw, 0, 0o600),
                file(&im_data.join("system.ini"), Format::Ini, 888, 0o600),
            ],
            in_use_if_exists,
        }
    }

    #[test]
    fn the_secret_is_kept_by_root_and_copied_to_the_service_without_being_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let secrets_dir = tmp.path().join("secrets");
        let im_data = service_dir(&tmp);
        let spec = db_secret(&secrets_dir, &im_data, Vec::new());
        let first = secret(&spec).unwrap();
        assert_eq!(first.len(), 20);
        let ini = std::fs::read_to_string(im_data.join("system.ini")).unwrap();
        assert!(ini.contains(&format!("superuser_password = {first}")));
        let m = std::fs::metadata(im_data.join("system.ini")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (888, 0o600));

        // The service rewrites its copy, or swaps it for a link to a root-only
        // file: the secret stays what root keeps, and nothing leaks into it.
        std::fs::remove_file(im_data.join("system.ini")).unwrap();
        let precious = tmp.path().join("shadow");
        std::fs::write(&precious, "[database]\nsuperuser_password = rootsecret\n").unwrap();
        std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&precious, im_data.join("system.ini")).unwrap();
        assert_eq!(secret(&spec).unwrap(), first);
        let ini = std::fs::read_to_string(im_data.join("system.ini")).unwrap();
        assert!(!ini.contains("rootsecret"), "{ini}");
        assert!(
            std::fs::read_to_string(&precious)
                .unwrap()
                .contains("rootsecret")
        );
    }

    #[test]
    fn an_authoritative_copy_in_a_service_writable_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let im_data = service_dir(&tmp);
        let spec = GeneratedSecret {
            id: "db".into(),
            length: 20,
            files: vec![file(&im_data.join("system.ini"), Format::Ini, 888, 0o600)],
            in_use_if_exists: Vec::new(),
        };
        let err = secret(&spec).unwrap_err().to_string();
        assert!(err.contains("only root can write"), "{err}");
        assert!(!im_data.join("system.ini").exists());
    }

    #[test]
    fn a_secret_in_use_is_never_regenerated_when_its_copy_is_lost() {
        // A restore brought back the database but not the secrets directory.
        let tmp = tempfile::tempdir().unwrap();
        let pg = tmp.path().join("im-postgresql");
        std::fs::create_dir_all(&pg).unwrap();
        std::fs::write(pg.join("PG_VERSION"), "14\n").unwrap();
        let im_data = service_dir(&tmp);
        let secrets_dir = tmp.path().join("secrets");
        let spec = db_secret(
            &secrets_dir,
            &im_data,
            vec![pg.join("PG_VERSION").display().to_string()],
        );
        let err = secret(&spec).unwrap_err().to_string();
        assert!(
            err.contains("already in use") && err.contains("Restore"),
            "{err}"
        );
        assert!(!secrets_dir.join("db").exists());
        assert!(!im_data.join("system.ini").exists());
        // With the copy restored, the value in use is kept.
        std::fs::write(secrets_dir.join("db"), "the-password-in-use\n").unwrap();
        assert_eq!(secret(&spec).unwrap(), "the-password-in-use");
        // A fresh host (no database yet) gets a new secret.
        std::fs::remove_file(pg.join("PG_VERSION")).unwrap();
        std::fs::remove_file(secrets_dir.join("db")).unwrap();
        assert_eq!(secret(&spec).unwrap().len(), 20);
    }

    #[test]
    fn directories_get_their_owner_and_nested_drift_is_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("im-data");
        std::fs::create_dir_all(data.join("im/storage")).unwrap();
        std::fs::write(data.join("im/restored.db"), "x").unwrap();
        let dir = |path: &Path, own_tree| DirectorySpec {
            path: path.display().to_string(),
            uid: 888,
            gid: 888,
            mode: 0o6755,
            must_exist: false,
            own_tree,
        };
        let repaired = directories(&[dir(&data, true)]).unwrap();
        assert_eq!(repaired, 3, "im, im/storage, im/restored.db");
        let m = std::fs::metadata(&data).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o7777),
            (888, 0o755),
            "no setuid/setgid"
        );
        assert_eq!(
            std::fs::metadata(data.join("im/restored.db"))
                .unwrap()
                .uid(),
            888
        );
        let missing = DirectorySpec {
            must_exist: true,
            ..dir(&tmp.path().join("absent"), false)
        };
        assert!(directories(&[missing]).is_err());
        assert!(!tmp.path().join("absent").exists());
    }
}
