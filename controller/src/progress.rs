//! Progress of long operations as typed events. Library code reports to a
//! [`ProgressSink`]; the CLI draws a spinner or prints lines, `--json` prints
//! one object per line, a daemon logs them. Nothing here draws anything.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A named step of bootstrap or deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Resolve,
    SshConnect,
    Probe,
    UploadAgent,
    CheckIdentity,
    Enrol,
    StartAgent,
    AwaitAgent,
    AwaitAgentUpgrade,
    PbxLogin,
    ImToken,
    Preflight,
    Whitelist,
    HashImage,
    UploadImage,
    Apply,
    Register,
}

impl Phase {
    /// What an operator reads while the phase runs.
    pub fn text(self) -> &'static str {
        match self {
            Phase::Resolve => "resolving",
            Phase::SshConnect => "connecting over SSH to",
            Phase::Probe => "probing the host",
            Phase::UploadAgent => "uploading the agent",
            Phase::CheckIdentity => "checking the agent identity",
            Phase::Enrol => "enrolling the agent identity",
            Phase::StartAgent => "starting the agent",
            Phase::AwaitAgent => "waiting for the agent to answer over mTLS",
            Phase::AwaitAgentUpgrade => "waiting for the host to confirm the new agent",
            Phase::PbxLogin => "logging in to the PBX API",
            Phase::ImToken => "getting the IM token from the PBX",
            Phase::Preflight => "preflight",
            Phase::Whitelist => "whitelisting on the PBX",
            Phase::HashImage => "hashing",
            Phase::UploadImage => "uploading",
            Phase::Apply => "applying",
            Phase::Register => "registering the IM server on the PBX",
        }
    }
}

/// One progress event. `host` is the name the operator used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    PhaseStarted {
        host: String,
        phase: Phase,
        /// What the phase works on (a file, an address), or empty.
        detail: String,
    },
    PhaseFinished {
        host: String,
        phase: Phase,
        ok: bool,
        elapsed_ms: u64,
    },
    BytesSent {
        host: String,
        file: String,
        sent: u64,
        total: u64,
    },
    /// A container's state as the agent reports it while applying.
    Container {
        host: String,
        container: String,
        state: String,
    },
    /// Any other step the agent reports while applying.
    AgentStep {
        host: String,
        step: String,
        message: String,
    },
}

impl Progress {
    /// One line for a person.
    pub fn text(&self) -> String {
        match self {
            Progress::PhaseStarted { phase, detail, .. } if detail.is_empty() => {
                phase.text().to_owned()
            }
            Progress::PhaseStarted { phase, detail, .. } => format!("{} {detail}", phase.text()),
            Progress::PhaseFinished {
                phase,
                ok,
                elapsed_ms,
                ..
            } => format!(
                "{} {} in {:.1} s",
                phase.text(),
                if *ok { "done" } else { "failed" },
                *elapsed_ms as f64 / 1000.0
            ),
            Progress::BytesSent {
                file, sent, total, ..
            } if sent < total => {
                format!(
                    "uploading {file}: {}",
                    imfleet_proto::megabytes(*sent, *total)
                )
            }
            Progress::BytesSent { file, .. } => {
                format!("{file}: verifying and loading into the Docker Engine")
            }
            Progress::Container {
                container, state, ..
            } => format!("container {container}: {state}"),
            Progress::AgentStep { step, message, .. } => format!("{step}: {message}"),
        }
    }
}

/// Where progress goes.
pub trait ProgressSink: Send + Sync {
    fn emit(&self, event: Progress);
}

impl<F: Fn(Progress) + Send + Sync> ProgressSink for F {
    fn emit(&self, event: Progress) {
        self(event)
    }
}

/// Reports one host's progress.
#[derive(Clone)]
pub struct Reporter {
    sink: Arc<dyn ProgressSink>,
    host: String,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Reporter {
    pub fn new(sink: Arc<dyn ProgressSink>, host: impl Into<String>) -> Reporter {
        Reporter {
            sink,
            host: host.into(),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runs one named step, reporting its start and how it ended.
    pub async fn phase<T, E>(
        &self,
        phase: Phase,
        detail: impl Into<String>,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.sink.emit(Progress::PhaseStarted {
            host: self.host.clone(),
            phase,
            detail: detail.into(),
        });
        let started = Instant::now();
        let result = step.await;
        self.sink.emit(Progress::PhaseFinished {
            host: self.host.clone(),
            phase,
            ok: result.is_ok(),
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
        result
    }

    pub fn bytes(&self, file: &str, sent: u64, total: u64) {
        self.sink.emit(Progress::BytesSent {
            host: self.host.clone(),
            file: file.to_owned(),
            sent,
            total,
        });
    }

    /// An apply event from the agent: `container NAME` steps are container
    /// states, the rest pass through.
    pub fn agent_step(&self, step: &str, message: &str) {
        let event = match step.strip_prefix("container ") {
            Some(container) => Progress::Container {
                host: self.host.clone(),
                container: container.to_owned(),
                state: message.to_owned(),
            },
            None => Progress::AgentStep {
                host: self.host.clone(),
                step: step.to_owned(),
                message: message.to_owned(),
            },
        };
        self.sink.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn recorder() -> (Arc<Mutex<Vec<Progress>>>, Arc<dyn ProgressSink>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let seen = seen.clone();
            Arc::new(move |e: Progress| seen.lock().unwrap().push(e)) as Arc<dyn ProgressSink>
        };
        (seen, sink)
    }

    #[tokio::test]
    async fn a_phase_reports_its_start_and_how_it_ended() {
        let (seen, sink) = recorder();
        let r = Reporter::new(sink, "im1");
        let ok: Result<u8, ()> = r.phase(Phase::Preflight, "", async { Ok(1) }).await;
        assert_eq!(ok, Ok(1));
        let failed: Result<(), &str> = r
            .phase(Phase::UploadImage, "big.tar", async { Err("boom") })
            .await;
        assert!(failed.is_err());
        r.agent_step("container portsip.instantmessage", "ready");
        r.agent_step("gate", "waiting");
        let seen = seen.lock().unwrap();
        let shape: Vec<(&str, bool)> = seen
            .iter()
            .map(|e| match e {
                Progress::PhaseStarted { .. } => ("started", true),
                Progress::PhaseFinished { ok, .. } => ("finished", *ok),
                Progress::Container { .. } => ("container", true),
                Progress::AgentStep { .. } => ("agent", true),
                Progress::BytesSent { .. } => ("bytes", true),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("started", true),
                ("finished", true),
                ("started", true),
                ("finished", false),
                ("container", true),
                ("agent", true)
            ]
        );
        assert_eq!(seen[2].text(), "uploading big.tar");
        assert_eq!(seen[4].text(), "container portsip.instantmessage: ready");
    }

    #[test]
    fn events_serialise_as_one_tagged_object() {
        let e = Progress::BytesSent {
            host: "im1".into(),
            file: "big.tar".into(),
            sent: 400_000,
            total: 900_000,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"event": "bytes-sent", "host": "im1", "file": "big.tar", "sent": 400_000, "total": 900_000})
        );
        assert_eq!(e.text(), "uploading big.tar: 0.4 of 0.9 MB");
    }
}
