//! What a controller may ask of this host, decided from the request alone.
//!
//! The agent runs as root and trusts the controller's certificate, not its
//! judgement: a stolen controller identity must not turn the agent into a
//! root shell. So every path a spec names lies under the roots fixed at
//! bootstrap (the data path and the storage dir, in `agent.toml`), written
//! canonically; bind sources are only directories the spec itself declares;
//! nothing asks for more than a deployment needs. Pure functions: the
//! filesystem half of the rule (no symlinks on the way) is `deploy::hostfs`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use imfleet_proto::agent::v1::{DeploymentSpec, HealthGate};

/// Trees a data root may never lie in: the system, the Engine's own state,
/// and (added at run time) the agent's directory.
const SYSTEM_TREES: &[&str] = &[
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
];

/// Directories too broad to be a data root (a root may lie inside them).
const TOO_BROAD: &[&str] = &[
    "/root", "/home", "/tmp", "/var/tmp", "/var/lib", "/var/log", "/opt", "/srv", "/mnt", "/media",
];

/// Prefix of the labels imfleet sets itself; a spec may not set them.
pub const RESERVED_LABEL_PREFIX: &str = "io.imfleet.";

/// The directories this agent may touch for deployments, as fixed at
/// bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// The IM data path (`im.sh`'s default /var/lib/portsip).
    pub data_path: PathBuf,
    /// The operator's `-f` storage directory, if any.
    pub storage_dir: Option<PathBuf>,
}

impl Roots {
    /// Checks both roots against `agent_root` (the agent's own directory).
    pub fn new(
        data_path: &str,
        storage_dir: Option<&str>,
        agent_root: &Path,
    ) -> Result<Roots, String> {
        let data_path = check_root(data_path, agent_root)?;
        let storage_dir = storage_dir.map(|s| check_root(s, agent_root)).transpose()?;
        Ok(Roots {
            data_path,
            storage_dir,
        })
    }

    pub fn all(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.data_path.as_path()).chain(self.storage_dir.as_deref())
    }

    /// Whether `path` (canonical) is a root or lies under one.
    pub fn contains(&self, path: &Path) -> bool {
        self.all().any(|root| path.starts_with(root))
    }

    /// The roots as text, for messages and the Ping reply.
    pub fn describe(&self) -> Vec<String> {
        self.all().map(|p| p.display().to_string()).collect()
    }
}

