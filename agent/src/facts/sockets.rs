//! Listening sockets from `/proc/net/{tcp,tcp6,udp,udp6}`, with the owning
//! process found through `/proc/<pid>/fd` socket inodes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use imfleet_proto::agent::v1::ListeningSocket;

/// A socket line: protocol, local address, port and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSocket {
    pub protocol: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// Parses a `/proc/net/*` table, keeping listening TCP sockets (state 0A) and
/// unconnected UDP sockets (state 07).
pub fn parse_proc_net(text: &str, protocol: &'static str) -> Vec<RawSocket> {
    let wanted = if protocol.starts_with("tcp") {
        "0A"
    } else {
        "07"
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != wanted {
                return None;
            }
            let (addr_hex, port_hex) = f[1].split_once(':')?;
            Some(RawSocket {
                protocol,
                address: decode_address(addr_hex)?,
                port: u16::from_str_radix(port_hex, 16).ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The kernel prints addresses as native-endian (little-endian here) 32-bit words.
fn decode_address(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::swap_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let w = word(&hex[i * 8..i * 8 + 8])?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Socket inode -> (pid, command name), from every readable `/proc/<pid>/fd`.
fn socket_owners() -> HashMap<u64, (u32, String)> {
    let mut owners = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for entry in procs.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        for fd in fds.filter_map(|e| e.ok()) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
            {
                owners.entry(inode).or_insert((pid, comm.clone()));
            }
        }
    }
    owners
}

/// Every listening socket on this host.
pub fn listening() -> Vec<ListeningSocket> {
    let owners = socket_owners();
    let mut out: Vec<ListeningSocket> = ["tcp", "tcp6", "udp", "udp6"]
        .iter()
        .flat_map(|proto| {
            std::fs::read_to_string(format!("/proc/net/{proto}"))
                .map(|t| parse_proc_net(&t, proto))
                .unwrap_or_default()
        })
        .map(|s| {
            let (pid, process) = owners.get(&s.inode).cloned().unwrap_or_default();
            ListeningSocket {
                protocol: s.protocol.to_owned(),
                address: s.address.to_string(),
                port: u32::from(s.port),
                process,
                pid,
            }
        })
        .collect();
    out.sort_by(|a, b| (a.port, &a.protocol).cmp(&(b.port, &b.protocol)));
    out.dedup_by(|a, b| a.port == b.port && a.protocol == b.protocol && a.address == b.address);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_tcp_tables_decode() {
        let v4 = parse_proc_net(include_str!("fixtures/proc-net-tcp"), "tcp");
        assert_eq!(
            v4,
            vec![
                RawSocket {
                    protocol: "tcp",
                    address: "127.0.0.53".parse().unwrap(),
                    port: 53,
                    inode: 18263
                },
                RawSocket {
                    protocol: "tcp",
                    address: "0.0.0.0".parse().unwrap(),
                    port: 22,
                    inode: 21344
                },
                RawSocket {
                    protocol: "tcp",
                    address: "127.0.0.1".parse().unwrap(),
                    port: 5432,
                    inode: 33333
                },
            ],
            "the established connection is not listening"
        );
        let v6 = parse_proc_net(include_str!("fixtures/proc-net-tcp6"), "tcp6");
        assert_eq!(v6.len(), 1);
        assert_eq!((v6[0].address, v6[0].port), ("::".parse().unwrap(), 8887));
    }
}
