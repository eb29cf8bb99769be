//! Loading image archives streamed from the controller: spool to a private
//! file while hashing, verify size and sha256, then `docker load` it.
//!
//! Spool files live in the agent's own root-only spool directory under
//! unguessable names, are removed when the upload ends however it ends, and
//! whatever a killed agent left there is removed at start-up.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use imfleet_proto::agent::v1::{ImageChunk, ImageUploadHeader};
use sha2::{Digest, Sha256};

/// Largest archive accepted (PortSIP's `portsip/pbx` bundles the whole PBX:
/// expect a gigabyte or more).
pub const MAX_ARCHIVE_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Longest silence between two chunks of an upload: a controller that went
/// away without closing its connection must not hold the one upload slot.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Space kept free on the spool's filesystem beyond the archive itself.
const SPOOL_HEADROOM: u64 = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the upload did not start with a header")]
    NoHeader,
    #[error("the archive is {0} bytes; the limit is {MAX_ARCHIVE_BYTES}")]
    TooLarge(u64),
    #[error(
        "not enough space to receive {name}: {needed} MB needed in {spool}, {available} MB free; free some space on the IM host"
    )]
    NoSpace {
        name: String,
        spool: String,
        needed: u64,
        available: u64,
    },
    #[error("another image upload is in progress on this host; try again when it ends")]
    Busy,
    #[error("the upload of {name} is corrupt: {detail}; nothing was loaded")]
    Corrupt { name: String, detail: String },
    #[error("{name} is not a valid image archive: {detail}")]
    NotAnImage { name: String, detail: String },
    #[error("spooling the upload: {0}")]
    Io(#[from] std::io::Error),
    #[error("receiving the upload: {0}")]
    Transport(String),
    #[error("the upload stalled: nothing arrived for {0} s; nothing was loaded")]
    Stalled(u64),
    #[error("Docker Engine: {0}")]
    Docker(#[from] bollard::errors::Error),
}

/// How long the Engine may take to answer a load: it reads and unpacks the
/// whole archive before its first word, so the wait grows with the size
/// (a slow disk still does 5 MB/s).
pub fn load_timeout(archive_bytes: u64) -> Duration {
    Duration::from_secs(300 + archive_bytes / (5 * 1024 * 1024))
}

/// Longest silence accepted between two progress messages once loading has
/// begun (registering one large layer takes a while).
const LOAD_IDLE: Duration = Duration::from_secs(600);

/// The agent's image spool: one upload at a time.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    busy: tokio::sync::Mutex<()>,
}

impl Spool {
    /// Creates (root-only) or empties the spool directory.
    pub fn open(dir: &Path) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                tracing::info!(file = %entry.path().display(), "removing an upload left by an earlier run");
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Spool {
            dir: dir.to_owned(),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_space(&self, header: &ImageUploadHeader) -> Result<(), LoadError> {
        let stat = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
        let available = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        if available < header.size.saturating_add(SPOOL_HEADROOM) {
            return Err(LoadError::NoSpace {
                name: header.name.clone(),
                spool: self.dir.display().to_string(),
                needed: header.size.saturating_add(SPOOL_HEADROOM) / 1_000_000,
                available: available / 1_000_000,
            });
        }
        Ok(())
    }

    /// Receives the chunks, verifies them and loads the archive.
    pub async fn load(
        &self,
        docker: &bollard::Docker,
        mut chunks: impl futures::Stream<Item = Result<ImageChunk, tonic::Status>> + Unpin,
    ) -> Result<Vec<String>, LoadError> {
        let _one_at_a_time = self.busy.try_lock().map_err(|_| LoadError::Busy)?;
        let mut next = async || {
            tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, chunks.next())
                .await
                .map_err(|_| LoadError::Stalled(UPLOAD_IDLE_TIMEOUT.as_secs()))
        };
        let first = next()
            .await?
            .ok_or(LoadError::NoHeader)?
            .map_err(|s| LoadError::Transport(s.message().to_owned()))?;
        let header: ImageUploadHeader = first.header.ok_or(LoadError::NoHeader)?;
        if header.size > MAX_ARCHIVE_BYTES {
            return Err(LoadError::TooLarge(header.size));
        }
        self.check_space(&header)?;
        // Removed on drop: on success, on any error, and when the controller
        // goes away mid-upload (the handler future is dropped).
        let mut spool = tempfile::Builder::new()
            .prefix("upload-")
            .suffix(".tar")
            .tempfile_in(&self.dir)?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut write = |data: &[u8]| -> Result<(), LoadError> {
            received += data.len() as u64;
            if received > header.size {
                return Err(LoadError::Corrupt {
                    name: header.name.clone(),
                    detail: format!("more than the announced {} bytes arrived", header.size),
                });
            }
            hasher.update(data);
            spool.write_all(data)?;
            Ok(())
        };
        write(&first.data)?;
        while let Some(chunk) = next().await? {
            let chunk = chunk.map_err(|s| LoadError::Transport(s.message().to_owned()))?;
            write(&chunk.data)?;
        }
        spool.as_file().sync_all()?;
        let digest = hex::encode(hasher.finalize());
        if received != header.size || digest != header.sha256 {
            return Err(LoadError::Corrupt {
                name: header.name.clone(),
                detail: format!(
                    "received {received} of {} bytes with sha256 {digest}, expected {}",
                    header.size, header.sha256
                ),
            });
        }
        load_archive(docker, spool.path(), &header).await
    }
}

