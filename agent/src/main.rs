//! `agent`: the imfleet agent binary. Normally started by systemd or by its own
//! supervisor; the `identity` and `service` commands are used by the
//! controller during the one-time SSH bootstrap.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    imfleet_agent::cli::main()
}
