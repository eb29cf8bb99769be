//! Log lines of a deployment's containers, for the controller: only
//! containers labelled with the deployment asked for, with every secret the
//! deployment put into them redacted.

use std::collections::HashMap;

use bollard::Docker;
use futures::StreamExt;
use imfleet_proto::agent::v1::{LogLine, LogsRequest};
use tokio::sync::mpsc;

use super::record::{DeploymentRecord, SecretSlot};
use super::validate::valid_name;
use super::{DeployError, PREVIOUS_SUFFIX, docker, secrets};

/// Most lines a request may ask for from the past.
const MAX_TAIL: u32 = 10_000;

pub type LogReceiver = mpsc::Receiver<Result<LogLine, tonic::Status>>;

/// Starts streaming the logs `request` asks for (its deployment name
/// already checked).
pub async fn stream(
    engine: &Docker,
    record: Option<DeploymentRecord>,
    request: &LogsRequest,
) -> Result<LogReceiver, DeployError> {
    if !request.container.is_empty() && !valid_name(&request.container) {
        return Err(DeployError::Invalid(
            "container names are letters, digits, `_`, `.` and `-`".into(),
        ));
    }
    let managed: Vec<String> = docker::managed(engine, &request.deployment)
        .await?
        .into_iter()
        .map(|m| m.name)
        .filter(|n| !n.ends_with(PREVIOUS_SUFFIX))
        .collect();
    let names = if request.container.is_empty() {
        managed
    } else if managed.contains(&request.container) {
        vec![request.container.clone()]
    } else {
        return Err(DeployError::Invalid(format!(
            "`{}` is not a container of deployment `{}`",
            request.container, request.deployment
        )));
    };
    let record = record.unwrap_or_default();
    let tail = match request.tail {
        0 => 100,
        n => n.min(MAX_TAIL),
    };
    let (tx, rx) = mpsc::channel(256);
    for name in names {
        let known = known_secrets(engine, &name, &record).await;
        let tx = tx.clone();
        let engine = engine.clone();
        let options = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            follow: request.follow,
            tail: tail.to_string(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let mut stream = engine.logs(&name, Some(options));
            while let Some(item) = stream.next().await {
                let (text, stderr) = match item {
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        (String::from_utf8_lossy(&message).into_owned(), true)
                    }
                    Ok(other) => (other.to_string(), false),
                    Err(e) => {
                        let _ = tx
                            .send(Err(tonic::Status::unavailable(e.to_string())))
                            .await;
                        break;
                    }
                };
                let line = LogLine {
                    container: name.clone(),
                    line: secrets::redact(text.trim_end(), &known),
                    stderr,
                };
                if tx.send(Ok(line)).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

/// The secret values in a container's configuration, located through the
/// deployment's record of where it put them.
async fn known_secrets(
    engine: &Docker,
    container: &str,
    record: &DeploymentRecord,
) -> HashMap<String, String> {
    let Some(slots) = record.secret_slots.get(container) else {
        return HashMap::new();
    };
    let Ok(inspected) = engine.inspect_container(container, None).await else {
        return HashMap::new();
    };
    let config = inspected.config.unwrap_or_default();
    let env: HashMap<String, String> = config
        .env
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let command = config.cmd.unwrap_or_default();
    let entrypoint = config.entrypoint.unwrap_or_default();
    let mut values = Vec::new();
    for slot in slots {
        let (template, actual) = match slot {
            SecretSlot::Env { key, template } => (template, env.get(key)),
            SecretSlot::Command { index, template } => (template, command.get(*index)),
            SecretSlot::Entrypoint { index, template } => (template, entrypoint.get(*index)),
        };
        if let Some(actual) = actual {
            values.extend(secrets::extract(template, actual));
        }
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i.to_string(), v))
        .collect()
}
