//! Every branch of the judge, from recorded facts (no network, no host).

use imfleet_proto::agent::v1::*;
use imfleet_proto::model::os_release::parse_os_release;

use super::*;

const GB: u64 = 1_000_000_000;
const UBUNTU_2404: &str = include_str!("../../../proto/src/model/fixtures/os-release-ubuntu-24.04");
const UBUNTU_2204: &str = include_str!("../../../proto/src/model/fixtures/os-release-ubuntu-22.04");
const DEBIAN_12: &str = include_str!("../../../proto/src/model/fixtures/os-release-debian-12");

fn os_info(text: &str) -> OsInfo {
    let r = parse_os_release(text);
    OsInfo {
        id: r.id,
        version_id: r.version_id,
        pretty_name: r.pretty_name,
        codename: r.codename,
        arch: "x86_64".into(),
        kernel: "6.8.0-45-generic".into(),
    }
}

pub(crate) fn params() -> PreflightParams {
    PreflightParams {
        private_ip: "192.168.1.20".parse().unwrap(),
        public_ip: "203.0.113.7".parse().unwrap(),
        storage_dir: Some("/srv/im".into()),
        data_path: DEFAULT_DATA_PATH.into(),
        sizing: sizing::profile(50_000).unwrap(),
        redeploy: false,
    }
}

fn path(p: &str, exists: bool) -> PathInfo {
    PathInfo {
        path: p.into(),
        exists,
        is_dir: exists,
        uid: 888,
        gid: 888,
        mode: 0o755,
        writable_by_service: exists,
        available_bytes: 400 * GB,
        total_bytes: 480 * GB,
        mount_point: "/".into(),
        disks: vec!["nvme0n1".into()],
        rotational: Some(false),
        error: String::new(),
    }
}

