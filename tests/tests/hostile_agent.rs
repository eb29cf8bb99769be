//! `controller serve` and the CLI against agents that root on their IM host
//! controls: each a real mTLS server holding that host's genuine
//! certificate, sending what such a host could send (a flood of samples, a
//! message over the size limit, lists far over their caps, terminal escape
//! sequences, NaN, a false certificate expiry, a flapping IM, a stream
//! restarted after every sample, twice the asked rate, a 4 MB ping reply)
//! next to healthy hosts, for a minute. The daemon must stay within its stated
//! memory and disk ceilings, announce each misbehaviour once, damp the
//! flapping, keep every printed and posted string safe, never let one host
//! spoil the others' view, expose a bounded page Prometheus parses, and
//! stop within its deadline.

use std::time::{Duration, Instant};

use imfleet_controller::health::damping::FLAP_CHANGES;
use imfleet_controller::health::metrics::MAX_SERIES_PER_HOST;
use imfleet_tests::daemon::{Daemon, WebhookReceiver, promtool_accepts, sample_value};
use imfleet_tests::sim_agents::{self, Behaviour};
use imfleet_tests::{Controller, rss};

/// What the daemon may grow to with this fleet (stated in SECURITY.md: a
/// base of about 20 MiB plus well under 1 MiB per host, hostile or not).
const RSS_CEILING: u64 = 64 << 20;
/// What the state database may grow to in this minute.
const DISK_CEILING: u64 = 4 << 20;
/// SIGTERM to exit (the unit allows 30 s).
const STOP_CEILING: Duration = Duration::from_secs(10);

