//! The state database under the load it meets on pbx01: `controller serve`
//! writing events, history and "seen" marks for a fleet whose IM flaps,
//! several writer processes (the controller's own `Store`, as every CLI
//! command) writing events, history points and whole rollouts while each
//! also checkpoints the WAL in a loop, and `controller events` reading, all
//! on one file at once. Afterwards SQLite finds the file intact and every
//! write each process reported is there. The linked SQLite is one without
//! the WAL-reset race (issue 25).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imfleet_tests::Controller;
use imfleet_tests::daemon::Daemon;
use imfleet_tests::sim_agents::{self, Behaviour};

const WRITERS: usize = 4;
const SECONDS: u64 = 10;
const FLAPPING_HOSTS: usize = 10;

#[test]
fn the_linked_sqlite_is_free_of_the_wal_reset_bug() {
    let version = rusqlite::version_number();
    assert!(
        imfleet_controller::store::has_wal_reset_fix(version),
        "SQLite {} has the WAL-reset corruption bug; use a rusqlite whose bundled SQLite is 3.51.3 or later",
        rusqlite::version()
    );
}

#[test]
fn daemon_and_writers_on_one_database_lose_nothing_and_corrupt_nothing() {
    imfleet_certs::install_crypto_provider();
    let controller = Controller::new();
    assert!(controller.run(&["init"]).success());
    let db = controller.state.path().join("state.db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    sim_agents::start_for(
        &controller,
        &runtime,
        &[Behaviour::Flapping; FLAPPING_HOSTS],
    );
    let daemon = Daemon::start(&controller, &[]);

    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            Command::new(imfleet_tests::bin("store-writer"))
                .arg(&db)
                .arg(format!("w{i}"))
                .arg(SECONDS.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn store-writer")
        })
        .collect();
    // A CLI reader throughout: readers are what a checkpoint must wait for.
    let until = Instant::now() + Duration::from_secs(SECONDS);
    let mut reads = 0;
    while Instant::now() < until {
        let run = controller.run(&["events", "--json"]);
        assert!(run.success(), "controller events failed: {run:#?}");
        reads += 1;
    }
    let reports: Vec<serde_json::Value> = writers
        .into_iter()
        .map(|w| {
            let out = w.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "a writer failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect();
    let log = daemon.log();
    assert_eq!(daemon.stop(), Some(0), "serve did not stop cleanly: {log}");
    assert!(
        !log.contains("cannot record"),
        "the daemon lost writes: {log}"
    );
    assert!(reads > 0);

    let conn = rusqlite::Connection::open(&db).unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let count = |sql: &str, host: &str| -> u64 {
        conn.query_row(sql, [host], |r| r.get::<_, i64>(0)).unwrap() as u64
    };
    let mut rollouts_seen = 0;
    for report in &reports {
        let host = report["host"].as_str().unwrap();
        let wrote = |key: &str| report[key].as_u64().unwrap();
        assert!(wrote("events") > 0 && wrote("checkpoints") > 0, "{report}");
        assert_eq!(
            count(
                "SELECT count(*) FROM events WHERE host = ?1 AND kind = 'start'",
                host
            ),
            wrote("events"),
            "{report}"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM health_history WHERE host = ?1 AND at >= 4000000000",
                host
            ),
            wrote("points"),
            "{report}"
        );
        let ids = report["rollouts"].as_array().unwrap();
        rollouts_seen += ids.len();
        assert_eq!(
            count(
                "SELECT count(*) FROM rollouts WHERE holder = ?1 AND state = 'succeeded'",
                host
            ),
            ids.len() as u64,
            "{report}"
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM events WHERE host = ?1 AND kind = 'rollout-step'",
                host
            ),
            wrote("steps"),
            "{report}"
        );
    }
    assert!(
        rollouts_seen > 0,
        "no writer ever got a rollout: {reports:?}"
    );
    // The daemon's side: every flapping host has history and was marked
    // seen, and its IM events alternate: a lost write would leave two of
    // the same kind next to each other.
    for i in 0..FLAPPING_HOSTS {
        let host = format!("sim{i:04}");
        assert!(count("SELECT count(*) FROM health_history WHERE host = ?1", &host) > 0);
        assert_eq!(
            count(
                "SELECT count(*) FROM hosts WHERE name = ?1 AND last_seen_at IS NOT NULL",
                &host
            ),
            1
        );
        let mut stmt = conn
            .prepare("SELECT kind FROM events WHERE host = ?1 AND kind LIKE 'im-%' ORDER BY id")
            .unwrap();
        let kinds: Vec<String> = stmt
            .query_map([&host], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(kinds.len() >= 4, "{host}: {kinds:?}");
        assert!(kinds.windows(2).all(|w| w[0] != w[1]), "{host}: {kinds:?}");
    }
}
