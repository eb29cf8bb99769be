//! `controller serve`: the daemon, with SIGTERM/SIGINT to stop and SIGHUP
//! to reload; and `controller events`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use imfleet_controller::serve::api::EventsWanted;
use imfleet_controller::serve::{self, ServeConfig, client};
use imfleet_controller::store::EventQuery;

use super::output;

#[derive(Args)]
pub struct ServeArgs {
    /// Seconds between the health samples each agent sends (1 to 3600).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Where Prometheus scrapes /metrics (also /healthz, /readyz).
    #[arg(long, default_value = serve::DEFAULT_METRICS_LISTEN, value_name = "ADDR:PORT")]
    metrics_listen: std::net::SocketAddr,
    /// Allow plain-HTTP metrics on an address other hosts can reach.
    #[arg(long)]
    metrics_insecure: bool,
    /// POST every event as JSON to this URL (retried; never blocks sampling).
    /// A URL given here is visible in the process list: prefer
    /// --webhook-file or the environment.
    #[arg(
        long,
        value_name = "URL",
        env = "IMFLEET_WEBHOOK",
        hide_env_values = true,
        conflicts_with = "webhook_file"
    )]
    webhook: Option<String>,
    /// Read the webhook URL (which often holds a token) from this file,
    /// readable by its owner only.
    #[arg(long, value_name = "FILE")]
    webhook_file: Option<std::path::PathBuf>,
    /// Serve the API to operators' CLIs on other nodes here, over TLS with
    /// operator certificates (`controller operators add`): the cluster's
    /// virtual IP and a port, e.g. 10.0.0.100:7444.
    #[arg(long, value_name = "ADDR:PORT")]
    api_listen: Option<std::net::SocketAddr>,
    /// Another name the API's certificate carries (a DNS name operators
    /// use); repeatable. The --api-listen address is always carried.
    #[arg(long = "api-name", value_name = "NAME", requires = "api_listen")]
    api_names: Vec<String>,
    /// How long health history is kept (one point per host and minute for a
    /// day, then one per ten minutes).
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    history: Duration,
}

pub async fn serve(dir: &Path, args: ServeArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let webhook = match &args.webhook_file {
        Some(path) => Some(read_webhook_file(path)?),
        None => {
            let from_env = std::env::var("IMFLEET_WEBHOOK").ok();
            if args.webhook.is_some() && args.webhook != from_env {
                eprintln!(
                    "warning: the webhook URL is on the command line, where every local user can read it; use --webhook-file or IMFLEET_WEBHOOK"
                );
            }
            args.webhook
        }
    };
    let config = ServeConfig {
        interval: args.interval,
        metrics_listen: args.metrics_listen,
        metrics_insecure: args.metrics_insecure,
        webhook,
        retention: args.history,
        api_listen: args.api_listen,
        api_names: args.api_names,
    };
    if config.metrics_insecure && !config.metrics_listen.ip().is_loopback() {
        eprintln!(
            "warning: /metrics is served over plain HTTP on {}",
            config.metrics_listen
        );
    }
    // One stream (one socket) per agent: a large fleet needs more than the
    // default 1024 descriptors.
    match raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = reload.try_send(());
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    serve::run(dir, config, reloads, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// The webhook URL from a file only its owner may read (it holds a token).
fn read_webhook_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the webhook file {}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "the webhook file {} can be read by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the webhook file {}", path.display()))?;
    let url = text.trim();
    if url.is_empty() || url.contains(char::is_whitespace) {
        anyhow::bail!(
            "the webhook file {} must hold one URL and nothing else",
            path.display()
        );
    }
    Ok(url.to_owned())
}

/// The soft descriptor limit raised as far as the hard one allows (65536 at most).
fn raise_open_files_limit() -> Result<u64, nix::errno::Errno> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = hard.min(65_536);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    Ok(want.max(soft))
}

#[derive(Args)]
pub struct EventsArgs {
    /// Only events of this host.
    #[arg(long)]
    host: Option<String>,
    /// Only events since then: a duration ago ("1h", "2days") or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// At most this many (the newest).
    #[arg(long, short = 'n', default_value_t = 100)]
    limit: usize,
    /// One JSON array of events.
    #[arg(long)]
    json: bool,
}

