//! A controller identity that fell into the wrong hands: the real agent
//! in-process, asked for what no IM deployment needs. Every request is
//! refused with a clear error, changes nothing, and is in the audit log.

use std::path::Path;

use imfleet_certs::CertificateAuthority;
use imfleet_controller::agent_client::{Agent, AgentError};
use imfleet_proto::agent::v1::{
    ApplyOutcome, ApplyRequest, BindMount, ContainerSpec, ControlRequest, DeploymentSpec,
    DirectorySpec, HealthGate, LogsRequest, control_request::Action,
};
use imfleet_tests::inproc::{RunningAgent, connect, roots_under, start_agent};
use imfleet_tests::pki::agent_identity_now;

/// Not the IM's name: other tests deploy that on the shared Docker Engine.
const DEPLOYMENT: &str = "imfleet-hostile-test";

struct Hostile {
    ca: CertificateAuthority,
    agent: RunningAgent,
    scratch: tempfile::TempDir,
}

impl Hostile {
    async fn start() -> Hostile {
        let ca = CertificateAuthority::generate("CA").unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let (roots, _) = roots_under(scratch.path());
        let agent = start_agent(
            &ca,
            agent_identity_now(&ca, &["127.0.0.1"]),
            Some(roots),
            |_, _| {},
        )
        .await;
        Hostile { ca, agent, scratch }
    }

    async fn agent(&self) -> Agent {
        connect(&self.ca, &self.agent).await
    }

    fn data(&self) -> std::path::PathBuf {
        self.scratch.path().join("portsip")
    }

