//! The health stream: what `WatchHealth` reports, sampled cheaply. One
//! long-lived sysinfo `System` for memory and the agent's own process, the
//! kernel's counter files read once each (`procfs`), container state from
//! the Engine's event stream (`containers`), the deployment's own gate
//! probed (`service`). No process is spawned per sample.

pub mod containers;
pub mod procfs;
pub mod service;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::{
    AgentMetrics, FilesystemUsage, HealthSample, HostMetrics, WatchHealthRequest,
};
use tokio::sync::{Semaphore, mpsc};

use crate::deploy::record::Records;
use crate::facts::storage;
use crate::policy::Roots;

pub use imfleet_proto::model::health::{DEFAULT_INTERVAL, MAX_INTERVAL, MIN_INTERVAL};
/// Health streams served at once (the daemon needs one, a `watch` another).
pub const MAX_STREAMS: usize = 16;
/// A sample is given to every stream that asks within this time.
const SHARE_FOR: Duration = Duration::from_millis(900);
/// The most one sample may take: the stats GET (3 s), the port probes
/// (2 s, at once) and the Engine's answers. A sample that takes longer is
/// replaced by a note saying so, and the stream goes on.
pub const SAMPLE_DEADLINE: Duration = Duration::from_secs(8);

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The sampling interval a request asks for: 0 is the default; below the
/// minimum or above an hour is refused.
pub fn interval(ms: u32) -> Result<Duration, String> {
    if ms == 0 {
        return Ok(DEFAULT_INTERVAL);
    }
    let asked = Duration::from_millis(u64::from(ms));
    if asked < MIN_INTERVAL || asked > MAX_INTERVAL {
        return Err(format!(
            "interval {ms} ms is out of range: at least {} ms, at most {} ms",
            MIN_INTERVAL.as_millis(),
            MAX_INTERVAL.as_millis()
        ));
    }
    Ok(asked)
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Invalid(String),
    #[error("{MAX_STREAMS} health streams are open already; close one first")]
    Busy,
}

/// Samples the host for every health stream of the agent.
#[derive(Debug)]
pub struct Monitor {
    system: Mutex<sysinfo::System>,
    containers: containers::ContainerCache,
    records: Records,
    roots: Option<Roots>,
    /// Shared with the serving credentials: a renewal moves it.
    certificate_not_after: Arc<std::sync::atomic::AtomicI64>,
    started: Instant,
    streams: Arc<Semaphore>,
    /// The last sample per deployment, shared by streams (the lock also
    /// makes streams wait for a sample already being taken).
    recent: tokio::sync::Mutex<HashMap<String, (Instant, HealthSample)>>,
    /// A host reading is under way (on a blocking thread).
    local_busy: AtomicBool,
    /// Turns true when the agent stops: every stream ends (a graceful
    /// shutdown would otherwise wait for streams that never end).
    closing: tokio::sync::watch::Sender<bool>,
}

