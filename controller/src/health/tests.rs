use super::*;
use imfleet_proto::agent::v1::{
    AgentMetrics, ContainerStatus, FilesystemUsage, HostMetrics, PortProbe, ServiceProbe,
};

const NOW: i64 = 1_800_000_000;

fn healthy() -> Observation {
    Observation {
        agent_up: true,
        deployed: true,
        im_healthy: true,
        restarts: [("portsip.instantmessage".to_owned(), 0)].into(),
        disk_used: [("data".to_owned(), 0.5)].into(),
        certificate_not_after: Some(NOW + 365 * 86_400),
        ..Default::default()
    }
}

fn kinds(events: &[HealthEvent]) -> Vec<EventKind> {
    events.iter().map(|e| e.kind).collect()
}

#[test]
fn a_first_healthy_observation_says_nothing_a_first_bad_one_speaks() {
    let mut t = Tracked::default();
    assert!(transitions(&mut t, &healthy(), NOW).is_empty());
    let mut t = Tracked::default();
    let down = Observation::unreachable("connection refused");
    let events = transitions(&mut t, &down, NOW);
    assert_eq!(kinds(&events), [EventKind::AgentUnreachable]);
    assert_eq!(events[0].detail, "connection refused");
}

#[test]
fn agent_down_and_back_once_each() {
    let mut t = Tracked::default();
    transitions(&mut t, &healthy(), NOW);
    let down = Observation::unreachable("stream ended");
    assert_eq!(
        kinds(&transitions(&mut t, &down, NOW)),
        [EventKind::AgentUnreachable]
    );
    assert!(
        transitions(&mut t, &down, NOW).is_empty(),
        "no repeat while down"
    );
    assert_eq!(
        kinds(&transitions(&mut t, &healthy(), NOW)),
        [EventKind::AgentBack]
    );
    // The IM was healthy before the agent went away: nothing to say of it.
    assert!(transitions(&mut t, &healthy(), NOW).is_empty());
}

#[test]
fn im_unhealthy_and_healthy_again() {
    let mut t = Tracked::default();
    transitions(&mut t, &healthy(), NOW);
    let sick = Observation {
        im_healthy: false,
        im_detail: "portsip.instantmessage running (unhealthy)".into(),
        ..healthy()
    };
    let events = transitions(&mut t, &sick, NOW);
    assert_eq!(kinds(&events), [EventKind::ImUnhealthy]);
    assert!(events[0].detail.contains("unhealthy"));
    assert!(transitions(&mut t, &sick, NOW).is_empty());
    // The agent going away does not forget that the IM was sick.
    transitions(&mut t, &Observation::unreachable("x"), NOW);
    assert_eq!(
        kinds(&transitions(&mut t, &sick, NOW)),
        [EventKind::AgentBack]
    );
    assert_eq!(
        kinds(&transitions(&mut t, &healthy(), NOW)),
        [EventKind::ImHealthy]
    );
    // Nothing deployed: no IM events at all.
    let bare = Observation {
        deployed: false,
        im_healthy: false,
        ..healthy()
    };
    assert!(transitions(&mut t, &bare, NOW).is_empty());
}

#[test]
fn restarts_disk_and_certificate() {
    let mut t = Tracked::default();
    transitions(&mut t, &healthy(), NOW);
    let mut seen = healthy();
    seen.restarts.insert("portsip.instantmessage".into(), 2);
    seen.disk_used.insert("data".into(), 0.95);
    seen.certificate_not_after = Some(NOW + 10 * 86_400);
    let events = transitions(&mut t, &seen, NOW);
    assert_eq!(
        kinds(&events),
        [
            EventKind::ContainerRestarting,
            EventKind::DiskFull,
            EventKind::CertificateExpiring
        ]
    );
    assert!(events[0].detail.contains("2 restarts"));
    assert!(events[1].detail.contains("95 %"));
    assert!(events[2].detail.contains("10 days"));
    // Still full, still expiring, no new restart: quiet.
    assert!(transitions(&mut t, &seen, NOW).is_empty());
    // 89 % is not yet fine (hysteresis); 80 % is.
    seen.disk_used.insert("data".into(), 0.89);
    assert!(transitions(&mut t, &seen, NOW).is_empty());
    seen.disk_used.insert("data".into(), 0.80);
    assert_eq!(kinds(&transitions(&mut t, &seen, NOW)), [EventKind::DiskOk]);
    // A renewed certificate re-arms the warning.
    seen.certificate_not_after = Some(NOW + 400 * 86_400);
    assert!(transitions(&mut t, &seen, NOW).is_empty());
    seen.certificate_not_after = Some(NOW + 86_400);
    assert_eq!(
        kinds(&transitions(&mut t, &seen, NOW)),
        [EventKind::CertificateExpiring]
    );
}

