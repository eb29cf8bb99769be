//! The controller's side of mutual TLS with an agent (and an operator's
//! with the daemon's API, by the same rules), done here rather than
//! by tonic so that imfleet's own rules apply: the server certificate must
//! chain to the controller's CA, name the dialled address, AND carry exactly
//! the role `agent` with a serverAuth EKU; and what the agent presented (its
//! expiry above all) is read from the handshake, not from what it says.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use imfleet_certs::{CertificateInfo, Role};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::state::ClientIdentity;

/// Checks the chain and name as WebPKI does, then the imfleet role.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: Role,
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        imfleet_certs::check_peer(end_entity, self.role)
            .map_err(|e| rustls::Error::General(format!("the {}'s certificate: {e}", self.role)))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls client configuration for talking to agents.
pub fn client_config(identity: &ClientIdentity) -> Result<Arc<rustls::ClientConfig>, String> {
    let config = mtls_client_config(
        &identity.ca_pem,
        (&identity.cert_pem, &identity.key_pem),
        Role::Agent,
        rustls::DEFAULT_VERSIONS,
    )
    .map_err(|e| e.replace("the client identity", "the controller identity"))?;
    let mut config = Arc::unwrap_or_clone(config);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client configuration presenting `identity` (certificate, key)
/// to a server that must chain to `ca_pem` and carry `server_role`.
pub fn mtls_client_config(
    ca_pem: &str,
    identity: (&str, &str),
    server_role: Role,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, String> {
    use imfleet_certs::tls;
    let provider = tls::provider();
    let roots = tls::root_store(ca_pem).map_err(|e| e.to_string())?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let (chain, key) = tls::chain_and_key(identity.0, identity.1)
        .map_err(|e| format!("the client identity: {e}"))?;
    let verifier = RoleVerifier {
        inner,
        role: server_role,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the client identity: {e}"))?;
    Ok(Arc::new(config))
}

/// What the agent presented in its last handshake on a channel.
pub type Presented = Arc<Mutex<Option<CertificateInfo>>>;

/// A tonic connector: TCP to the agent, then TLS with [`client_config`];
/// records the certificate the agent presented.
#[derive(Clone)]
pub struct AgentConnector {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub host: String,
    pub port: u16,
    pub presented: Presented,
}

impl tower_service::Service<http::Uri> for AgentConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(this.config)
                .connect(this.server_name, tcp)
                .await?;
            let info = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| imfleet_certs::inspect_der(leaf).ok());
            *this.presented.lock().unwrap_or_else(|p| p.into_inner()) = info;
            Ok(TokioIo::new(tls))
        })
    }
}
