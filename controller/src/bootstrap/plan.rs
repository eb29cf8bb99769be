//! The decisions of bootstrap, as pure functions over what was observed, so
//! every branch is unit-tested without a host.

use std::net::IpAddr;

use time::OffsetDateTime;

/// What the probe script reported about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    pub uid: u32,
    pub user: String,
    /// `uname -m`.
    pub arch: String,
    pub sudo: Sudo,
    /// SHA-256 of an already installed agent binary.
    pub installed_sha256: Option<String>,
    pub has_sha256sum: bool,
    /// Private scratch directory created for this bootstrap.
    pub tmp_dir: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sudo {
    /// Logged in as root.
    NotNeeded,
    Passwordless,
    NeedsPassword,
    Missing,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the host's probe output is incomplete (missing `{0}`); is /bin/sh a POSIX shell?")]
    ProbeIncomplete(&'static str),
    #[error(
        "user `{user}` needs sudo without a password for bootstrap, but sudo asked for one. Fix: on the host run `echo '{user} ALL=(ALL) NOPASSWD: ALL' | sudo tee /etc/sudoers.d/imfleet && sudo chmod 0440 /etc/sudoers.d/imfleet`, or bootstrap as root (--ssh-user root)"
    )]
    SudoNeedsPassword { user: String },
    #[error(
        "user `{user}` is not root and sudo is not installed on the host. Fix: install sudo and grant `{user}` passwordless sudo, or bootstrap as root (--ssh-user root)"
    )]
    SudoMissing { user: String },
    #[error(
        "the agent binary is built for {binary} but the host is {host}; build the agent for {host} and pass it with --agent-binary"
    )]
    ArchMismatch { binary: String, host: String },
    #[error("the host has no `sha256sum` (coreutils); cannot verify the upload")]
    NoSha256sum,
}

/// Parses the `key=value` lines of the probe script.
pub fn parse_probe(text: &str) -> Result<HostProbe, PlanError> {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
    };
    let uid: u32 = get("uid")
        .and_then(|v| v.parse().ok())
        .ok_or(PlanError::ProbeIncomplete("uid"))?;
    let sudo = if uid == 0 {
        Sudo::NotNeeded
    } else {
        match get("sudo").as_deref() {
            Some("ok") => Sudo::Passwordless,
            Some("password") => Sudo::NeedsPassword,
            Some("missing") => Sudo::Missing,
            _ => return Err(PlanError::ProbeIncomplete("sudo")),
        }
    };
    Ok(HostProbe {
        uid,
        user: get("user").ok_or(PlanError::ProbeIncomplete("user"))?,
        arch: get("arch").ok_or(PlanError::ProbeIncomplete("arch"))?,
        sudo,
        installed_sha256: get("installed_sha256").filter(|s| s.len() == 64),
        has_sha256sum: get("has_sha256sum").as_deref() == Some("yes"),
        tmp_dir: get("tmp")
            .filter(|t| t.starts_with("/tmp/imfleet-bootstrap."))
            .ok_or(PlanError::ProbeIncomplete("tmp"))?,
    })
}

/// The probe, run by `sh -c` as the login user. `$1` is the agent binary path.
pub const PROBE_SCRIPT: &str = r#"
echo "uid=$(id -u)"
echo "user=$(id -un)"
echo "arch=$(uname -m)"
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then echo sudo=missing
  elif sudo -n true >/dev/null 2>&1; then echo sudo=ok
  else echo sudo=password; fi
fi
if command -v sha256sum >/dev/null 2>&1; then
  echo has_sha256sum=yes
  if [ -f "$1" ]; then echo "installed_sha256=$(sha256sum "$1" | cut -d' ' -f1)"; fi
fi
echo "tmp=$(mktemp -d /tmp/imfleet-bootstrap.XXXXXXXX)"
"#;

/// The agent binary the controller would install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAgent {
    pub sha256: String,
    pub size: u64,
    /// `uname -m` spelling of the ELF machine, e.g. `x86_64`.
    pub arch: String,
}

/// What bootstrap will do on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// Privileged steps go through `sudo -n`.
    pub use_sudo: bool,
    /// The installed binary differs (or is absent) and must be uploaded.
    pub upload: bool,
}

