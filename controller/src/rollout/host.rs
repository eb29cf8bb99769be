//! One host's part of a rollout: stage, swap and verify, roll back, or look
//! at it after the controller lost track. Every operation records the phase
//! it enters before acting and ends in a recorded phase of its own, so the
//! driver never has to guess from a task's return value.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imfleet_proto::agent::v1::DeploymentStatus;

use super::decide::{Observed, Runs, reconcile};
use super::{EventSink, RolloutError, RolloutEvent, RolloutParams};
use crate::agent_client::Agent;
use crate::deployment::portsip::{self, DEPLOYMENT_NAME, PortsipParams};
use crate::deployment::run::install;
use crate::deployment::upload::upload_image;
use crate::deployment::{DeployError, DeployRequest, ImToken, TokenSource};
use crate::pbx::PbxClient;
use crate::preflight::{PreflightParams, sizing};
use crate::progress::{Progress, ProgressSink, Reporter};
use crate::store::{DeploymentRecord, HostRecord, Outcome, StepPhase, Store};

/// How often a host being verified is asked how it is.
const VERIFY_EVERY: Duration = Duration::from_secs(1);

/// What a host ran before the rollout and what it is to run.
#[derive(Debug, Clone)]
pub struct HostTarget {
    pub host: String,
    pub from_revision: Option<i64>,
    pub from: DeploymentRecord,
    pub to: DeploymentRecord,
}

impl HostTarget {
    /// A new rollout starts from the host's current deployment; a resumed
    /// one from the revision its step recorded.
    pub async fn load(
        store: &Store,
        host: &HostRecord,
        from_revision: Option<i64>,
        image: Option<&str>,
        db_image: Option<&str>,
    ) -> Result<HostTarget, RolloutError> {
        let not_deployed = || RolloutError::NotDeployed(host.name.clone());
        let (from_revision, from) = match from_revision {
            Some(id) => (
                Some(id),
                store.revision(id).await?.ok_or_else(not_deployed)?,
            ),
            None => (
                store.last_good_revision(&host.name).await?,
                store
                    .deployment(&host.name)
                    .await?
                    .ok_or_else(not_deployed)?,
            ),
        };
        let mut to = from.clone();
        if let Some(image) = image {
            to.image = image.to_owned();
        }
        if let Some(db_image) = db_image {
            to.db_image = db_image.to_owned();
        }
        Ok(HostTarget {
            host: host.name.clone(),
            from_revision,
            from,
            to,
        })
    }
}

/// The deploy request that installs `record` on `host` (the token is given
/// to `install` apart; the one here is never read).
pub fn deploy_request(
    host: &str,
    record: &DeploymentRecord,
    stop_grace_seconds: u32,
    health_timeout: Duration,
) -> Result<DeployRequest, RolloutError> {
    let ip = |text: &str, what: &str| {
        text.parse().map_err(|_| {
            RolloutError::Usage(format!(
                "the recorded {what} of {host} ({text}) is not an IP address; redeploy the host"
            ))
        })
    };
    let private_ip = ip(&record.private_ip, "private address")?;
    let public_ip = ip(&record.public_ip, "public address")?;
    let sizing = sizing::profile(record.users).ok_or_else(|| {
        RolloutError::Usage(format!(
            "{host} was deployed for {} users, which is no known sizing; redeploy it with --users",
            record.users
        ))
    })?;
    Ok(DeployRequest {
        host: host.to_owned(),
        params: PortsipParams {
            private_ip,
            public_ip,
            pbx: ip(&record.pbx, "PBX address")?,
            data_path: record.data_path.clone(),
            storage_dir: record.storage_dir.clone(),
            image: record.image.clone(),
            db_image: record.db_image.clone(),
            stop_grace_seconds,
        },
        preflight: PreflightParams {
            private_ip,
            public_ip,
            storage_dir: record.storage_dir.clone(),
            data_path: record.data_path.clone(),
            sizing,
            redeploy: true,
        },
        token: TokenSource::FromPbx,
        pbx: None,
        force: true,
        health_timeout,
        image_files: Vec::new(),
    })
}

/// What every host task shares.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub rollout: i64,
    pub params: &'a RolloutParams,
    pub pbx: Option<&'a PbxClient>,
    pub events: &'a EventSink,
    /// Every host's phase as last recorded, for the overall count.
    pub phases: Arc<Mutex<Vec<(String, StepPhase)>>>,
}

