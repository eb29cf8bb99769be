//! What must change in the cluster configuration for `HaConfig` to hold:
//! a pure function of the configuration observed, so re-applying (after a
//! PortSIP upgrade re-created its resources, or with nothing to do) is
//! safe and does only what is missing.

use serde::Serialize;

use super::cib::Observed;
use super::{HaConfig, HaError, META};

/// The agent the daemon's resource runs.
pub const AGENT: &str = "ocf:imfleet:controller";

/// One change, as a `pcs` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// What it does, for the operator.
    pub why: String,
    /// `pcs` arguments (each one word: no shell quoting needed).
    pub pcs: Vec<String>,
}

impl Step {
    fn new(why: String, pcs: &[&str]) -> Step {
        Step {
            why,
            pcs: pcs.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The command line as the operator would type it.
    pub fn command_line(&self) -> String {
        let words: Vec<String> = self.pcs.iter().map(|w| quote(w)).collect();
        format!("pcs {}", words.join(" "))
    }
}

/// Quotes a word for a POSIX shell when it needs it.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/=@+,".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The parameters the agent knows: one the configuration no longer names
/// is cleared.
const KNOWN_PARAMS: &[&str] = &[
    "binary",
    "state_dir",
    "metrics_listen",
    "logfile",
    "api_listen",
];

/// A constraint id to be replaced must be the daemon's: never delete
/// someone else's constraint that happens to carry the name.
fn ours(cid: &str, names_daemon: bool) -> Result<(), HaError> {
    if names_daemon {
        Ok(())
    } else {
        Err(HaError::Cib(format!(
            "constraint `{cid}` exists and is not the daemon's; choose another --resource-id"
        )))
    }
}

fn delete(cid: &str) -> Step {
    Step::new(
        format!("remove {cid}, which says something else"),
        &["constraint", "delete", cid],
    )
}

/// The steps that bring `observed` to `config`; empty when it holds.
pub fn plan(config: &HaConfig, observed: &Observed) -> Result<Vec<Step>, HaError> {
    super::check(config)?;
    for with in &config.with {
        if !observed.resources.contains(with) {
            return Err(HaError::MissingResource(with.clone()));
        }
    }
    // State on a local disk would fork the fleet's records at the first
    // failover: it must lie on the filesystem the daemon runs with.
    if let Some(mount) = config.with.first().and_then(|w| observed.mounts.get(w)) {
        let under = std::path::Path::new(&config.state_dir).starts_with(mount);
        if !under {
            return Err(HaError::StateNotReplicated {
                state_dir: config.state_dir.clone(),
                resource: config.with[0].clone(),
                mount: mount.clone(),
            });
        }
    }
    let id = config.resource.as_str();
    let mut steps = Vec::new();
    let wanted: Vec<String> = config
        .params()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let meta: Vec<String> = META.iter().map(|(k, v)| format!("{k}={v}")).collect();
    match &observed.primitive {
        None if observed.resources.contains(id) => {
            return Err(HaError::Cib(format!(
                "`{id}` is a resource of another kind already; choose another --resource-id"
            )));
        }
        None => {
            let mut args = vec!["resource", "create", id, AGENT];
            args.extend(wanted.iter().map(String::as_str));
            args.extend([
                "op",
                "monitor",
                "interval=10s",
                "timeout=20s",
                "op",
                "start",
                "timeout=60s",
                "op",
                "stop",
                "timeout=40s",
                "on-fail=block",
                "meta",
            ]);
            args.extend(meta.iter().map(String::as_str));
            steps.push(Step::new(
                format!("create the daemon's resource {id}"),
                &args,
            ));
        }
        Some(found) if found.agent != AGENT => {
            return Err(HaError::Cib(format!(
                "`{id}` runs {} rather than {AGENT}; choose another --resource-id or remove it",
                found.agent
            )));
        }
        Some(found) => {
            let mut changed: Vec<String> = config
                .params()
                .iter()
                .filter(|(k, v)| found.params.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let named: Vec<&str> = config.params().iter().map(|(k, _)| *k).collect();
            changed.extend(
                KNOWN_PARAMS
                    .iter()
                    .filter(|k| !named.contains(k) && found.params.contains_key(**k))
                    .map(|k| format!("{k}=")),
            );
            if !changed.is_empty() {
                let mut args = vec!["resource", "update", id];
                args.extend(changed.iter().map(String::as_str));
                steps.push(Step::new(format!("update {id}'s parameters"), &args));
            }
            let stale: Vec<String> = META
                .iter()
                .filter(|(k, v)| found.meta.get(*k).map(String::as_str) != Some(*v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !stale.is_empty() {
                let mut args = vec!["resource", "meta", id];
                args.extend(stale.iter().map(String::as_str));
                steps.push(Step::new(
                    format!("set {id}'s meta attributes (critical=false keeps the PBX in place)"),
                    &args,
                ));
            }
        }
    }
    for with in &config.with {
        let cid = config.colocation_id(with);
        let found = observed.colocations.get(&cid);
        let right = found.is_some_and(|c| {
            c.rsc == id
                && &c.with_rsc == with
                && matches!(c.score.as_str(), "INFINITY" | "+INFINITY")
                && c.influence.as_deref() == Some("false")
        });
        if !right {
            if let Some(c) = found {
                ours(&cid, c.rsc == id)?;
                steps.push(delete(&cid));
            }
            steps.push(Step::new(
                format!("run {id} only where {with} runs, never moving {with} for it"),
                &[
                    "constraint",
                    "colocation",
                    "add",
                    id,
                    "with",
                    with,
                    "INFINITY",
                    "influence=false",
                    &format!("id={cid}"),
                ],
            ));
        }
        // Two one-way orders rather than one symmetrical: a stop of the
        // daemon that blocks must never hold the PBX's resources back.
        let wanted = [
            (
                config.order_id(with),
                (with.as_str(), "start", id, "start", "Mandatory"),
                format!("start {id} after {with}"),
            ),
            (
                config.stop_order_id(with),
                (id, "stop", with.as_str(), "stop", "Optional"),
                format!("stop {id} before {with} when both stop"),
            ),
        ];
        for (oid, (first, first_action, then, then_action, kind), why) in wanted {
            let found = observed.orders.get(&oid);
            let right = found.is_some_and(|o| {
                o.first == first
                    && o.first_action.as_deref().unwrap_or("start") == first_action
                    && o.then == then
                    && o.then_action.as_deref().unwrap_or(first_action) == then_action
                    && o.kind.as_deref().unwrap_or("Mandatory") == kind
                    && o.symmetrical.as_deref() == Some("false")
            });
            if right {
                continue;
            }
            if let Some(o) = found {
                ours(&oid, o.first == id || o.then == id)?;
                steps.push(delete(&oid));
            }
            steps.push(Step::new(
                why,
                &[
                    "constraint",
                    "order",
                    first_action,
                    first,
                    "then",
                    then_action,
                    then,
                    &format!("kind={kind}"),
                    "symmetrical=false",
                    &format!("id={oid}"),
                ],
            ));
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::cib::{Colocation, Order, Primitive};

    fn config() -> HaConfig {
        HaConfig {
            resource: "imfleet-controller".into(),
            with: vec!["datapath_fs".into(), "vip".into()],
            binary: "/usr/local/bin/controller".into(),
            state_dir: "/var/lib/portsip/imfleet".into(),
            metrics_listen: "127.0.0.1:9743".into(),
            api_listen: Some("10.0.0.100:7444".into()),
            log_file: "/var/log/imfleet-controller.log".into(),
        }
    }

    fn portsip_cluster() -> Observed {
        let mut seen = Observed::default();
        for r in ["datapath_fs", "vip", "pbx_service"] {
            seen.resources.insert(r.into());
        }
        seen
    }

    /// The configuration once every step of a plan is applied.
    fn applied(config: &HaConfig, mut seen: Observed) -> Observed {
        seen.resources.insert(config.resource.clone());
        seen.primitive = Some(Primitive {
            agent: AGENT.into(),
            params: config
                .params()
                .into_iter()
                .map(|(k, v)| (k.into(), v))
                .collect(),
            meta: META
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        for with in &config.with {
            seen.colocations.insert(
                config.colocation_id(with),
                Colocation {
                    rsc: config.resource.clone(),
                    with_rsc: with.clone(),
                    score: "INFINITY".into(),
                    influence: Some("false".into()),
                },
            );
            // As pcs writes them: actions and kind spelled out.
            seen.orders.insert(
                config.order_id(with),
                Order {
                    first: with.clone(),
                    first_action: Some("start".into()),
                    then: config.resource.clone(),
                    then_action: Some("start".into()),
                    kind: Some("Mandatory".into()),
                    symmetrical: Some("false".into()),
                },
            );
            seen.orders.insert(
                config.stop_order_id(with),
                Order {
                    first: config.resource.clone(),
                    first_action: Some("stop".into()),
                    then: with.clone(),
                    then_action: Some("stop".into()),
                    kind: Some("Optional".into()),
                    symmetrical: Some("false".into()),
                },
            );
        }
        seen
    }

    #[test]
    fn a_fresh_cluster_gets_the_resource_with_critical_false_and_both_constraints_per_resource() {
        let steps = plan(&config(), &portsip_cluster()).unwrap();
        assert_eq!(steps.len(), 7);
        let create = steps[0].command_line();
        assert!(create.starts_with("pcs resource create imfleet-controller ocf:imfleet:controller binary=/usr/local/bin/controller"), "{create}");
        assert!(
            create.contains("meta critical=false migration-threshold=3 failure-timeout=10min"),
            "{create}"
        );
        assert!(
            create.contains("op stop timeout=40s on-fail=block"),
            "{create}"
        );
        assert_eq!(
            steps[1].command_line(),
            "pcs constraint colocation add imfleet-controller with datapath_fs INFINITY influence=false id=imfleet-controller-with-datapath_fs"
        );
        assert_eq!(
            steps[2].command_line(),
            "pcs constraint order start datapath_fs then start imfleet-controller kind=Mandatory symmetrical=false id=imfleet-controller-after-datapath_fs"
        );
        assert_eq!(
            steps[3].command_line(),
            "pcs constraint order stop imfleet-controller then stop datapath_fs kind=Optional symmetrical=false id=imfleet-controller-stops-before-datapath_fs"
        );
    }

    #[test]
    fn re_applying_changes_nothing_and_repairs_only_what_drifted() {
        let config = config();
        let done = applied(&config, portsip_cluster());
        assert_eq!(plan(&config, &done).unwrap(), vec![]);

        // A PortSIP upgrade re-created its resources: constraints on them went.
        let mut upgraded = done.clone();
        upgraded.colocations.remove(&config.colocation_id("vip"));
        upgraded.orders.remove(&config.order_id("vip"));
        upgraded.orders.remove(&config.stop_order_id("vip"));
        let steps = plan(&config, &upgraded).unwrap();
        assert_eq!(steps.len(), 3, "{steps:#?}");
        assert!(steps.iter().all(|s| s.pcs.contains(&"vip".to_owned())));

        // Someone set critical=true and moved the state directory.
        let mut drifted = done.clone();
        let p = drifted.primitive.as_mut().unwrap();
        p.meta.insert("critical".into(), "true".into());
        p.params.insert("state_dir".into(), "/old".into());
        let steps = plan(&config, &drifted).unwrap();
        let lines: Vec<String> = steps.iter().map(Step::command_line).collect();
        assert_eq!(
            lines,
            [
                "pcs resource update imfleet-controller state_dir=/var/lib/portsip/imfleet",
                "pcs resource meta imfleet-controller critical=false"
            ]
        );

        // No API any more: its parameter is cleared.
        let mut without_api = config.clone();
        without_api.api_listen = None;
        without_api.with.pop();
        let steps = plan(&without_api, &done).unwrap();
        assert_eq!(
            steps[0].command_line(),
            "pcs resource update imfleet-controller api_listen="
        );

        // An order made symmetrical again (a blocked stop would hold the
        // PBX) is replaced.
        let mut symmetrical = done.clone();
        symmetrical
            .orders
            .get_mut(&config.order_id("vip"))
            .unwrap()
            .symmetrical = None;
        let steps = plan(&config, &symmetrical).unwrap();
        assert_eq!(steps[0].pcs[..2], ["constraint", "delete"]);
        assert_eq!(steps.len(), 2);

        // A constraint id holding something else is replaced, not kept.
        let mut wrong = done.clone();
        wrong
            .colocations
            .get_mut(&config.colocation_id("datapath_fs"))
            .unwrap()
            .score = "100".into();
        let steps = plan(&config, &wrong).unwrap();
        assert_eq!(steps[0].pcs[..2], ["constraint", "delete"]);
        assert_eq!(steps.len(), 2);

        // ... but only when it is the daemon's: another's is never deleted.
        let mut foreign = done;
        foreign
            .colocations
            .get_mut(&config.colocation_id("vip"))
            .unwrap()
            .rsc = "pbx_service".into();
        assert!(plan(&config, &foreign).is_err());
    }

    #[test]
    fn the_state_must_be_on_the_filesystem_the_daemon_runs_with() {
        let mut seen = portsip_cluster();
        seen.mounts
            .insert("datapath_fs".into(), "/var/lib/portsip".into());
        assert!(plan(&config(), &seen).is_ok());
        let mut local = config();
        local.state_dir = "/var/lib/imfleet".into();
        let err = plan(&local, &seen).unwrap_err().to_string();
        assert!(err.contains("not on datapath_fs"), "{err}");
        // A prefix of the name is not the directory.
        local.state_dir = "/var/lib/portsip-old/imfleet".into();
        assert!(plan(&local, &seen).is_err());
    }

    #[test]
    fn a_missing_resource_or_a_foreign_one_is_refused_before_anything() {
        let mut seen = portsip_cluster();
        seen.resources.remove("vip");
        let err = plan(&config(), &seen).unwrap_err().to_string();
        assert!(
            err.contains("no resource `vip`") && err.contains("--with"),
            "{err}"
        );

        let mut seen = portsip_cluster();
        seen.resources.insert("imfleet-controller".into());
        seen.primitive = Some(Primitive {
            agent: "ocf:heartbeat:Dummy".into(),
            ..Default::default()
        });
        assert!(plan(&config(), &seen).is_err());

        let mut hostile = config();
        hostile.state_dir = "/srv/x; rm -rf /".into();
        assert!(matches!(
            plan(&hostile, &portsip_cluster()),
            Err(HaError::BadValue { .. })
        ));
        let mut hostile = config();
        hostile.with = vec!["fs\" or 1".into()];
        assert!(matches!(
            plan(&hostile, &portsip_cluster()),
            Err(HaError::BadId(_))
        ));
    }
}
