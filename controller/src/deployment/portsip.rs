//! The PortSIP IM layout of `im_ctl.sh` ("extended" standalone mode), as a
//! deployment spec: database, one-shot database init, IM, web server; host
//! networking; data directories with PortSIP's ownership; health checks.

use std::net::IpAddr;

use imfleet_proto::agent::v1::{
    BindMount, ContainerSpec, DeploymentSpec, DirectorySpec, GeneratedSecret, HealthCheck,
    HealthGate, SecretFile, secret_file::Format,
};
use prost::Message;
use sha2::{Digest, Sha256};

pub use imfleet_proto::model::portsip::{
    DEFAULT_DB_IMAGE, DEFAULT_IMAGE, DEPLOYMENT_NAME, SECRET_DB_PASSWORD, SECRET_IM_TOKEN,
};
use imfleet_proto::model::portsip::{
    IM_DATA_MOUNT, IM_STORAGE_MOUNT, POSTGRES_UID, SERVICE_UID as PORTSIP_UID,
};

/// The IM's directories under the data path: what `rm --purge` deletes.
const IM_DATA_DIR: &str = "im-data";
const DB_DATA_DIR: &str = "im-postgresql";
const SECRETS_DIR: &str = "secrets";

/// The directories `rm --purge` deletes (the `-f` storage is the operator's).
pub fn purge_paths(data_path: &str) -> Vec<String> {
    [IM_DATA_DIR, DB_DATA_DIR, SECRETS_DIR]
        .iter()
        .map(|leaf| path(data_path, leaf))
        .collect()
}

/// What an operator decides for one IM host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortsipParams {
    pub private_ip: IpAddr,
    pub public_ip: IpAddr,
    /// The PBX, or the HA cluster's virtual IP, the IM connects to.
    pub pbx: IpAddr,
    pub data_path: String,
    /// Optional `-f` storage directory (must exist).
    pub storage_dir: Option<String>,
    pub image: String,
    pub db_image: String,
    /// Grace period for stopping containers (PortSIP restarts use 300 s).
    pub stop_grace_seconds: u32,
}

fn path(base: &str, leaf: &str) -> String {
    format!("{}/{leaf}", base.trim_end_matches('/'))
}

fn mount(source: String, target: &str, read_only: bool) -> BindMount {
    BindMount {
        source,
        target: target.to_owned(),
        read_only,
    }
}