/// Decides whether bootstrap can proceed on this host and what it must do.
pub fn plan_host(probe: &HostProbe, local: &LocalAgent) -> Result<HostPlan, PlanError> {
    let use_sudo = match probe.sudo {
        Sudo::NotNeeded => false,
        Sudo::Passwordless => true,
        Sudo::NeedsPassword => {
            return Err(PlanError::SudoNeedsPassword {
                user: probe.user.clone(),
            });
        }
        Sudo::Missing => {
            return Err(PlanError::SudoMissing {
                user: probe.user.clone(),
            });
        }
    };
    if normalise_arch(&probe.arch) != normalise_arch(&local.arch) {
        return Err(PlanError::ArchMismatch {
            binary: local.arch.clone(),
            host: probe.arch.clone(),
        });
    }
    if !probe.has_sha256sum {
        return Err(PlanError::NoSha256sum);
    }
    Ok(HostPlan {
        use_sudo,
        upload: probe.installed_sha256.as_deref() != Some(local.sha256.as_str()),
    })
}

fn normalise_arch(arch: &str) -> &str {
    match arch {
        "amd64" | "x86_64" => "x86_64",
        "arm64" | "aarch64" => "aarch64",
        other => other,
    }
}

/// The `uname -m` name of an ELF executable's machine, from its header.
pub fn elf_arch(header: &[u8]) -> Option<&'static str> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        return None;
    }
    let little_endian = header[5] == 1;
    let machine = if little_endian {
        u16::from_le_bytes([header[18], header[19]])
    } else {
        u16::from_be_bytes([header[18], header[19]])
    };
    Some(match machine {
        0x3e => "x86_64",
        0xb7 => "aarch64",
        0x03 => "i686",
        0x28 => "armv7l",
        0xf3 => "riscv64",
        _ => "unknown",
    })
}

/// Why the agent gets a new certificate, or `None` to keep the one it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityDecision {
    Keep,
    Issue(String),
}

/// Keeps an installed certificate only if it chains to our CA, names every
/// address the controller will dial, and stays valid for the renewal window.
pub fn decide_identity(
    installed_cert: Option<&str>,
    ca_pem: &str,
    names: &[String],
    now: OffsetDateTime,
) -> IdentityDecision {
    let Some(cert) = installed_cert else {
        return IdentityDecision::Issue("the agent has no certificate yet".into());
    };
    for name in names {
        if let Err(e) = imfleet_certs::verify_server_identity(ca_pem, cert, name, now) {
            return IdentityDecision::Issue(format!(
                "the installed certificate is unusable for {name}: {e}"
            ));
        }
    }
    match imfleet_certs::inspect_pem(cert) {
        Ok(info) if info.not_before > now => {
            IdentityDecision::Issue("the installed certificate is not yet valid".into())
        }
        Ok(info) if imfleet_certs::renewal_due(info.not_before, info.not_after, now) => {
            IdentityDecision::Issue("the installed certificate is due for renewal".into())
        }
        Ok(_) => IdentityDecision::Keep,
        Err(e) => IdentityDecision::Issue(format!("the installed certificate is unreadable: {e}")),
    }
}

