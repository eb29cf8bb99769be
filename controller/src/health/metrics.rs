//! The fleet as Prometheus metrics: node_exporter's names for host figures,
//! `imfleet_*` for the agent, the IM and the streams; every sample carries a
//! `host` label (the imfleet host name; `instance` is the scrape target's).

use super::HostSnapshot;
use super::exposition::{Family, render};

/// What the daemon's webhook did so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookCounts {
    pub delivered: u64,
    pub failed: u64,
    pub dropped: u64,
}

/// What the daemon itself counts, beside its hosts.
#[derive(Debug, Clone, Copy, Default)]
pub struct DaemonCounts {
    /// The webhook's, when there is one.
    pub webhook: Option<WebhookCounts>,
    /// Events and history points that did not fit the queue to the database.
    pub queue_dropped: u64,
}

/// The `/metrics` page for these hosts and the daemon's own counts.
pub fn page(hosts: &[HostSnapshot], daemon: DaemonCounts) -> String {
    let mut f = Families::default();
    for h in hosts {
        f.host(h);
    }
    f.queue_dropped
        .push(Vec::new(), daemon.queue_dropped as f64);
    if let Some(w) = daemon.webhook {
        for (outcome, n) in [
            ("delivered", w.delivered),
            ("failed", w.failed),
            ("dropped", w.dropped),
        ] {
            f.webhook
                .push(vec![("outcome", outcome.to_owned())], n as f64);
        }
    }
    render(&f.into_list())
}

/// The most series one host puts on the page: its lists are capped on
/// admission (`health::ingest`), and each entry makes a fixed number of
/// series. With 1,000 hosts that is at most 2.4 million, in practice
/// (8 CPUs, 4 containers) about 150 a host.
pub const MAX_SERIES_PER_HOST: usize = {
    use super::ingest::*;
    // agent up, reconnects, three drop counters, sample age, IM healthy,
    // four memory figures, three loads, certificate, agent memory and CPU.
    17 + MAX_CPUS * 8
        + MAX_FILESYSTEMS * 3
        + MAX_NETWORKS * 2
        + MAX_DISKS * 3
        + MAX_CONTAINERS * 3
        + MAX_STATS
        + MAX_PORTS
};

/// Every metric name the page can hold (what dashboards and alerting
/// rules may refer to).
pub fn names() -> Vec<&'static str> {
    Families::default()
        .into_list()
        .iter()
        .map(Family::name)
        .collect()
}

