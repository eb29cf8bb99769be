//! The README's main job: create a throwaway target host (a real sshd on a
//! loopback address, private /opt/imfleet), then drive it with the real
//! `controller` as an operator would on pbx01: bootstrap, preflight, deploy
//! the IM service (the project's stand-in images), status.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, ExitCode};

use imfleet_tests::{ImSlot, SshUser, TestHost, bin};

/// Runs one controller command visibly; returns its exit status.
fn show(state: &std::path::Path, args: &[String]) -> i32 {
    println!("\n$ controller {}", args.join(" "));
    Command::new(bin("controller"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env("IMFLEET_AGENT_BINARY", bin("agent"))
        .status()
        .expect("run controller")
        .code()
        .unwrap_or(-1)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn main() -> ExitCode {
    let keep = std::env::args().any(|a| a == "--keep");
    let _slot = ImSlot::take();
    println!("Creating a throwaway IM host: sshd on a loopback address, private /opt/imfleet ...");
    let host = TestHost::start();
    let work = tempfile::Builder::new()
        .prefix("imfleet-demo-")
        .tempdir()
        .expect("tempdir");
    let state = work.path().join("state");
    let token = work.path().join("im.token");
    std::fs::write(&token, "demo-im-token-0123456789abcdef\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let data = work.path().join("portsip").display().to_string();
    let a = host.address().to_string();
    println!(
        "Target host: root@{a}:2222 (ssh_config {})",
        host.ssh_config().display()
    );

    let mut bootstrap = vec!["bootstrap".to_owned()];
    bootstrap.extend(host.ssh_args(SshUser::Root));
    // The agent keeps its default port; it listens on the host's own address.
    bootstrap.extend(strings(&["--agent-bind", &a, "--data-path", &data, &a]));
    let target = strings(&["-a", &a, "-A", &a, "--data-path", &data, "--users", "5000"]);
    let mut preflight = strings(&["preflight", &a]);
    preflight.extend(target.clone());
    let mut deploy = strings(&["deploy", &a, "--pbx", "127.0.0.1"]);
    deploy.extend(target);
    deploy.extend(strings(&[
        "--token-file",
        &token.display().to_string(),
        "--image",
        "imfleet-test/pbx:22",
        "--db-image",
        "imfleet-test/postgresql:14.12",
        // This machine is not Ubuntu 24.04 (and may have PostgreSQL installed):
        // the demo overrides those checks, and deploy records what it overrode.
        "--force",
    ]));

    // (command, whether a non-zero exit ends the demo)
    let steps: Vec<(Vec<String>, bool)> = vec![
        (strings(&["init"]), true),
        (bootstrap, true),
        (strings(&["ping", &a]), true),
        (preflight, false),
        (deploy, true),
        (strings(&["status", &a]), true),
    ];
    for (step, must_pass) in &steps {
        let code = show(&state, step);
        if code != 0 && *must_pass {
            eprintln!(
                "\ndemo failed at `controller {}` (exit {code})",
                step.join(" ")
            );
            eprintln!("agent log:\n{}", host.agent_log());
            return ExitCode::from(1);
        }
    }
    if keep {
        println!(
            "\nKept running. Try: target/debug/controller --state-dir {} status {a}   (Enter ends the demo)",
            state.display()
        );
        let _ = std::io::stdin().read_line(&mut String::new());
    }
    // Tear down quietly: the status above is the demo's result.
    let _ = Command::new(bin("controller"))
        .arg("--state-dir")
        .arg(&state)
        .args(["rm", "--yes", "--grace", "5", &a])
        .output();
    println!("\nDemo complete: the IM service was healthy; the throwaway host is torn down.");
    ExitCode::SUCCESS
}
