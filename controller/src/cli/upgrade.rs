//! `controller upgrade` (start, `--resume`, `--abort`, `--dry-run`) and
//! `controller rollouts`: parsing and presentation of `rollout`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use imfleet_controller::deployment::TokenSource;
use imfleet_controller::rollout::credentials::Stored;
use imfleet_controller::rollout::{
    self, Credentials, EventSink, Limits, RolloutEvent, RolloutPlan, Timing, UpgradeRequest,
};
use imfleet_controller::serve::api::{Driving, Submission, Upgrade};
use imfleet_controller::serve::client::{self, Endpoint};
use imfleet_controller::store::{Rollout, RolloutState};

use super::deploy::{PbxArgs, given_token};
use super::output;

#[derive(Args)]
pub struct UpgradeArgs {
    /// Hosts to upgrade, in this order.
    #[arg(required_unless_present_any = ["all", "resume", "abort", "follow"])]
    hosts: Vec<String>,
    /// Every host with a deployment.
    #[arg(long, conflicts_with = "hosts")]
    all: bool,
    /// New IM server image. Default: the one --image-file names.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// `docker save` archive staged on every host before any swap (repeatable).
    #[arg(long, value_name = "FILE")]
    image_file: Vec<PathBuf>,
    /// New database image. Default: keep each host's.
    #[arg(long, value_name = "REF")]
    db_image: Option<String>,
    /// Hosts out of service at once, rollbacks included.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_parallel: u32,
    /// Hosts upgraded first, alone; the rest waits until they are done.
    #[arg(long, default_value_t = 0, value_name = "N")]
    canary: u32,
    /// A host must stay healthy this long on the new version.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    min_healthy_time: Duration,
    /// From its swap, a host has this long to be healthy for --min-healthy-time.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    healthy_deadline: Duration,
    /// From its swap, a host has this long to be done or restored.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    progress_deadline: Duration,
    /// Failed hosts tolerated before the rollout stops.
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_failures: u32,
    /// Leave a failed host as it is instead of restoring the previous version.
    #[arg(long)]
    no_auto_rollback: bool,
    /// Check every host and print the plan; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Go on with the active rollout where it stopped.
    /// The recorded parameters are used; none may be given again.
    #[arg(long, conflicts_with_all = ["hosts", "all", "abort", "dry_run", "image", "image_file", "db_image",
        "max_parallel", "canary", "min_healthy_time", "healthy_deadline", "progress_deadline", "max_failures", "no_auto_rollback", "force", "stop_grace"])]
    resume: bool,
    /// Show the rollout `controller serve` drives (Ctrl-C leaves it running).
    #[arg(long, conflicts_with_all = ["hosts", "all", "resume", "abort", "dry_run", "image", "image_file", "db_image",
        "max_parallel", "canary", "min_healthy_time", "healthy_deadline", "progress_deadline", "max_failures", "no_auto_rollback", "force", "stop_grace", "token_file"])]
    follow: bool,
    /// Roll back every host the active rollout changed.
    #[arg(long, conflicts_with_all = ["hosts", "all", "dry_run", "image", "image_file", "db_image",
        "max_parallel", "canary", "min_healthy_time", "healthy_deadline", "progress_deadline", "max_failures", "no_auto_rollback", "force", "stop_grace"])]
    abort: bool,
    /// File holding the NEW IM token (`-` for stdin). Default:
    /// IMFLEET_IM_TOKEN, else generated through --pbx-api. --resume and
    /// --abort use what the rollout kept unless given. Never give it as an
    /// argument.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    pbx_api: PbxArgs,
    /// Upgrade despite failed preflight checks.
    #[arg(long)]
    force: bool,
    /// Seconds containers get to stop gracefully.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    stop_grace: u32,
    /// One JSON object per event on stdout, the rollout last.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RolloutsArgs {
    /// How many of the newest rollouts.
    #[arg(long, default_value_t = 10)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

