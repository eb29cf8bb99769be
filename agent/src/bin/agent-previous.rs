//! A test build of the agent (`test-flavors`): see `imfleet_agent::flavor`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    imfleet_agent::flavor::set(imfleet_agent::flavor::Flavor::Previous);
    imfleet_agent::cli::main()
}