/// A host that meets every requirement for 50,000 users.
pub(crate) fn good_host() -> HostInventory {
    HostInventory {
        hostname: "im1".into(),
        os: Some(os_info(UBUNTU_2404)),
        cpu: Some(CpuInfo {
            model: "Xeon".into(),
            physical_cores: 20,
            logical_cores: 40,
            sockets: 2,
        }),
        memory: Some(MemoryInfo {
            total_bytes: 32 * GB,
            available_bytes: 30 * GB,
            ..Default::default()
        }),
        paths: vec![path("/var/lib/portsip", false), path("/srv/im", true)],
        interfaces: vec![
            NetworkInterface {
                name: "lo".into(),
                loopback: true,
                up: true,
                addresses: vec![InterfaceAddress {
                    address: "127.0.0.1".into(),
                    prefix: 8,
                    ..Default::default()
                }],
                ..Default::default()
            },
            NetworkInterface {
                name: "ens18".into(),
                up: true,
                addresses: vec![InterfaceAddress {
                    address: "192.168.1.20".into(),
                    prefix: 24,
                    origin: AddressOrigin::Static as i32,
                    origin_source: "netplan /etc/netplan/01.yaml".into(),
                }],
                ..Default::default()
            },
            NetworkInterface {
                name: "ens19".into(),
                up: true,
                addresses: vec![InterfaceAddress {
                    address: "203.0.113.7".into(),
                    prefix: 28,
                    origin: AddressOrigin::Static as i32,
                    origin_source: "netplan /etc/netplan/01.yaml".into(),
                }],
                ..Default::default()
            },
        ],
        clock: Some(ClockInfo {
            synchronized: Some(true),
            source: "systemd-timesyncd".into(),
        }),
        power: Some(PowerInfo {
            governor: "performance".into(),
            profile: String::new(),
        }),
        listening: vec![ListeningSocket {
            protocol: "tcp".into(),
            address: "127.0.0.53".into(),
            port: 53,
            process: "systemd-resolve".into(),
            pid: 1,
        }],
        docker: Some(DockerInfo {
            installed: true,
            running: true,
            version: "27.3.1".into(),
            ..Default::default()
        }),
        updates: Some(PendingUpdates {
            known: true,
            total: 0,
            security: 0,
        }),
        agent: Some(AgentPrivileges {
            uid: 0,
            user: "root".into(),
            root: true,
        }),
        firewall: Some(FirewallInfo {
            active: "ufw".into(),
            installed: vec!["ufw".into()],
            admitted_tcp: vec![PortRange {
                first: 8887,
                last: 8887,
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pbx01() -> OsRelease {
    parse_os_release(UBUNTU_2404)
}

fn verdict_of(inv: &HostInventory, p: &PreflightParams, id: &str) -> Verdict {
    let checks = judge(inv, p, &pbx01());
    checks
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no check {id}: {checks:#?}"))
        .verdict
}

#[test]
fn a_compliant_host_passes_everything() {
    let checks = judge(&good_host(), &params(), &pbx01());
    let not_passing: Vec<_> = checks
        .iter()
        .filter(|c| c.verdict != Verdict::Pass)
        .collect();
    assert!(not_passing.is_empty(), "{not_passing:#?}");
    assert_eq!(Summary::of(&checks).exit_code(), 0);
    assert!(checks.iter().all(|c| c.remedy.is_empty()));
}

#[test]
fn os_release_and_pbx_version() {
    let mut host = good_host();
    host.os = Some(os_info(UBUNTU_2204));
    assert_eq!(verdict_of(&host, &params(), "os.release"), Verdict::Fail);
    assert_eq!(
        verdict_of(&host, &params(), "os.same-as-pbx"),
        Verdict::Fail
    );
    host.os = Some(os_info(DEBIAN_12));
    assert_eq!(verdict_of(&host, &params(), "os.release"), Verdict::Fail);
    // Same as pbx01 when pbx01 runs Debian too, but still not the supported OS.
    let checks = judge(&host, &params(), &parse_os_release(DEBIAN_12));
    let same = checks.iter().find(|c| c.id == "os.same-as-pbx").unwrap();
    assert_eq!(same.verdict, Verdict::Pass);
    let mut arm = good_host();
    arm.os.as_mut().unwrap().arch = "aarch64".into();
    assert_eq!(verdict_of(&arm, &params(), "os.arch"), Verdict::Fail);
}

#[test]
fn sizing_rows_decide_cpu_memory_and_disk() {
    let mut host = good_host();
    host.cpu.as_mut().unwrap().logical_cores = 12;
    host.memory.as_mut().unwrap().total_bytes = 9 * GB;
    let p50 = params();
    assert_eq!(verdict_of(&host, &p50, "cpu.cores"), Verdict::Fail);
    assert_eq!(verdict_of(&host, &p50, "memory.total"), Verdict::Fail);
    let mut p5 = params();
    p5.sizing = sizing::profile(5_000).unwrap();
    assert_eq!(verdict_of(&host, &p5, "cpu.cores"), Verdict::Pass);
    assert_eq!(verdict_of(&host, &p5, "memory.total"), Verdict::Pass);
    // No disk-size row below 50,000 users.
    assert!(
        judge(&host, &p5, &pbx01())
            .iter()
            .all(|c| c.id != "disk.size")
    );

    // 16 GiB-class VM reporting slightly under 16 GB still passes.
    host.memory.as_mut().unwrap().total_bytes = 15_700_000_000;
    assert_eq!(verdict_of(&host, &p50, "memory.total"), Verdict::Pass);

    let set_total = |host: &mut HostInventory, total: u64, free: u64| {
        for p in host.paths.iter_mut().filter(|p| p.path == "/srv/im") {
            p.total_bytes = total;
            p.available_bytes = free;
        }
    };
    set_total(&mut host, 200 * GB, 150 * GB);
    assert_eq!(verdict_of(&host, &p50, "disk.size"), Verdict::Warn);
    set_total(&mut host, 100 * GB, 90 * GB);
    assert_eq!(verdict_of(&host, &p50, "disk.size"), Verdict::Fail);
    assert_eq!(verdict_of(&host, &p50, "disk.free"), Verdict::Fail);
}

#[test]
fn storage_disk_and_directory() {
    let p = params();
    let mut host = good_host();
    host.paths[1].rotational = Some(true);
    assert_eq!(verdict_of(&host, &p, "disk.ssd"), Verdict::Fail);
    host.paths[1].rotational = None;
    assert_eq!(verdict_of(&host, &p, "disk.ssd"), Verdict::Warn);

    let mut host = good_host();
    host.paths[1] = path("/srv/im", false);
    let checks = judge(&host, &p, &pbx01());
    let dir = checks.iter().find(|c| c.id == "storage.dir").unwrap();
    assert_eq!(dir.verdict, Verdict::Fail);
    assert!(dir.remedy.contains("mkdir -p /srv/im"), "{dir:?}");

    let mut host = good_host();
    host.paths[1].is_dir = false;
    assert_eq!(verdict_of(&host, &p, "storage.dir"), Verdict::Fail);
    let mut host = good_host();
    host.paths[1].writable_by_service = false;
    host.paths[1].uid = 0;
    assert_eq!(verdict_of(&host, &p, "storage.dir"), Verdict::Warn);

    // Without -f the data path carries the disk checks, and no storage.dir check runs.
    let mut no_f = params();
    no_f.storage_dir = None;
    let checks = judge(&good_host(), &no_f, &pbx01());
    assert!(checks.iter().all(|c| c.id != "storage.dir"));
    let data = checks.iter().find(|c| c.id == "storage.data-path").unwrap();
    assert_eq!(
        (data.verdict, data.observed.as_str()),
        (Verdict::Pass, "/var/lib/portsip will be created")
    );
    let mut host = good_host();
    host.paths[0].exists = true;
    host.paths[0].is_dir = false;
    assert_eq!(verdict_of(&host, &no_f, "storage.data-path"), Verdict::Fail);
}

#[test]
fn private_address_must_be_ours_and_static() {
    let mut p = params();
    let host = good_host();
    p.private_ip = "192.168.1.99".parse().unwrap();
    assert_eq!(verdict_of(&host, &p, "net.private-ip"), Verdict::Fail);

    let mut dhcp = good_host();
    dhcp.interfaces[1].addresses[0].origin = AddressOrigin::Dhcp as i32;
    assert_eq!(
        verdict_of(&dhcp, &params(), "net.private-ip"),
        Verdict::Fail
    );
    dhcp.interfaces[1].addresses[0].origin = AddressOrigin::Unknown as i32;
    assert_eq!(
        verdict_of(&dhcp, &params(), "net.private-ip"),
        Verdict::Warn
    );

    // A loopback test address is covered by lo's /8: usable, but only a warning.
    let mut lo = params();
    lo.private_ip = "127.77.0.3".parse().unwrap();
    assert_eq!(
        verdict_of(&good_host(), &lo, "net.private-ip"),
        Verdict::Warn
    );

    // A public address behind NAT is a warning, on an interface a pass.
    assert_eq!(
        verdict_of(&good_host(), &params(), "net.public-ip"),
        Verdict::Pass
    );
    let mut nat = good_host();
    nat.interfaces.pop();
    assert_eq!(verdict_of(&nat, &params(), "net.public-ip"), Verdict::Warn);
}

#[test]
fn clock_updates_and_power() {
    let p = params();
    let mut host = good_host();
    host.clock = Some(ClockInfo {
        synchronized: Some(false),
        source: "timedatectl".into(),
    });
    assert_eq!(verdict_of(&host, &p, "clock.sync"), Verdict::Fail);
    host.clock = Some(ClockInfo {
        synchronized: None,
        source: "unknown".into(),
    });
    assert_eq!(verdict_of(&host, &p, "clock.sync"), Verdict::Warn);

    host.updates = Some(PendingUpdates {
        known: true,
        total: 17,
        security: 5,
    });
    assert_eq!(verdict_of(&host, &p, "updates.security"), Verdict::Warn);
    host.updates = Some(PendingUpdates::default());
    assert_eq!(verdict_of(&host, &p, "updates.security"), Verdict::Warn);

    host.power = Some(PowerInfo {
        governor: "powersave".into(),
        profile: String::new(),
    });
    assert_eq!(verdict_of(&host, &p, "power.performance"), Verdict::Warn);
    host.power = Some(PowerInfo::default());
    assert_eq!(verdict_of(&host, &p, "power.performance"), Verdict::Pass);
}

#[test]
fn conflicting_software_and_ports() {
    let p = params();
    let mut host = good_host();
    // What the agent reports for its recorded dpkg status fixture.
    host.packages = ["anydesk", "docker-ce", "ufw", "wireguard-tools"]
        .iter()
        .map(|name| Package {
            name: (*name).into(),
            version: "1".into(),
        })
        .collect();
    let checks = judge(&host, &p, &pbx01());
    let get = |id: &str| checks.iter().find(|c| c.id == id).unwrap().clone();
    assert_eq!(get("remote-access.absent").verdict, Verdict::Fail);
    assert_eq!(get("remote-access.absent").observed, "anydesk");
    assert_eq!(get("vpn.absent").observed, "wireguard-tools");
    // postgresql-16 in the fixture is removed (config files only): no conflict.
    assert_eq!(get("postgresql.absent").verdict, Verdict::Pass);

    host.packages.push(Package {
        name: "postgresql-16".into(),
        version: "16.4".into(),
    });
    host.packages.push(Package {
        name: "dnsmasq".into(),
        version: "2.90".into(),
    });
    host.listening.push(ListeningSocket {
        protocol: "tcp6".into(),
        address: "::".into(),
        port: 8887,
        process: "nginx".into(),
        pid: 7,
    });
    host.listening.push(ListeningSocket {
        protocol: "udp".into(),
        address: "0.0.0.0".into(),
        port: 67,
        process: "kea-dhcp4".into(),
        pid: 8,
    });
    let checks = judge(&host, &p, &pbx01());
    let get = |id: &str| checks.iter().find(|c| c.id == id).unwrap().clone();
    assert_eq!(get("postgresql.absent").verdict, Verdict::Fail);
    assert_eq!(get("dns.not-server").verdict, Verdict::Fail);
    assert_eq!(get("dhcp.not-server").verdict, Verdict::Fail);
    let port = get("port.8887");
    assert_eq!(port.verdict, Verdict::Fail);
    assert!(port.observed.contains("nginx"), "{port:?}");
    // Our own running deployment holding the port is not a conflict.
    let mut redeploy = params();
    redeploy.redeploy = true;
    let checks = judge(&host, &redeploy, &pbx01());
    assert_eq!(
        checks.iter().find(|c| c.id == "port.8887").unwrap().verdict,
        Verdict::Pass
    );
    // systemd-resolved's stub on 127.0.0.53 is not a DNS server.
    assert_eq!(
        verdict_of(&good_host(), &p, "dns.not-server"),
        Verdict::Pass
    );
}

#[test]
fn docker_firewall_and_agent() {
    let p = params();
    let mut host = good_host();
    host.docker = Some(DockerInfo::default());
    assert_eq!(verdict_of(&host, &p, "docker.engine"), Verdict::Warn);
    host.firewall = Some(FirewallInfo {
        active: "firewalld".into(),
        installed: vec![],
        admitted_tcp: vec![PortRange {
            first: 22,
            last: 22,
        }],
        ..Default::default()
    });
    assert_eq!(verdict_of(&host, &p, "firewall.im-port"), Verdict::Warn);
    // A range that covers the IM port admits it.
    host.firewall
        .as_mut()
        .unwrap()
        .admitted_tcp
        .push(PortRange {
            first: 8000,
            last: 9000,
        });
    assert_eq!(verdict_of(&host, &p, "firewall.im-port"), Verdict::Pass);
    host.agent = Some(AgentPrivileges {
        uid: 1000,
        user: "pbx".into(),
        root: false,
    });
    assert_eq!(verdict_of(&host, &p, "agent.privileges"), Verdict::Fail);
}

#[test]
fn summary_and_ordering() {
    let mut host = good_host();
    host.os = Some(os_info(UBUNTU_2204));
    host.power = Some(PowerInfo {
        governor: "powersave".into(),
        profile: String::new(),
    });
    let mut checks = judge(&host, &params(), &pbx01());
    let summary = Summary::of(&checks);
    assert_eq!((summary.fail, summary.exit_code()), (2, 2));
    failures_first(&mut checks);
    assert_eq!(checks[0].verdict, Verdict::Fail);
    assert_eq!(checks[2].verdict, Verdict::Warn);
    let warn_only = Summary {
        pass: 3,
        warn: 1,
        fail: 0,
    };
    assert_eq!(warn_only.exit_code(), 1);
}