/// The full spec for `params`. `token_fingerprint` (sha256 of the IM token)
/// enters the config hash so a new token counts as a new configuration.
pub fn portsip_spec(params: &PortsipParams, token_fingerprint: &str) -> DeploymentSpec {
    let im_data = path(&params.data_path, IM_DATA_DIR);
    let pg_data = path(&params.data_path, DB_DATA_DIR);
    let secrets_dir = path(&params.data_path, SECRETS_DIR);
    let db_password_file = path(&secrets_dir, SECRET_DB_PASSWORD);
    let grace = params.stop_grace_seconds;

    let dir = |path: &str, uid: u32, mode: u32, own_tree: bool| DirectorySpec {
        path: path.to_owned(),
        uid,
        gid: uid,
        mode,
        must_exist: false,
        own_tree,
    };
    // The IM writes everywhere under its data tree as 888, and PortSIP's
    // restore guide warns that wrong ownership stops it: the trees are
    // re-owned on every deploy.
    let mut directories = vec![
        dir(&params.data_path, 0, 0o755, false),
        dir(&im_data, PORTSIP_UID, 0o755, true),
        dir(&pg_data, POSTGRES_UID, 0o700, true),
        // The authoritative database password: root only.
        dir(&secrets_dir, 0, 0o700, false),
    ];
    let mut im_mounts = vec![mount(im_data.clone(), IM_DATA_MOUNT, false)];
    if let Some(storage) = &params.storage_dir {
        // The storage dir is mounted inside the im-data mount: the Engine
        // would create the mount point (and `im/`) as root:root, which the
        // IM cannot write. They exist with the IM's owner beforehand.
        directories.push(dir(&path(&im_data, "im"), PORTSIP_UID, 0o755, false));
        directories.push(dir(
            &path(&im_data, "im/storage"),
            PORTSIP_UID,
            0o755,
            false,
        ));
        directories.push(DirectorySpec {
            must_exist: true,
            ..dir(storage, PORTSIP_UID, 0, true)
        });
        im_mounts.push(mount(storage.clone(), IM_STORAGE_MOUNT, false));
    }

    let secrets = vec![GeneratedSecret {
        id: SECRET_DB_PASSWORD.into(),
        length: 20,
        files: vec![
            // First: the copy the agent reads back.
            SecretFile {
                path: db_password_file,
                format: Format::Raw as i32,
                ini_section: String::new(),
                ini_key: String::new(),
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
            SecretFile {
                path: path(&im_data, "system.ini"),
                format: Format::Ini as i32,
                ini_section: "database".into(),
                ini_key: "superuser_password".into(),
                uid: PORTSIP_UID,
                gid: PORTSIP_UID,
                mode: 0o600,
            },
        ],
        // An initialised database already has a password: a restore that
        // lost `secrets/` must not get a new one the database never heard of.
        in_use_if_exists: vec![path(&pg_data, "PG_VERSION")],
    }];

    let portsip_user = format!("{PORTSIP_UID}:{PORTSIP_UID}");
    let health = |test: &[&str]| {
        Some(HealthCheck {
            test: test.iter().map(|s| s.to_string()).collect(),
            interval_seconds: 3,
            timeout_seconds: 3,
            retries: 10,
            start_period_seconds: 0,
        })
    };
    let containers = vec![
        ContainerSpec {
            name: "portsip.database".into(),
            image: params.db_image.clone(),
            // im_ctl.sh's interface. Whether portsip/postgresql reads the
            // `_FILE` form is not known, so the vendor's variable is used; the
            // value is generated on the host and never reaches the controller.
            env: [
                (
                    "POSTGRES_PASSWORD".to_owned(),
                    format!("${{secret:{SECRET_DB_PASSWORD}}}"),
                ),
                ("PGDATA".to_owned(), "/var/lib/postgresql/data".to_owned()),
            ]
            .into(),
            mounts: vec![mount(pg_data, "/var/lib/postgresql/data", false)],
            host_network: true,
            health: health(&["CMD", "pg_isready", "-h", "127.0.0.1", "-p", "5432"]),
            stop_grace_seconds: grace,
            ..Default::default()
        },
        ContainerSpec {
            name: "portsip.initdt".into(),
            image: params.image.clone(),
            command: vec![
                "initdt.sh".into(),
                "-D".into(),
                IM_DATA_MOUNT.into(),
                "--pg-superuser-name".into(),
                "postgres".into(),
                "--pg-superuser-password".into(),
                format!("${{secret:{SECRET_DB_PASSWORD}}}"),
            ],
            user: portsip_user.clone(),
            mounts: vec![mount(im_data.clone(), IM_DATA_MOUNT, false)],
            host_network: true,
            one_shot: true,
            stop_grace_seconds: 10,
            ..Default::default()
        },
        ContainerSpec {
            name: "portsip.instantmessage".into(),
            image: params.image.clone(),
            command: vec![
                "im".into(),
                "serve".into(),
                "-E".into(),
                "-D".into(),
                IM_DATA_MOUNT.into(),
                "-t".into(),
                format!("${{secret:{SECRET_IM_TOKEN}}}"),
                "-a".into(),
                params.pbx.to_string(),
                "-x".into(),
                params.private_ip.to_string(),
                "-z".into(),
                params.public_ip.to_string(),
            ],
            user: portsip_user.clone(),
            mounts: im_mounts,
            host_network: true,
            health: health(&["CMD", "curl", "-fsS", "http://localhost:8902/svr_stats"]),
            stop_grace_seconds: grace,
            ..Default::default()
        },
        ContainerSpec {
            name: "portsip.webserver".into(),
            image: params.image.clone(),
            command: vec![
                "run_im_websrv.sh".into(),
                "websrv".into(),
                "serve".into(),
                "-n".into(),
                "websrv".into(),
                "-D".into(),
                IM_DATA_MOUNT.into(),
            ],
            user: portsip_user,
            mounts: vec![mount(im_data, IM_DATA_MOUNT, false)],
            host_network: true,
            stop_grace_seconds: grace,
            ..Default::default()
        },
    ];

    let mut spec = DeploymentSpec {
        name: DEPLOYMENT_NAME.into(),
        directories,
        secrets,
        containers,
        gate: Some(HealthGate {
            http_url: "http://127.0.0.1:8902/svr_stats".into(),
            tcp_ports: vec![8887],
            timeout_seconds: 0,
        }),
        open_tcp_ports: vec![8887],
        config_hash: String::new(),
    };
    spec.config_hash = config_hash(&spec, token_fingerprint);
    spec
}

/// sha256 over the spec's protobuf encoding and the token fingerprint. Maps
/// encode in no fixed order, so env and labels are hashed sorted, apart.
fn config_hash(spec: &DeploymentSpec, token_fingerprint: &str) -> String {
    let mut canonical = spec.clone();
    canonical.config_hash.clear();
    let mut hasher = Sha256::new();
    for c in &canonical.containers {
        // Map order is not stable in an encoding; hash env and labels sorted.
        let mut env: Vec<_> = c.env.iter().collect();
        env.sort();
        let mut labels: Vec<_> = c.labels.iter().collect();
        labels.sort();
        hasher.update(format!("{env:?}{labels:?}"));
    }
    for c in &mut canonical.containers {
        c.env.clear();
        c.labels.clear();
    }
    hasher.update(canonical.encode_to_vec());
    hasher.update(token_fingerprint.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// sha256 of the IM token, for the config hash; never the token itself.
pub fn token_fingerprint(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PortsipParams {
        PortsipParams {
            private_ip: "10.0.0.5".parse().unwrap(),
            public_ip: "203.0.113.5".parse().unwrap(),
            pbx: "10.0.0.2".parse().unwrap(),
            data_path: "/var/lib/portsip".into(),
            storage_dir: Some("/srv/im".into()),
            image: DEFAULT_IMAGE.into(),
            db_image: DEFAULT_DB_IMAGE.into(),
            stop_grace_seconds: 300,
        }
    }

    #[test]
    fn containers_follow_im_ctl_sh() {
        let spec = portsip_spec(&params(), "fp");
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "portsip.database",
                "portsip.initdt",
                "portsip.instantmessage",
                "portsip.webserver"
            ]
        );
        assert!(spec.containers.iter().all(|c| c.host_network));
        let im = &spec.containers[2];
        assert_eq!(
            im.command.join(" "),
            "im serve -E -D /var/lib/portsip/pbx -t ${secret:im_token} -a 10.0.0.2 -x 10.0.0.5 -z 203.0.113.5"
        );
        assert_eq!(im.user, "888:888");
        assert_eq!(im.stop_grace_seconds, 300);
        assert!(
            im.mounts
                .iter()
                .any(|m| m.source == "/srv/im" && m.target == "/var/lib/portsip/pbx/im/storage")
        );
        assert_eq!(im.health.as_ref().unwrap().retries, 10);
        assert_eq!(im.health.as_ref().unwrap().interval_seconds, 3);
        assert!(spec.containers[1].one_shot);
        assert_eq!(
            spec.gate.as_ref().unwrap().http_url,
            "http://127.0.0.1:8902/svr_stats"
        );
        assert_eq!(spec.open_tcp_ports, vec![8887]);
    }

    #[test]
    fn ownership_and_secrets_follow_portsip() {
        let spec = portsip_spec(&params(), "fp");
        let owner = |p: &str| {
            let d = spec.directories.iter().find(|d| d.path == p).unwrap();
            (d.uid, d.gid, d.must_exist, d.own_tree)
        };
        assert_eq!(owner("/var/lib/portsip/im-data"), (888, 888, false, true));
        assert_eq!(
            owner("/var/lib/portsip/im-postgresql"),
            (999, 999, false, true)
        );
        assert_eq!(owner("/srv/im"), (888, 888, true, true));
        // The nested mount point of -f and the directory above it are the IM's.
        assert_eq!(
            owner("/var/lib/portsip/im-data/im"),
            (888, 888, false, false)
        );
        assert_eq!(
            owner("/var/lib/portsip/im-data/im/storage"),
            (888, 888, false, false)
        );
        // The authoritative password copy is root's; the IM gets system.ini.
        let authority = &spec.secrets[0].files[0];
        assert_eq!(
            authority.path,
            "/var/lib/portsip/secrets/db_superuser_password"
        );
        assert_eq!((authority.uid, authority.mode), (0, 0o600));
        assert_eq!(owner("/var/lib/portsip/secrets"), (0, 0, false, false));
        let ini = &spec.secrets[0].files[1];
        assert_eq!(ini.path, "/var/lib/portsip/im-data/system.ini");
        assert_eq!(
            (ini.ini_section.as_str(), ini.ini_key.as_str(), ini.mode),
            ("database", "superuser_password", 0o600)
        );
        // No secret value is in the spec: only references. The database
        // gets the password the way im_ctl.sh passes it.
        let text = format!("{spec:?}");
        assert!(text.contains("${secret:db_superuser_password}"));
        let db = &spec.containers[0];
        assert_eq!(
            db.env.get("POSTGRES_PASSWORD").map(String::as_str),
            Some("${secret:db_superuser_password}")
        );
        assert!(!db.env.contains_key("POSTGRES_PASSWORD_FILE"));

        let mut no_f = params();
        no_f.storage_dir = None;
        let spec = portsip_spec(&no_f, "fp");
        assert!(spec.directories.iter().all(|d| !d.must_exist));
        assert!(!spec.directories.iter().any(|d| d.path.ends_with("/im")));
        assert_eq!(spec.containers[2].mounts.len(), 1);
    }

    #[test]
    fn config_hash_tracks_configuration_and_token() {
        let a = portsip_spec(&params(), "fp1").config_hash;
        assert_eq!(a, portsip_spec(&params(), "fp1").config_hash, "stable");
        assert_ne!(
            a,
            portsip_spec(&params(), "fp2").config_hash,
            "token counts"
        );
        let mut other = params();
        other.image = "portsip/pbx:23".into();
        assert_ne!(a, portsip_spec(&other, "fp1").config_hash, "image counts");
        assert_eq!(a.len(), 32);
    }
}
