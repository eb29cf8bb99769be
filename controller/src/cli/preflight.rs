//! `inventory` and `preflight`: what the host is, and whether it is fit for
//! the IM service.

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use imfleet_controller::preflight::{
    self, Check, DEFAULT_DATA_PATH, IM_CLIENT_PORT, PreflightParams, SERVICE_GID, SERVICE_UID,
    Summary, Verdict, sizing,
};
use imfleet_proto::agent::v1::{AddressOrigin, HostInventory};
use serde::Serialize;

use super::output;

#[derive(Args)]
pub struct InventoryArgs {
    /// Bootstrapped host (name or agent address).
    host: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// What is about to be deployed; shared with `deploy`.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Private IP of the IM host (as `im.sh -a`).
    #[arg(short = 'a', long = "private-ip", value_name = "IP")]
    pub private_ip: IpAddr,
    /// Public IP clients reach the IM host on (as `im.sh -A`).
    #[arg(short = 'A', long = "public-ip", value_name = "IP")]
    pub public_ip: IpAddr,
    /// Existing directory for IM file storage (as `im.sh -f`).
    #[arg(short = 'f', long = "storage-dir", value_name = "DIR")]
    pub storage_dir: Option<String>,
    /// Where the IM data directories live on the host.
    #[arg(long, default_value = DEFAULT_DATA_PATH, value_name = "DIR")]
    pub data_path: String,
    /// Sizing profile: concurrent users to plan for.
    #[arg(long, default_value_t = sizing::DEFAULT_USERS, value_parser = users_profile, value_name = "N")]
    pub users: u32,
}

