//! Mutual TLS between controller and agent refuses every identity it should:
//! the real agent server in-process, the controller's real client code.

use std::net::SocketAddr;

use imfleet_agent::identity::ServingIdentity;
use imfleet_agent::server::{AgentFacts, serve};
use imfleet_certs::{CONTROLLER_LIFETIME, CertificateAuthority, IssuedIdentity, Validity};
use imfleet_controller::agent_client::{Agent, AgentAddress, AgentError};
use imfleet_controller::state::ClientIdentity;
use imfleet_proto::agent::v1::PingRequest;
use imfleet_proto::agent::v1::agent_client::AgentClient;
use imfleet_tests::pki::agent_identity_now;
use tokio::sync::oneshot;

/// An agent serving on 127.0.0.1 with a certificate for `sans`.
struct RunningAgent {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start_agent(ca: &CertificateAuthority, sans: &[&str]) -> RunningAgent {
    imfleet_certs::install_crypto_provider();
    let issued = agent_identity_now(ca, sans);
    let identity = ServingIdentity {
        info: imfleet_certs::inspect_pem(&issued.cert_pem).unwrap(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: ca.cert_pem().to_owned(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let facts = AgentFacts::detect(&identity);
    let root = tempfile::tempdir().unwrap();
    tokio::spawn(async move {
        let layout = imfleet_agent::layout::Layout::new(root.path());
        serve(&layout, &identity, facts, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    RunningAgent { addr, _stop: stop }
}

fn controller_identity(ca: &CertificateAuthority, validity: Validity) -> IssuedIdentity {
    ca.issue_controller("controller@test", validity).unwrap()
}

fn client(trusted_ca: &CertificateAuthority, presented: &IssuedIdentity) -> ClientIdentity {
    ClientIdentity {
        ca_pem: trusted_ca.cert_pem().to_owned(),
        cert_pem: presented.cert_pem.clone(),
        key_pem: presented.key_pem.clone(),
    }
}

fn address(agent: &RunningAgent, host: &str) -> AgentAddress {
    AgentAddress {
        host: host.to_owned(),
        port: agent.addr.port(),
    }
}

/// Connect and ping; TLS 1.3 may report a refused client certificate only on
/// the first request, so both steps count.
async fn call(identity: &ClientIdentity, address: &AgentAddress) -> Result<u64, AgentError> {
    let agent = Agent::connect(identity, address).await?;
    Ok(agent.ping().await?.reply.uptime_seconds + 1)
}

fn refusal_text(err: &AgentError) -> String {
    imfleet_controller::error_chain(err).to_lowercase()
}

#[tokio::test]
async fn the_controller_identity_is_accepted() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let me = client(
        &ca,
        &controller_identity(&ca, Validity::starting_now(CONTROLLER_LIFETIME)),
    );
    let agent_client = Agent::connect(&me, &address(&agent, "127.0.0.1"))
        .await
        .unwrap();
    let pong = agent_client.ping().await.unwrap();
    assert_eq!(pong.reply.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        pong.reply.protocol_revision,
        imfleet_proto::PROTOCOL_REVISION
    );
}

#[tokio::test]
async fn a_client_without_certificate_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
        .domain_name("127.0.0.1");
    let result = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", agent.addr))?
            .tls_config(tls)?
            .connect()
            .await?;
        let reply = AgentClient::new(channel)
            .ping(PingRequest { nonce: 1 })
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(reply)
    }
    .await;
    let err = result.expect_err("an anonymous client got an answer");
    let text = format!("{err:?}").to_lowercase();
    assert!(text.contains("certificaterequired"), "{text}");
}

#[tokio::test]
async fn a_controller_certificate_from_a_foreign_ca_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let foreign = CertificateAuthority::generate("foreign CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let me = client(
        &ca,
        &controller_identity(&foreign, Validity::starting_now(CONTROLLER_LIFETIME)),
    );
    let err = call(&me, &address(&agent, "127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(refusal_text(&err).contains("alert: unknownca"), "{err}");
    assert!(
        err.to_string()
            .contains("does not trust this controller's CA"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_controller_certificate_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    };
    let me = client(&ca, &controller_identity(&ca, expired));
    let err = call(&me, &address(&agent, "127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(
        refusal_text(&err).contains("alert: certificateexpired"),
        "{err}"
    );
    assert!(err.to_string().contains("controller init"), "{err}");
}

#[tokio::test]
async fn an_agent_certificate_cannot_act_as_the_controller() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    // A genuine agent identity from the same CA, presented as a client.
    let other_agent = agent_identity_now(&ca, &["127.0.0.5"]);
    let me = client(&ca, &other_agent);
    let err = call(&me, &address(&agent, "127.0.0.1")).await.unwrap_err();
    // Its EKU is serverAuth only, so the agent's TLS stack rejects it.
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(
        refusal_text(&err).contains("alert: unsupportedcertificate"),
        "{err}"
    );
}

#[tokio::test]
async fn the_controller_refuses_an_agent_whose_san_is_not_the_dialled_address() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    // The agent listens on 127.0.0.1 but its certificate names 127.0.0.9.
    let agent = start_agent(&ca, &["127.0.0.9"]).await;
    let me = client(
        &ca,
        &controller_identity(&ca, Validity::starting_now(CONTROLLER_LIFETIME)),
    );
    let err = call(&me, &address(&agent, "127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(refusal_text(&err).contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn the_controller_refuses_an_agent_from_a_foreign_ca() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let foreign = CertificateAuthority::generate("impostor CA").unwrap();
    let impostor = start_agent(&foreign, &["127.0.0.1"]).await;
    let me = client(
        &ca,
        &controller_identity(&ca, Validity::starting_now(CONTROLLER_LIFETIME)),
    );
    let err = call(&me, &address(&impostor, "127.0.0.1"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(refusal_text(&err).contains("unknownissuer"), "{err}");
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_match_its_sha256_is_refused() {
    use imfleet_proto::agent::v1::{ImageChunk, ImageUploadHeader};
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let me = client(
        &ca,
        &controller_identity(&ca, Validity::starting_now(CONTROLLER_LIFETIME)),
    );
    let connected = Agent::connect(&me, &address(&agent, "127.0.0.1"))
        .await
        .unwrap();
    let data = b"pretend image bytes".to_vec();
    let lying = ImageChunk {
        header: Some(ImageUploadHeader {
            name: "pbx.tar".into(),
            size: data.len() as u64,
            sha256: "00".repeat(32),
        }),
        data,
    };
    let err = connected
        .load_image(tokio_stream::iter(vec![lying]))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("upload of pbx.tar is corrupt"), "{text}");
    assert!(text.contains("nothing was loaded"), "{text}");
}
