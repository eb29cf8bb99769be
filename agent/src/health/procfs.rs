//! Pure parsers of the kernel's counters: `/proc/stat` (CPU time per mode),
//! `/proc/diskstats` (bytes read and written per disk) and `/proc/net/dev`
//! (bytes per interface). One file read each per sample, no process spawned.

use imfleet_proto::agent::v1::{CpuTimes, DiskCounters, NetworkCounters};

/// `/proc/stat` counts in USER_HZ, which Linux fixes at 100 for userspace
/// on every architecture (whatever the kernel's own tick rate).
const USER_HZ: f64 = 100.0;
/// `/proc/diskstats` counts 512-byte sectors, whatever the device's own size.
const SECTOR_BYTES: u64 = 512;

/// Seconds per mode for every `cpuN` line (the `cpu` total line is skipped).
pub fn parse_stat(text: &str) -> Vec<CpuTimes> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu: u32 = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<f64> = fields
                .take(8)
                .map(|f| f.parse::<u64>().map(|n| n as f64 / USER_HZ))
                .collect::<Result<_, _>>()
                .ok()?;
            let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
            Some(CpuTimes {
                cpu,
                user: at(0),
                nice: at(1),
                system: at(2),
                idle: at(3),
                iowait: at(4),
                irq: at(5),
                softirq: at(6),
                steal: at(7),
            })
        })
        .collect()
}

/// Whole disks only: partitions, loop and RAM devices are left out, as
/// node_exporter does by default (a partition would count its bytes twice).
pub fn parse_diskstats(text: &str) -> Vec<DiskCounters> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 14 {
                return None;
            }
            let device = f[2];
            if !is_whole_disk(device) {
                return None;
            }
            let n = |i: usize| f[i].parse::<u64>().ok();
            Some(DiskCounters {
                device: device.to_owned(),
                read_bytes: n(5)? * SECTOR_BYTES,
                written_bytes: n(9)? * SECTOR_BYTES,
                io_time_seconds: n(12)? as f64 / 1000.0,
            })
        })
        .collect()
}

fn is_whole_disk(name: &str) -> bool {
    let excluded = ["loop", "ram", "fd", "sr", "zram"];
    if excluded.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    // nvme0n1p2, mmcblk0p1: a `p` and digits after a digit.
    if let Some((head, tail)) = name.rsplit_once('p')
        && !tail.is_empty()
        && tail.bytes().all(|b| b.is_ascii_digit())
        && head.bytes().last().is_some_and(|b| b.is_ascii_digit())
        && (head.starts_with("nvme") || head.starts_with("mmcblk"))
    {
        return false;
    }
    // sda1, vdb3, xvda1: letters then digits.
    let classic = ["sd", "vd", "hd", "xvd"];
    if classic.iter().any(|p| name.starts_with(p)) {
        return !name.bytes().last().is_some_and(|b| b.is_ascii_digit());
    }
    true
}

/// Byte and error counters per interface, loopback included (node_exporter
/// reports it too; dashboards filter).
pub fn parse_net_dev(text: &str) -> Vec<NetworkCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let f: Vec<u64> = counters
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            if f.len() < 16 {
                return None;
            }
            Some(NetworkCounters {
                device: name.trim().to_owned(),
                receive_bytes: f[0],
                receive_errors: f[2],
                transmit_bytes: f[8],
                transmit_errors: f[10],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_in_seconds_per_mode() {
        let text = "cpu  1000 20 300 40000 50 6 7 8 0 0\n\
                    cpu0 600 10 200 20000 25 3 4 5 0 0\n\
                    cpu1 400 10 100 20000 25 3 3 3 0 0\n\
                    intr 12345 0 0\nctxt 999\nbtime 1700000000\n";
        let cpus = parse_stat(text);
        assert_eq!(cpus.len(), 2, "the total line is not a CPU");
        assert_eq!(cpus[0].cpu, 0);
        assert_eq!(cpus[0].user, 6.0);
        assert_eq!(cpus[0].idle, 200.0);
        assert_eq!(cpus[1].cpu, 1);
        assert_eq!(cpus[1].steal, 0.03);
        // Old kernels have fewer columns: the missing modes are zero.
        let old = parse_stat("cpu0 100 0 100 1000\n");
        assert_eq!(old[0].iowait, 0.0);
        assert_eq!(old[0].system, 1.0);
        assert!(parse_stat("cpu0 x y z\n").is_empty());
    }

    #[test]
    fn whole_disks_in_bytes() {
        let text = "   8       0 sda 1000 0 2048 0 500 0 4096 0 0 1500 0 0 0 0 0 0 0\n\
                    8       1 sda1 900 0 2000 0 400 0 4000 0 0 1400 0\n\
                    259     0 nvme0n1 10 0 8 0 20 0 16 0 0 30 0\n\
                    259     1 nvme0n1p1 10 0 8 0 20 0 16 0 0 30 0\n\
                    7       0 loop0 5 0 10 0 0 0 0 0 0 1 0\n\
                    253     0 dm-0 1 0 2 0 3 0 4 0 0 5 0\n";
        let disks = parse_diskstats(text);
        let names: Vec<&str> = disks.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(names, ["sda", "nvme0n1", "dm-0"]);
        assert_eq!(disks[0].read_bytes, 2048 * 512);
        assert_eq!(disks[0].written_bytes, 4096 * 512);
        assert_eq!(disks[0].io_time_seconds, 1.5);
    }

    #[test]
    fn interfaces_with_their_byte_counters() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
eth0: 123456 100 2 0 0 0 0 0 654321 90 1 0 0 0 0 0\n";
        let nets = parse_net_dev(text);
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[1].device, "eth0");
        assert_eq!(nets[1].receive_bytes, 123456);
        assert_eq!(nets[1].transmit_bytes, 654321);
        assert_eq!(nets[1].receive_errors, 2);
        assert_eq!(nets[1].transmit_errors, 1);
    }
}
