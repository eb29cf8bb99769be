//! CPU topology from `/proc/cpuinfo`.

use std::collections::HashSet;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTopology {
    pub model: String,
    pub logical: u32,
    pub physical_cores: u32,
    pub sockets: u32,
}

/// Counts logical CPUs, distinct (socket, core) pairs and sockets. Hosts that
/// do not report topology (some VMs, non-x86) count every CPU as a core.
pub fn parse_cpuinfo(text: &str) -> CpuTopology {
    let mut model = String::new();
    let mut logical = 0u32;
    let mut cores = HashSet::new();
    let mut sockets = HashSet::new();
    for block in text.split("\n\n").filter(|b| b.contains("processor")) {
        logical += 1;
        let mut physical_id = None;
        let mut core_id = None;
        for line in block.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "model name" | "Model" if model.is_empty() => model = value.trim().to_owned(),
                "physical id" => physical_id = Some(value.trim().to_owned()),
                "core id" => core_id = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        if let (Some(p), Some(c)) = (&physical_id, &core_id) {
            cores.insert((p.clone(), c.clone()));
        }
        if let Some(p) = physical_id {
            sockets.insert(p);
        }
    }
    CpuTopology {
        model,
        logical,
        physical_cores: if cores.is_empty() {
            logical
        } else {
            cores.len() as u32
        },
        sockets: sockets.len().max(1) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyperthreaded_two_socket_host() {
        let t = parse_cpuinfo(include_str!("fixtures/cpuinfo-2socket-ht"));
        assert_eq!((t.logical, t.physical_cores, t.sockets), (8, 4, 2));
        assert!(t.model.contains("Xeon"));
    }

    #[test]
    fn recorded_vm_cpuinfo() {
        let t = parse_cpuinfo(include_str!("fixtures/cpuinfo-vm-2core"));
        assert_eq!(t.logical, 2);
        assert!(t.physical_cores >= 1 && t.physical_cores <= 2);
        assert!(!t.model.is_empty());
    }
}