pub async fn upgrade(
    dir: &Path,
    remote: Option<&Endpoint>,
    args: UpgradeArgs,
) -> anyhow::Result<ExitCode> {
    let endpoint = remote.cloned().unwrap_or_else(|| Endpoint::local(dir));
    if args.follow {
        return match remote {
            Some(remote) => follow_remote(remote, args.json).await,
            None => follow_daemon(dir, &endpoint, args.json).await,
        };
    }
    if remote.is_some() && args.dry_run {
        bail!(
            "--dry-run plans on the node that holds the state (the active node); run it there, or submit without --dry-run"
        );
    }
    if remote.is_some() && !args.image_file.is_empty() {
        bail!(
            "--image-file names a file the daemon reads on the active node; run this upgrade there, or use images the hosts can pull (nothing was started)"
        );
    }
    let given = Credentials {
        token: given_token(args.token_file.as_deref())?,
        pbx: args.pbx_api.options()?,
    };
    let starting = !(args.resume || args.abort);
    if starting && !args.dry_run && given.token.is_none() && given.pbx.is_none() {
        bail!(
            "an upgrade needs the IM token it installs: a NEW one, as the HA guide asks. Generate it in the PBX portal (Servers > IM Servers > Generate Token) and pass --token-file FILE, or give --pbx-api to have it generated"
        );
    }
    let request = starting.then(|| request_of(&args, &given)).transpose()?;
    if let Some(request) = &request
        && args.dry_run
    {
        let state = super::open_state(dir)?;
        let plan = rollout::dry_run(&state, request).await?;
        if args.json {
            output::print_json(&plan)?;
        } else {
            print_plan(&plan);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // With a daemon, the daemon drives the rollout and this follows it.
    let stored = Stored::of(None, &given);
    let submission = match &request {
        Some(request) => Submission::Start {
            upgrade: Upgrade::of(request),
            credentials: stored,
        },
        None if args.resume => Submission::Resume {
            credentials: stored,
        },
        None => Submission::Abort {
            credentials: stored,
        },
    };
    if let Some(run) = client::submit(&endpoint, &submission).await? {
        return follow_run(&endpoint, run, args.json, args.abort).await;
    }
    let state = super::open_state(dir)?;
    let events = sink(args.json);
    let result = match request {
        Some(request) => rollout::upgrade(&state, request, events.sink.clone()).await,
        None if args.resume => rollout::resume(&state, given, events.sink.clone()).await,
        None => rollout::abort(&state, given, events.sink.clone()).await,
    };
    events.finish();
    finished(&result?, args.json, args.abort)
}

/// The request `upgrade` was given (paths made absolute: a daemon may read them).
fn request_of(args: &UpgradeArgs, given: &Credentials) -> anyhow::Result<UpgradeRequest> {
    let image_files = args
        .image_file
        .iter()
        .map(|f| std::path::absolute(f).with_context(|| format!("--image-file {}", f.display())))
        .collect::<anyhow::Result<Vec<PathBuf>>>()?;
    Ok(UpgradeRequest {
        selection: super::selection(args.all, &args.hosts),
        image: args.image.clone(),
        db_image: args.db_image.clone(),
        image_files,
        canaries: args.canary,
        limits: Limits {
            max_parallel: args.max_parallel,
            max_failures: args.max_failures,
            auto_rollback: !args.no_auto_rollback,
            accepted_failures: 0,
            accepted_canary_failures: 0,
        },
        timing: Timing {
            min_healthy: args.min_healthy_time,
            healthy_deadline: args.healthy_deadline,
            progress_deadline: args.progress_deadline,
        },
        stop_grace_seconds: args.stop_grace,
        token: match (&given.token, &given.pbx) {
            (Some(token), _) => TokenSource::Given(token.clone()),
            (None, Some(_)) if !args.dry_run => TokenSource::NewFromPbx,
            _ => TokenSource::FromPbx,
        },
        pbx: given.pbx.clone(),
        force: args.force,
    })
}

/// Prints how the rollout stands; success when it succeeded (or, asked to
/// abort, was aborted).
fn finished(rollout: &Rollout, json: bool, aborting: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!(
            "{}",
            output::json_line(&serde_json::json!({"event": "rollout", "rollout": rollout}))?
        );
    } else {
        print_rollout(rollout);
    }
    let ok = match rollout.state {
        RolloutState::Succeeded => true,
        RolloutState::Aborted => aborting,
        _ => false,
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How long `--follow` waits for the daemon to take an active rollout up.
const TAKE_UP_WAIT: Duration = Duration::from_secs(15);

/// `upgrade --follow`: the run the daemon drives now, else how the active
/// rollout stands.
async fn follow_daemon(dir: &Path, endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let state = super::open_state(dir)?;
    // A daemon that just started takes an active rollout up within seconds.
    let deadline = tokio::time::Instant::now() + TAKE_UP_WAIT;
    let (driving, active) = loop {
        let driving = client::driving(endpoint).await?;
        if let Some(Driving {
            run: Some(run),
            running: true,
        }) = driving
        {
            return follow_run(endpoint, run, json, false).await;
        }
        let Some(active) = state.store.active_rollout().await? else {
            // It may have just ended: the daemon's newest run says how.
            if let Some(Driving { run: Some(run), .. }) = driving {
                return follow_run(endpoint, run, json, false).await;
            }
            bail!("there is no active rollout to follow; see `controller rollouts`");
        };
        let waiting = driving.is_some()
            && matches!(active.state, RolloutState::Running | RolloutState::Aborting);
        if !waiting || tokio::time::Instant::now() >= deadline {
            break (driving, active);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let why = if active.state == RolloutState::Paused {
        "it is paused: `controller upgrade --resume` goes on, `--abort` rolls back".to_owned()
    } else if rollout::is_driven(&state.run_dir())? {
        format!("another controller process drives it ({})", active.holder)
    } else if driving.is_none() {
        "no `controller serve` runs here: start it (it takes the rollout up), or run `controller upgrade --resume`".to_owned()
    } else {
        "`controller serve` takes it up after a delay, unless only the operator can help (see its log: journalctl -u imfleet-controller); `controller upgrade --resume` goes on now".to_owned()
    };
    eprintln!("rollout {} is not being driven right now: {why}", active.id);
    finished(&active, json, false)
}

/// `upgrade --follow` through the API: the run the daemon drives, the one
/// it drove last, else how the newest rollout stands.
async fn follow_remote(endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    // A daemon that just started (a failover) takes an active rollout up
    // within seconds.
    let deadline = tokio::time::Instant::now() + TAKE_UP_WAIT;
    let newest = loop {
        let driving = client::driving(endpoint).await?;
        let run = driving.as_ref().and_then(|d| d.run);
        if let (Some(run), Some(true)) = (run, driving.as_ref().map(|d| d.running)) {
            return follow_run(endpoint, run, json, false).await;
        }
        let newest = client::rollouts(endpoint, 1).await?.unwrap_or_default();
        let waiting = newest
            .first()
            .is_some_and(|r| matches!(r.state, RolloutState::Running | RolloutState::Aborting));
        if !waiting {
            // It may have just ended: the daemon's newest run says how.
            if let Some(run) = run {
                return follow_run(endpoint, run, json, false).await;
            }
            break newest;
        }
        if tokio::time::Instant::now() >= deadline {
            break newest;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    match newest.into_iter().next() {
        Some(rollout) if rollout.state.is_active() => {
            eprintln!(
                "rollout {} is not being driven by `controller serve`: it is {}; `controller upgrade --resume` goes on, `--abort` rolls back",
                rollout.id,
                rollout.state.as_str()
            );
            finished(&rollout, json, false)
        }
        _ => bail!("there is no active rollout to follow; see `controller rollouts`"),
    }
}

/// Shows a run the daemon drives until it ends; Ctrl-C leaves it running.
async fn follow_run(
    endpoint: &Endpoint,
    run: u64,
    json: bool,
    aborting: bool,
) -> anyhow::Result<ExitCode> {
    let events = sink(json);
    let mut after = 0;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let end = loop {
        let page = tokio::select! {
            page = client::run_page(endpoint, run, after) => page,
            _ = &mut interrupted => {
                events.finish();
                eprintln!(
                    "detached: `controller serve` goes on with the rollout; `controller upgrade --follow` shows it again, `controller rollouts` how it stands"
                );
                return Ok(ExitCode::SUCCESS);
            }
        };
        // A daemon that stops mid-answer is gone, not unreadable.
        let gone = match page {
            Ok(Some(page)) => Some(page),
            Ok(None) => None,
            Err(e) => match client::driving(endpoint).await {
                Ok(None) => None,
                _ => return Err(e.into()),
            },
        };
        let Some(page) = gone else {
            events.finish();
            bail!(
                "`controller serve` stopped while driving the rollout; it takes it up again when it starts (or run `controller upgrade --resume`)"
            );
        };
        for event in page.events {
            match serde_json::from_value::<RolloutEvent>(event) {
                Ok(event) => (events.sink)(event),
                Err(e) => tracing::debug!("an event from the daemon could not be read: {e}"),
            }
        }
        after = page.next;
        if let Some(end) = page.ended {
            break end;
        }
    };
    events.finish();
    match (end.rollout, end.error) {
        (Some(rollout), _) => finished(&rollout, json, aborting),
        (None, error) => bail!(
            "{}",
            error.unwrap_or_else(|| "the run ended without a rollout".into())
        ),
    }
}

pub async fn rollouts(
    dir: &Path,
    remote: Option<&Endpoint>,
    args: RolloutsArgs,
) -> anyhow::Result<ExitCode> {
    let rollouts = match remote {
        Some(remote) => client::rollouts(remote, args.limit)
            .await?
            .unwrap_or_default(),
        None => super::open_state(dir)?.store.rollouts(args.limit).await?,
    };
    if args.json {
        output::print_json(&rollouts)?;
    } else if rollouts.is_empty() {
        println!("no rollouts yet");
    } else {
        for r in &rollouts {
            print_rollout(r);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(plan: &RolloutPlan) {
    println!(
        "plan: {} host(s), at most {} out of service at once; nothing was changed",
        plan.lines.len(),
        plan.max_parallel
    );
    let mut table = output::table(&[
        "batch",
        "host",
        "canary",
        "runs now",
        "will run",
        "rollback to",
    ]);
    for l in &plan.lines {
        table.add_row(vec![
            l.batch.to_string(),
            l.host.clone(),
            if l.canary { "yes" } else { "" }.into(),
            format!("{}\n{}", l.from_image, l.from_db_image),
            format!("{}\n{}", l.to_image, l.to_db_image),
            l.from_revision
                .map_or("-".into(), |r| format!("revision {r}")),
        ]);
    }
    println!("{table}");
    for (host, check) in &plan.overridden {
        println!(
            "{host}: --force overrides failed check {}: {}",
            check.id,
            output::shown(&check.observed, 512)
        );
    }
    for (host, check) in &plan.warnings {
        println!(
            "{host}: warning {}: {}",
            check.id,
            output::shown(&check.observed, 512)
        );
    }
}

fn print_rollout(r: &Rollout) {
    let image = output::shown(r.params["image"].as_str().unwrap_or("(images kept)"), 512);
    println!(
        "rollout {} {} ({image}), started {} by {}",
        r.id,
        r.state.as_str(),
        output::rfc3339(r.created_at),
        output::shown(&r.holder, 256)
    );
    let mut table = output::table(&["host", "canary", "phase", "detail"]);
    for s in &r.steps {
        table.add_row(vec![
            output::shown(&s.host, 256),
            if s.canary { "yes" } else { "" }.into(),
            s.phase.as_str().into(),
            output::shown(&s.detail, 4096),
        ]);
    }
    println!("{table}");
}

/// Where a rollout's events go: lines (or a spinner) on stderr, or JSON
/// lines on stdout.
struct Events {
    sink: EventSink,
    bar: indicatif::ProgressBar,
}

impl Events {
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn overall(ended: usize, total: usize) -> String {
    let width = 20;
    let filled = (ended * width).checked_div(total).unwrap_or(width);
    format!(
        "[{}{}] {ended}/{total}",
        "#".repeat(filled),
        "-".repeat(width - filled)
    )
}

fn sink(json: bool) -> Events {
    if json {
        let sink: EventSink = Arc::new(|event: RolloutEvent| {
            if let Ok(line) = output::json_line(&event) {
                println!("{line}");
            }
        });
        return Events {
            sink,
            bar: indicatif::ProgressBar::hidden(),
        };
    }
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let shown = bar.clone();
    let sink: EventSink = Arc::new(move |event: RolloutEvent| {
        let line = match &event {
            RolloutEvent::Started {
                rollout,
                resumed,
                hosts,
                ..
            } => Some(format!(
                "rollout {rollout} {} for {} host(s)",
                if *resumed { "taken up" } else { "started" },
                hosts.len()
            )),
            RolloutEvent::Step {
                host,
                phase,
                detail,
                ended,
                total,
                ..
            } => Some(format!(
                "{} {host}: {}{}{detail}",
                overall(*ended, *total),
                phase.as_str(),
                if detail.is_empty() { "" } else { ": " }
            )),
            RolloutEvent::Finished { state, detail, .. } => {
                Some(format!("rollout {}: {detail}", state.as_str()))
            }
            RolloutEvent::Healthy {
                host,
                healthy_ms,
                needed_ms,
            } => {
                shown.set_message(format!(
                    "{host}: healthy {} s of {} s",
                    healthy_ms / 1000,
                    needed_ms / 1000
                ));
                None
            }
            RolloutEvent::Host { progress } => {
                shown.set_message(output::shown(&progress.text(), 512));
                None
            }
        };
        if let Some(line) = line {
            // Details quote the agents.
            let line = output::shown(&line, 4096);
            shown.suspend(|| eprintln!("{line}"));
        }
    });
    Events { sink, bar }
}
