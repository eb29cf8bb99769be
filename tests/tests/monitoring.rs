//! What ships for Prometheus and Grafana (`monitoring/`): the alerting rules
//! pass promtool's check and their own unit tests, and the rules and the
//! dashboard use only metrics the daemon exposes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../monitoring")
        .join(file)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (scripts/setup installs the prometheus package)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn alerting_rules_pass_promtool_and_their_unit_tests() {
    let rules = monitoring("imfleet-alerts.yml");
    let (ok, said) = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(ok, "{said}");
    assert!(said.contains("6 rules found"), "{said}");
    let tests = monitoring("imfleet-alerts.test.yml");
    let (ok, said) = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(ok, "{said}");
}

/// Metric names (`node_*`, `imfleet_*`) a text refers to.
fn referenced(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("node_") || rest.starts_with("imfleet_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn rules_and_dashboard_use_only_exposed_metrics() {
    let exposed = imfleet_controller::health::metrics::names();
    let rules = std::fs::read_to_string(monitoring("imfleet-alerts.yml")).unwrap();
    let dashboard_text = std::fs::read_to_string(monitoring("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let mut exprs = String::new();
    let mut ids = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if let Some(id) = panel["id"].as_i64() {
            ids.push(id);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().unwrap_or_default());
            exprs.push('\n');
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "panel ids repeat: {ids:?}");
    for (what, text) in [("rules", rules.as_str()), ("dashboard", exprs.as_str())] {
        let names = referenced(text);
        assert!(!names.is_empty(), "{what} refer to no metric");
        for name in names {
            assert!(
                exposed.contains(&name.as_str()),
                "{what} use `{name}`, which the daemon does not expose"
            );
        }
    }
}
