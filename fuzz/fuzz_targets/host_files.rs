//! Files and command output the agent reads on its host, which local users
//! or packages may have written, and what the IM's stats endpoint answers:
//! none of the parsers may panic. The first
//! byte picks the parser.
#![no_main]

use std::net::IpAddr;

use imfleet_agent::config::AgentConfig;
use imfleet_agent::facts::net::{self, ConfigKind, NetConfig};
use imfleet_agent::facts::{packages, sockets, storage};
use imfleet_agent::health::{procfs, service};
use imfleet_proto::model::os_release as os;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 11 {
        0 => {
            let _ = os::parse_os_release(&text);
        }
        1 => {
            let _ = packages::parse_dpkg_status(&text);
        }
        2 => {
            let _ = packages::parse_updates_available(&text);
        }
        3 => {
            let _ = sockets::parse_proc_net(&text, "tcp");
            let _ = sockets::parse_proc_net(&text, "udp6");
        }
        4 => {
            let mounts = storage::parse_mounts(&text);
            let _ = storage::mount_for(std::path::Path::new("/var/lib/portsip"), &mounts);
        }
        5 => {
            let _ = net::parse_ip_json(&text);
        }
        6 => {
            if let Ok(config) = toml::from_str::<AgentConfig>(&text) {
                let _ = config.roots(std::path::Path::new("/opt/imfleet"));
            }
        }
        7 => {
            let _ = procfs::parse_stat(&text);
            let _ = procfs::parse_diskstats(&text);
            let _ = procfs::parse_net_dev(&text);
        }
        8 => {
            // The IM's /svr_stats answer: bounded, whatever it is.
            let fields = service::numeric_fields(rest);
            assert!(fields.len() <= service::MAX_FIELDS);
            assert!(fields.keys().all(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')));
        }
        _ => {
            let kind = [
                ConfigKind::Netplan,
                ConfigKind::Networkd,
                ConfigKind::Ifupdown,
                ConfigKind::NetworkManager,
            ][usize::from(which) % 4];
            let configs = vec![NetConfig {
                kind,
                path: "/etc/fuzz".into(),
                text: text.into_owned(),
            }];
            for ip in ["10.0.0.2", "192.168.1.20", "2001:db8::5"] {
                let ip: IpAddr = ip.parse().expect("literal");
                let _ = net::classify("eth0", ip, &configs, None);
            }
        }
    }
});
