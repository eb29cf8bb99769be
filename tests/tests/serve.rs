//! `controller serve` with real agents: health streams, events, status from
//! the daemon, Prometheus metrics judged by promtool, the webhook, history
//! kept across restarts.

use std::time::{Duration, Instant};

use imfleet_tests::daemon::{Daemon, WebhookReceiver, promtool_accepts, sample_value};
use imfleet_tests::deploy::{self, Setup};
use imfleet_tests::{Controller, ImSlot, SshUser, TestHost, bootstrapped_host};

/// `controller status --json` for one host, until `until` holds (or panics
/// after `limit` with the last answer).
fn status_until(
    controller: &Controller,
    host: &str,
    limit: Duration,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let run = controller.run(&["status", "--json", host]);
        let value: serde_json::Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {run:#?}"));
        if until(&value[0]) {
            return value[0].clone();
        }
        assert!(Instant::now() < deadline, "gave up waiting: {value:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn events(controller: &Controller, host: &str) -> Vec<serde_json::Value> {
    let run = controller.run(&["events", "--json", "--host", host]);
    run.json().as_array().unwrap().clone()
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// The first event of `kind` among the host's events after the first
/// `skip`, waiting up to `limit` (panics with what was recorded).
fn event_after(
    controller: &Controller,
    host: &str,
    skip: usize,
    kind: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let recorded = events(controller, host);
        if let Some(e) = recorded.iter().skip(skip).find(|e| e["kind"] == kind) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} event within {limit:?}: {recorded:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stopped_agent_is_down_within_two_intervals_and_up_again_after_restart() {
    let (host, controller) = bootstrapped_host();
    let address = host.address().to_string();
    let daemon = Daemon::start(&controller, &[]);
    // (Containers are not asserted: test hosts share one Docker Engine.)
    status_until(&controller, &address, Duration::from_secs(20), |s| {
        s["source"] == "daemon" && s["agent_reachable"] == true
    });

    // The page parses and lints clean, and says what the agent said.
    let page = daemon.scrape();
    promtool_accepts(&page);
    let host_label = format!("host=\"{address}\"");
    assert_eq!(
        sample_value(&page, "imfleet_agent_up", &host_label),
        Some(1.0)
    );
    let days = sample_value(
        &page,
        "imfleet_agent_certificate_expiry_seconds",
        &host_label,
    )
    .expect("certificate expiry")
        / 86_400.0;
    assert!(days > 80.0, "{days} days");
    assert!(page.contains("node_cpu_seconds_total{host="), "{page}");
    assert!(sample_value(&page, "node_memory_MemTotal_bytes", &host_label).unwrap() > 0.0);
    let rss = sample_value(&page, "imfleet_agent_resident_memory_bytes", &host_label).unwrap();
    assert!(rss > 1e6, "agent RSS {rss}");

    // Down: the stream ends at once, status says so within two intervals.
    let stopped = Instant::now();
    let stopped_at = imfleet_controller::now_unix();
    host.stop_agent();
    let down = status_until(&controller, &address, Duration::from_secs(10), |s| {
        s["agent_reachable"] == false
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(2) + Duration::from_millis(800),
        "down only after {:?}",
        stopped.elapsed()
    );
    assert_eq!(down["source"], "daemon");
    let recorded = events(&controller, &address);
    let unreachable = recorded
        .iter()
        .find(|e| e["kind"] == "agent-unreachable")
        .unwrap_or_else(|| panic!("no agent-unreachable event: {recorded:#?}"));
    assert!(unreachable["at"].as_i64().unwrap() <= stopped_at + 2);
    let page = daemon.scrape();
    assert_eq!(
        sample_value(&page, "imfleet_agent_up", &host_label),
        Some(0.0)
    );
    assert_eq!(
        sample_value(&page, "node_memory_MemTotal_bytes", &host_label),
        None,
        "no stale host figures for a host that is down"
    );

    // Bootstrap starts it again: up, with an event, no daemon restart.
    let run = controller.bootstrap(&host, SshUser::Root, &[]);
    assert!(run.success(), "{run:#?}");
    status_until(&controller, &address, Duration::from_secs(20), |s| {
        s["agent_reachable"] == true
    });
    let after = kinds(&events(&controller, &address));
    let back = after.iter().rposition(|k| k == "agent-back");
    let gone = after.iter().rposition(|k| k == "agent-unreachable");
    assert!(back > gone, "{after:?}");
    let reconnects = sample_value(
        &daemon.scrape(),
        "imfleet_stream_reconnects_total",
        &host_label,
    )
    .unwrap();
    assert!(reconnects >= 1.0);

    // Killed (SIGKILL, as a crash): down at once, back when its supervisor
    // restarts it.
    let before = events(&controller, &address).len();
    let killed = Instant::now();
    host.kill_serving_agent();
    let two_intervals = Duration::from_secs(2);
    let gone = event_after(
        &controller,
        &address,
        before,
        "agent-unreachable",
        two_intervals,
    );
    assert!(killed.elapsed() < two_intervals, "{gone}");
    // Back after the supervisor restarted it.
    event_after(
        &controller,
        &address,
        before,
        "agent-back",
        Duration::from_secs(20),
    );

    // SIGTERM stops it cleanly; a new daemon still has the history.
    let log = daemon.log();
    assert_eq!(daemon.stop(), Some(0));
    let socket = imfleet_controller::serve::http::socket_path(controller.state.path());
    assert!(!socket.exists(), "socket left behind");
    let history = controller.run(&["history", "--json", &address, "--since", "1h"]);
    let points = history.json();
    let points = points.as_array().unwrap();
    assert!(
        points.iter().any(|p| p["agent_up"] == false),
        "the outage is in the history: {points:#?}\n{log}"
    );
    // Without the daemon, status asks the agent itself.
    let direct = status_until(&controller, &address, Duration::from_secs(5), |_| true);
    assert_eq!(direct["source"], "agent");
    let again = Daemon::start(&controller, &[]);
    status_until(&controller, &address, Duration::from_secs(20), |s| {
        s["source"] == "daemon" && s["agent_reachable"] == true
    });
    let kept = controller.run(&["history", "--json", &address, "--since", "1h"]);
    let kept = kept.json();
    let kept = kept.as_array().unwrap();
    assert!(kept.len() >= points.len() && kept.iter().any(|p| p["agent_up"] == false));
    // A second daemon on the same state is refused, naming the first.
    let second = controller.run(&["serve", "--metrics-listen", "127.0.0.1:0"]);
    assert_eq!(second.status, Some(1), "{second:#?}");
    assert!(
        second.stderr.contains("already serves"),
        "{}",
        second.stderr
    );
    drop(again);
}

#[test]
fn a_host_bootstrapped_while_the_daemon_runs_is_picked_up() {
    let controller = Controller::new();
    let daemon = Daemon::start(&controller, &[]);
    let host = TestHost::start();
    let run = controller.bootstrap(&host, SshUser::Root, &[]);
    assert!(run.success(), "{run:#?}");
    let address = host.address().to_string();
    status_until(&controller, &address, Duration::from_secs(20), |s| {
        s["source"] == "daemon" && s["agent_reachable"] == true
    });
    // SIGHUP reloads (identity re-read, streams reconnected) and keeps serving.
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    status_until(&controller, &address, Duration::from_secs(20), |s| {
        s["source"] == "daemon" && s["agent_reachable"] == true
    });
    assert!(daemon.log().contains("reloaded"), "{}", daemon.log());
    // The live view, one frame: the host, up, within 80 columns.
    let frame = controller.run(&["watch", "--once"]);
    assert!(frame.success(), "{frame:#?}");
    let line = frame
        .stdout
        .lines()
        .find(|l| l.starts_with(&address))
        .unwrap_or_else(|| panic!("{}", frame.stdout));
    assert!(line.contains(" up "), "{line}");
    assert!(frame.stdout.lines().all(|l| l.chars().count() <= 80));
    assert_eq!(daemon.stop(), Some(0));
    let without = controller.run(&["watch", "--once"]);
    assert_eq!(without.status, Some(1));
    assert!(
        without.stderr.contains("controller serve"),
        "{}",
        without.stderr
    );
}

#[test]
fn an_unhealthy_im_shows_and_fires_the_webhook() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    let run = s.deploy(&[]);
    assert!(run.success(), "{run:#?}");
    let hook = WebhookReceiver::start();
    let daemon = Daemon::start(&s.controller, &["--webhook", &hook.url]);
    let address = s.address();
    status_until(&s.controller, &address, Duration::from_secs(30), |st| {
        st["source"] == "daemon" && st["healthy"] == true
    });
    let page = daemon.scrape();
    promtool_accepts(&page);
    let host_label = format!("host=\"{address}\"");
    assert_eq!(
        sample_value(&page, "imfleet_im_healthy", &host_label),
        Some(1.0)
    );
    // The stand-in IM's own figures, as its /svr_stats reports them.
    assert!(
        sample_value(
            &page,
            "imfleet_im_stat",
            &format!("{host_label},name=\"online_users\"")
        )
        .is_some(),
        "{page}"
    );
    assert_eq!(
        sample_value(
            &page,
            "imfleet_im_tcp_port_open",
            &format!("{host_label},port=\"8887\"")
        ),
        Some(1.0)
    );
    let data_fs = page
        .lines()
        .find(|l| l.starts_with("node_filesystem_avail_bytes{") && l.contains("role=\"data\""));
    assert!(data_fs.is_some(), "{page}");

    let out = deploy::docker(&["stop", "-t", "5", "portsip.instantmessage"]);
    assert!(out.status.success(), "{out:?}");
    let body = hook
        .wait_for("im-unhealthy", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no webhook for im-unhealthy; daemon log:\n{}", daemon.log()));
    assert_eq!(body["host"], address.as_str());
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("portsip.instantmessage"),
        "{body}"
    );
    let sick = status_until(&s.controller, &address, Duration::from_secs(10), |st| {
        st["healthy"] == false
    });
    assert_eq!(sick["agent_reachable"], true);
    assert_eq!(
        sample_value(&daemon.scrape(), "imfleet_im_healthy", &host_label),
        Some(0.0)
    );
    // Started again: healthy, and the webhook hears that too.
    let out = deploy::docker(&["start", "portsip.instantmessage"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        hook.wait_for("im-healthy", Duration::from_secs(60))
            .is_some()
    );
    assert!(kinds(&events(&s.controller, &address)).contains(&"im-unhealthy".to_owned()));
}

/// A small tmpfs, mounted for a test (before the test host's mount
/// namespace is made, so the host sees it) and unmounted at the end.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "imfleet-test",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_nearly_full_data_filesystem_raises_the_disk_event() {
    let disk = Tmpfs::mount(8 << 20);
    let data = disk.dir.path().join("portsip");
    std::fs::create_dir(&data).unwrap();
    let data_arg = data.display().to_string();
    let (host, controller) = imfleet_tests::bootstrapped_host_with(&["--data-path", &data_arg]);
    let address = host.address().to_string();
    let daemon = Daemon::start(&controller, &[]);
    status_until(&controller, &address, Duration::from_secs(20), |s| {
        s["source"] == "daemon" && s["agent_reachable"] == true
    });
    let page = daemon.scrape();
    let size = page
        .lines()
        .find(|l| {
            l.starts_with("node_filesystem_size_bytes{")
                && l.contains(&format!("host=\"{address}\""))
                && l.contains("role=\"data\"")
                && l.contains("fstype=\"tmpfs\"")
        })
        .unwrap_or_else(|| panic!("no data filesystem on the page: {page}"));
    assert!(size.ends_with(" 8388608"), "{size}");
    assert!(!kinds(&events(&controller, &address)).contains(&"disk-full".to_owned()));

    // 95 % used (as the IM's uid would fill it: a file in the data tree).
    let filler = data.join("filler");
    std::fs::write(&filler, vec![0u8; (8 << 20) * 95 / 100]).unwrap();
    let full = event_after(
        &controller,
        &address,
        0,
        "disk-full",
        Duration::from_secs(10),
    );
    assert!(
        full["detail"].as_str().unwrap().contains("data filesystem"),
        "{full}"
    );
    std::fs::remove_file(&filler).unwrap();
    event_after(&controller, &address, 0, "disk-ok", Duration::from_secs(10));
    drop(daemon);
    drop(host);
}
