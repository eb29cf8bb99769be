use super::*;
use imfleet_proto::agent::v1::{
    AgentMetrics, ContainerStatus, CpuTimes, DiskCounters, FilesystemUsage, HostMetrics,
    NetworkCounters, PortProbe,
};
use prost::Message;

fn container(name: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        image: "portsip/pbx:22".into(),
        state: "running".into(),
        health: "healthy".into(),
        ..Default::default()
    }
}

fn fs(role: &str, mount: &str) -> FilesystemUsage {
    FilesystemUsage {
        role: role.into(),
        path: "/var/lib/portsip".into(),
        mount_point: mount.into(),
        device: "/dev/mapper/ubuntu--vg-ubuntu--lv".into(),
        fs_type: "ext4".into(),
        size_bytes: 100,
        available_bytes: 50,
        free_bytes: 60,
    }
}

fn real() -> HealthSample {
    HealthSample {
        sequence: 3,
        host: Some(HostMetrics {
            cpus: (0..8)
                .map(|cpu| CpuTimes {
                    cpu,
                    user: 10.0,
                    idle: 100.0,
                    ..Default::default()
                })
                .collect(),
            load1: 0.5,
            filesystems: vec![fs("data", "/"), fs("storage", "/srv")],
            networks: vec![NetworkCounters {
                device: "enp0s31f6".into(),
                ..Default::default()
            }],
            disks: vec![DiskCounters {
                device: "nvme0n1".into(),
                io_time_seconds: 1.5,
                ..Default::default()
            }],
            ..Default::default()
        }),
        containers: ["portsip.database", "portsip.instantmessage"]
            .map(container)
            .into(),
        deployment_healthy: true,
        service: Some(ServiceProbe {
            stats_ok: true,
            stats: [("online_users".to_owned(), 12.0)].into(),
            tcp: vec![PortProbe {
                port: 8887,
                open: true,
            }],
            ..Default::default()
        }),
        agent: Some(AgentMetrics {
            version: "0.1.0".into(),
            certificate_not_after: 1_900_000_000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_real_sample_is_kept_as_it_is_but_for_the_certificate_claim() {
    let (kept, admission) = admit(real(), Some(1_850_000_000));
    assert!(admission.clean(), "{admission:?}");
    let mut expected = real();
    expected.agent.as_mut().unwrap().certificate_not_after = 1_850_000_000;
    assert_eq!(kept, expected);
    // No presented certificate known: no expiry rather than the agent's word.
    let (kept, _) = admit(real(), None);
    assert_eq!(kept.agent.unwrap().certificate_not_after, 0);
}

#[test]
fn a_hostile_sample_is_capped_named_finite_and_printable() {
    let mut s = real();
    let escape = "\x1b]52;c;ZXZpbA==\x07\x1b[2J";
    s.containers = (0..100_000)
        .map(|i| container(&format!("c{}", i % 50_000)))
        .collect();
    s.containers.insert(0, container(escape));
    s.containers[1].state = format!("running{escape}{}", "x".repeat(10_000));
    let h = s.host.as_mut().unwrap();
    h.load1 = f64::NAN;
    h.load5 = f64::INFINITY;
    h.cpus = (0..5000)
        .map(|i| CpuTimes {
            cpu: i % 3,
            user: f64::NEG_INFINITY,
            ..Default::default()
        })
        .collect();
    h.filesystems = vec![
        fs("data", "/"),
        fs("data", "/again"),
        fs("../../etc", "/"),
        fs("storage", "relative"),
    ];
    h.networks = (0..1000)
        .map(|i| NetworkCounters {
            device: if i % 2 == 0 {
                format!("eth{i}")
            } else {
                "bad name\n".into()
            },
            ..Default::default()
        })
        .collect();
    let service = s.service.as_mut().unwrap();
    service.stats = (0..10_000)
        .map(|i| (format!("figure_{i}"), f64::NAN))
        .chain([("Name With\u{1b}Escape".to_owned(), 1.0)])
        .collect();
    service.tcp = (0..100)
        .map(|i| PortProbe {
            port: 8887 + i % 2,
            open: true,
        })
        .chain([PortProbe {
            port: 70_000,
            open: true,
        }])
        .collect();
    service.stats_error = escape.repeat(1000);
    let agent = s.agent.as_mut().unwrap();
    agent.certificate_not_after = i64::MAX;
    agent.cpu_seconds = f64::NAN;
    agent.version = format!("1.0{escape}");
    s.notes = vec![escape.to_owned(); 100];

    let (kept, admission) = admit(s, Some(1_850_000_000));
    assert_eq!(kept.containers.len(), MAX_CONTAINERS);
    assert!(kept.containers.iter().all(|c| c.name.starts_with('c')));
    assert!(kept.containers[0].state.chars().count() <= MAX_SHORT + 1);
    let h = kept.host.as_ref().unwrap();
    assert_eq!((h.load1, h.load5), (0.0, 0.0));
    assert_eq!(h.cpus.len(), 3, "one entry per CPU index");
    assert!(h.cpus.iter().all(|c| c.user == 0.0));
    let roles: Vec<&str> = h.filesystems.iter().map(|f| f.role.as_str()).collect();
    assert_eq!(roles, ["data"]);
    assert_eq!(h.networks.len(), MAX_NETWORKS);
    assert!(h.networks.iter().all(|n| n.device.starts_with("eth")));
    let service = kept.service.as_ref().unwrap();
    assert_eq!(service.stats.len(), MAX_STATS);
    assert!(service.stats.values().all(|v| *v == 0.0));
    let ports: Vec<u32> = service.tcp.iter().map(|p| p.port).collect();
    assert_eq!(ports, [8887, 8888]);
    let agent = kept.agent.as_ref().unwrap();
    assert_eq!(agent.certificate_not_after, 1_850_000_000);
    assert_eq!(agent.cpu_seconds, 0.0);
    assert_eq!(kept.notes.len(), MAX_NOTES);
    // Nothing kept can act on a terminal.
    let texts = kept
        .containers
        .iter()
        .flat_map(|c| [&c.name, &c.state, &c.health, &c.image])
        .chain(kept.notes.iter())
        .chain([&service.stats_error, &agent.version]);
    for t in texts {
        assert!(!t.chars().any(char::is_control), "{t:?}");
    }
    assert!(admission.dropped > 100_000 && admission.non_finite > 0);
}

#[test]
fn a_sample_at_every_cap_fits_the_decode_limit_with_room() {
    let long = |n: usize| "x".repeat(n);
    let mut s = real();
    s.containers = (0..MAX_CONTAINERS)
        .map(|i| ContainerStatus {
            name: format!("{i}{}", long(127)),
            image: long(255),
            image_id: long(71),
            image_version: long(64),
            state: long(64),
            health: long(64),
            ..Default::default()
        })
        .collect();
    let h = s.host.as_mut().unwrap();
    h.cpus = (0..MAX_CPUS as u32)
        .map(|cpu| CpuTimes {
            cpu,
            user: 1e9,
            nice: 1e9,
            system: 1e9,
            idle: 1e9,
            iowait: 1e9,
            irq: 1e9,
            softirq: 1e9,
            steal: 1e9,
        })
        .collect();
    h.filesystems = (0..MAX_FILESYSTEMS)
        .map(|_| FilesystemUsage {
            path: long(256),
            mount_point: long(256),
            device: long(256),
            fs_type: long(32),
            ..fs("data", "/")
        })
        .collect();
    h.networks = (0..MAX_NETWORKS)
        .map(|_| NetworkCounters {
            device: long(64),
            receive_bytes: u64::MAX,
            transmit_bytes: u64::MAX,
            receive_errors: u64::MAX,
            transmit_errors: u64::MAX,
        })
        .collect();
    h.disks = (0..MAX_DISKS)
        .map(|_| DiskCounters {
            device: long(64),
            read_bytes: u64::MAX,
            written_bytes: u64::MAX,
            io_time_seconds: 1e9,
        })
        .collect();
    let service = s.service.as_mut().unwrap();
    service.stats = (0..MAX_STATS)
        .map(|i| (format!("{i}{}", long(62)), 1e9))
        .collect();
    service.stats_error = long(256);
    service.tcp = (0..MAX_PORTS as u32)
        .map(|port| PortProbe { port, open: true })
        .collect();
    s.notes = vec![long(256); MAX_NOTES];
    let size = s.encoded_len();
    assert!(
        size * 2 < MAX_MESSAGE_BYTES,
        "a sample at every cap is {size} bytes"
    );
    assert!(real().encoded_len() < 4096);
}