#[test]
fn a_sample_is_judged_from_containers_stats_and_ports() {
    let container = |name: &str, state: &str, health: &str| ContainerStatus {
        name: name.into(),
        state: state.into(),
        health: health.into(),
        restart_count: 1,
        ..Default::default()
    };
    let mut sample = HealthSample {
        containers: vec![
            container("portsip.database", "running", "healthy"),
            container("portsip.instantmessage", "running", "healthy"),
        ],
        deployment_healthy: true,
        service: Some(ServiceProbe {
            stats_ok: true,
            tcp: vec![PortProbe {
                port: 8887,
                open: true,
            }],
            ..Default::default()
        }),
        host: Some(HostMetrics {
            filesystems: vec![FilesystemUsage {
                role: "data".into(),
                size_bytes: 1000,
                available_bytes: 50,
                ..Default::default()
            }],
            ..Default::default()
        }),
        agent: Some(AgentMetrics {
            certificate_not_after: NOW,
            ..Default::default()
        }),
        ..Default::default()
    };
    let seen = observe(&sample);
    assert!(seen.agent_up && seen.deployed && seen.im_healthy);
    assert_eq!(seen.disk_used["data"], 0.95);
    assert_eq!(seen.restarts["portsip.database"], 1);
    assert_eq!(seen.certificate_not_after, Some(NOW));
    // Containers fine but 8887 closed: not healthy, and it says why.
    sample.service.as_mut().unwrap().tcp[0].open = false;
    let seen = observe(&sample);
    assert!(!seen.im_healthy);
    assert!(seen.im_detail.contains("TCP 8887"), "{}", seen.im_detail);
    // A stats endpoint that fails.
    sample.service.as_mut().unwrap().tcp.clear();
    sample.service.as_mut().unwrap().stats_ok = false;
    sample.service.as_mut().unwrap().stats_error = "HTTP 503".into();
    assert!(!observe(&sample).im_healthy);
    // An exited container.
    let mut sample2 = sample.clone();
    sample2.service = None;
    sample2.containers[1].state = "exited".into();
    sample2.deployment_healthy = false;
    let seen = observe(&sample2);
    assert!(!seen.im_healthy);
    assert!(seen.im_detail.contains("portsip.instantmessage exited"));
}

#[test]
fn cpu_busy_from_two_samples() {
    let cpu = |user: f64, idle: f64| CpuTimes {
        user,
        idle,
        ..Default::default()
    };
    let before = [cpu(10.0, 90.0), cpu(10.0, 90.0)];
    let after = [cpu(15.0, 95.0), cpu(20.0, 90.0)];
    // 20 s passed in all, 5 of them idle.
    assert_eq!(cpu_busy(&before, &after), Some(0.75));
    assert_eq!(cpu_busy(&before, &before), None);
    assert_eq!(cpu_busy(&after, &before), None, "counters went back");
}

#[test]
fn a_restarted_daemon_remembers_what_it_announced() {
    let event = |kind: EventKind, detail: &str| crate::store::Event {
        id: 0,
        at: NOW,
        host: Some("im1".into()),
        kind,
        detail: detail.into(),
        rollout_id: None,
    };
    let mut seeded = seed(&[
        event(EventKind::Bootstrap, "x"),
        event(EventKind::AgentUnreachable, "refused"),
        event(EventKind::AgentBack, "back"),
        event(EventKind::ImUnhealthy, "exited"),
        event(EventKind::DiskFull, "the data filesystem is 95 % full"),
        event(EventKind::DiskFull, "the storage filesystem is 93 % full"),
        event(EventKind::DiskOk, "the storage filesystem is 50 % full"),
        event(EventKind::CertificateExpiring, "soon"),
    ]);
    assert_eq!(seeded.agent_up, Some(true));
    assert_eq!(seeded.im_healthy, Some(false));
    assert_eq!(seeded.full_disks, ["data".to_owned()].into());
    assert!(seeded.certificate_warned);
    // Still sick, still full, still expiring: nothing is announced again.
    let mut seen = healthy();
    seen.im_healthy = false;
    seen.disk_used.insert("data".into(), 0.95);
    seen.certificate_not_after = Some(NOW + 86_400);
    assert!(transitions(&mut seeded, &seen, NOW).is_empty());
    // Healed while the daemon was down: said once.
    assert_eq!(
        kinds(&transitions(&mut seeded, &healthy(), NOW)),
        [EventKind::ImHealthy, EventKind::DiskOk]
    );
}

#[test]
fn a_closed_stream_is_misbehaving_once_and_details_are_safe_and_short() {
    let mut t = Tracked::default();
    announce(&mut t, &healthy(), NOW);
    let closed = Observation::misbehaving(format!("too fast\x1b[2J{}", "x".repeat(5000)));
    let events = announce(&mut t, &closed, NOW + 1);
    assert_eq!(kinds(&events), [EventKind::AgentMisbehaving]);
    let detail = &events[0].detail;
    assert!(detail.contains("\\x1b[2J") && !detail.contains('\x1b'));
    assert!(detail.chars().count() <= MAX_EVENT_DETAIL + 1);
    // Still closed on the next try: nothing new.
    assert!(announce(&mut t, &closed, NOW + 2).is_empty());
    // The log remembers it as down, as it remembers flapping.
    let logged = |kind, at| crate::store::Event {
        id: 0,
        at,
        host: Some("im1".into()),
        kind,
        detail: String::new(),
        rollout_id: None,
    };
    let seeded = seed(&[
        logged(EventKind::AgentMisbehaving, NOW),
        logged(EventKind::Flapping, NOW + 10),
    ]);
    assert_eq!(seeded.agent_up, Some(false));
    assert_eq!(seeded.damping.flapping_since, Some(NOW + 10));
    let steady = seed(&[
        logged(EventKind::Flapping, NOW),
        logged(EventKind::Steady, NOW + 700),
    ]);
    assert_eq!(steady.damping.flapping_since, None);
}