/// SANs for an agent reached as `host`: the name itself, plus the addresses it
/// resolves to when it is a DNS name.
pub fn subject_alt_names(host: &str, resolved: &[IpAddr]) -> Vec<String> {
    let mut names = vec![host.to_owned()];
    if host.parse::<IpAddr>().is_err() {
        for ip in resolved {
            let text = ip.to_string();
            if !names.contains(&text) {
                names.push(text);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_certs::{AGENT_LIFETIME, CertificateAuthority, Validity};

    const ROOT_PROBE: &str =
        "uid=0\nuser=root\narch=x86_64\nhas_sha256sum=yes\ntmp=/tmp/imfleet-bootstrap.AbCd1234\n";

    fn local() -> LocalAgent {
        LocalAgent {
            sha256: "a".repeat(64),
            size: 1,
            arch: "x86_64".into(),
        }
    }

    #[test]
    fn root_probe_plans_an_upload_without_sudo() {
        let probe = parse_probe(ROOT_PROBE).unwrap();
        assert_eq!(probe.sudo, Sudo::NotNeeded);
        assert_eq!(
            plan_host(&probe, &local()).unwrap(),
            HostPlan {
                use_sudo: false,
                upload: true
            }
        );
    }

    #[test]
    fn identical_binary_is_not_uploaded_again() {
        let text = format!("{ROOT_PROBE}installed_sha256={}\n", "a".repeat(64));
        let plan = plan_host(&parse_probe(&text).unwrap(), &local()).unwrap();
        assert!(!plan.upload);
        let text = format!("{ROOT_PROBE}installed_sha256={}\n", "b".repeat(64));
        assert!(
            plan_host(&parse_probe(&text).unwrap(), &local())
                .unwrap()
                .upload
        );
    }

    #[test]
    fn sudo_states_decide_the_plan() {
        let base =
            "uid=1000\nuser=pbx\narch=x86_64\nhas_sha256sum=yes\ntmp=/tmp/imfleet-bootstrap.x\n";
        let ok = parse_probe(&format!("{base}sudo=ok\n")).unwrap();
        assert!(plan_host(&ok, &local()).unwrap().use_sudo);
        let pw = parse_probe(&format!("{base}sudo=password\n")).unwrap();
        let err = plan_host(&pw, &local()).unwrap_err();
        assert!(err.to_string().contains("NOPASSWD"), "{err}");
        let missing = parse_probe(&format!("{base}sudo=missing\n")).unwrap();
        assert!(matches!(
            plan_host(&missing, &local()),
            Err(PlanError::SudoMissing { .. })
        ));
        assert_eq!(parse_probe(base), Err(PlanError::ProbeIncomplete("sudo")));
    }

    #[test]
    fn wrong_architecture_or_missing_tools_are_refused() {
        let arm = parse_probe(&ROOT_PROBE.replace("x86_64", "aarch64")).unwrap();
        assert!(matches!(
            plan_host(&arm, &local()),
            Err(PlanError::ArchMismatch { .. })
        ));
        let amd = parse_probe(&ROOT_PROBE.replace("x86_64", "amd64")).unwrap();
        assert!(plan_host(&amd, &local()).is_ok());
        let no_sum = parse_probe(&ROOT_PROBE.replace("has_sha256sum=yes\n", "")).unwrap();
        assert_eq!(plan_host(&no_sum, &local()), Err(PlanError::NoSha256sum));
        // A tmp dir that is not ours is never trusted (it is later removed with rm -rf).
        assert!(parse_probe(&ROOT_PROBE.replace("/tmp/imfleet-bootstrap.AbCd1234", "/")).is_err());
    }

    #[test]
    fn elf_header_gives_the_architecture() {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[5] = 1;
        header[18] = 0x3e;
        assert_eq!(elf_arch(&header), Some("x86_64"));
        header[18] = 0xb7;
        assert_eq!(elf_arch(&header), Some("aarch64"));
        assert_eq!(elf_arch(b"#!/bin/sh\necho hi\n"), None);
    }

    #[test]
    fn identity_is_kept_only_when_valid_for_every_name_and_the_renewal_window() {
        let ca = CertificateAuthority::generate("CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let names = vec!["127.0.0.2".to_owned()];
        let issue = |sans: &[String], validity| {
            let req = imfleet_certs::generate_key_and_request("im1").unwrap();
            ca.sign_agent_request(&req.csr_pem, "im1", sans, validity)
                .unwrap()
        };
        let good = issue(&names, Validity::starting_now(AGENT_LIFETIME));
        assert_eq!(
            decide_identity(Some(&good), ca.cert_pem(), &names, now),
            IdentityDecision::Keep
        );
        assert!(matches!(
            decide_identity(None, ca.cert_pem(), &names, now),
            IdentityDecision::Issue(_)
        ));

        let other_name = issue(
            &["127.0.0.3".to_owned()],
            Validity::starting_now(AGENT_LIFETIME),
        );
        assert!(matches!(
            decide_identity(Some(&other_name), ca.cert_pem(), &names, now),
            IdentityDecision::Issue(_)
        ));
        // Two thirds of its life gone: renewed.
        let expiring = issue(
            &names,
            Validity {
                not_before: now - time::Duration::days(61),
                not_after: now + time::Duration::days(29),
            },
        );
        assert!(matches!(
            decide_identity(Some(&expiring), ca.cert_pem(), &names, now),
            IdentityDecision::Issue(_)
        ));
        let foreign = CertificateAuthority::generate("other").unwrap();
        assert!(matches!(
            decide_identity(Some(&good), foreign.cert_pem(), &names, now),
            IdentityDecision::Issue(_)
        ));
    }

    #[test]
    fn dns_names_also_get_their_addresses() {
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        assert_eq!(
            subject_alt_names("im1.example", &ips),
            vec!["im1.example", "10.0.0.5"]
        );
        assert_eq!(subject_alt_names("10.0.0.6", &ips), vec!["10.0.0.6"]);
    }
}