async fn load_archive(
    docker: &bollard::Docker,
    archive: &Path,
    header: &ImageUploadHeader,
) -> Result<Vec<String>, LoadError> {
    let not_an_image = |detail: String| LoadError::NotAnImage {
        name: header.name.clone(),
        detail,
    };
    let reader = tokio::fs::File::open(archive).await?;
    let body = tokio_util::io::ReaderStream::new(reader);
    let docker = docker.clone().with_timeout(load_timeout(header.size));
    let mut progress = docker.import_image_stream(
        bollard::query_parameters::ImportImageOptions {
            quiet: false,
            ..Default::default()
        },
        body,
        None,
    );
    let mut loaded = Vec::new();
    loop {
        let item = match tokio::time::timeout(LOAD_IDLE, progress.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(_) => {
                return Err(not_an_image(format!(
                    "the Docker Engine reported no progress for {} s",
                    LOAD_IDLE.as_secs()
                )));
            }
        };
        let info = item.map_err(|e| not_an_image(e.to_string()))?;
        if let Some(error) = info.error_detail.and_then(|d| d.message) {
            return Err(not_an_image(error));
        }
        if let Some(text) = info.stream {
            for line in text.lines().filter(|l| l.starts_with("Loaded image")) {
                loaded.push(line.trim().to_owned());
            }
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_timeout_grows_with_the_archive() {
        const GB: u64 = 1024 * 1024 * 1024;
        // A PortSIP-sized archive gets far more than bollard's default 120 s.
        assert!(load_timeout(2 * GB) >= Duration::from_secs(300 + 400));
        assert!(load_timeout(16 * GB) > load_timeout(2 * GB));
        assert!(load_timeout(0) >= Duration::from_secs(300));
    }

    #[tokio::test]
    async fn a_corrupt_or_aborted_upload_leaves_no_spool_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("upload-left-by-a-crash.tar"), "x").unwrap();
        let spool = Spool::open(&dir).unwrap();
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "emptied at start"
        );
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let docker = bollard::Docker::connect_with_unix_defaults().unwrap();
        let header = |size, sha256: &str| ImageChunk {
            header: Some(ImageUploadHeader {
                name: "pbx.tar".into(),
                size,
                sha256: sha256.into(),
            }),
            data: b"abc".to_vec(),
        };
        // Wrong digest: refused before the Engine sees anything.
        let chunks = futures::stream::iter(vec![Ok(header(3, "00"))]);
        let err = spool.load(&docker, chunks).await.unwrap_err();
        assert!(matches!(err, LoadError::Corrupt { .. }), "{err}");
        // The controller goes away mid-upload.
        let chunks = futures::stream::iter(vec![
            Ok(header(10, "00")),
            Err(tonic::Status::cancelled("gone")),
        ]);
        let err = spool.load(&docker, chunks).await.unwrap_err();
        assert!(matches!(err, LoadError::Transport(_)), "{err}");
        // More space announced than the disk has.
        let chunks = futures::stream::iter(vec![Ok(header(MAX_ARCHIVE_BYTES, "00"))]);
        match spool.load(&docker, chunks).await {
            Err(LoadError::NoSpace { .. }) | Err(LoadError::Corrupt { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_upload_gives_the_slot_back() {
        use futures::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path()).unwrap();
        let docker = bollard::Docker::connect_with_unix_defaults().unwrap();
        let first = ImageChunk {
            header: Some(ImageUploadHeader {
                name: "pbx.tar".into(),
                size: 10,
                sha256: "00".into(),
            }),
            data: b"abc".to_vec(),
        };
        // A half-open connection: the header, then silence forever.
        let chunks = futures::stream::iter(vec![Ok(first)]).chain(futures::stream::pending());
        let err = spool.load(&docker, Box::pin(chunks)).await.unwrap_err();
        assert!(matches!(err, LoadError::Stalled(120)), "{err}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        // The slot is free again.
        assert!(spool.busy.try_lock().is_ok());
    }
}
