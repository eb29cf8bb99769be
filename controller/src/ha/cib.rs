//! What the cluster holds, read from Pacemaker's XML: the configuration
//! (`cibadmin --query`) and the status (`crm_mon --output-as=xml`). Pure
//! parsers; the commands are run in `pacemaker`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::HaError;

/// The parts of the configuration `plan` decides on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every resource id: primitives, groups, clones, bundles.
    pub resources: BTreeSet<String>,
    /// The daemon's resource, when configured.
    pub primitive: Option<Primitive>,
    pub colocations: BTreeMap<String, Colocation>,
    pub orders: BTreeMap<String, Order>,
    /// Filesystem resources (`ocf:heartbeat:Filesystem`) and where they mount.
    pub mounts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Primitive {
    /// `class:provider:type`.
    pub agent: String,
    pub params: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Colocation {
    pub rsc: String,
    pub with_rsc: String,
    pub score: String,
    pub influence: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub first: String,
    pub first_action: Option<String>,
    pub then: String,
    pub then_action: Option<String>,
    /// None: Mandatory (Pacemaker's default).
    pub kind: Option<String>,
    /// None: true (Pacemaker's default).
    pub symmetrical: Option<String>,
}

const RESOURCE_TAGS: &[&str] = &["primitive", "group", "clone", "master", "bundle"];

/// The configuration as `plan` needs it, `resource` being the daemon's id.
pub fn observe(cib: &str, resource: &str) -> Result<Observed, HaError> {
    let doc = roxmltree::Document::parse(cib).map_err(|e| HaError::Cib(e.to_string()))?;
    let configuration = doc
        .descendants()
        .find(|n| n.has_tag_name("configuration"))
        .ok_or_else(|| HaError::Cib("no <configuration> in the CIB".into()))?;
    let mut observed = Observed::default();
    for node in configuration.descendants() {
        let tag = node.tag_name().name();
        let id = node.attribute("id").unwrap_or_default();
        let is_resource = node.ancestors().any(|a| a.has_tag_name("resources"));
        if is_resource && RESOURCE_TAGS.contains(&tag) && !id.is_empty() {
            observed.resources.insert(id.to_owned());
            if tag == "primitive" && id == resource {
                observed.primitive = Some(primitive(node));
            }
            if tag == "primitive" && node.attribute("type") == Some("Filesystem") {
                let found = primitive(node);
                if let Some(directory) = found.params.get("directory") {
                    observed.mounts.insert(id.to_owned(), directory.clone());
                }
            }
        }
        let attr = |name: &str| node.attribute(name).unwrap_or_default().to_owned();
        match tag {
            "rsc_colocation" => {
                observed.colocations.insert(
                    id.to_owned(),
                    Colocation {
                        rsc: attr("rsc"),
                        with_rsc: attr("with-rsc"),
                        score: attr("score"),
                        influence: node.attribute("influence").map(str::to_owned),
                    },
                );
            }
            "rsc_order" => {
                observed.orders.insert(
                    id.to_owned(),
                    Order {
                        first: attr("first"),
                        first_action: node.attribute("first-action").map(str::to_owned),
                        then: attr("then"),
                        then_action: node.attribute("then-action").map(str::to_owned),
                        kind: node.attribute("kind").map(str::to_owned),
                        symmetrical: node.attribute("symmetrical").map(str::to_owned),
                    },
                );
            }
            _ => {}
        }
    }
    Ok(observed)
}

fn primitive(node: roxmltree::Node<'_, '_>) -> Primitive {
    let agent = [
        node.attribute("class"),
        node.attribute("provider"),
        node.attribute("type"),
    ]
    .iter()
    .flatten()
    .copied()
    .collect::<Vec<_>>()
    .join(":");
    let pairs = |set: &str| -> BTreeMap<String, String> {
        node.children()
            .filter(|c| c.has_tag_name(set))
            .flat_map(|c| c.children().filter(|n| n.has_tag_name("nvpair")))
            .filter_map(|p| {
                Some((
                    p.attribute("name")?.to_owned(),
                    p.attribute("value")?.to_owned(),
                ))
            })
            .collect()
    };
    Primitive {
        agent,
        params: pairs("instance_attributes"),
        meta: pairs("meta_attributes"),
    }
}

/// Where a resource runs and how it stands, as `crm_mon` says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResourceStatus {
    pub id: String,
    pub role: String,
    pub active: bool,
    pub failed: bool,
    pub nodes: Vec<String>,
}

/// The cluster's status as `controller ha status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    pub quorate: bool,
    pub nodes_online: Vec<String>,
    /// The daemon's resource; None when it is not configured.
    pub daemon: Option<ResourceStatus>,
    /// The resources it runs with.
    pub with: Vec<ResourceStatus>,
    /// The daemon's fail count per node (only nodes with failures).
    pub fail_counts: BTreeMap<String, u64>,
}

