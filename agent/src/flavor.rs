//! Test builds of the agent (feature `test-flavors`, never in a release):
//! binaries that report a newer (or an older) version and protocol
//! revision, for the agent-upgrade tests, and that misbehave the way a broken release could:
//! exit at start, or run without ever serving. Each is its own binary
//! (`src/bin/agent-*.rs`) that sets its flavour before the agent's `main`.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// A working newer build.
    Next,
    /// A newer build that exits as soon as it is asked to serve.
    CrashAtStart,
    /// A newer build that runs but never serves.
    NeverServes,
    /// A working build one protocol revision older (what a fleet upgraded
    /// from runs).
    Previous,
}

static FLAVOR: OnceLock<Flavor> = OnceLock::new();

impl Flavor {
    pub fn version(self) -> &'static str {
        match self {
            Flavor::Previous => concat!(env!("CARGO_PKG_VERSION"), "-previous"),
            _ => concat!(env!("CARGO_PKG_VERSION"), "+next"),
        }
    }

    pub fn protocol_revision(self) -> u32 {
        match self {
            Flavor::Previous => imfleet_proto::PROTOCOL_REVISION - 1,
            _ => imfleet_proto::PROTOCOL_REVISION + 1,
        }
    }
}

/// Sets this process's flavour (once, before `cli::main`).
pub fn set(flavor: Flavor) {
    let _ = FLAVOR.set(flavor);
}

pub fn current() -> Option<Flavor> {
    FLAVOR.get().copied()
}

/// What the flavour does when `serve` starts.
pub async fn before_serving() -> anyhow::Result<()> {
    match current() {
        Some(Flavor::CrashAtStart) => anyhow::bail!("test flavour: exits at start"),
        Some(Flavor::NeverServes) => {
            tracing::warn!("test flavour: never serves");
            std::future::pending::<()>().await;
            Ok(())
        }
        _ => Ok(()),
    }
}
