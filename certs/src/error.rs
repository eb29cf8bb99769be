use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("not a valid PEM {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("could not parse X.509 {what}: {detail}")]
    Parse { what: &'static str, detail: String },
    #[error("certificate verification failed: {0}")]
    Verify(String),
    #[error("the certificate does not belong to the private key")]
    KeyMismatch,
    #[error("invalid subject alternative name {0:?}")]
    InvalidName(String),
}