/// Reads `crm_mon --output-as=xml --include=all` for `resource` and `with`.
pub fn status(crm_mon: &str, resource: &str, with: &[String]) -> Result<ClusterStatus, HaError> {
    let doc = roxmltree::Document::parse(crm_mon).map_err(|e| HaError::Cib(e.to_string()))?;
    let mut status = ClusterStatus {
        quorate: doc
            .descendants()
            .find(|n| n.has_tag_name("current_dc"))
            .and_then(|n| n.attribute("with_quorum"))
            == Some("true"),
        ..Default::default()
    };
    for node in doc.descendants() {
        match node.tag_name().name() {
            "node"
                if node.parent().is_some_and(|p| p.has_tag_name("nodes"))
                    && node.attribute("online") == Some("true") =>
            {
                status
                    .nodes_online
                    .extend(node.attribute("name").map(str::to_owned));
            }
            "resource" if node.ancestors().any(|a| a.has_tag_name("resources")) => {
                let id = node.attribute("id").unwrap_or_default();
                let read = || ResourceStatus {
                    id: id.to_owned(),
                    role: node.attribute("role").unwrap_or_default().to_owned(),
                    active: node.attribute("active") == Some("true"),
                    failed: node.attribute("failed") == Some("true"),
                    nodes: node
                        .children()
                        .filter(|c| c.has_tag_name("node"))
                        .filter_map(|c| c.attribute("name").map(str::to_owned))
                        .collect(),
                };
                // A group's members stand for the group.
                let group = node
                    .parent()
                    .filter(|p| p.has_tag_name("group"))
                    .and_then(|p| p.attribute("id"));
                if id == resource {
                    status.daemon = Some(read());
                } else if let Some(wanted) = with
                    .iter()
                    .find(|w| w.as_str() == id || Some(w.as_str()) == group)
                    && !status.with.iter().any(|s| &s.id == wanted)
                {
                    let mut found = read();
                    found.id = wanted.clone();
                    status.with.push(found);
                }
            }
            "resource_history" if node.attribute("id") == Some(resource) => {
                let count = node
                    .attribute("fail-count")
                    .and_then(|c| {
                        if c == "INFINITY" {
                            Some(u64::MAX)
                        } else {
                            c.parse().ok()
                        }
                    })
                    .unwrap_or(0);
                let host = node.parent().and_then(|p| p.attribute("name"));
                if let (Some(host), true) = (host, count > 0) {
                    status.fail_counts.insert(host.to_owned(), count);
                }
            }
            _ => {}
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIB: &str = r#"<cib><configuration><crm_config/><nodes/>
      <resources>
        <group id="pbx">
          <primitive id="datapath_fs" class="ocf" provider="heartbeat" type="Filesystem">
            <instance_attributes id="fs"><nvpair id="fs-d" name="directory" value="/var/lib/portsip"/></instance_attributes>
          </primitive>
          <primitive id="vip" class="ocf" provider="heartbeat" type="IPaddr2"/>
        </group>
        <primitive id="imfleet-controller" class="ocf" provider="imfleet" type="controller">
          <instance_attributes id="ia"><nvpair id="a" name="state_dir" value="/srv/s"/></instance_attributes>
          <meta_attributes id="ma"><nvpair id="b" name="critical" value="false"/></meta_attributes>
        </primitive>
      </resources>
      <constraints>
        <rsc_colocation id="c1" rsc="imfleet-controller" with-rsc="datapath_fs" score="INFINITY"/>
        <rsc_order id="o1" first="datapath_fs" then="imfleet-controller"/>
      </constraints></configuration><status/></cib>"#;

    #[test]
    fn the_configuration_is_read_as_plan_needs_it() {
        let seen = observe(CIB, "imfleet-controller").unwrap();
        let ids: Vec<_> = seen.resources.iter().map(String::as_str).collect();
        assert_eq!(ids, ["datapath_fs", "imfleet-controller", "pbx", "vip"]);
        let p = seen.primitive.unwrap();
        assert_eq!(p.agent, "ocf:imfleet:controller");
        assert_eq!(p.params["state_dir"], "/srv/s");
        assert_eq!(p.meta["critical"], "false");
        assert_eq!(seen.colocations["c1"].with_rsc, "datapath_fs");
        assert_eq!(seen.orders["o1"].kind, None);
        assert_eq!(seen.mounts["datapath_fs"], "/var/lib/portsip");
        assert!(observe("<cib/>", "x").is_err());
        assert!(observe("not xml", "x").is_err());
    }

    #[test]
    fn the_status_names_nodes_roles_and_failures() {
        let xml = r#"<pacemaker-result api-version="2.30" request="crm_mon">
          <summary><current_dc present="true" name="ha1" with_quorum="true"/></summary>
          <nodes><node name="ha1" online="true"/><node name="ha2" online="false"/></nodes>
          <resources>
            <group id="pbx" number_resources="2">
              <resource id="datapath_fs" role="Started" active="true" failed="false"><node name="ha1"/></resource>
            </group>
            <resource id="imfleet-controller" role="Stopped" active="false" failed="false"/>
          </resources>
          <node_history><node name="ha1">
            <resource_history id="imfleet-controller" fail-count="3"/>
            <resource_history id="datapath_fs"/>
          </node></node_history>
        </pacemaker-result>"#;
        let status = status(xml, "imfleet-controller", &["pbx".into()]).unwrap();
        assert!(status.quorate);
        assert_eq!(status.nodes_online, ["ha1"]);
        let daemon = status.daemon.unwrap();
        assert_eq!((daemon.role.as_str(), daemon.active), ("Stopped", false));
        assert_eq!(status.with[0].id, "pbx");
        assert_eq!(status.with[0].nodes, ["ha1"]);
        assert_eq!(status.fail_counts["ha1"], 3);
    }
}
