//! Admitting the IM client port in whichever firewall the host uses. The
//! commands are planned by a pure function from what the facts module saw.

use imfleet_proto::agent::v1::FirewallInfo;

/// The commands that admit `port`/tcp, or none when it already is (or no
/// firewall filters input).
pub fn plan(info: &FirewallInfo, nft_ruleset: Option<&str>, port: u32) -> Vec<Vec<String>> {
    if info.im_port_allowed == Some(true) {
        return Vec::new();
    }
    let cmd = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let port_tcp = format!("{port}/tcp");
    match info.active.as_str() {
        "ufw" => vec![cmd(&[
            "ufw",
            "allow",
            &port_tcp,
            "comment",
            "imfleet: PortSIP IM clients",
        ])],
        "firewalld" => vec![
            cmd(&[
                "firewall-cmd",
                "--permanent",
                &format!("--add-port={port_tcp}"),
            ]),
            cmd(&["firewall-cmd", "--reload"]),
        ],
        "nftables" => match nft_ruleset.and_then(input_chain) {
            Some((family, table, chain)) => vec![cmd(&[
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
            ])],
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
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
pub fn open(port: u32) -> Result<Vec<String>, String> {
    let packages = crate::facts::packages::installed();
    let info = crate::facts::firewall::collect(&packages);
    let ruleset = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let mut done = Vec::new();
    for command in plan(&info, ruleset.as_deref(), port) {
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

    fn info(active: &str, allowed: Option<bool>) -> FirewallInfo {
        FirewallInfo {
            active: active.into(),
            installed: vec![],
            im_port_allowed: allowed,
        }
    }

    #[test]
    fn each_firewall_gets_its_own_command() {
        assert_eq!(
            plan(&info("ufw", Some(false)), None, 8887),
            vec![vec![
                "ufw",
                "allow",
                "8887/tcp",
                "comment",
                "imfleet: PortSIP IM clients"
            ]]
        );
        let firewalld = plan(&info("firewalld", Some(false)), None, 8887);
        assert_eq!(
            firewalld[0],
            vec!["firewall-cmd", "--permanent", "--add-port=8887/tcp"]
        );
        assert_eq!(firewalld[1], vec!["firewall-cmd", "--reload"]);
        let ruleset = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t}\n}\n";
        assert_eq!(
            plan(&info("nftables", Some(false)), Some(ruleset), 8887),
            vec![vec![
                "nft", "insert", "rule", "inet", "filter", "input", "tcp", "dport", "8887",
                "accept"
            ]]
        );
    }

    #[test]
    fn nothing_to_do_when_admitted_or_unfiltered() {
        assert!(plan(&info("ufw", Some(true)), None, 8887).is_empty());
        assert!(plan(&info("none", Some(true)), None, 8887).is_empty());
        assert!(
            plan(
                &info("nftables", Some(false)),
                Some("table ip nat {\n}\n"),
                8887
            )
            .is_empty()
        );
    }
}