    /// A spec shaped like the PortSIP one, inside the roots.
    fn spec(&self) -> DeploymentSpec {
        let im_data = self.data().join("im-data").display().to_string();
        DeploymentSpec {
            name: DEPLOYMENT.into(),
            directories: vec![
                DirectorySpec {
                    path: self.data().display().to_string(),
                    mode: 0o755,
                    ..Default::default()
                },
                DirectorySpec {
                    path: im_data.clone(),
                    uid: 888,
                    gid: 888,
                    mode: 0o755,
                    ..Default::default()
                },
            ],
            containers: vec![ContainerSpec {
                name: "imfleet-hostile-test".into(),
                image: "imfleet-test/pbx:22".into(),
                mounts: vec![BindMount {
                    source: im_data,
                    target: "/var/lib/portsip/pbx".into(),
                    read_only: false,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.agent.layout().audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

async fn apply(agent: &Agent, spec: DeploymentSpec, token: &str) -> ApplyOutcome {
    let mut stream = agent
        .apply(ApplyRequest {
            spec: Some(spec),
            provided_secrets: [("im_token".to_owned(), token.to_owned())].into(),
            health_timeout_seconds: 5,
        })
        .await
        .unwrap();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(outcome) = event.outcome {
            return outcome;
        }
    }
    panic!("no outcome");
}

#[tokio::test]
async fn a_spec_asking_for_more_than_a_deployment_needs_is_refused_and_changes_nothing() {
    let h = Hostile::start().await;
    let agent = h.agent().await;
    let token = "hostile-test-token-0123456789";
    type Twist = Box<dyn Fn(&mut DeploymentSpec)>;
    let twists: Vec<(&str, Twist)> = vec![
        (
            "bind mount",
            Box::new(|s| s.containers[0].mounts[0].source = "/".into()),
        ),
        (
            "bind mount",
            Box::new(|s| s.containers[0].mounts[0].source = "/var/run/docker.sock".into()),
        ),
        (
            "bind mount",
            Box::new(|s| s.containers[0].mounts[0].source = "/opt/imfleet".into()),
        ),
        (
            "outside this agent's data directories",
            Box::new(|s| {
                s.directories.push(DirectorySpec {
                    path: "/etc/imfleet-hostile".into(),
                    mode: 0o755,
                    ..Default::default()
                })
            }),
        ),
        (
            "`..`",
            Box::new(|s| {
                s.directories[1]
                    .path
                    .push_str("/../../../../etc/imfleet-hostile")
            }),
        ),
        ("setuid", Box::new(|s| s.directories[1].mode = 0o4777)),
        (
            "not an image reference",
            Box::new(|s| s.containers[0].image = "x/../../containers/victim".into()),
        ),
        (
            "loopback",
            Box::new(|s| {
                s.gate = Some(HealthGate {
                    http_url: "http://169.254.169.254:80/latest/meta-data".into(),
                    ..Default::default()
                })
            }),
        ),
        (
            "reserved",
            Box::new(|s| {
                s.containers[0]
                    .labels
                    .insert("io.imfleet.deployment".into(), "other".into());
            }),
        ),
    ];
    for (expected, twist) in &twists {
        let mut spec = h.spec();
        twist(&mut spec);
        let outcome = apply(&agent, spec, token).await;
        assert!(!outcome.success);
        assert!(
            outcome.error.contains(expected),
            "want `{expected}`: {}",
            outcome.error
        );
    }
    // Nothing was created, on the host or in the Engine.
    assert!(!h.data().exists());
    assert!(!Path::new("/etc/imfleet-hostile").exists());
    let status = agent.status(DEPLOYMENT).await.unwrap();
    assert!(status.containers.is_empty(), "{status:?}");

    // Every attempt is in the audit log, with who asked, and no secret.
    let audit = h.audit();
    let applies: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|e| e["rpc"] == "apply" && e["outcome"] != "started")
        .collect();
    assert_eq!(applies.len(), twists.len(), "{audit:#?}");
    for entry in &applies {
        assert_eq!(entry["caller"]["common_name"], "controller@test");
        assert!(entry["outcome"].as_str().unwrap().starts_with("failed:"));
    }
    let text = std::fs::read_to_string(h.agent.layout().audit_log()).unwrap();
    assert!(!text.contains(token));
}

#[tokio::test]
async fn an_agent_bootstrapped_without_roots_deploys_nothing() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(
        &ca,
        agent_identity_now(&ca, &["127.0.0.1"]),
        None,
        |_, _| {},
    )
    .await;
    let client = connect(&ca, &agent).await;
    let h = Hostile::start().await;
    let outcome = apply(&client, h.spec(), "t0k3n-value-1234").await;
    assert!(!outcome.success);
    assert!(
        outcome.error.contains("re-run `controller bootstrap`"),
        "{}",
        outcome.error
    );
    assert!(!h.data().exists());
    let pong = client.ping().await.unwrap();
    assert!(pong.reply.data_roots.is_empty());
}

#[tokio::test]
async fn logs_serve_only_named_containers_of_the_deployment() {
    let h = Hostile::start().await;
    let agent = h.agent().await;
    for (deployment, container, expected) in [
        ("../../version#", "", "not a deployment name"),
        (DEPLOYMENT, "../../version#", "letters, digits"),
        (DEPLOYMENT, "dockerd", "is not a container of deployment"),
    ] {
        let err = agent
            .logs(LogsRequest {
                deployment: deployment.into(),
                container: container.into(),
                follow: false,
                tail: 10,
            })
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Rejected { .. }), "{err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

#[tokio::test]
async fn purge_removes_only_what_a_deployment_recorded() {
    let h = Hostile::start().await;
    let agent = h.agent().await;
    // A directory inside the data path that no deployment declared.
    let stray = h.data().join("operator-backup");
    std::fs::create_dir_all(&stray).unwrap();
    for path in [
        "/etc".to_owned(),
        stray.display().to_string(),
        h.data().display().to_string(),
        format!("{}/../..", h.data().display()),
    ] {
        let err = agent
            .control(ControlRequest {
                deployment: DEPLOYMENT.into(),
                action: Action::Remove as i32,
                stop_grace_seconds: 1,
                purge_paths: vec![path.clone()],
            })
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Rejected { .. }), "{path}: {err}");
        assert!(err.to_string().contains("refused"), "{path}: {err}");
    }
    assert!(stray.is_dir());
    assert!(Path::new("/etc/passwd").exists());
    let refused = h
        .audit()
        .into_iter()
        .filter(|e| e["rpc"] == "control")
        .filter(|e| e["outcome"].as_str().unwrap().starts_with("refused:"))
        .count();
    assert_eq!(refused, 4);
}

#[tokio::test]
async fn image_staging_takes_only_image_references() {
    let h = Hostile::start().await;
    let agent = h.agent().await;
    for images in [
        vec!["--config=/etc/shadow".to_owned()],
        vec!["portsip/pbx:22\nX-Injected: 1".to_owned()],
        vec!["portsip/pbx:22".to_owned(); 9],
        // Out of /images/ in the Engine's URL, to another container.
        vec!["x/../../containers/victim".to_owned()],
        vec!["pbx%2F..%2F..%2Fcontainers%2Fvictim".to_owned()],
    ] {
        let err = agent.prepare_images(images.clone()).await.unwrap_err();
        assert!(
            matches!(err, AgentError::Rejected { .. }),
            "{images:?}: {err}"
        );
    }
    // Only the space is asked: no image is touched, the Engine's root is told.
    let space = agent.prepare_images(Vec::new()).await.unwrap();
    assert!(space.images.is_empty());
    assert!(!space.docker_root.is_empty() && space.docker_root_available_bytes > 0);
    let audit = h.audit();
    let staged: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|e| e["rpc"] == "prepare_images")
        .collect();
    // Every request is audited, one JSON line each (the newline stayed escaped).
    assert_eq!(staged.len(), 6, "{staged:?}");
    assert!(
        staged[..5]
            .iter()
            .all(|e| e["outcome"].as_str().unwrap().starts_with("refused")),
        "{staged:?}"
    );
}

#[tokio::test]
async fn an_agent_binary_the_fleet_ca_did_not_sign_is_refused() {
    use imfleet_proto::agent::v1::{AgentBinaryChunk, AgentBinaryHeader};
    use sha2::Digest;
    let ca = CertificateAuthority::generate("CA").unwrap();
    // An agent that could restart itself (as under its supervisor).
    let agent = start_agent(
        &ca,
        agent_identity_now(&ca, &["127.0.0.1"]),
        None,
        |facts, _| facts.supervision = "supervisor".into(),
    )
    .await;
    let layout = agent.layout();
    std::fs::create_dir_all(layout.bin_dir()).unwrap();
    std::fs::write(layout.binary(), b"the running agent").unwrap();
    let client = connect(&ca, &agent).await;
    // A real agent binary, correctly described, signed by another CA (or
    // not at all): what a stolen controller certificate can send.
    let bytes = std::fs::read(imfleet_tests::bin("agent")).unwrap();
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let message = imfleet_certs::agent_binary_message(
        &sha256,
        imfleet_agent::VERSION,
        imfleet_proto::PROTOCOL_REVISION,
    );
    let stranger = CertificateAuthority::generate("CA").unwrap();
    for signature in [stranger.sign(&message).unwrap(), Vec::new()] {
        let header = AgentBinaryHeader {
            size: bytes.len() as u64,
            sha256: sha256.clone(),
            version: imfleet_agent::VERSION.into(),
            protocol_revision: imfleet_proto::PROTOCOL_REVISION,
            signature,
        };
        let chunks = bytes
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, data)| AgentBinaryChunk {
                header: (i == 0).then(|| header.clone()),
                data: data.to_vec(),
            })
            .collect::<Vec<_>>();
        let err = client
            .upgrade_agent(futures::stream::iter(chunks))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Rejected { .. }) && err.to_string().contains("not signed"),
            "{err}"
        );
    }
    // Nothing changed on the host.
    assert_eq!(
        std::fs::read(layout.binary()).unwrap(),
        b"the running agent"
    );
    assert!(!layout.bin_dir().join("agent.previous").exists());
    let audit = std::fs::read_to_string(layout.audit_log()).unwrap();
    assert_eq!(
        audit.matches("\"rpc\":\"upgrade_agent\"").count(),
        2,
        "{audit}"
    );
    assert!(audit.contains("refused"), "{audit}");
}
