//! Measuring the host: hardware, OS, network and configuration facts for the
//! controller's inventory and preflight. Each module pairs a pure parser
//! (unit-tested with recorded fixtures) with a thin reader of `/proc`, `/sys`
//! and `/etc`; commands run only where no file tells (`ip -j addr` for lease
//! lifetimes, `timedatectl`, `nft`).

pub mod cpu;
pub mod docker;
pub mod firewall;
pub mod net;
pub mod packages;
pub mod sockets;
pub mod storage;
pub mod system;

use std::path::Path;

use imfleet_proto::agent::v1::{CpuInfo, HostInventory, InventoryRequest, MemoryInfo, OsInfo};

/// Collects every fact. Never fails: what cannot be read is left empty and
/// explained in `notes`.
pub async fn collect(request: InventoryRequest) -> HostInventory {
    let docker = docker::collect().await;
    let mut inventory = tokio::task::spawn_blocking(move || collect_blocking(&request))
        .await
        .unwrap_or_else(|e| HostInventory {
            notes: vec![format!("fact collection failed: {e}")],
            ..Default::default()
        });
    inventory.docker = Some(docker);
    inventory
}

fn collect_blocking(request: &InventoryRequest) -> HostInventory {
    let mut notes = Vec::new();
    let release = imfleet_proto::model::os_release::read_os_release();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let topology = cpu::parse_cpuinfo(&cpuinfo);
    let memory = match sysinfo::System::new() {
        Ok(mut system) => {
            system.refresh_memory();
            MemoryInfo {
                total_bytes: system.total_memory(),
                available_bytes: system.available_memory(),
                swap_total_bytes: system.total_swap(),
                swap_free_bytes: system.free_swap(),
            }
        }
        Err(e) => {
            notes.push(format!("memory: {e}"));
            MemoryInfo::default()
        }
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map(|t| storage::parse_mounts(&t))
        .unwrap_or_else(|e| {
            notes.push(format!("cannot read /proc/self/mounts: {e}"));
            Vec::new()
        });
    let disks = storage::block_devices(Path::new("/sys/block"));
    if disks.is_empty() {
        notes.push("no block devices visible in /sys/block".into());
    }
    let packages = packages::installed();
    let clock = system::clock();
    if clock.synchronized.is_none() {
        notes.push(format!("clock synchronisation: {}", clock.source));
    }
    HostInventory {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: Some(OsInfo {
            id: release.id,
            version_id: release.version_id,
            pretty_name: release.pretty_name,
            codename: release.codename,
            arch: sysinfo::System::cpu_arch(),
            kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        }),
        cpu: Some(CpuInfo {
            model: topology.model,
            physical_cores: sysinfo::System::physical_core_count()
                .map(|n| n as u32)
                .unwrap_or(topology.physical_cores),
            logical_cores: topology.logical,
            sockets: topology.sockets,
        }),
        memory: Some(memory),
        filesystems: storage::filesystems(&mounts),
        paths: request
            .paths
            .iter()
            .map(|p| {
                storage::path_info(p, request.service_uid, request.service_gid, &mounts, &disks)
            })
            .collect(),
        disks,
        interfaces: net::interfaces(&net::read_configs()),
        virtualization: system::virtualization(),
        clock: Some(clock),
        power: Some(system::power()),
        listening: sockets::listening(),
        docker: None,
        firewall: Some(firewall::collect(&packages)),
        packages,
        updates: Some(packages::pending_updates()),
        agent: Some(system::privileges()),
        collected_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        notes,
    }
}
