//! What the daemon keeps of a health sample. The agent on an IM host is
//! root's to replace: its samples may carry a million containers, names
//! that are escape sequences, NaN for a load average, the same filesystem
//! twice, an expiry its certificate does not have. [`admit`] makes any
//! sample one the daemon can hold, show, store and expose: every list
//! capped, every name held to the agent's own rules (or dropped), every
//! text made printable and cut, every number finite, duplicates gone, and
//! the certificate expiry the one the agent presented in the handshake.
//! Pure; what it dropped is counted for `/metrics`.

use std::collections::{BTreeMap, BTreeSet};

use imfleet_proto::agent::v1::{HealthSample, ServiceProbe};
use imfleet_proto::model::names;

use crate::text::printable;

/// The most the daemon decodes of one health message. A sample at every
/// cap below with every text at its longest is about 58 KB (a test keeps it
/// under half of this); a real one is 2 to 5 KB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Caps on each list of a sample, and so on each host's series.
pub const MAX_CPUS: usize = 256;
pub const MAX_FILESYSTEMS: usize = 4;
pub const MAX_NETWORKS: usize = 32;
pub const MAX_DISKS: usize = 32;
pub const MAX_CONTAINERS: usize = 32;
/// The agent keeps at most this many stats figures and gate ports itself.
pub const MAX_STATS: usize = 64;
pub const MAX_PORTS: usize = 8;
pub const MAX_NOTES: usize = 8;

/// Longest text kept of a field that is only shown.
const MAX_TEXT: usize = 256;
const MAX_SHORT: usize = 64;

/// What [`admit`] had to change: entries dropped (over a cap, a name the
/// agent would never send, a duplicate) and numbers that were not finite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    pub dropped: u64,
    pub non_finite: u64,
}

impl Admission {
    pub fn clean(&self) -> bool {
        *self == Admission::default()
    }
}

/// `sample` made safe to keep; `presented_not_after` (Unix seconds) is the
/// expiry of the certificate the agent presented, which replaces its claim.
pub fn admit(
    mut sample: HealthSample,
    presented_not_after: Option<i64>,
) -> (HealthSample, Admission) {
    let mut a = Admission::default();
    if let Some(h) = sample.host.as_mut() {
        let mut seen = BTreeSet::new();
        keep(&mut h.cpus, MAX_CPUS, &mut a, |c| seen.insert(c.cpu));
        for c in &mut h.cpus {
            for v in [
                &mut c.user,
                &mut c.nice,
                &mut c.system,
                &mut c.idle,
                &mut c.iowait,
                &mut c.irq,
                &mut c.softirq,
                &mut c.steal,
            ] {
                finite(v, &mut a);
            }
        }
        for v in [&mut h.load1, &mut h.load5, &mut h.load15] {
            finite(v, &mut a);
        }
        let mut roles = BTreeSet::new();
        keep(&mut h.filesystems, MAX_FILESYSTEMS, &mut a, |f| {
            matches!(f.role.as_str(), "data" | "storage")
                && names::valid_fs_type(&f.fs_type)
                && f.mount_point.starts_with('/')
                && roles.insert(f.role.clone())
        });
        for f in &mut h.filesystems {
            // Any text: `/dev/mapper/vg-root`, `server:/export`, `overlay`.
            text(&mut f.device, MAX_TEXT);
            text(&mut f.path, MAX_TEXT);
            text(&mut f.mount_point, MAX_TEXT);
        }
        let mut seen = BTreeSet::new();
        keep(&mut h.networks, MAX_NETWORKS, &mut a, |n| {
            names::valid_device_name(&n.device) && seen.insert(n.device.clone())
        });
        let mut seen = BTreeSet::new();
        keep(&mut h.disks, MAX_DISKS, &mut a, |d| {
            names::valid_device_name(&d.device) && seen.insert(d.device.clone())
        });
        for d in &mut h.disks {
            finite(&mut d.io_time_seconds, &mut a);
        }
    }
    let mut seen = BTreeSet::new();
    keep(&mut sample.containers, MAX_CONTAINERS, &mut a, |c| {
        names::valid_container_name(&c.name) && seen.insert(c.name.clone())
    });
    for c in &mut sample.containers {
        text(&mut c.image, MAX_TEXT);
        text(&mut c.image_id, MAX_SHORT + 8);
        text(&mut c.image_version, MAX_SHORT);
        text(&mut c.state, MAX_SHORT);
        text(&mut c.health, MAX_SHORT);
    }
    if let Some(s) = sample.service.as_mut() {
        admit_service(s, &mut a);
    }
    if let Some(agent) = sample.agent.as_mut() {
        finite(&mut agent.cpu_seconds, &mut a);
        text(&mut agent.version, MAX_SHORT);
        agent.certificate_not_after = presented_not_after.unwrap_or_default();
    }
    let notes = sample.notes.len();
    sample.notes.truncate(MAX_NOTES);
    a.dropped += (notes - sample.notes.len()) as u64;
    for n in &mut sample.notes {
        text(n, MAX_TEXT);
    }
    (sample, a)
}

fn admit_service(s: &mut ServiceProbe, a: &mut Admission) {
    text(&mut s.stats_error, MAX_TEXT);
    let before = s.stats.len();
    let stats: BTreeMap<String, f64> = std::mem::take(&mut s.stats)
        .into_iter()
        .filter(|(name, _)| names::valid_stat_name(name))
        .take(MAX_STATS)
        .collect();
    a.dropped += (before - stats.len()) as u64;
    s.stats = stats
        .into_iter()
        .map(|(name, mut v)| {
            finite(&mut v, a);
            (name, v)
        })
        .collect();
    let mut seen = BTreeSet::new();
    keep(&mut s.tcp, MAX_PORTS, a, |p| {
        (1..=65_535).contains(&p.port) && seen.insert(p.port)
    });
}

/// Keeps the entries `ok` accepts, at most `cap` of them, counting the rest.
fn keep<T>(list: &mut Vec<T>, cap: usize, a: &mut Admission, mut ok: impl FnMut(&T) -> bool) {
    let before = list.len();
    let mut kept = 0;
    list.retain(|item| {
        let keep = kept < cap && ok(item);
        kept += usize::from(keep);
        keep
    });
    a.dropped += (before - list.len()) as u64;
}

fn finite(v: &mut f64, a: &mut Admission) {
    if !v.is_finite() {
        *v = 0.0;
        a.non_finite += 1;
    }
}

fn text(s: &mut String, max_chars: usize) {
    if let std::borrow::Cow::Owned(shown) = printable(s, max_chars) {
        *s = shown;
    }
}

#[cfg(test)]
mod tests;