fn users_profile(text: &str) -> Result<u32, String> {
    let users: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    match sizing::profile(users) {
        Some(_) => Ok(users),
        None => Err(format!(
            "no sizing profile for {users} users; choose one of {}",
            sizing::PROFILES
                .iter()
                .map(|p| p.users.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

impl TargetArgs {
    /// Validates what can be validated without the host.
    pub fn params(&self) -> anyhow::Result<PreflightParams> {
        for (flag, path) in [
            ("-f", self.storage_dir.as_deref()),
            ("--data-path", Some(&self.data_path)),
        ] {
            if let Some(p) = path
                && !Path::new(p).is_absolute()
            {
                bail!("{flag} {p}: must be an absolute path on the IM host");
            }
        }
        for (flag, ip) in [("-a", self.private_ip), ("-A", self.public_ip)] {
            if ip.is_unspecified() || ip.is_multicast() {
                bail!("{flag} {ip}: not a host address");
            }
        }
        Ok(PreflightParams {
            private_ip: self.private_ip,
            public_ip: self.public_ip,
            storage_dir: self.storage_dir.clone(),
            data_path: self.data_path.clone(),
            sizing: sizing::profile(self.users).context("sizing profile")?,
            redeploy: false,
        })
    }
}

#[derive(Args)]
pub struct PreflightArgs {
    /// Bootstrapped host (name or agent address).
    host: String,
    #[command(flatten)]
    target: TargetArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct PreflightReport<'a> {
    host: &'a str,
    users: u32,
    summary: Summary,
    checks: &'a [Check],
}

pub async fn inventory(dir: &Path, args: InventoryArgs) -> anyhow::Result<ExitCode> {
    let fleet = super::open_fleet(dir).await?;
    let host = fleet.host(&args.host).await?;
    let agent = fleet.connect(&host).await?;
    let inv = agent
        .inventory(vec![DEFAULT_DATA_PATH.to_owned()], SERVICE_UID, SERVICE_GID)
        .await?;
    if args.json {
        output::print_json(&inv)?;
    } else {
        print_inventory(&host.name, &inv);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn preflight(dir: &Path, args: PreflightArgs) -> anyhow::Result<ExitCode> {
    let params = args.target.params()?;
    let fleet = super::open_fleet(dir).await?;
    let host = fleet.host(&args.host).await?;
    let agent = fleet.connect(&host).await?;
    let checks = preflight::assess(&agent, &params).await?;
    let summary = Summary::of(&checks);
    if args.json {
        output::print_json(&PreflightReport {
            host: &host.name,
            users: params.sizing.users,
            summary,
            checks: &checks,
        })?;
    } else {
        print_checks(&checks);
        println!(
            "Preflight of {} for {} users: {} failed, {} warnings, {} passed.",
            host.name, params.sizing.users, summary.fail, summary.warn, summary.pass
        );
    }
    Ok(ExitCode::from(summary.exit_code()))
}

pub fn print_checks(checks: &[Check]) {
    let mut table = output::table(&["RESULT", "CHECK", "OBSERVED", "REQUIRED / REMEDY"]);
    for c in checks {
        let result = match c.verdict {
            Verdict::Fail => "FAIL",
            Verdict::Warn => "warn",
            Verdict::Pass => "pass",
        };
        let advice = if c.remedy.is_empty() {
            c.required.clone()
        } else {
            format!("{}\n-> {}", c.required, c.remedy)
        };
        table.add_row(vec![
            result.to_owned(),
            c.id.to_owned(),
            c.observed.clone(),
            advice,
        ]);
    }
    println!("{table}");
}

fn print_inventory(name: &str, inv: &HostInventory) {
    let os = inv.os.clone().unwrap_or_default();
    let cpu = inv.cpu.clone().unwrap_or_default();
    let mem = inv.memory.unwrap_or_default();
    // Everything the host reports is shown through this.
    let s = |text: &str| output::shown(text, 256);
    println!("Host      {name} ({})", s(&inv.hostname));
    println!(
        "OS        {} {}, kernel {}, virtualisation {}",
        s(&os.pretty_name),
        s(&os.arch),
        s(&os.kernel),
        s(&inv.virtualization)
    );
    println!(
        "CPU       {}: {} sockets, {} cores, {} logical CPUs",
        s(&cpu.model),
        cpu.sockets,
        cpu.physical_cores,
        cpu.logical_cores
    );
    println!(
        "Memory    {} ({} available), swap {} ({} free)",
        sizing::gb(mem.total_bytes),
        sizing::gb(mem.available_bytes),
        sizing::gb(mem.swap_total_bytes),
        sizing::gb(mem.swap_free_bytes)
    );
    let clock = inv.clock.clone().unwrap_or_default();
    let source = s(&clock.source);
    match clock.synchronized {
        Some(true) => println!("Clock     synchronised ({source})"),
        Some(false) => println!("Clock     NOT synchronised ({source})"),
        None => println!("Clock     {source}"),
    }
    let power = inv.power.clone().unwrap_or_default();
    println!(
        "Power     governor {}{}",
        if power.governor.is_empty() {
            "none exposed".into()
        } else {
            s(&power.governor)
        },
        if power.profile.is_empty() {
            String::new()
        } else {
            format!(", profile {}", s(&power.profile))
        }
    );
    let docker = inv.docker.clone().unwrap_or_default();
    println!(
        "Docker    {}",
        if docker.running {
            format!(
                "Engine {} (API {}), compose plugin {}",
                s(&docker.version),
                s(&docker.api_version),
                if docker.compose_plugin { "yes" } else { "no" }
            )
        } else if docker.installed {
            "installed, not answering".into()
        } else {
            "not installed".into()
        }
    );
    let fw = inv.firewall.clone().unwrap_or_default();
    println!(
        "Firewall  {}{}",
        s(&fw.active),
        match (
            fw.active.as_str(),
            imfleet_proto::model::firewall::admits(&fw, IM_CLIENT_PORT),
        ) {
            ("none" | "", _) => "",
            (_, true) => ", 8887/tcp allowed",
            (_, false) => ", 8887/tcp NOT allowed",
        }
    );
    let updates = inv.updates.unwrap_or_default();
    println!(
        "Updates   {}",
        if updates.known {
            format!("{} pending ({} security)", updates.total, updates.security)
        } else {
            "unknown".into()
        }
    );
    let agent = inv.agent.clone().unwrap_or_default();
    println!(
        "Agent     runs as {} (uid {}){}",
        s(&agent.user),
        agent.uid,
        if agent.root { "" } else { ", NOT root" }
    );

    let mut disks = output::table(&["DISK", "SIZE", "MODEL", "KIND"]);
    for d in &inv.disks {
        let kind = if d.is_virtual {
            "virtual"
        } else if d.rotational {
            "HDD"
        } else {
            "SSD"
        };
        disks.add_row(vec![
            d.name.clone(),
            sizing::gb(d.size_bytes),
            d.model.clone(),
            kind.into(),
        ]);
    }
    println!("\n{disks}");
    let mut fs = output::table(&["MOUNT", "DEVICE", "TYPE", "SIZE", "FREE", "DISKS"]);
    for f in &inv.filesystems {
        fs.add_row(vec![
            f.mount_point.clone(),
            f.device.clone(),
            f.fs_type.clone(),
            sizing::gb(f.total_bytes),
            sizing::gb(f.available_bytes),
            f.disks.join(","),
        ]);
    }
    println!("{fs}");
    let mut net = output::table(&["INTERFACE", "ADDRESS", "ORIGIN", "WHY"]);
    for i in &inv.interfaces {
        for a in &i.addresses {
            let origin = match AddressOrigin::try_from(a.origin).unwrap_or(AddressOrigin::Unknown) {
                AddressOrigin::Static => "static",
                AddressOrigin::Dhcp => "DHCP",
                AddressOrigin::LinkLocal => "link-local",
                AddressOrigin::Unknown => "unknown",
            };
            net.add_row(vec![
                i.name.clone(),
                format!("{}/{}", a.address, a.prefix),
                origin.into(),
                a.origin_source.clone(),
            ]);
        }
    }
    println!("{net}");
    let mut ports = output::table(&["PROTO", "ADDRESS", "PORT", "PROCESS"]);
    for s in &inv.listening {
        ports.add_row(vec![
            s.protocol.clone(),
            s.address.clone(),
            s.port.to_string(),
            format!(
                "{} {}",
                s.process,
                if s.pid > 0 {
                    s.pid.to_string()
                } else {
                    String::new()
                }
            ),
        ]);
    }
    println!("{ports}");
    if !inv.packages.is_empty() {
        let names: Vec<String> = inv
            .packages
            .iter()
            .map(|p| format!("{} {}", s(&p.name), s(&p.version)))
            .collect();
        println!("Packages of interest: {}", names.join(", "));
    }
    for note in &inv.notes {
        println!("note: {}", s(note));
    }
}
