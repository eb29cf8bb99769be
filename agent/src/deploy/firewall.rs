//! Admitting the IM client port in whichever firewall the host uses. The
//! commands are planned by a pure function from what the facts module saw.

use imfleet_proto::agent::v1::FirewallInfo;
use imfleet_proto::model::firewall::admits;

/// The commands that admit every port of `ports`/tcp the active firewall
/// does not admit yet; none when no firewall filters input.
pub fn plan(info: &FirewallInfo, nft_ruleset: Option<&str>, ports: &[u32]) -> Vec<Vec<String>> {
    let mut missing: Vec<u32> = ports
        .iter()
        .copied()
        .filter(|p| !admits(info, *p))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Vec::new();
    }
    let cmd = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut commands = Vec::new();
    match info.active.as_str() {
        "ufw" => {
            for port in &missing {
                commands.push(cmd(&[
                    "ufw",
                    "allow",
                    &format!("{port}/tcp"),
                    "comment",
                    "imfleet deployment",
                ]));
            }
        }
        "firewalld" => {
            for port in &missing {
                commands.push(cmd(&[
                    "firewall-cmd",
                    "--permanent",
                    &format!("--add-port={port}/tcp"),
                ]));
            }
            commands.push(cmd(&["firewall-cmd", "--reload"]));
        }
        "nftables" => {
            if let Some((family, table, chain)) = nft_ruleset.and_then(input_chain) {
                for port in &missing {
                    commands.push(cmd(&[
                        "nft",
                        "insert",
                        "rule",
                        &family,
                        &table,
                        &chain,
                        "tcp",
                        "dport",
                        &port.to_string(),
                        "accept",
                    ]));
                }
            }
        }
        _ => {}
    }
    commands
}

/// (family, table, chain) of the first chain hooked on input.
fn input_chain(ruleset: &str) -> Option<(String, String, String)> {
    let mut table = None;
    let mut chain = None;
    for line in ruleset.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, "{"] => table = Some((family.to_string(), name.to_string())),
            ["chain", name, "{"] => chain = Some(name.to_string()),
            _ if line.contains("hook input") => {
                if let (Some((family, table)), Some(chain)) = (&table, &chain) {
                    return Some((family.clone(), table.clone(), chain.clone()));
                }
            }
            _ => {}
        }
    }
    None
}

/// Runs the plan; the first failing command is an error naming it.
pub fn open(ports: &[u32]) -> Result<Vec<String>, String> {
    let packages = crate::facts::packages::installed();
    let evidence = crate::facts::firewall::evidence();
    let info = crate::facts::firewall::judge(&evidence, &packages);
    let mut done = Vec::new();
    for command in plan(&info, evidence.nft_ruleset.as_deref(), ports) {
        let out = std::process::Command::new(&command[0])
            .args(&command[1..])
            .output()
            .map_err(|e| format!("{}: {e}", command.join(" ")))?;
        if !out.status.success() {
            return Err(format!(
                "`{}` failed: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        done.push(command.join(" "));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imfleet_proto::agent::v1::PortRange;

    fn info(active: &str, admitted: &[u32]) -> FirewallInfo {
        FirewallInfo {
            active: active.into(),
            admitted_tcp: admitted
                .iter()
                .map(|p| PortRange {
                    first: *p,
                    last: *p,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_firewall_gets_its_own_commands_for_every_missing_port() {
        assert_eq!(
            plan(&info("ufw", &[22]), None, &[8887, 5432]),
            vec![
                vec!["ufw", "allow", "5432/tcp", "comment", "imfleet deployment"],
                vec!["ufw", "allow", "8887/tcp", "comment", "imfleet deployment"],
            ]
        );
        let firewalld = plan(&info("firewalld", &[]), None, &[8887]);
        assert_eq!(
            firewalld,
            vec![
                vec!["firewall-cmd", "--permanent", "--add-port=8887/tcp"],
                vec!["firewall-cmd", "--reload"],
            ]
        );
        let ruleset = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t}\n}\n";
        assert_eq!(
            plan(&info("nftables", &[]), Some(ruleset), &[8887]),
            vec![vec![
                "nft", "insert", "rule", "inet", "filter", "input", "tcp", "dport", "8887",
                "accept"
            ]]
        );
    }

    #[test]
    fn an_open_im_port_does_not_hide_the_others() {
        // Once 8887 was open, the old plan did nothing for any port.
        assert_eq!(
            plan(&info("ufw", &[8887]), None, &[8887, 9000]),
            vec![vec![
                "ufw",
                "allow",
                "9000/tcp",
                "comment",
                "imfleet deployment"
            ]]
        );
    }

    #[test]
    fn nothing_to_do_when_admitted_or_unfiltered() {
        assert!(plan(&info("ufw", &[8887]), None, &[8887]).is_empty());
        assert!(plan(&info("none", &[]), None, &[8887, 5432]).is_empty());
        assert!(plan(&info("nftables", &[]), Some("table ip nat {\n}\n"), &[8887]).is_empty());
    }
}