type Labels = Vec<(&'static str, String)>;

struct Families {
    cpu: Family,
    mem_total: Family,
    mem_available: Family,
    swap_total: Family,
    swap_free: Family,
    load1: Family,
    load5: Family,
    load15: Family,
    fs_size: Family,
    fs_avail: Family,
    fs_free: Family,
    net_rx: Family,
    net_tx: Family,
    disk_read: Family,
    disk_written: Family,
    disk_io: Family,
    agent_up: Family,
    im_healthy: Family,
    container_up: Family,
    container_healthy: Family,
    container_restarts: Family,
    im_stat: Family,
    tcp_open: Family,
    cert_expiry: Family,
    agent_rss: Family,
    agent_cpu: Family,
    sample_age: Family,
    reconnects: Family,
    samples_dropped: Family,
    entries_dropped: Family,
    events_suppressed: Family,
    queue_dropped: Family,
    webhook: Family,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            cpu: Family::counter(
                "node_cpu_seconds_total",
                "Seconds the CPUs spent in each mode.",
            ),
            mem_total: Family::gauge(
                "node_memory_MemTotal_bytes",
                "Memory information field MemTotal_bytes.",
            ),
            mem_available: Family::gauge(
                "node_memory_MemAvailable_bytes",
                "Memory information field MemAvailable_bytes.",
            ),
            swap_total: Family::gauge(
                "node_memory_SwapTotal_bytes",
                "Memory information field SwapTotal_bytes.",
            ),
            swap_free: Family::gauge(
                "node_memory_SwapFree_bytes",
                "Memory information field SwapFree_bytes.",
            ),
            load1: Family::gauge("node_load1", "1m load average."),
            load5: Family::gauge("node_load5", "5m load average."),
            load15: Family::gauge("node_load15", "15m load average."),
            fs_size: Family::gauge("node_filesystem_size_bytes", "Filesystem size in bytes."),
            fs_avail: Family::gauge(
                "node_filesystem_avail_bytes",
                "Filesystem space available to non-root users in bytes.",
            ),
            fs_free: Family::gauge(
                "node_filesystem_free_bytes",
                "Filesystem free space in bytes.",
            ),
            net_rx: Family::counter(
                "node_network_receive_bytes_total",
                "Network device statistic receive_bytes.",
            ),
            net_tx: Family::counter(
                "node_network_transmit_bytes_total",
                "Network device statistic transmit_bytes.",
            ),
            disk_read: Family::counter(
                "node_disk_read_bytes_total",
                "The total number of bytes read successfully.",
            ),
            disk_written: Family::counter(
                "node_disk_written_bytes_total",
                "The total number of bytes written successfully.",
            ),
            disk_io: Family::counter(
                "node_disk_io_time_seconds_total",
                "Total seconds spent doing I/Os.",
            ),
            agent_up: Family::gauge(
                "imfleet_agent_up",
                "Whether the host's agent streams health samples (1) or not (0).",
            ),
            im_healthy: Family::gauge(
                "imfleet_im_healthy",
                "Whether the IM service is healthy: containers, stats endpoint and ports (1) or not (0).",
            ),
            container_up: Family::gauge(
                "imfleet_container_up",
                "Whether the container is running.",
            ),
            container_healthy: Family::gauge(
                "imfleet_container_healthy",
                "Whether the container is running and healthy (or has no health check).",
            ),
            container_restarts: Family::counter(
                "imfleet_container_restarts_total",
                "Times the Engine restarted the container since it was created.",
            ),
            im_stat: Family::gauge(
                "imfleet_im_stat",
                "A numeric figure of the IM's /svr_stats answer, by field name.",
            ),
            tcp_open: Family::gauge(
                "imfleet_im_tcp_port_open",
                "Whether the IM's TCP port accepts connections on the host.",
            ),
            cert_expiry: Family::gauge(
                "imfleet_agent_certificate_expiry_seconds",
                "Seconds until the agent's certificate expires.",
            ),
            agent_rss: Family::gauge(
                "imfleet_agent_resident_memory_bytes",
                "Resident memory of the agent process.",
            ),
            agent_cpu: Family::counter(
                "imfleet_agent_cpu_seconds_total",
                "CPU seconds the agent process used.",
            ),
            sample_age: Family::gauge(
                "imfleet_last_sample_age_seconds",
                "Seconds since the host's last health sample arrived.",
            ),
            reconnects: Family::counter(
                "imfleet_stream_reconnects_total",
                "Times the daemon reconnected the host's health stream.",
            ),
            samples_dropped: Family::counter(
                "imfleet_samples_dropped_total",
                "Health samples dropped for arriving sooner than the daemon asked.",
            ),
            entries_dropped: Family::counter(
                "imfleet_sample_entries_dropped_total",
                "Entries of health samples dropped on admission (over a cap, a bad name, a duplicate, a number that is not finite).",
            ),
            events_suppressed: Family::counter(
                "imfleet_events_suppressed_total",
                "Health events not announced: the host was flapping or over its event budget.",
            ),
            queue_dropped: Family::counter(
                "imfleet_daemon_queue_dropped_total",
                "Events and history points the daemon could not queue for its database.",
            ),
            webhook: Family::counter(
                "imfleet_webhook_notifications_total",
                "Event notifications to the webhook, by outcome (dropped: the queue was full).",
            ),
        }
    }
}