/// Whether `text` could act on a terminal: a control character other than
/// a line break, or a character that reorders text.
fn unsafe_char(text: &str) -> Option<char> {
    text.chars().find(|&c| {
        (c.is_control() && c != '\n')
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

fn assert_printable(what: &str, text: &str) {
    if let Some(c) = unsafe_char(text) {
        panic!("{what} holds {c:?}:\n{text}");
    }
}

fn disk_use(dir: &std::path::Path) -> u64 {
    ["state.db", "state.db-wal", "state.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_hostile_fleet_for_a_minute_leaves_the_daemon_within_its_ceilings() {
    imfleet_certs::install_crypto_provider();
    let controller = Controller::new();
    assert!(controller.run(&["init"]).success());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    use Behaviour::*;
    let behaviours = [
        Flood,
        Oversized,
        Bloated,
        Escapes,
        NonFinite,
        ClaimsExpiry,
        Flapping,
        Restarter,
        DoubleRate,
        PingAbuse,
        Healthy,
        Healthy,
    ];
    let sims = sim_agents::start_for(&controller, &runtime, &behaviours);
    let name = |b: Behaviour| {
        let i = behaviours.iter().position(|x| *x == b).unwrap();
        sims[i].name.clone()
    };
    let hook = WebhookReceiver::start();
    let hook_file = controller.state.path().join("webhook.url");
    std::fs::write(&hook_file, &hook.url).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = Daemon::start(
        &controller,
        &["--webhook-file", hook_file.to_str().unwrap()],
    );
    let pid = daemon.pid();

    // A minute under the hostile fleet, the daemon's memory read twice a
    // second (a measurement, not a wait for anything).
    let started = Instant::now();
    let mut max_rss = 0;
    while started.elapsed() < Duration::from_secs(60) {
        max_rss = max_rss.max(rss(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    let disk = disk_use(controller.state.path());
    println!(
        "hostile minute: daemon RSS at most {:.1} MiB, state database {:.2} MiB",
        max_rss as f64 / (1 << 20) as f64,
        disk as f64 / (1 << 20) as f64
    );

    // One host's bad answers never spoil the others' view.
    let watch = controller.run(&["watch", "--once", "--json"]);
    assert!(watch.success(), "{watch:#?}");
    let fleet: serde_json::Value = serde_json::from_str(watch.stdout.trim()).unwrap();
    let fleet = fleet.as_array().unwrap();
    assert_eq!(fleet.len(), behaviours.len(), "{fleet:#?}");
    let snapshot = |host: &str| fleet.iter().find(|h| h["host"] == host).unwrap().clone();
    for sim in sims.iter().filter(|s| {
        let b = behaviours[sims.iter().position(|x| x.name == s.name).unwrap()];
        matches!(b, Healthy | NonFinite | ClaimsExpiry | Bloated)
    }) {
        let h = snapshot(&sim.name);
        assert_eq!(h["agent_up"], true, "{h:#}");
        assert_eq!(h["im_healthy"], true, "{h:#}");
    }
    for closed in [Flood, Oversized, Restarter, DoubleRate, PingAbuse] {
        assert_eq!(snapshot(&name(closed))["agent_up"], false, "{closed:?}");
    }
    // Status takes every host from the daemon, hostile ones included: none
    // sends the CLI to ask the agents (where a hostile one could stall it).
    let status = controller.run(&["status", "--all", "--json"]);
    let statuses: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    for s in statuses.as_array().unwrap() {
        assert_eq!(s["source"], "daemon", "{s:#}");
    }
    assert!(
        status.elapsed < Duration::from_secs(10),
        "{:?}",
        status.elapsed
    );

    // Everything printed is safe for the operator's terminal.
    for args in [
        &["watch", "--once"][..],
        &["status", "--all"],
        &["events", "-n", "1000"],
        &["hosts"],
        &["hosts", "--json"],
        &["status", "--all", "--json"],
        &["events", "--json", "-n", "1000"],
    ] {
        let run = controller.run(args);
        assert!(run.status.is_some(), "{args:?} hung");
        assert_printable(&format!("{args:?} stdout"), &run.stdout);
        assert_printable(&format!("{args:?} stderr"), &run.stderr);
    }
    let events_run = controller.run(&["events", "--json", "-n", "1000"]);
    let events = events_run.json().as_array().unwrap().clone();
    let of = |host: &str, kind: &str| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| e["host"] == host && e["kind"] == kind)
            .cloned()
            .collect()
    };
    for e in &events {
        assert_printable("an event", e["detail"].as_str().unwrap());
    }
    // The escapes reached the event log, escaped.
    let escaped = of(&name(Escapes), "im-unhealthy");
    assert_eq!(escaped.len(), 1, "{events:#?}");
    assert!(escaped[0]["detail"].as_str().unwrap().contains("\\x1b"));

    // Each misbehaviour closed its stream and was said once.
    let flood = of(&name(Flood), "agent-misbehaving");
    assert_eq!(flood.len(), 1, "{events:#?}");
    assert!(
        flood[0]["detail"].as_str().unwrap().contains("faster"),
        "{flood:?}"
    );
    let oversized = of(&name(Oversized), "agent-misbehaving");
    assert_eq!(oversized.len(), 1, "{events:#?}");
    assert!(
        oversized[0]["detail"].as_str().unwrap().contains("limit"),
        "{oversized:?}"
    );
    // A stream ended after every sample: reconnections back off (a short
    // stream never resets the backoff) and the changes are damped.
    let restarter: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["host"] == name(Restarter))
        .collect();
    assert!(restarter.len() <= FLAP_CHANGES, "{restarter:#?}");
    let double = of(&name(DoubleRate), "agent-misbehaving");
    assert_eq!(double.len(), 1, "{events:#?}");
    assert!(
        double[0]["detail"].as_str().unwrap().contains("faster"),
        "{double:?}"
    );
    // The 4 MB ping reply was refused, never stored.
    assert_eq!(
        of(&name(PingAbuse), "agent-unreachable").len(),
        1,
        "{events:#?}"
    );
    // The flapping host: a few changes, one `flapping`, then quiet.
    let flapping: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["host"] == name(Flapping))
        .collect();
    assert!(flapping.len() <= FLAP_CHANGES, "{flapping:#?}");
    assert_eq!(of(&name(Flapping), "flapping").len(), 1, "{flapping:#?}");
    // The healthy hosts said nothing at all.
    for sim in sims.iter().skip(behaviours.len() - 2) {
        assert!(events.iter().all(|e| e["host"] != sim.name), "{events:#?}");
    }

    // The page: bounded, one series per label set, parsed by promtool, and
    // the certificate expiry is the presented certificate's.
    let page = daemon.scrape();
    promtool_accepts(&page);
    let bloated = format!("host=\"{}\"", name(Bloated));
    let series = page.lines().filter(|l| l.contains(&bloated)).count();
    assert!(series <= MAX_SERIES_PER_HOST, "{series} series");
    let claims = &sims[behaviours.iter().position(|b| *b == ClaimsExpiry).unwrap()];
    let expiry = sample_value(
        &page,
        "imfleet_agent_certificate_expiry_seconds",
        &format!("host=\"{}\"", claims.name),
    )
    .unwrap();
    let real = (claims.certificate_not_after - imfleet_controller::now_unix()) as f64;
    assert!((expiry - real).abs() < 120.0, "{expiry} vs {real}");
    let reconnects = sample_value(
        &page,
        "imfleet_stream_reconnects_total",
        &format!("host=\"{}\"", name(Restarter)),
    )
    .unwrap();
    assert!(reconnects <= 20.0, "{reconnects} streams in a minute");
    let suppressed = sample_value(
        &page,
        "imfleet_events_suppressed_total",
        &format!("host=\"{}\"", name(Flapping)),
    )
    .unwrap();
    assert!(suppressed > 10.0, "{suppressed}");

    // The webhook heard each announced event once, and nothing unsafe.
    let health_events = events.iter().filter(|e| e["host"].is_string()).count();
    let mut posted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while posted.len() < health_events && Instant::now() < deadline {
        if let Ok(body) = hook.bodies.recv_timeout(Duration::from_millis(200)) {
            posted.push(body);
        }
    }
    assert_eq!(posted.len(), health_events, "{posted:#?}");
    for body in &posted {
        assert_printable("a webhook detail", body["detail"].as_str().unwrap());
    }

    // Within the ceilings, and a prompt stop.
    assert!(max_rss <= RSS_CEILING, "daemon RSS {max_rss}");
    assert!(disk <= DISK_CEILING, "state database {disk} bytes");
    let stopping = Instant::now();
    let log = daemon.log();
    assert_eq!(daemon.stop(), Some(0), "{log}");
    let stop = stopping.elapsed();
    println!(
        "hostile minute: SIGTERM to exit {:.2} s",
        stop.as_secs_f64()
    );
    assert!(stop <= STOP_CEILING, "{stop:?}");
    assert_printable("the daemon's log", &log);
}
