//! One writer process of the state-database stress test
//! (`tests/tests/store_stress.rs`): it writes through the controller's own
//! `Store`, as every CLI command does, for a bounded time (events, history
//! points, whole rollouts with their steps) while a second connection of its
//! own checkpoints the WAL over and over, then prints what it wrote as JSON.
//! Any error is fatal: a busy database must be waited for, never failed.
//!
//! Usage: store-writer <state.db> <name> <seconds>

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use imfleet_controller::store::{
    EventKind, HealthPoint, HostRecord, PlannedStep, RolloutState, StepPhase, Store, StoreError,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [db, name, seconds] = args.as_slice() else {
        bail!("usage: store-writer <state.db> <name> <seconds>");
    };
    let db = PathBuf::from(db);
    let until = Instant::now() + Duration::from_secs(seconds.parse().context("seconds")?);
    let store = Store::open(&db)?;
    let host = format!("stress-{name}");
    store.upsert_host(&record(&host)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let checkpoints = Arc::new(AtomicU64::new(0));
    let checkpointer = {
        let (db, stop, checkpoints) = (db.clone(), stop.clone(), checkpoints.clone());
        std::thread::spawn(move || checkpoint_until(&db, &stop, &checkpoints))
    };

    let (mut events, mut points, mut steps, mut contended) = (0u64, 0u64, 0u64, 0u64);
    let mut rollouts = Vec::new();
    // Minutes far in the future: the daemon, which watches this host too,
    // writes its own points at the present (and its pruning keeps these).
    let base = FIRST_POINT_AT;
    let mut n = 0i64;
    while Instant::now() < until {
        n += 1;
        store
            .record_event(Some(&host), EventKind::Start, &format!("{host} {n}"))
            .await?;
        events += 1;
        store.record_health(point(&host, base + n * 60)).await?;
        points += 1;
        if n % 10 == 0 {
            let plan = vec![PlannedStep {
                host: host.clone(),
                batch: 0,
                canary: false,
                from_revision: None,
            }];
            match store
                .begin_rollout(&host, serde_json::json!({ "n": n }), plan)
                .await
            {
                Ok(id) => {
                    for phase in [StepPhase::Staged, StepPhase::Swapping, StepPhase::Done] {
                        store.set_step(id, &host, phase, None, "").await?;
                        steps += 1;
                    }
                    let from = &[RolloutState::Running];
                    if !store
                        .move_rollout(id, from, RolloutState::Succeeded, "stress")
                        .await?
                    {
                        bail!("rollout {id} was moved by someone else");
                    }
                    rollouts.push(id);
                }
                // Another writer's rollout is active: the schema allows one.
                Err(StoreError::RolloutActive { .. }) => contended += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    checkpointer.join().expect("checkpointer")?;
    println!(
        "{}",
        serde_json::json!({
            "host": host, "events": events, "points": points, "steps": steps,
            "rollouts": rollouts, "contended": contended,
            "checkpoints": checkpoints.load(Ordering::Relaxed),
        })
    );
    Ok(())
}

/// Checkpoints the WAL in every mode, as fast as it can, on a connection of
/// its own: the moment the WAL-reset race needs is a checkpoint running while
/// another connection writes.
fn checkpoint_until(
    db: &std::path::Path,
    stop: &AtomicBool,
    count: &AtomicU64,
) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let modes = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"];
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let mode = modes[i % modes.len()];
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
            .with_context(|| format!("checkpoint {mode}"))?;
        count.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    Ok(())
}

/// Where each writer's history points start (2096): the test counts from here.
const FIRST_POINT_AT: i64 = 4_000_000_000;

fn record(name: &str) -> HostRecord {
    HostRecord {
        name: name.into(),
        agent_address: "192.0.2.1".into(),
        agent_port: 7443,
        ssh_user: None,
        ssh_port: None,
        agent_version: "0.0.0-stress".into(),
        agent_sha256: String::new(),
        cert_serial: "00".into(),
        cert_not_after: 0,
        supervision: "simulated".into(),
        bootstrapped_at: 0,
        last_seen_at: None,
    }
}

/// A host's point at `at`; each writer's points are a minute apart, so none
/// merges with another.
fn point(host: &str, at: i64) -> HealthPoint {
    HealthPoint {
        host: host.into(),
        at,
        agent_up: true,
        im_healthy: Some(at % 120 == 0),
        cpu_busy: Some(0.5),
        memory_available_bytes: Some(1 << 30),
        memory_total_bytes: Some(2 << 30),
        data_used: Some(0.25),
        load1: Some(0.1),
    }
}
