//! Streaming a `docker save` archive to the agent, which loads it only if its
//! size and sha256 match what was announced.

use super::api::AgentApi;
use super::run::DeployError;
use crate::progress::{Phase, Reporter};

/// Bytes per streamed chunk (well under gRPC's 4 MiB message limit).
const CHUNK: usize = 1024 * 1024;

/// Hashes the archive, then streams it; the agent loads it only if size and
/// sha256 match.
pub(crate) async fn upload_image(
    agent: &impl AgentApi,
    path: &std::path::Path,
    progress: &Reporter,
) -> Result<(), DeployError> {
    use imfleet_proto::agent::v1::{ImageChunk, ImageUploadHeader};
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;

    let io_err = |source| DeployError::ImageFile {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (size, sha256) = progress
        .phase(Phase::HashImage, name.clone(), async {
            let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
            let size = file.metadata().await.map_err(io_err)?.len();
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf).await.map_err(io_err)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            Ok::<_, DeployError>((size, hex::encode(hasher.finalize())))
        })
        .await?;
    let header = ImageUploadHeader {
        name: name.clone(),
        size,
        sha256,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ImageChunk>(4);
    let bar = progress.clone();
    let shown = name.clone();
    let reader = tokio::spawn(async move {
        let mut header = Some(header);
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 && header.is_none() {
                return Ok::<_, std::io::Error>(());
            }
            sent += n as u64;
            bar.bytes(&shown, sent, size);
            let chunk = ImageChunk {
                header: header.take(),
                data: buf[..n].to_vec(),
            };
            if tx.send(chunk).await.is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let loaded = progress
        .phase(
            Phase::UploadImage,
            name,
            agent.load_image(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
    reader
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
        .map_err(io_err)?;
    let loaded = loaded?;
    tracing::info!(archive = %path.display(), loaded = ?loaded.loaded, "image archive loaded");
    Ok(())
}
