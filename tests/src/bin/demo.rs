//! The README's main job: create a throwaway target host (a real sshd on a
//! loopback address, private /opt/imfleet), then drive it with the real
//! `controller` exactly as an operator would on pbx01.
#![forbid(unsafe_code)]

use std::process::{Command, ExitCode};

use imfleet_tests::{SshUser, TestHost, bin};

fn show(controller_state: &std::path::Path, args: &[String]) -> bool {
    println!("\n$ controller {}", args.join(" "));
    let status = Command::new(bin("controller"))
        .arg("--state-dir")
        .arg(controller_state)
        .args(args)
        .env("IMFLEET_AGENT_BINARY", bin("agent"))
        .status()
        .expect("run controller");
    status.success()
}

fn main() -> ExitCode {
    let keep = std::env::args().any(|a| a == "--keep");
    println!("Creating a throwaway IM host: sshd on a loopback address, private /opt/imfleet ...");
    let host = TestHost::start();
    let state = tempfile::Builder::new()
        .prefix("imfleet-demo-state-")
        .tempdir()
        .expect("tempdir");
    let address = host.address().to_string();
    println!(
        "Target host: root@{address}:2222 (ssh_config {})",
        host.ssh_config().display()
    );

    let mut bootstrap: Vec<String> = vec!["bootstrap".into()];
    bootstrap.extend(host.ssh_args(SshUser::Root));
    // The agent keeps its default port; it listens on the host's own address.
    bootstrap.extend(["--agent-bind".to_owned(), address.clone()]);
    bootstrap.push(address.clone());
    let steps: Vec<Vec<String>> = vec![
        vec!["init".into()],
        bootstrap,
        vec!["ping".into(), address.clone()],
        vec!["hosts".into()],
    ];
    for step in &steps {
        if !show(state.path(), step) {
            eprintln!("\ndemo failed at `controller {}`", step.join(" "));
            eprintln!("agent log:\n{}", host.agent_log());
            return ExitCode::from(1);
        }
    }
    if keep {
        let state = state.keep();
        println!(
            "\nKept running. Try: target/debug/controller --state-dir {} hosts   (Ctrl-C ends the host)",
            state.display()
        );
        let _ = std::io::stdin().read_line(&mut String::new());
    }
    println!("\nDemo complete; tearing the throwaway host down.");
    ExitCode::SUCCESS
}
