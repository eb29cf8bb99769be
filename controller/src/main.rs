//! `controller`: run on pbx01 to bootstrap, inspect and (later) deploy IM hosts.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    imfleet_certs::install_crypto_provider();
    let args = cli::Cli::parse();
    let filter = match args.verbose {
        0 => "warn",
        1 => "info,imfleet_controller=info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person: never into a log file or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(err) => {
            // Errors quote agents and the PBX: shown safe for the terminal.
            let text = imfleet_controller::text::printable_lines(&format!("{err:#}"), 4096);
            eprintln!("error: {text}");
            ExitCode::from(1)
        }
    }
}
