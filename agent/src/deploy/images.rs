//! Loading image archives streamed from the controller: spool to a private
//! file while hashing, verify size and sha256, then `docker load` it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use futures::StreamExt;
use imfleet_proto::agent::v1::{ImageChunk, ImageUploadHeader};
use sha2::{Digest, Sha256};

/// Largest archive accepted (PortSIP's images are a few hundred MB).
pub const MAX_ARCHIVE_BYTES: u64 = 16 * 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the upload did not start with a header")]
    NoHeader,
    #[error("the archive is {0} bytes; the limit is {MAX_ARCHIVE_BYTES}")]
    TooLarge(u64),
    #[error("the upload of {name} is corrupt: {detail}; nothing was loaded")]
    Corrupt { name: String, detail: String },
    #[error("{name} is not a valid image archive: {detail}")]
    NotAnImage { name: String, detail: String },
    #[error("spooling the upload: {0}")]
    Io(#[from] std::io::Error),
    #[error("receiving the upload: {0}")]
    Transport(String),
    #[error("Docker Engine: {0}")]
    Docker(#[from] bollard::errors::Error),
}

/// A spool file removed when dropped.
struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Receives the chunks, verifies them and loads the archive.
pub async fn load(
    docker: &bollard::Docker,
    mut chunks: impl futures::Stream<Item = Result<ImageChunk, tonic::Status>> + Unpin,
) -> Result<Vec<String>, LoadError> {
    let first = chunks
        .next()
        .await
        .ok_or(LoadError::NoHeader)?
        .map_err(|s| LoadError::Transport(s.message().to_owned()))?;
    let header: ImageUploadHeader = first.header.ok_or(LoadError::NoHeader)?;
    if header.size > MAX_ARCHIVE_BYTES {
        return Err(LoadError::TooLarge(header.size));
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let spool = Spool(std::env::temp_dir().join(format!(
        "imfleet-image-{}-{}.tar",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&spool.0)?;
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
        file.write_all(data)?;
        Ok(())
    };
    write(&first.data)?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|s| LoadError::Transport(s.message().to_owned()))?;
        write(&chunk.data)?;
    }
    file.sync_all()?;
    drop(file);
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

    let reader = tokio::fs::File::open(&spool.0).await?;
    let body = tokio_util::io::ReaderStream::new(reader);
    let mut progress = docker.import_image_stream(
        bollard::query_parameters::ImportImageOptions {
            quiet: true,
            ..Default::default()
        },
        body,
        None,
    );
    let mut loaded = Vec::new();
    while let Some(item) = progress.next().await {
        let info = item.map_err(|e| LoadError::NotAnImage {
            name: header.name.clone(),
            detail: e.to_string(),
        })?;
        if let Some(error) = info.error_detail.and_then(|d| d.message) {
            return Err(LoadError::NotAnImage {
                name: header.name.clone(),
                detail: error,
            });
        }
        if let Some(text) = info.stream {
            for line in text.lines().filter(|l| l.starts_with("Loaded image")) {
                loaded.push(line.trim().to_owned());
            }
        }
    }
    Ok(loaded)
}