/// Unix seconds of `--since`: a duration before `now`, or an RFC 3339 time.
fn since(text: &str, now: i64) -> anyhow::Result<i64> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now - ago.as_secs().min(i64::MAX as u64) as i64);
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| {
            anyhow::anyhow!(
                "--since {text:?} is neither a duration (\"30m\", \"2h\", \"7days\") nor an RFC 3339 time (\"2026-12-01T08:00:00Z\")"
            )
        })
}

pub async fn events(
    dir: &Path,
    remote: Option<&client::Endpoint>,
    args: EventsArgs,
) -> anyhow::Result<ExitCode> {
    let since = args
        .since
        .as_deref()
        .map(|s| since(s, imfleet_controller::now_unix()))
        .transpose()?
        .unwrap_or(0);
    let events = match remote {
        Some(remote) => {
            let wanted = EventsWanted {
                host: args.host.clone(),
                since,
                limit: args.limit,
            };
            client::events(remote, &wanted).await?.unwrap_or_default()
        }
        None => {
            let fleet = super::open_fleet(dir).await?;
            let host = match &args.host {
                Some(h) => Some(fleet.host(h).await?.name),
                None => None,
            };
            let query = EventQuery {
                host,
                since,
                after_id: 0,
                limit: args.limit,
            };
            fleet.store().query_events(query).await?
        }
    };
    if args.json {
        output::print_json(&events)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&["TIME", "HOST", "EVENT", "DETAIL"]);
    for e in &events {
        table.add_row(vec![
            imfleet_controller::rfc3339(e.at),
            // Printable: the events may come from a daemon across the
            // network (`--daemon`).
            e.host
                .as_deref()
                .map_or_else(|| "-".into(), |h| output::shown(h, 256)),
            e.kind.to_string(),
            output::shown(&e.detail, 4096),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct HistoryArgs {
    /// Bootstrapped host.
    host: String,
    /// Since then: a duration ago ("1h", "2days") or an RFC 3339 time.
    #[arg(long, value_name = "WHEN", default_value = "1h")]
    since: String,
    /// One JSON array of points.
    #[arg(long)]
    json: bool,
}

/// The health history `controller serve` kept for one host.
pub async fn history(dir: &Path, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let since = since(&args.since, imfleet_controller::now_unix())?;
    let fleet = super::open_fleet(dir).await?;
    let host = fleet.host(&args.host).await?;
    let points = fleet.store().health_history(&host.name, since).await?;
    if args.json {
        output::print_json(&points)?;
        return Ok(ExitCode::SUCCESS);
    }
    let percent = |v: Option<f64>| {
        v.map(|v| format!("{:.0} %", v * 100.0))
            .unwrap_or("-".into())
    };
    let mut table = output::table(&[
        "TIME",
        "AGENT",
        "IM",
        "CPU",
        "MEM AVAIL",
        "DATA DISK",
        "LOAD1",
    ]);
    for p in &points {
        table.add_row(vec![
            imfleet_controller::rfc3339(p.at),
            if p.agent_up { "up" } else { "DOWN" }.into(),
            match p.im_healthy {
                Some(true) => "healthy",
                Some(false) => "UNHEALTHY",
                None => "-",
            }
            .into(),
            percent(p.cpu_busy),
            p.memory_available_bytes
                .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or("-".into()),
            percent(p.data_used),
            p.load1.map(|l| format!("{l:.2}")).unwrap_or("-".into()),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_webhook_file_must_be_private_and_hold_one_url() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("https://hooks.example/T0KEN\n", 0o600);
        assert_eq!(
            super::read_webhook_file(&path).unwrap(),
            "https://hooks.example/T0KEN"
        );
        write("https://hooks.example/T0KEN", 0o644);
        let err = super::read_webhook_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && !err.contains("T0KEN"), "{err}");
        write("a b", 0o600);
        assert!(super::read_webhook_file(&path).is_err());
        assert!(super::read_webhook_file(&dir.path().join("none")).is_err());
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(super::since("1h", 10_000).unwrap(), 6_400);
        assert_eq!(
            super::since("2026-12-01T00:00:00Z", 0).unwrap(),
            1_796_083_200
        );
        let err = super::since("yesterday", 0).unwrap_err().to_string();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