impl Monitor {
    pub fn new(
        docker: bollard::Docker,
        records: Records,
        roots: Option<Roots>,
        certificate_not_after: Arc<std::sync::atomic::AtomicI64>,
    ) -> Result<Monitor, sysinfo::Error> {
        Ok(Monitor {
            system: Mutex::new(sysinfo::System::new()?),
            containers: containers::ContainerCache::new(docker),
            records,
            roots,
            certificate_not_after,
            started: Instant::now(),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            recent: Default::default(),
            local_busy: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Samples at once, then once per interval, until the receiver is dropped.
    pub fn watch(
        self: &Arc<Self>,
        request: &WatchHealthRequest,
    ) -> Result<mpsc::Receiver<HealthSample>, WatchError> {
        let every = interval(request.interval_ms).map_err(WatchError::Invalid)?;
        if !crate::deploy::validate::valid_name(&request.deployment) {
            return Err(WatchError::Invalid(format!(
                "`{}` is not a deployment name",
                request.deployment.escape_debug()
            )));
        }
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchError::Busy)?;
        let (tx, rx) = mpsc::channel(2);
        let monitor = self.clone();
        let deployment = request.deployment.clone();
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let mut ticker = tokio::time::interval(every);
            // A slow reader gets fewer samples, never a burst of stale ones.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for sequence in 0u64.. {
                // A caller gone or the agent stopping ends the stream at
                // once, even in the middle of a sample.
                let step = async {
                    ticker.tick().await;
                    let sample = monitor.sample(&deployment, sequence).await;
                    tx.send(sample).await.is_ok()
                };
                let sent = tokio::select! {
                    sent = step => sent,
                    _ = tx.closed() => false,
                    _ = closing.wait_for(|c| *c) => false,
                };
                if !sent {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// Ends every stream (the agent is stopping).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// One sample for a stream: taken fresh, or the one another stream took
    /// less than a second ago (so many streams cost no more probes).
    pub async fn sample(self: &Arc<Self>, deployment: &str, sequence: u64) -> HealthSample {
        let mut recent = self.recent.lock().await;
        let fresh = recent
            .get(deployment)
            .filter(|(at, _)| at.elapsed() < SHARE_FOR)
            .map(|(_, sample)| sample.clone());
        let mut sample = match fresh {
            Some(sample) => sample,
            None => {
                let taken = match tokio::time::timeout(SAMPLE_DEADLINE, self.take(deployment)).await
                {
                    Ok(sample) => sample,
                    Err(_) => HealthSample {
                        collected_at_ms: now_ms(),
                        notes: vec![format!(
                            "sampling took longer than {} s (a hung Docker Engine or filesystem?)",
                            SAMPLE_DEADLINE.as_secs()
                        )],
                        ..Default::default()
                    },
                };
                recent.insert(deployment.to_owned(), (Instant::now(), taken.clone()));
                taken
            }
        };
        sample.sequence = sequence;
        sample
    }

    /// One sample of host, containers, service and agent.
    async fn take(self: &Arc<Self>, deployment: &str) -> HealthSample {
        let mut notes = Vec::new();
        // A reading stuck on a hung filesystem is not joined by another one
        // (each would hold a blocking thread for good).
        let local = (!self.local_busy.swap(true, Ordering::AcqRel)).then(|| {
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                let reading = me.sample_local();
                me.local_busy.store(false, Ordering::Release);
                reading
            })
        });
        let containers = match self.containers.of(deployment).await {
            Ok(c) => c,
            Err(e) => {
                notes.push(format!("Docker Engine: {e}"));
                Vec::new()
            }
        };
        let gate = match self.records.load(deployment) {
            Ok(record) => record.and_then(|r| r.gate),
            Err(e) => {
                notes.push(e.to_string());
                None
            }
        };
        let service = service::probe(gate.as_ref()).await;
        let failed = |why: String| (HostMetrics::default(), AgentMetrics::default(), vec![why]);
        let (host, agent, local_notes) = match local {
            Some(reading) => reading
                .await
                .unwrap_or_else(|e| failed(format!("host sampling failed: {e}"))),
            None => failed(
                "host figures: the previous reading has not finished (a hung filesystem?)".into(),
            ),
        };
        notes.extend(local_notes);
        HealthSample {
            sequence: 0,
            collected_at_ms: now_ms(),
            host: Some(host),
            deployment_healthy: crate::deploy::all_healthy(&containers),
            containers,
            service: Some(service),
            agent: Some(agent),
            notes,
        }
    }

    /// What is read from the kernel and sysinfo (may block on a hung
    /// filesystem: run off the async threads).
    fn sample_local(&self) -> (HostMetrics, AgentMetrics, Vec<String>) {
        let mut notes = Vec::new();
        let mut read = |path: &str| {
            std::fs::read_to_string(path).unwrap_or_else(|e| {
                notes.push(format!("{path}: {e}"));
                String::new()
            })
        };
        let cpus = procfs::parse_stat(&read("/proc/stat"));
        let networks = procfs::parse_net_dev(&read("/proc/net/dev"));
        let disks = procfs::parse_diskstats(&read("/proc/diskstats"));
        let mounts = storage::parse_mounts(&read("/proc/self/mounts"));
        let mut filesystems = Vec::new();
        if let Some(roots) = &self.roots {
            let roles = std::iter::once(("data", roots.data_path.as_path()))
                .chain(roots.storage_dir.as_deref().map(|p| ("storage", p)));
            for (role, path) in roles {
                match filesystem(role, path, &mounts) {
                    Ok(fs) => filesystems.push(fs),
                    Err(e) => notes.push(format!("{}: {e}", path.display())),
                }
            }
        }
        let (load1, load5, load15) = match sysinfo::System::load_average() {
            Ok(l) => (l.one, l.five, l.fifteen),
            Err(e) => {
                notes.push(format!("load average: {e}"));
                (0.0, 0.0, 0.0)
            }
        };
        let mut system = self.system.lock().unwrap_or_else(|p| p.into_inner());
        system.refresh_memory();
        let pid = sysinfo::Pid::from_u32(std::process::id());
        system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            false,
            sysinfo::ProcessRefreshKind::nothing()
                .with_memory()
                .with_cpu(),
        );
        let me = system.process(pid);
        let host = HostMetrics {
            cpus,
            memory_total_bytes: system.total_memory(),
            memory_available_bytes: system.available_memory(),
            swap_total_bytes: system.total_swap(),
            swap_free_bytes: system.free_swap(),
            load1,
            load5,
            load15,
            filesystems,
            networks,
            disks,
        };
        let agent = AgentMetrics {
            resident_memory_bytes: me.map(|p| p.memory()).unwrap_or_default(),
            cpu_seconds: me
                .map(|p| p.accumulated_cpu_time() as f64 / 1000.0)
                .unwrap_or_default(),
            certificate_not_after: self
                .certificate_not_after
                .load(std::sync::atomic::Ordering::Relaxed),
            uptime_seconds: self.started.elapsed().as_secs(),
            version: crate::version().to_owned(),
        };
        (host, agent, notes)
    }
}

fn filesystem(
    role: &str,
    path: &Path,
    mounts: &[storage::Mount],
) -> Result<FilesystemUsage, nix::Error> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    let unit = stat.fragment_size();
    let mount = storage::mount_for(path, mounts);
    Ok(FilesystemUsage {
        role: role.to_owned(),
        path: path.display().to_string(),
        mount_point: mount.map(|m| m.mount_point.clone()).unwrap_or_default(),
        device: mount.map(|m| m.device.clone()).unwrap_or_default(),
        fs_type: mount.map(|m| m.fs_type.clone()).unwrap_or_default(),
        size_bytes: stat.blocks() * unit,
        available_bytes: stat.blocks_available() * unit,
        free_bytes: stat.blocks_free() * unit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_default_and_bounds() {
        assert_eq!(interval(0), Ok(DEFAULT_INTERVAL));
        assert_eq!(interval(1000), Ok(Duration::from_secs(1)));
        assert_eq!(interval(2500), Ok(Duration::from_millis(2500)));
        assert!(interval(999).unwrap_err().contains("at least 1000 ms"));
        assert!(interval(3_600_001).is_err());
    }
}