impl Families {
    fn host(&mut self, h: &HostSnapshot) {
        let host = || -> Labels { vec![("host", h.host.clone())] };
        let with = |extra: &[(&'static str, &str)]| -> Labels {
            let mut l = host();
            l.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
            l
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        self.agent_up.push(host(), flag(h.agent_up));
        self.reconnects.push(host(), h.reconnects as f64);
        self.samples_dropped.push(host(), h.samples_dropped as f64);
        self.entries_dropped.push(host(), h.entries_dropped as f64);
        self.events_suppressed
            .push(host(), h.events_suppressed as f64);
        if let Some(age) = h.sample_age_seconds {
            self.sample_age.push(host(), age);
        }
        let Some(sample) = &h.sample else { return };
        if let Some(healthy) = h.im_healthy {
            self.im_healthy.push(host(), flag(healthy));
        }
        if let Some(m) = &sample.host {
            for c in &m.cpus {
                let cpu = c.cpu.to_string();
                for (mode, v) in [
                    ("user", c.user),
                    ("nice", c.nice),
                    ("system", c.system),
                    ("idle", c.idle),
                    ("iowait", c.iowait),
                    ("irq", c.irq),
                    ("softirq", c.softirq),
                    ("steal", c.steal),
                ] {
                    self.cpu.push(with(&[("cpu", &cpu), ("mode", mode)]), v);
                }
            }
            self.mem_total.push(host(), m.memory_total_bytes as f64);
            self.mem_available
                .push(host(), m.memory_available_bytes as f64);
            self.swap_total.push(host(), m.swap_total_bytes as f64);
            self.swap_free.push(host(), m.swap_free_bytes as f64);
            self.load1.push(host(), m.load1);
            self.load5.push(host(), m.load5);
            self.load15.push(host(), m.load15);
            // One series per filesystem: the data path and the storage
            // directory on one mount are one filesystem, with both roles.
            let mut seen: Vec<(&str, Vec<&str>, &imfleet_proto::agent::v1::FilesystemUsage)> =
                Vec::new();
            for fs in &m.filesystems {
                match seen
                    .iter_mut()
                    .find(|(mount, _, _)| *mount == fs.mount_point)
                {
                    Some((_, roles, _)) => roles.push(&fs.role),
                    None => seen.push((&fs.mount_point, vec![&fs.role], fs)),
                }
            }
            for (_, roles, fs) in seen {
                let roles = roles.join(",");
                let l = with(&[
                    ("device", &fs.device),
                    ("fstype", &fs.fs_type),
                    ("mountpoint", &fs.mount_point),
                    ("role", &roles),
                ]);
                self.fs_size.push(l.clone(), fs.size_bytes as f64);
                self.fs_avail.push(l.clone(), fs.available_bytes as f64);
                self.fs_free.push(l, fs.free_bytes as f64);
            }
            for n in &m.networks {
                let l = with(&[("device", &n.device)]);
                self.net_rx.push(l.clone(), n.receive_bytes as f64);
                self.net_tx.push(l, n.transmit_bytes as f64);
            }
            for d in &m.disks {
                let l = with(&[("device", &d.device)]);
                self.disk_read.push(l.clone(), d.read_bytes as f64);
                self.disk_written.push(l.clone(), d.written_bytes as f64);
                self.disk_io.push(l, d.io_time_seconds);
            }
        }
        for c in &sample.containers {
            let l = with(&[("container", &c.name)]);
            let running = c.state == "running";
            self.container_up.push(l.clone(), flag(running));
            self.container_healthy.push(
                l.clone(),
                flag(imfleet_proto::model::health::container_serving(c)),
            );
            self.container_restarts.push(l, f64::from(c.restart_count));
        }
        if let Some(s) = &sample.service {
            let mut stats: Vec<(&String, &f64)> = s.stats.iter().collect();
            stats.sort_by(|a, b| a.0.cmp(b.0));
            for (name, v) in stats {
                self.im_stat.push(with(&[("name", name)]), *v);
            }
            // A port listed twice is one series (a duplicate spoils the page).
            let mut ports: Vec<&imfleet_proto::agent::v1::PortProbe> = s.tcp.iter().collect();
            ports.sort_by_key(|p| p.port);
            ports.dedup_by_key(|p| p.port);
            for p in ports {
                self.tcp_open
                    .push(with(&[("port", &p.port.to_string())]), flag(p.open));
            }
        }
        if let Some(a) = &sample.agent {
            if a.certificate_not_after > 0 {
                self.cert_expiry
                    .push(host(), (a.certificate_not_after - h.now_unix) as f64);
            }
            self.agent_rss.push(host(), a.resident_memory_bytes as f64);
            self.agent_cpu.push(host(), a.cpu_seconds);
        }
    }

    fn into_list(self) -> Vec<Family> {
        vec![
            self.agent_up,
            self.im_healthy,
            self.sample_age,
            self.reconnects,
            self.samples_dropped,
            self.entries_dropped,
            self.events_suppressed,
            self.cert_expiry,
            self.agent_rss,
            self.agent_cpu,
            self.container_up,
            self.container_healthy,
            self.container_restarts,
            self.im_stat,
            self.tcp_open,
            self.cpu,
            self.mem_total,
            self.mem_available,
            self.swap_total,
            self.swap_free,
            self.load1,
            self.load5,
            self.load15,
            self.fs_size,
            self.fs_avail,
            self.fs_free,
            self.net_rx,
            self.net_tx,
            self.disk_read,
            self.disk_written,
            self.disk_io,
            self.queue_dropped,
            self.webhook,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::{
        FilesystemUsage, HealthSample, HostMetrics, PortProbe, ServiceProbe,
    };

    #[test]
    fn one_series_per_filesystem_and_port() {
        let fs = |role: &str| FilesystemUsage {
            role: role.into(),
            mount_point: "/".into(),
            size_bytes: 100,
            ..Default::default()
        };
        let probe = |port| PortProbe { port, open: true };
        let host = HostSnapshot {
            host: "im1".into(),
            agent_up: true,
            sample: Some(HealthSample {
                host: Some(HostMetrics {
                    filesystems: vec![fs("data"), fs("storage")],
                    ..Default::default()
                }),
                service: Some(ServiceProbe {
                    tcp: vec![probe(8887), probe(8887)],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = page(
            &[host],
            DaemonCounts {
                webhook: Some(WebhookCounts {
                    delivered: 2,
                    ..Default::default()
                }),
                queue_dropped: 0,
            },
        );
        let sizes: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("node_filesystem_size_bytes{"))
            .collect();
        assert_eq!(sizes.len(), 1, "{text}");
        assert!(sizes[0].contains("role=\"data,storage\""), "{}", sizes[0]);
        let ports = text
            .lines()
            .filter(|l| l.starts_with("imfleet_im_tcp_port_open{"))
            .count();
        assert_eq!(ports, 1);
        assert!(text.contains("imfleet_webhook_notifications_total{outcome=\"delivered\"} 2"));
        // Every name the page can hold is known to dashboards' checks.
        assert!(names().contains(&"imfleet_webhook_notifications_total"));
    }

    #[test]
    fn a_hostile_sample_stays_within_the_series_bound() {
        use imfleet_proto::agent::v1::{ContainerStatus, CpuTimes, DiskCounters, NetworkCounters};
        let huge = HealthSample {
            host: Some(HostMetrics {
                cpus: (0..100_000)
                    .map(|cpu| CpuTimes {
                        cpu,
                        ..Default::default()
                    })
                    .collect(),
                filesystems: (0..1000)
                    .map(|i| FilesystemUsage {
                        role: if i % 2 == 0 { "data" } else { "storage" }.into(),
                        mount_point: format!("/m{i}"),
                        fs_type: "ext4".into(),
                        ..Default::default()
                    })
                    .collect(),
                networks: (0..100_000)
                    .map(|i| NetworkCounters {
                        device: format!("e{}", i % 500),
                        ..Default::default()
                    })
                    .collect(),
                disks: (0..100_000)
                    .map(|i| DiskCounters {
                        device: format!("d{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            containers: (0..100_000)
                .map(|i| ContainerStatus {
                    name: format!("c{i}"),
                    ..Default::default()
                })
                .collect(),
            service: Some(ServiceProbe {
                stats: (0..100_000).map(|i| (format!("s{i}"), 1.0)).collect(),
                tcp: (1..60_000)
                    .map(|port| PortProbe { port, open: true })
                    .collect(),
                ..Default::default()
            }),
            agent: Some(Default::default()),
            ..Default::default()
        };
        let (sample, _) = super::super::ingest::admit(huge, Some(2_000_000_000));
        let host = HostSnapshot {
            host: "im1".into(),
            agent_up: true,
            im_healthy: Some(true),
            sample_age_seconds: Some(1.0),
            sample: Some(sample),
            ..Default::default()
        };
        let text = page(&[host], DaemonCounts::default());
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("host=\"im1\""))
            .collect();
        assert!(series.len() <= MAX_SERIES_PER_HOST, "{}", series.len());
        assert!(
            series.len() > MAX_SERIES_PER_HOST - 10,
            "every cap reached: {}",
            series.len()
        );
        let unique: std::collections::HashSet<&str> = series
            .iter()
            .map(|l| l.rsplit_once(' ').unwrap().0)
            .collect();
        assert_eq!(unique.len(), series.len(), "one series per label set");
    }
}
