//! Disks (`/sys/block`), mounted filesystems (`/proc/self/mounts` + statvfs)
//! and the facts about a directory the IM service will write to.

use std::path::{Path, PathBuf};

use imfleet_proto::agent::v1::{BlockDevice, Filesystem, PathInfo};

/// Kernel block devices that are never storage for the IM service.
const IGNORED_DEVICE_PREFIXES: &[&str] = &["loop", "ram", "zram", "fd", "sr", "nbd"];

/// Filesystem types that hold data (pseudo and container-image filesystems are skipped).
const DATA_FILESYSTEMS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "vfat", "exfat",
    "ntfs", "ntfs3", "fuseblk", "nfs", "nfs4", "cifs", "ceph",
];

/// Lists the physical and virtual block devices under `sys_block` (`/sys/block`).
pub fn block_devices(sys_block: &Path) -> Vec<BlockDevice> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut devices: Vec<BlockDevice> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| !IGNORED_DEVICE_PREFIXES.iter().any(|p| name.starts_with(p)))
        .map(|name| {
            let dir = sys_block.join(&name);
            let read = |rel: &str| {
                std::fs::read_to_string(dir.join(rel))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            };
            BlockDevice {
                size_bytes: read("size").parse::<u64>().unwrap_or(0) * 512,
                model: read("device/model"),
                rotational: read("queue/rotational") == "1",
                removable: read("removable") == "1",
                is_virtual: name.starts_with("dm-") || name.starts_with("md"),
                name,
            }
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

/// The physical disks behind a block device name: partitions resolve to their
/// disk, device-mapper and md devices to their slaves, recursively.
pub fn disks_behind(sys_class_block: &Path, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    collect_disks(sys_class_block, name, &mut out, 0);
    out.sort();
    out.dedup();
    out
}

fn collect_disks(sys_class_block: &Path, name: &str, out: &mut Vec<String>, depth: u8) {
    if depth > 8 {
        return;
    }
    let node = sys_class_block.join(name);
    let Ok(real) = std::fs::canonicalize(&node) else {
        return;
    };
    // A partition's sysfs directory sits inside its disk's directory.
    let disk_dir = if real.join("partition").exists() {
        real.parent().map(Path::to_path_buf).unwrap_or(real.clone())
    } else {
        real.clone()
    };
    let disk = disk_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(name)
        .to_owned();
    let slaves: Vec<String> = std::fs::read_dir(disk_dir.join("slaves"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    if slaves.is_empty() {
        out.push(disk);
    } else {
        for slave in slaves {
            collect_disks(sys_class_block, &slave, out, depth + 1);
        }
    }
}

/// One line of `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub device: String,
    pub mount_point: String,
    pub fs_type: String,
}

/// Parses mounts text; octal escapes (`\040` for a space) are decoded.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some(Mount {
                device: unescape(fields.next()?),
                mount_point: unescape(fields.next()?),
                fs_type: fields.next()?.to_owned(),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount that holds `path` (longest mount-point prefix; later mounts win).
pub fn mount_for<'m>(path: &Path, mounts: &'m [Mount]) -> Option<&'m Mount> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.len(), *i))
        .map(|(_, m)| m)
}

/// The kernel block device name of a mount source, e.g. `/dev/sda1` -> `sda1`,
/// `/dev/mapper/vg-root` -> `dm-0`. `None` for non-device sources.
fn device_name(source: &str) -> Option<String> {
    if !source.starts_with("/dev/") {
        return None;
    }
    let real = std::fs::canonicalize(source).unwrap_or_else(|_| PathBuf::from(source));
    real.file_name()?.to_str().map(str::to_owned)
}

/// Data filesystems with their size and the disks behind them.
pub fn filesystems(mounts: &[Mount]) -> Vec<Filesystem> {
    let mut seen = std::collections::HashSet::new();
    mounts
        .iter()
        .filter(|m| DATA_FILESYSTEMS.contains(&m.fs_type.as_str()))
        .filter(|m| seen.insert(m.mount_point.clone()))
        .map(|m| {
            let (total, available) = space(Path::new(&m.mount_point));
            Filesystem {
                mount_point: m.mount_point.clone(),
                device: m.device.clone(),
                fs_type: m.fs_type.clone(),
                total_bytes: total,
                available_bytes: available,
                disks: device_name(&m.device)
                    .map(|d| disks_behind(Path::new("/sys/class/block"), &d))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// (total, available to unprivileged users) bytes of the filesystem at `path`.
fn space(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        }
        Err(_) => (0, 0),
    }
}

/// Whether a user `uid` in group `gid` may write a file with these owner and
/// mode bits (classic permission bits; ACLs and supplementary groups aside).
pub fn can_write(owner_uid: u32, owner_gid: u32, mode: u32, uid: u32, gid: u32) -> bool {
    if uid == 0 {
        true
    } else if owner_uid == uid {
        mode & 0o200 != 0
    } else if owner_gid == gid {
        mode & 0o020 != 0
    } else {
        mode & 0o002 != 0
    }
}

/// Facts about `path` for a service running as `uid:gid`. For a path that does
/// not exist yet, space and disks are those of its nearest existing ancestor.
pub fn path_info(
    path: &str,
    uid: u32,
    gid: u32,
    mounts: &[Mount],
    disks: &[BlockDevice],
) -> PathInfo {
    use std::os::unix::fs::MetadataExt;
    let mut info = PathInfo {
        path: path.to_owned(),
        ..Default::default()
    };
    let requested = Path::new(path);
    if !requested.is_absolute() {
        info.error = "not an absolute path".into();
        return info;
    }
    match std::fs::metadata(requested) {
        Ok(meta) => {
            info.exists = true;
            info.is_dir = meta.is_dir();
            info.uid = meta.uid();
            info.gid = meta.gid();
            info.mode = meta.mode() & 0o7777;
            info.writable_by_service = can_write(meta.uid(), meta.gid(), meta.mode(), uid, gid);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => info.error = e.to_string(),
    }
    let existing = requested
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let canonical = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_owned());
    let (total, available) = space(&canonical);
    info.total_bytes = total;
    info.available_bytes = available;
    if let Some(mount) = mount_for(&canonical, mounts) {
        info.mount_point = mount.mount_point.clone();
        info.disks = device_name(&mount.device)
            .map(|d| disks_behind(Path::new("/sys/class/block"), &d))
            .unwrap_or_default();
        let known: Vec<&BlockDevice> = info
            .disks
            .iter()
            .filter_map(|d| disks.iter().find(|b| &b.name == d))
            .collect();
        if !known.is_empty() {
            info.rotational = Some(known.iter().any(|d| d.rotational));
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "/dev/sda2 / ext4 rw,relatime 0 0\n\
        proc /proc proc rw 0 0\n\
        /dev/sdb1 /var/lib/portsip xfs rw 0 0\n\
        /dev/sdc1 /mnt/im\\040storage ext4 rw 0 0\n\
        tmpfs /run tmpfs rw 0 0\n";

    #[test]
    fn mounts_parse_and_the_longest_prefix_wins() {
        let mounts = parse_mounts(MOUNTS);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[3].mount_point, "/mnt/im storage");
        let m = mount_for(Path::new("/var/lib/portsip/im-data"), &mounts).unwrap();
        assert_eq!(m.device, "/dev/sdb1");
        let m = mount_for(Path::new("/var/lib/portsipx"), &mounts).unwrap();
        assert_eq!(
            m.mount_point, "/",
            "a sibling with a common prefix is not inside"
        );
        let m = mount_for(Path::new("/mnt/im storage/x"), &mounts).unwrap();
        assert_eq!(m.device, "/dev/sdc1");
    }

    #[test]
    fn write_permission_follows_owner_group_other() {
        assert!(can_write(888, 888, 0o755, 888, 888));
        assert!(!can_write(0, 0, 0o755, 888, 888));
        assert!(can_write(0, 888, 0o775, 888, 888));
        assert!(can_write(0, 0, 0o1777, 888, 888));
        assert!(!can_write(999, 999, 0o700, 888, 888));
        assert!(can_write(999, 999, 0o000, 0, 0));
    }

    #[test]
    fn recorded_sysfs_tree_resolves_partitions_and_device_mapper() {
        let tmp = tempfile::tempdir().unwrap();
        let devices = tmp.path().join("devices");
        let class = tmp.path().join("class/block");
        let block = tmp.path().join("block");
        std::fs::create_dir_all(&class).unwrap();
        std::fs::create_dir_all(&block).unwrap();
        let mk = |rel: &str, files: &[(&str, &str)]| {
            let dir = devices.join(rel);
            std::fs::create_dir_all(&dir).unwrap();
            for (f, v) in files {
                let p = dir.join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, v).unwrap();
            }
            dir
        };
        // sda: a spinning disk with partition sda1; nvme0n1: an SSD; dm-0 on sda1.
        let sda = mk(
            "sda",
            &[
                ("size", "3907029168\n"),
                ("queue/rotational", "1\n"),
                ("device/model", "ST2000DM008\n"),
                ("removable", "0\n"),
            ],
        );
        let sda1 = mk("sda/sda1", &[("partition", "1\n")]);
        let nvme = mk(
            "nvme0n1",
            &[
                ("size", "500118192\n"),
                ("queue/rotational", "0\n"),
                ("device/model", "Samsung SSD 980\n"),
            ],
        );
        let dm = mk("dm-0", &[("size", "100\n"), ("queue/rotational", "1\n")]);
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        std::os::unix::fs::symlink(&sda1, dm.join("slaves/sda1")).unwrap();
        let loop0 = mk("loop0", &[("size", "8\n")]);
        for (name, target) in [
            ("sda", &sda),
            ("sda1", &sda1),
            ("nvme0n1", &nvme),
            ("dm-0", &dm),
            ("loop0", &loop0),
        ] {
            std::os::unix::fs::symlink(target, class.join(name)).unwrap();
            if !name.ends_with('1') || name == "nvme0n1" {
                std::os::unix::fs::symlink(target, block.join(name)).unwrap();
            }
        }

        let disks = block_devices(&block);
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["dm-0", "nvme0n1", "sda"],
            "loop devices are skipped"
        );
        let sda_dev = disks.iter().find(|d| d.name == "sda").unwrap();
        assert!(sda_dev.rotational && !sda_dev.is_virtual);
        assert_eq!(sda_dev.size_bytes, 3907029168 * 512);
        assert_eq!(sda_dev.model, "ST2000DM008");
        assert!(
            !disks
                .iter()
                .find(|d| d.name == "nvme0n1")
                .unwrap()
                .rotational
        );
        assert!(disks.iter().find(|d| d.name == "dm-0").unwrap().is_virtual);

        assert_eq!(disks_behind(&class, "sda1"), vec!["sda"]);
        assert_eq!(disks_behind(&class, "dm-0"), vec!["sda"]);
        assert_eq!(disks_behind(&class, "nvme0n1"), vec!["nvme0n1"]);
    }

    #[test]
    fn a_missing_directory_reports_its_nearest_existing_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("not/yet");
        let info = path_info(missing.to_str().unwrap(), 888, 888, &[], &[]);
        assert!(!info.exists && !info.writable_by_service);
        assert!(
            info.total_bytes > 0,
            "space comes from the existing ancestor"
        );
        let relative = path_info("relative/dir", 888, 888, &[], &[]);
        assert_eq!(relative.error, "not an absolute path");
    }
}
