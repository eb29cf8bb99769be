//! The host itself: OS release, CPU, memory, disks, the data path and
//! the storage directory.

use super::*;

pub(super) fn os_checks(inv: &HostInventory, controller_os: &OsRelease, out: &mut Vec<Check>) {
    let os = inv.os.clone().unwrap_or_default();
    let described = if os.pretty_name.is_empty() {
        format!("{} {}", os.id, os.version_id)
    } else {
        os.pretty_name.clone()
    };
    out.push(check(
        "os.release",
        pass_if(os.id == "ubuntu" && os.version_id == "24.04"),
        &described,
        "Ubuntu 24.04",
        "install Ubuntu 24.04 LTS (64-bit) on the IM host",
    ));
    out.push(check(
        "os.arch",
        pass_if(os.arch == "x86_64"),
        &os.arch,
        "x86_64 (64-bit)",
        "PortSIP images are built for x86_64; use a 64-bit x86 host",
    ));
    let same = os.id == controller_os.id && os.version_id == controller_os.version_id;
    out.push(check(
        "os.same-as-pbx",
        pass_if(same),
        format!(
            "{} {} (pbx01: {} {})",
            os.id, os.version_id, controller_os.id, controller_os.version_id
        ),
        "the same OS version as the PBX nodes",
        "run the IM host on the same Ubuntu release as the PBX HA nodes",
    ));
}

pub(super) fn hardware_checks(inv: &HostInventory, params: &PreflightParams, out: &mut Vec<Check>) {
    let s = params.sizing;
    let cpu = inv.cpu.clone().unwrap_or_default();
    out.push(check(
        "cpu.cores",
        pass_if(cpu.logical_cores >= s.min_cores),
        format!(
            "{} logical CPUs ({} physical cores)",
            cpu.logical_cores, cpu.physical_cores
        ),
        format!(">= {} cores for {} users", s.min_cores, s.users),
        format!(
            "give the host at least {} cores, or size for fewer users with --users",
            s.min_cores
        ),
    ));
    let memory = inv.memory.map(|m| m.total_bytes).unwrap_or(0);
    // Firmware and the kernel keep a little of the installed memory.
    let enough = memory as f64 >= s.min_memory_bytes as f64 * 0.97;
    out.push(check(
        "memory.total",
        pass_if(enough),
        sizing::gb(memory),
        format!(
            ">= {} for {} users",
            sizing::gb(s.min_memory_bytes),
            s.users
        ),
        format!(
            "give the host at least {} of RAM",
            sizing::gb(s.min_memory_bytes)
        ),
    ));

    let storage_path = params.storage_path();
    let storage = inv.paths.iter().find(|p| p.path == storage_path);
    let rotational = storage.and_then(|p| p.rotational);
    let disks = storage.map(|p| p.disks.join(", ")).unwrap_or_default();
    out.push(check(
        "disk.ssd",
        match rotational {
            Some(false) => Verdict::Pass,
            Some(true) => Verdict::Fail,
            None => Verdict::Warn,
        },
        match rotational {
            Some(false) => format!("{storage_path} is on SSD ({disks})"),
            Some(true) => format!("{storage_path} is on a rotational disk ({disks})"),
            None => format!("cannot tell which disk holds {storage_path}"),
        },
        "SSD storage",
        "put the IM data on an SSD (high I/O)",
    ));
    let total = storage.map(|p| p.total_bytes).unwrap_or(0);
    if s.min_disk_bytes > 0 {
        let verdict = if total < s.min_disk_bytes {
            Verdict::Fail
        } else if total < s.recommended_disk_bytes {
            Verdict::Warn
        } else {
            Verdict::Pass
        };
        out.push(check(
            "disk.size",
            verdict,
            format!("{} filesystem at {storage_path}", sizing::gb(total)),
            format!(
                ">= {} ({} recommended) for {} users",
                sizing::gb(s.min_disk_bytes),
                sizing::gb(s.recommended_disk_bytes),
                s.users
            ),
            format!(
                "grow the storage to {} or more",
                sizing::gb(s.recommended_disk_bytes)
            ),
        ));
    }
    let free = storage.map(|p| p.available_bytes).unwrap_or(0);
    out.push(check(
        "disk.free",
        pass_if(free >= s.min_free_bytes),
        format!("{} free at {storage_path}", sizing::gb(free)),
        format!(">= {} free", sizing::gb(s.min_free_bytes)),
        "free space on the storage filesystem or choose another directory with -f",
    ));

    if let Some(dir) = &params.storage_dir {
        out.push(storage_dir_check(
            inv.paths.iter().find(|p| &p.path == dir),
            dir,
        ));
    }
    out.push(data_path_check(
        inv.paths.iter().find(|p| p.path == params.data_path),
        &params.data_path,
    ));
}

pub(super) fn storage_dir_check(info: Option<&PathInfo>, dir: &str) -> Check {
    let required = format!("an existing directory writable by {SERVICE_UID}:{SERVICE_GID}");
    match info {
        Some(p) if !p.error.is_empty() => check(
            "storage.dir",
            Verdict::Fail,
            &p.error,
            required,
            format!("check the path {dir}"),
        ),
        Some(p) if !p.exists => check(
            "storage.dir",
            Verdict::Fail,
            format!("{dir} does not exist"),
            required,
            format!("create it first: mkdir -p {dir} (on a disk with enough space)"),
        ),
        Some(p) if !p.is_dir => check(
            "storage.dir",
            Verdict::Fail,
            format!("{dir} is not a directory"),
            required,
            "pass a directory with -f",
        ),
        Some(p) if !p.writable_by_service => check(
            "storage.dir",
            Verdict::Warn,
            format!("{dir} is owned by {}:{} mode {:o}", p.uid, p.gid, p.mode),
            required,
            format!(
                "deploy sets the owner to {SERVICE_UID}:{SERVICE_GID}; or run chown -R {SERVICE_UID}:{SERVICE_GID} {dir}"
            ),
        ),
        Some(p) => check(
            "storage.dir",
            Verdict::Pass,
            format!("{dir} owned by {}:{}", p.uid, p.gid),
            required,
            "",
        ),
        None => check(
            "storage.dir",
            Verdict::Warn,
            "not examined",
            required,
            "re-run preflight",
        ),
    }
}

pub(super) fn data_path_check(info: Option<&PathInfo>, path: &str) -> Check {
    let required = "a directory, or a path deploy can create";
    match info {
        Some(p) if !p.error.is_empty() => check(
            "storage.data-path",
            Verdict::Fail,
            &p.error,
            required,
            format!("check the path {path}"),
        ),
        Some(p) if p.exists && !p.is_dir => check(
            "storage.data-path",
            Verdict::Fail,
            format!("{path} exists and is not a directory"),
            required,
            "move it aside or choose another --data-path",
        ),
        Some(p) if p.exists => check(
            "storage.data-path",
            Verdict::Pass,
            format!("{path} exists"),
            required,
            "",
        ),
        Some(_) => check(
            "storage.data-path",
            Verdict::Pass,
            format!("{path} will be created"),
            required,
            "",
        ),
        None => check(
            "storage.data-path",
            Verdict::Warn,
            "not examined",
            required,
            "re-run preflight",
        ),
    }
}