impl Ctx<'_> {
    /// Records `phase` (before its side effect), then reports it.
    pub async fn set(
        &self,
        host: &str,
        phase: StepPhase,
        detail: &str,
    ) -> Result<(), RolloutError> {
        self.store
            .set_step(self.rollout, host, phase, None, detail)
            .await?;
        let (ended, total) = {
            let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = phases.iter_mut().find(|(h, _)| h == host) {
                entry.1 = phase;
            }
            let ended = phases.iter().filter(|(_, p)| p.has_ended()).count();
            (ended, phases.len())
        };
        (self.events)(RolloutEvent::Step {
            rollout: self.rollout,
            host: host.to_owned(),
            phase,
            detail: detail.to_owned(),
            ended,
            total,
        });
        Ok(())
    }

    fn reporter(&self, host: &str) -> Reporter {
        let events = self.events.clone();
        let sink: Arc<dyn ProgressSink> =
            Arc::new(move |progress: Progress| events(RolloutEvent::Host { progress }));
        Reporter::new(sink, host)
    }

    /// The configuration hash `record` installed with `token` has.
    pub fn hash_of(
        &self,
        host: &str,
        record: &DeploymentRecord,
        token: &ImToken,
    ) -> Result<String, RolloutError> {
        let request = self.request(host, record)?;
        Ok(portsip::portsip_spec(&request.params, &token.fingerprint()).config_hash)
    }

    fn request(
        &self,
        host: &str,
        record: &DeploymentRecord,
    ) -> Result<DeployRequest, RolloutError> {
        deploy_request(
            host,
            record,
            self.params.stop_grace_seconds,
            self.params.timing.healthy_deadline,
        )
    }
}

/// One host and its agent.
pub struct HostTask<'a> {
    pub ctx: &'a Ctx<'a>,
    pub target: &'a HostTarget,
    pub agent: Agent,
}

fn describe(status: &DeploymentStatus) -> String {
    let bad: Vec<String> = status
        .containers
        .iter()
        .filter(|c| c.state != "running" || !(c.health.is_empty() || c.health == "healthy"))
        .map(|c| format!("{} {} {}", c.name, c.state, c.health))
        .collect();
    if bad.is_empty() {
        "not every container is healthy".into()
    } else {
        bad.join(", ")
    }
}