/// `path` as a canonical absolute path: no `.`, `..`, empty components or
/// trailing slash, no NUL, at most 1024 bytes. Lexical only.
pub fn canonical(path: &str) -> Result<PathBuf, String> {
    let bad = |why: &str| Err(format!("path `{}` {why}", path.escape_debug()));
    if path.len() > 1024 {
        return bad("is longer than 1024 bytes");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if !path.starts_with('/') {
        return bad("is not absolute");
    }
    if path.len() > 1 && (path.ends_with('/') || path.contains("//")) {
        return bad("is not written canonically (no `//`, no trailing `/`)");
    }
    let p = Path::new(path);
    if p.components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
        || path.split('/').any(|part| part == "." || part == "..")
    {
        return bad("contains `.` or `..`");
    }
    Ok(p.to_path_buf())
}

/// A data root must be canonical, neither a system tree (or inside one, or
/// the agent's own directory) nor so broad it holds other things.
pub fn check_root(path: &str, agent_root: &Path) -> Result<PathBuf, String> {
    let p = canonical(path)?;
    let refuse = |why: String| {
        Err(format!(
            "{} cannot be a data directory: {why}; choose a dedicated directory such as /var/lib/portsip or /data/im",
            p.display()
        ))
    };
    let agent = agent_root.to_path_buf();
    for tree in SYSTEM_TREES
        .iter()
        .map(PathBuf::from)
        .chain(std::iter::once(agent.clone()))
    {
        if p.starts_with(&tree) {
            return refuse(format!("it lies in {}", tree.display()));
        }
        if tree.starts_with(&p) {
            return refuse(format!("it contains {}", tree.display()));
        }
    }
    for broad in TOO_BROAD.iter().map(Path::new) {
        if broad.starts_with(&p) {
            return refuse(format!("it is or contains {}", broad.display()));
        }
    }
    Ok(p)
}

/// Everything a spec asks for, against the roots. Run before anything on the
/// host changes; a refusal names the field.
pub fn check_spec(spec: &DeploymentSpec, roots: &Roots) -> Result<(), String> {
    let inside = |what: &str, path: &str| -> Result<PathBuf, String> {
        let p = canonical(path).map_err(|e| format!("{what}: {e}"))?;
        if roots.contains(&p) {
            Ok(p)
        } else {
            Err(format!(
                "{what} {} is outside this agent's data directories ({}); re-run bootstrap with --data-path/--storage-dir to change them",
                p.display(),
                roots.describe().join(", ")
            ))
        }
    };
    let mut declared = HashSet::new();
    for dir in &spec.directories {
        let p = inside("directory", &dir.path)?;
        check_mode("directory", &p, dir.mode)?;
        declared.insert(p);
    }
    for secret in &spec.secrets {
        if !(16..=256).contains(&secret.length) {
            return Err(format!("secret `{}`: length must be 16 to 256", secret.id));
        }
        for path in &secret.in_use_if_exists {
            inside(&format!("secret `{}` in-use marker", secret.id), path)?;
        }
        for (i, file) in secret.files.iter().enumerate() {
            let p = inside(&format!("secret `{}` file", secret.id), &file.path)?;
            check_mode("secret file", &p, file.mode)?;
            if file.mode & 0o077 != 0 {
                return Err(format!(
                    "secret file {}: mode {:o} lets others read it; secrets are 0600 or stricter",
                    p.display(),
                    file.mode
                ));
            }
            if i == 0 {
                // The only copy ever read: it must live where only root writes.
                let parent = p.parent().unwrap_or(Path::new("/"));
                let root_only = spec
                    .directories
                    .iter()
                    .any(|d| Path::new(&d.path) == parent && d.uid == 0 && d.mode & 0o022 == 0);
                if !root_only {
                    return Err(format!(
                        "secret `{}`: its first file {} must be in a directory the spec declares as root-owned and writable by root alone",
                        secret.id,
                        p.display()
                    ));
                }
            }
        }
    }
    for c in &spec.containers {
        for m in &c.mounts {
            let source = canonical(&m.source)
                .map_err(|e| format!("container `{}` mount source: {e}", c.name))?;
            if !declared.contains(&source) {
                return Err(format!(
                    "container `{}`: bind mount of {} refused: a bind source must be a directory the spec declares under the data directories",
                    c.name,
                    source.display()
                ));
            }
            let target = canonical(&m.target)
                .map_err(|e| format!("container `{}` mount target: {e}", c.name))?;
            if target == Path::new("/") {
                return Err(format!(
                    "container `{}`: cannot mount over the container's /",
                    c.name
                ));
            }
        }
        if let Some(label) = c
            .labels
            .keys()
            .find(|k| k.starts_with(RESERVED_LABEL_PREFIX))
        {
            return Err(format!(
                "container `{}`: label `{label}` is reserved for imfleet",
                c.name
            ));
        }
    }
    if let Some(gate) = &spec.gate {
        check_gate(gate)?;
    }
    check_firewall_ports(&spec.open_tcp_ports)
}

/// Most ports one spec may open: PortSIP needs one.
const MAX_FIREWALL_PORTS: usize = 16;

/// A deployment opens unprivileged ports only: never SSH or another system
/// service to the world on behalf of a request.
fn check_firewall_ports(ports: &[u32]) -> Result<(), String> {
    if ports.len() > MAX_FIREWALL_PORTS {
        return Err(format!(
            "{} firewall ports asked for; a deployment may open at most {MAX_FIREWALL_PORTS}",
            ports.len()
        ));
    }
    if let Some(port) = ports.iter().find(|p| **p == 0 || **p > 65535) {
        return Err(format!("firewall port {port} is not a TCP port"));
    }
    if let Some(port) = ports.iter().find(|p| **p < 1024) {
        return Err(format!(
            "firewall port {port} refused: a deployment opens only unprivileged ports (1024-65535)"
        ));
    }
    Ok(())
}

fn check_mode(what: &str, path: &Path, mode: u32) -> Result<(), String> {
    if mode & !0o777 != 0 {
        return Err(format!(
            "{what} {}: mode {mode:o} refused: only permission bits (no setuid, setgid or sticky)",
            path.display()
        ));
    }
    Ok(())
}

/// The health gate probes this host only: an `http://` URL to a loopback
/// address, TCP ports on 127.0.0.1.
/// Most TCP ports a health gate may list.
pub const MAX_GATE_PORTS: usize = 8;

pub fn check_gate(gate: &HealthGate) -> Result<(), String> {
    if let Some(port) = gate.tcp_ports.iter().find(|p| **p == 0 || **p > 65535) {
        return Err(format!("gate port {port} is not a TCP port"));
    }
    // The health stream probes these on every sample: a few, each once.
    if gate.tcp_ports.len() > MAX_GATE_PORTS {
        return Err(format!("at most {MAX_GATE_PORTS} gate ports"));
    }
    let mut seen = gate.tcp_ports.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != gate.tcp_ports.len() {
        return Err("a gate port is listed twice".into());
    }
    if gate.http_url.is_empty() {
        return Ok(());
    }
    let refuse = || {
        Err(format!(
            "gate URL `{}` refused: only http:// to a loopback address and port (e.g. http://127.0.0.1:8902/svr_stats)",
            gate.http_url.escape_debug()
        ))
    };
    let Some(rest) = gate.http_url.strip_prefix("http://") else {
        return refuse();
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') || gate.http_url.chars().any(|c| c.is_control() || c == ' ') {
        return refuse();
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok_and(|p| p > 0) => host,
        _ => return refuse(),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => Ok(()),
        _ if host == "localhost" => Ok(()),
        _ => refuse(),
    }
}

/// Purge only what a deployment that existed declared, strictly under the
/// data path, never a root and never anything holding the operator's
/// storage directory.
pub fn check_purge(paths: &[String], recorded: &[String], roots: &Roots) -> Result<(), String> {
    for path in paths {
        let p = canonical(path).map_err(|e| format!("purge refused: {e}"))?;
        if !recorded.iter().any(|r| Path::new(r) == p) {
            return Err(format!(
                "purge of {} refused: it is not a directory this agent created for the deployment",
                p.display()
            ));
        }
        let holds_storage = roots
            .storage_dir
            .as_deref()
            .is_some_and(|s| s.starts_with(&p) || p.starts_with(s));
        if !p.starts_with(&roots.data_path) || p == roots.data_path || holds_storage {
            return Err(format!(
                "purge of {} refused: only directories inside the data path {} (not the storage directory) are purged",
                p.display(),
                roots.data_path.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::{
        BindMount, ContainerSpec, DirectorySpec, GeneratedSecret, SecretFile,
    };

    const AGENT: &str = "/opt/imfleet";

    fn roots() -> Roots {
        Roots::new("/var/lib/portsip", Some("/srv/im"), Path::new(AGENT)).unwrap()
    }

    fn dir(path: &str, uid: u32, mode: u32) -> DirectorySpec {
        DirectorySpec {
            path: path.into(),
            uid,
            gid: uid,
            mode,
            ..Default::default()
        }
    }

    fn spec() -> DeploymentSpec {
        DeploymentSpec {
            name: "portsip-im".into(),
            directories: vec![
                dir("/var/lib/portsip", 0, 0o755),
                dir("/var/lib/portsip/im-data", 888, 0o755),
                dir("/var/lib/portsip/secrets", 0, 0o700),
                dir("/srv/im", 888, 0),
            ],
            secrets: vec![GeneratedSecret {
                id: "db".into(),
                length: 24,
                files: vec![
                    SecretFile {
                        path: "/var/lib/portsip/secrets/db".into(),
                        mode: 0o600,
                        ..Default::default()
                    },
                    SecretFile {
                        path: "/var/lib/portsip/im-data/system.ini".into(),
                        uid: 888,
                        mode: 0o600,
                        ..Default::default()
                    },
                ],
                in_use_if_exists: vec!["/var/lib/portsip/im-postgresql/PG_VERSION".into()],
            }],
            containers: vec![ContainerSpec {
                name: "im".into(),
                image: "portsip/pbx:22".into(),
                mounts: vec![
                    BindMount {
                        source: "/var/lib/portsip/im-data".into(),
                        target: "/var/lib/portsip/pbx".into(),
                        read_only: false,
                    },
                    BindMount {
                        source: "/srv/im".into(),
                        target: "/var/lib/portsip/pbx/im/storage".into(),
                        read_only: false,
                    },
                ],
                ..Default::default()
            }],
            gate: Some(HealthGate {
                http_url: "http://127.0.0.1:8902/svr_stats".into(),
                tcp_ports: vec![8887],
                timeout_seconds: 0,
            }),
            open_tcp_ports: vec![8887],
            config_hash: String::new(),
        }
    }

    #[test]
    fn the_portsip_shape_passes() {
        check_spec(&spec(), &roots()).unwrap();
    }

    #[test]
    fn system_and_broad_roots_are_refused() {
        let agent = Path::new(AGENT);
        for bad in [
            "/",
            "/etc",
            "/etc/portsip",
            "/proc/1",
            "/var",
            "/var/lib",
            "/var/run/x",
            "/run/docker",
            "/var/lib/docker/volumes",
            "/opt",
            "/opt/imfleet",
            "/opt/imfleet/etc",
            "/srv",
            "/home",
            "/tmp",
            "relative/dir",
            "/var/lib/../etc",
            "/var/lib/portsip/",
            "/var//lib/portsip",
        ] {
            assert!(check_root(bad, agent).is_err(), "{bad} accepted");
        }
        for good in [
            "/var/lib/portsip",
            "/data",
            "/srv/im",
            "/home/im/storage",
            "/tmp/.tmpAbc/portsip",
        ] {
            check_root(good, agent).unwrap();
        }
    }

    #[test]
    fn paths_outside_the_roots_are_refused() {
        let mut s = spec();
        s.directories.push(dir("/etc/cron.d", 0, 0o755));
        let e = check_spec(&s, &roots()).unwrap_err();
        assert!(e.contains("outside this agent's data directories"), "{e}");

        let mut s = spec();
        s.directories[1].path = "/var/lib/portsip/im-data/../../../etc".into();
        assert!(check_spec(&s, &roots()).unwrap_err().contains("`..`"));

        let mut s = spec();
        s.secrets[0].files[1].path = "/root/.ssh/authorized_keys".into();
        assert!(check_spec(&s, &roots()).is_err());
    }

    #[test]
    fn binds_must_be_declared_directories() {
        for source in [
            "/",
            "/etc",
            "/proc",
            "/var/run/docker.sock",
            "/opt/imfleet",
            "/var/lib/portsip/undeclared",
        ] {
            let mut s = spec();
            s.containers[0].mounts[0].source = source.into();
            let e = check_spec(&s, &roots()).unwrap_err();
            assert!(e.contains("bind mount"), "{source}: {e}");
        }
    }

    #[test]
    fn modes_are_permission_bits_and_secrets_private() {
        let mut s = spec();
        s.directories[1].mode = 0o4755;
        assert!(check_spec(&s, &roots()).unwrap_err().contains("setuid"));
        let mut s = spec();
        s.secrets[0].files[1].mode = 0o644;
        assert!(check_spec(&s, &roots()).unwrap_err().contains("0600"));
        let mut s = spec();
        s.secrets[0].files[0].mode = 0o2600;
        assert!(check_spec(&s, &roots()).is_err());
    }

    #[test]
    fn the_authoritative_secret_lives_in_a_root_only_directory() {
        let mut s = spec();
        s.secrets[0].files.swap(0, 1);
        let e = check_spec(&s, &roots()).unwrap_err();
        assert!(e.contains("root-owned"), "{e}");
    }

    #[test]
    fn reserved_labels_are_refused() {
        let mut s = spec();
        s.containers[0]
            .labels
            .insert("io.imfleet.deployment".into(), "other".into());
        assert!(check_spec(&s, &roots()).unwrap_err().contains("reserved"));
    }

    #[test]
    fn only_a_few_unprivileged_firewall_ports() {
        check_firewall_ports(&[8887, 1024, 65535]).unwrap();
        for bad in [
            vec![22],
            vec![0],
            vec![70000],
            vec![8887, 443],
            (2000..2020).collect(),
        ] {
            assert!(check_firewall_ports(&bad).is_err(), "{bad:?} accepted");
        }
        let mut s = spec();
        s.open_tcp_ports = vec![8887, 22];
        assert!(
            check_spec(&s, &roots())
                .unwrap_err()
                .contains("port 22 refused")
        );
    }

    #[test]
    fn gates_probe_loopback_only() {
        let gate = |url: &str| HealthGate {
            http_url: url.into(),
            ..Default::default()
        };
        for ok in [
            "http://127.0.0.1:8902/svr_stats",
            "http://[::1]:80/",
            "http://localhost:8902",
            "http://127.9.9.9:1/x",
        ] {
            check_gate(&gate(ok)).unwrap();
        }
        for bad in [
            "http://169.254.169.254:80/latest/meta-data",
            "http://10.0.0.1:8902/",
            "https://127.0.0.1:8902/",
            "http://127.0.0.1/",
            "http://user@127.0.0.1:80/",
            "http://127.0.0.1:80/\r\nX: y",
            "http://evil.example:80/",
            "file:///etc/shadow",
        ] {
            assert!(check_gate(&gate(bad)).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn purge_only_recorded_directories_inside_the_data_path() {
        let recorded: Vec<String> = [
            "/var/lib/portsip",
            "/var/lib/portsip/im-data",
            "/var/lib/portsip/im-postgresql",
            "/srv/im",
        ]
        .map(String::from)
        .to_vec();
        let r = roots();
        check_purge(&["/var/lib/portsip/im-data".into()], &recorded, &r).unwrap();
        for bad in [
            "/etc",
            "/var/lib/portsip",
            "/srv/im",
            "/var/lib/portsip/other",
            "/var/lib/portsip/im-data/../..",
        ] {
            assert!(
                check_purge(&[bad.into()], &recorded, &r).is_err(),
                "{bad} purged"
            );
        }
        let nested = Roots::new(
            "/var/lib/portsip",
            Some("/var/lib/portsip/im-data/files"),
            Path::new(AGENT),
        )
        .unwrap();
        assert!(check_purge(&["/var/lib/portsip/im-data".into()], &recorded, &nested).is_err());
    }
}
