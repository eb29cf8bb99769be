//! What the agent remembers of each deployment it applied, in its own
//! root-only state directory: the directories it declared (the only ones a
//! later purge may delete) and where its containers carry secrets (so logs
//! can be redacted after an agent restart, when no secret is in memory).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use imfleet_proto::agent::v1::DeploymentSpec;
use serde::{Deserialize, Serialize};

use super::validate::valid_name;

/// Where a container carries a value built from a `${secret:ID}` template.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "in", rename_all = "snake_case")]
pub enum SecretSlot {
    Env { key: String, template: String },
    Command { index: usize, template: String },
    Entrypoint { index: usize, template: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Every directory any applied spec of this deployment declared.
    pub directories: Vec<String>,
    /// Per container name, where its secrets are.
    pub secret_slots: BTreeMap<String, Vec<SecretSlot>>,
    /// An apply under way (cleared when it ends): what recovery needs after
    /// the agent died in the middle of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<super::recovery::InProgress>,
    /// The health gate of the spec applied last: what the health stream
    /// probes (never a URL a watch request names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateRecord>,
}

/// A spec's health gate as the agent keeps it (already checked by policy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateRecord {
    pub http_url: String,
    pub tcp_ports: Vec<u32>,
}

impl DeploymentRecord {
    /// This record updated for `spec`: directories accumulate (a purge may
    /// still remove what an older spec created); secret slots are the spec's.
    pub fn updated_for(&self, spec: &DeploymentSpec) -> DeploymentRecord {
        let mut directories = self.directories.clone();
        for d in &spec.directories {
            if !directories.contains(&d.path) {
                directories.push(d.path.clone());
            }
        }
        // Slots accumulate too: after a rollback the old containers run
        // again and must still be redacted where the old spec put secrets.
        let mut secret_slots = self.secret_slots.clone();
        for c in &spec.containers {
            let mut slots = Vec::new();
            let carries = |s: &str| s.contains("${secret:");
            for (key, template) in &c.env {
                if carries(template) {
                    slots.push(SecretSlot::Env {
                        key: key.clone(),
                        template: template.clone(),
                    });
                }
            }
            for (index, template) in c.command.iter().enumerate() {
                if carries(template) {
                    slots.push(SecretSlot::Command {
                        index,
                        template: template.clone(),
                    });
                }
            }
            for (index, template) in c.entrypoint.iter().enumerate() {
                if carries(template) {
                    slots.push(SecretSlot::Entrypoint {
                        index,
                        template: template.clone(),
                    });
                }
            }
            if !slots.is_empty() {
                let known = secret_slots.entry(c.name.clone()).or_default();
                known.extend(slots);
                // The env is a map: a stable order keeps the record stable.
                known.sort();
                known.dedup();
            }
        }
        DeploymentRecord {
            directories,
            secret_slots,
            in_progress: self.in_progress.clone(),
            gate: spec.gate.as_ref().map(|g| GateRecord {
                http_url: g.http_url.clone(),
                tcp_ports: g.tcp_ports.clone(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("deployment record {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("deployment record {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("`{0}` is not a valid deployment name")]
    Name(String),
}

/// The records, one JSON file per deployment in a root-only directory.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn open(dir: &Path) -> Result<Records, RecordError> {
        let io = |source| RecordError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        Ok(Records {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, deployment: &str) -> Result<PathBuf, RecordError> {
        if !valid_name(deployment) {
            return Err(RecordError::Name(deployment.to_owned()));
        }
        Ok(self.dir.join(format!("{deployment}.json")))
    }

    pub fn load(&self, deployment: &str) -> Result<Option<DeploymentRecord>, RecordError> {
        let path = self.path(deployment)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RecordError::Corrupt {
                path: path.display().to_string(),
                detail: e.to_string(),
            })
    }

    /// Replaces the record atomically (temporary file, fsync, rename).
    pub fn save(&self, deployment: &str, record: &DeploymentRecord) -> Result<(), RecordError> {
        let path = self.path(deployment)?;
        let io = |source| RecordError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string_pretty(record).expect("records serialise");
        let mut tmp = tempfile::Builder::new()
            .prefix(".record")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)
            .map_err(io)?;
        tmp.write_all(text.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        // The rename itself must survive a power loss: recovery reads it.
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Deployments with a record.
    pub fn names(&self) -> Result<Vec<String>, RecordError> {
        let io = |source| RecordError::Io {
            path: self.dir.display().to_string(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".json"))
                && valid_name(n)
            {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn remove(&self, deployment: &str) -> Result<(), RecordError> {
        let path = self.path(deployment)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::{ContainerSpec, DirectorySpec};

    fn spec(dirs: &[&str]) -> DeploymentSpec {
        DeploymentSpec {
            name: "portsip-im".into(),
            directories: dirs
                .iter()
                .map(|p| DirectorySpec {
                    path: p.to_string(),
                    ..Default::default()
                })
                .collect(),
            containers: vec![ContainerSpec {
                name: "db".into(),
                env: [
                    ("POSTGRES_PASSWORD".into(), "${secret:db}".into()),
                    ("PGDATA".into(), "/data".into()),
                ]
                .into(),
                command: vec!["serve".into(), "-t ${secret:token}".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn directories_and_slots_accumulate() {
        let first = DeploymentRecord::default().updated_for(&spec(&["/d", "/d/a"]));
        let second = first.updated_for(&spec(&["/d", "/d/b"]));
        assert_eq!(second.directories, ["/d", "/d/a", "/d/b"]);
        let slots = &second.secret_slots["db"];
        assert_eq!(slots.len(), 2);
        assert!(slots.contains(&SecretSlot::Env {
            key: "POSTGRES_PASSWORD".into(),
            template: "${secret:db}".into()
        }));
        assert!(slots.contains(&SecretSlot::Command {
            index: 1,
            template: "-t ${secret:token}".into()
        }));
        // A spec that moves the secret keeps the old place known (a rollback
        // brings the old container back).
        let mut moved = spec(&["/d"]);
        moved.containers[0].env.clear();
        moved.containers[0]
            .env
            .insert("DB_PASS".into(), "${secret:db}".into());
        let third = second.updated_for(&moved);
        let slots = &third.secret_slots["db"];
        assert_eq!(slots.len(), 3);
        assert!(
            slots
                .iter()
                .any(|s| matches!(s, SecretSlot::Env { key, .. } if key == "POSTGRES_PASSWORD"))
        );
        assert!(
            slots
                .iter()
                .any(|s| matches!(s, SecretSlot::Env { key, .. } if key == "DB_PASS"))
        );
    }

    #[test]
    fn records_round_trip_privately_and_refuse_bad_names() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(&dir.path().join("state")).unwrap();
        assert_eq!(records.load("portsip-im").unwrap(), None);
        let record = DeploymentRecord::default().updated_for(&spec(&["/d"]));
        records.save("portsip-im", &record).unwrap();
        assert_eq!(records.load("portsip-im").unwrap(), Some(record));
        let file = dir.path().join("state/portsip-im.json");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            records.load("../../etc/passwd"),
            Err(RecordError::Name(_))
        ));
        records.remove("portsip-im").unwrap();
        assert_eq!(records.load("portsip-im").unwrap(), None);
    }
}
