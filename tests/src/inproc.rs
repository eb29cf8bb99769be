//! The real agent server running inside the test process, on 127.0.0.1,
//! with its files in a scratch directory: for tests of the mTLS gate and of
//! what the agent refuses, which need no SSH and no test host.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use imfleet_agent::identity::ServingIdentity;
use imfleet_agent::policy::Roots;
use imfleet_agent::server::{AgentFacts, serve};
use imfleet_certs::{CONTROLLER_LIFETIME, CertificateAuthority, IssuedIdentity, Validity};
use imfleet_controller::agent_client::{Agent, AgentAddress};
use imfleet_controller::state::ClientIdentity;
use imfleet_proto::model::layout::Layout;
use tokio::sync::oneshot;

/// An agent serving until dropped.
pub struct RunningAgent {
    pub addr: SocketAddr,
    /// The agent's installation root (`log/audit.log`, `state/`, ...).
    pub root: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl RunningAgent {
    pub fn layout(&self) -> Layout {
        Layout::new(self.root.path())
    }

    pub fn address(&self, host: &str) -> AgentAddress {
        AgentAddress {
            host: host.to_owned(),
            port: self.addr.port(),
        }
    }
}

/// Starts an agent serving `issued`, deploying only under `roots`; `lie`
/// may change what it says about itself and its certificate.
pub async fn start_agent(
    ca: &CertificateAuthority,
    issued: IssuedIdentity,
    roots: Option<Roots>,
    lie: impl FnOnce(&mut AgentFacts, &mut imfleet_certs::CertificateInfo),
) -> RunningAgent {
    imfleet_certs::install_crypto_provider();
    let mut identity = ServingIdentity {
        info: imfleet_certs::inspect_pem(&issued.cert_pem).unwrap(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: ca.cert_pem().to_owned(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut facts = AgentFacts::detect();
    lie(&mut facts, &mut identity.info);
    let root = tempfile::tempdir().unwrap();
    let layout = Layout::new(root.path());
    tokio::spawn(async move {
        let restart = imfleet_agent::upgrade::RestartRequest::default();
        serve(&layout, &identity, facts, roots, listener, restart, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    RunningAgent {
        addr,
        root,
        _stop: stop,
    }
}

/// What a controller holding `presented` (trusting `trusted_ca`) uses.
pub fn client(trusted_ca: &CertificateAuthority, presented: &IssuedIdentity) -> ClientIdentity {
    ClientIdentity {
        ca_pem: trusted_ca.cert_pem().to_owned(),
        cert_pem: presented.cert_pem.clone(),
        key_pem: presented.key_pem.clone(),
        controllers: None,
    }
}

/// A genuine controller identity from `ca`.
pub fn controller(ca: &CertificateAuthority) -> ClientIdentity {
    let issued = ca
        .issue_controller(
            "controller@test",
            Validity::starting_now(CONTROLLER_LIFETIME),
        )
        .unwrap();
    client(ca, &issued)
}

/// Connects to `agent` as the genuine controller of `ca`.
pub async fn connect(ca: &CertificateAuthority, agent: &RunningAgent) -> Agent {
    Agent::connect(&controller(ca), &agent.address("127.0.0.1"))
        .await
        .unwrap()
}

/// Roots for a scratch data path (and storage dir) under `dir`.
pub fn roots_under(dir: &Path) -> (Roots, PathBuf) {
    let data = dir.join("portsip");
    let roots = Roots::new(
        &data.display().to_string(),
        Some(&dir.join("storage").display().to_string()),
        Path::new(imfleet_proto::model::layout::DEFAULT_ROOT),
    )
    .unwrap();
    (roots, data)
}