impl HostTask<'_> {
    fn host(&self) -> &str {
        &self.target.host
    }

    fn config_hash(
        &self,
        record: &DeploymentRecord,
        token: &ImToken,
    ) -> Result<String, RolloutError> {
        self.ctx.hash_of(self.host(), record, token)
    }

    /// Streams the archives to the host; it keeps serving meanwhile.
    pub async fn stage(&self) -> Result<(), RolloutError> {
        let files = &self.ctx.params.image_files;
        self.ctx
            .set(
                self.host(),
                StepPhase::Staging,
                &format!("{} archive(s)", files.len()),
            )
            .await?;
        let reporter = self.ctx.reporter(self.host());
        let failed = |e: DeployError| RolloutError::Deploy(self.host().to_owned(), Box::new(e));
        for path in files {
            upload_image(&self.agent, path, &reporter)
                .await
                .map_err(failed)?;
        }
        // Every image the new version runs is on the host now (pulled if
        // need be), or the rollout stops before any host is touched.
        let images = vec![
            self.target.to.image.clone(),
            self.target.to.db_image.clone(),
        ];
        let prepared = self
            .agent
            .prepare_images(images)
            .await
            .map_err(|e| failed(e.into()))?;
        let detail = prepared
            .images
            .iter()
            .map(|i| {
                let short = i.id.trim_start_matches("sha256:");
                format!(
                    "{} {}{}",
                    i.reference,
                    &short[..short.len().min(12)],
                    if i.pulled { " (pulled)" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        self.ctx.set(self.host(), StepPhase::Staged, &detail).await
    }

    async fn install(&self, record: &DeploymentRecord, token: &ImToken) -> Result<(), DeployError> {
        let request = self.ctx.request(self.host(), record).map_err(|e| {
            DeployError::Agent(crate::agent_client::AgentError::Rejected {
                address: self.host().to_owned(),
                message: e.to_string(),
            })
        })?;
        install(
            self.ctx.store,
            &self.agent,
            &request,
            token,
            self.ctx.pbx,
            &[],
            &self.ctx.reporter(self.host()),
        )
        .await
        .map(|_| ())
    }

    /// Swaps to the new version and verifies it; on failure restores the
    /// previous one (or leaves it, with `--no-auto-rollback`).
    pub async fn upgrade(&self, token: &ImToken) -> Result<(), RolloutError> {
        let t = self.target;
        let detail = if t.from.image == t.to.image && t.from.db_image == t.to.db_image {
            format!("{} again with the new token", t.to.image)
        } else {
            format!("{} -> {}", t.from.image, t.to.image)
        };
        self.ctx
            .set(self.host(), StepPhase::Swapping, &detail)
            .await?;
        let timing = self.ctx.params.timing;
        let give_up = Instant::now() + timing.progress_deadline;
        let installed =
            tokio::time::timeout(timing.progress_deadline, self.install(&t.to, token)).await;
        match installed {
            Err(_) => {
                let reason = format!(
                    "no outcome within --progress-deadline {}",
                    humantime::format_duration(timing.progress_deadline)
                );
                self.failed(token, &reason).await
            }
            Ok(Ok(())) => {
                self.ctx
                    .set(
                        self.host(),
                        StepPhase::Verifying,
                        "healthy; checking it stays so",
                    )
                    .await?;
                self.verify_until(token, give_up).await
            }
            Ok(Err(DeployError::Apply {
                error,
                rolled_back: true,
                ..
            })) => {
                // The agent restarted the previous containers itself, with
                // the token they had; the rollout's token replaces it (the
                // old one was revoked when it was made).
                let reason = format!("the new version failed: {error}");
                let restored = self.config_hash(&t.from, token)?;
                match self.agent.status(DEPLOYMENT_NAME).await {
                    Ok(s) if s.healthy && s.config_hash == restored => {
                        let detail = format!("{reason}; the previous containers run healthy again");
                        self.ctx
                            .set(self.host(), StepPhase::RolledBack, &detail)
                            .await
                    }
                    _ => self.failed(token, &reason).await,
                }
            }
            Ok(Err(e)) => self.failed(token, &crate::error_chain(&e)).await,
        }
    }

    /// Verifies a host found running the new version after a restart.
    pub async fn verify(&self, token: &ImToken) -> Result<(), RolloutError> {
        let give_up = Instant::now() + self.ctx.params.timing.progress_deadline;
        self.verify_until(token, give_up).await
    }

    /// From now, the host must be healthy without a break for the minimum
    /// time within the healthy deadline (and before `give_up`).
    async fn verify_until(&self, token: &ImToken, give_up: Instant) -> Result<(), RolloutError> {
        let timing = self.ctx.params.timing;
        let want = self.config_hash(&self.target.to, token)?;
        let deadline = (Instant::now() + timing.healthy_deadline).min(give_up);
        let mut healthy_since: Option<Instant> = None;
        let mut problem = String::from("no answer yet");
        loop {
            let now = Instant::now();
            match self.agent.status(DEPLOYMENT_NAME).await {
                Ok(s) if s.applying => {
                    healthy_since = None;
                    problem = "a change is still under way on the host".into();
                }
                Ok(s) if s.healthy && s.config_hash == want => {
                    let since = *healthy_since.get_or_insert(now);
                    let healthy = now - since;
                    (self.ctx.events)(RolloutEvent::Healthy {
                        host: self.host().to_owned(),
                        healthy_ms: healthy.as_millis() as u64,
                        needed_ms: timing.min_healthy.as_millis() as u64,
                    });
                    if healthy >= timing.min_healthy {
                        let detail = format!(
                            "healthy for {}",
                            humantime::format_duration(Duration::from_secs(healthy.as_secs()))
                        );
                        return self.ctx.set(self.host(), StepPhase::Done, &detail).await;
                    }
                }
                Ok(s) if s.config_hash != want => {
                    healthy_since = None;
                    problem = "it no longer runs the new configuration".into();
                }
                Ok(s) => {
                    healthy_since = None;
                    problem = describe(&s);
                }
                Err(e) => {
                    healthy_since = None;
                    problem = e.to_string();
                }
            }
            if now >= deadline {
                let reason = format!(
                    "not healthy for {} in a row within {}: {problem}",
                    humantime::format_duration(timing.min_healthy),
                    humantime::format_duration(timing.healthy_deadline)
                );
                return self.failed(token, &reason).await;
            }
            tokio::time::sleep(VERIFY_EVERY.min(deadline - now)).await;
        }
    }

    async fn failed(&self, token: &ImToken, reason: &str) -> Result<(), RolloutError> {
        if self.ctx.params.limits.auto_rollback {
            self.roll_back(token, reason).await
        } else {
            self.ctx
                .set(
                    self.host(),
                    StepPhase::Failed,
                    &format!("{reason}; left as it is (--no-auto-rollback)"),
                )
                .await
        }
    }

    /// Restores what ran before, with the rollout's token, and confirms it
    /// healthy (the apply succeeds only healthy).
    pub async fn roll_back(&self, token: &ImToken, reason: &str) -> Result<(), RolloutError> {
        self.ctx
            .set(self.host(), StepPhase::RollingBack, reason)
            .await?;
        match self.install(&self.target.from, token).await {
            Ok(()) => {
                let detail = format!("{reason}; {} restored and healthy", self.target.from.image);
                self.ctx
                    .set(self.host(), StepPhase::RolledBack, &detail)
                    .await
            }
            Err(e) => {
                let detail = format!(
                    "{reason}; the rollback failed too: {}",
                    crate::error_chain(&e)
                );
                self.ctx.set(self.host(), StepPhase::Failed, &detail).await
            }
        }
    }

    /// Records that the host runs `record`'s version healthy, as found after
    /// the controller lost track mid-apply (the apply finished on the host,
    /// its record was never written), unless the record says so already.
    async fn adopt(
        &self,
        record: &DeploymentRecord,
        status: &DeploymentStatus,
    ) -> Result<(), RolloutError> {
        let store = self.ctx.store;
        let current = store.deployment(self.host()).await?;
        if current.is_some_and(|c| c.config_hash == status.config_hash) {
            return Ok(());
        }
        let mut found = record.clone();
        found.config_hash = status.config_hash.clone();
        crate::deployment::run::stamp_running(&mut found, status);
        store
            .record_apply(
                &found,
                Outcome::Applied,
                "found running healthy after the controller lost track of the apply",
            )
            .await?;
        Ok(())
    }

    /// Looks at a host the controller lost mid-swap and records what it is.
    /// An apply the agent was still doing finishes (or is undone) within its
    /// health timeout, so the host is given that long to settle on either
    /// version before it is judged.
    pub async fn observe(&self, token: &ImToken, aborting: bool) -> Result<(), RolloutError> {
        let target = self.config_hash(&self.target.to, token)?;
        let restored = self.config_hash(&self.target.from, token)?;
        let deadline = Instant::now() + self.ctx.params.timing.healthy_deadline;
        let mut last: Option<DeploymentStatus>;
        let observed = loop {
            let status = self.agent.status(DEPLOYMENT_NAME).await;
            let observed = match &status {
                // An apply the controller lost is still running: wait for it.
                Ok(s) if s.applying => Observed {
                    runs: Runs::Other,
                    healthy: false,
                },
                Ok(s) => Observed {
                    runs: if s.config_hash == target {
                        Runs::Target
                    } else if s.config_hash == restored
                        || s.config_hash == self.target.from.config_hash
                    {
                        Runs::Previous
                    } else {
                        Runs::Other
                    },
                    healthy: s.healthy,
                },
                Err(_) => Observed {
                    runs: Runs::Other,
                    healthy: false,
                },
            };
            last = status.ok();
            let settled = observed.healthy && observed.runs != Runs::Other;
            if settled || Instant::now() >= deadline {
                break observed;
            }
            tokio::time::sleep(VERIFY_EVERY).await;
        };
        if let Some(status) = last.filter(|_| observed.healthy) {
            match observed.runs {
                Runs::Target => {
                    self.adopt(&self.target.to, &status).await?;
                    // The lost apply may have ended before the PBX was told.
                    if let Some(pbx) = self.ctx.pbx {
                        let request = self.ctx.request(self.host(), &self.target.to)?;
                        crate::deployment::run::register(pbx, &request)
                            .await
                            .map_err(|e| {
                                RolloutError::Deploy(self.host().to_owned(), Box::new(e))
                            })?;
                    }
                }
                Runs::Previous => self.adopt(&self.target.from, &status).await?,
                Runs::Other => {}
            }
        }
        let phase = reconcile(observed, self.ctx.params.limits.auto_rollback, aborting);
        let detail = format!(
            "found running {} ({})",
            match observed.runs {
                Runs::Target => "the new version",
                Runs::Previous => "the previous version",
                Runs::Other => "neither version",
            },
            if observed.healthy {
                "healthy"
            } else {
                "not healthy"
            }
        );
        self.ctx.set(self.host(), phase, &detail).await
    }
}
