//! The service probe of a health sample: the deployment's gate URL (the
//! IM's `/svr_stats`) and its TCP ports, as the last applied spec declared
//! them. Nothing a watch request says is dialled.

use std::collections::BTreeMap;

use imfleet_proto::agent::v1::{PortProbe, ServiceProbe};

use crate::deploy::gate;
use crate::deploy::record::GateRecord;

/// Most figures kept from one stats answer (a chatty service cannot bloat
/// every sample and every metrics scrape).
pub const MAX_FIELDS: usize = 64;
const MAX_DEPTH: usize = 4;
const MAX_KEY: usize = 64;

pub async fn probe(gate: Option<&GateRecord>) -> ServiceProbe {
    let Some(gate) = gate else {
        return ServiceProbe::default();
    };
    let mut probe = ServiceProbe::default();
    if !gate.http_url.is_empty() {
        match gate::http_get(&gate.http_url, gate::MAX_BODY).await {
            Ok((200, body)) => {
                probe.stats_ok = true;
                probe.stats = numeric_fields(&body).into_iter().collect();
            }
            Ok((code, _)) => probe.stats_error = format!("{} answered HTTP {code}", gate.http_url),
            Err(e) => probe.stats_error = format!("{}: {e}", gate.http_url),
        }
    }
    // Each port once (policy refuses repeats; a record from before may not
    // have been checked), all at once.
    let mut ports: Vec<u32> = gate.tcp_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    ports.truncate(crate::policy::MAX_GATE_PORTS);
    let open = futures::future::join_all(ports.iter().map(|p| gate::port_open(*p))).await;
    probe.tcp = ports
        .into_iter()
        .zip(open)
        .map(|(port, open)| PortProbe { port, open })
        .collect();
    probe
}

/// The numeric fields of a JSON object, nested keys joined with `_`, keys
/// reduced to `[a-z0-9_]` (they become metric label values), booleans as
/// 0/1, at most [`MAX_FIELDS`]. Anything that is not a JSON object: none.
pub fn numeric_fields(body: &[u8]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Ok(value @ serde_json::Value::Object(_)) = serde_json::from_slice(body) {
        collect("", &value, 0, &mut out);
    }
    out
}

fn collect(prefix: &str, value: &serde_json::Value, depth: usize, out: &mut BTreeMap<String, f64>) {
    use serde_json::Value;
    if out.len() >= MAX_FIELDS {
        return;
    }
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                out.insert(prefix.to_owned(), f);
            }
        }
        Value::Bool(b) => {
            out.insert(prefix.to_owned(), if *b { 1.0 } else { 0.0 });
        }
        Value::Object(map) if depth < MAX_DEPTH => {
            for (key, v) in map {
                let key = sanitize(key);
                if key.is_empty() {
                    continue;
                }
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}_{key}")
                };
                if name.len() <= MAX_KEY {
                    collect(&name, v, depth + 1, out);
                }
            }
        }
        _ => {}
    }
}

fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_flags_of_nested_objects() {
        let body = br#"{"status":"ok","online_users":12,"uptime":3600.5,
            "db":{"connected":true,"pool":{"Idle Conns":4}},"peers":[1,2],"bad":"7"}"#;
        let f = numeric_fields(body);
        assert_eq!(f.get("online_users"), Some(&12.0));
        assert_eq!(f.get("uptime"), Some(&3600.5));
        assert_eq!(f.get("db_connected"), Some(&1.0));
        assert_eq!(f.get("db_pool_idle_conns"), Some(&4.0));
        assert!(!f.contains_key("status") && !f.contains_key("peers") && !f.contains_key("bad"));
    }

    #[test]
    fn hostile_answers_stay_bounded() {
        assert!(numeric_fields(b"[1,2,3]").is_empty());
        assert!(numeric_fields(b"not json").is_empty());
        let many: String = (0..1000).map(|i| format!("\"k{i}\":{i},")).collect();
        let body = format!("{{{}\"end\":1}}", many);
        assert_eq!(numeric_fields(body.as_bytes()).len(), MAX_FIELDS);
        let deep = br#"{"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}"#;
        assert!(numeric_fields(deep).is_empty(), "deeper than the limit");
        let long = format!("{{\"{}\":1}}", "x".repeat(500));
        assert!(numeric_fields(long.as_bytes()).is_empty());
    }
}
