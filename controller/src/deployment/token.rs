//! The IM server token: where it comes from, and a type that never shows it.

use super::portsip;

/// The IM server token from the PBX. Never printed: `Debug` is redacted.
#[derive(Clone)]
pub struct ImToken(String);

impl std::fmt::Debug for ImToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImToken([redacted])")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "the IM token is empty; generate one on the PBX (Servers > IM Servers > Generate Token)"
    )]
    Empty,
    #[error(
        "the IM token contains spaces or control characters; copy it again from the PBX portal"
    )]
    Malformed,
    #[error("the IM token is longer than 4096 characters; is that the right file?")]
    TooLong,
}

impl ImToken {
    /// Accepts the token as read from a file, stdin or the environment
    /// (surrounding white space, such as a final newline, is dropped).
    pub fn parse(text: &str) -> Result<ImToken, TokenError> {
        let token = text.trim();
        if token.is_empty() {
            Err(TokenError::Empty)
        } else if token.len() > 4096 {
            Err(TokenError::TooLong)
        } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Err(TokenError::Malformed)
        } else {
            Ok(ImToken(token.to_owned()))
        }
    }

    pub fn fingerprint(&self) -> String {
        portsip::token_fingerprint(&self.0)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// Where the IM token comes from.
#[derive(Debug)]
pub enum TokenSource {
    /// From the operator (file, stdin, environment or prompt).
    Given(ImToken),
    /// The PBX's current token, through its API.
    FromPbx,
    /// A newly generated token (the HA upgrade guide asks for one per upgrade).
    NewFromPbx,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_shown() {
        assert_eq!(ImToken::parse("").unwrap_err(), TokenError::Empty);
        assert_eq!(ImToken::parse(" \n").unwrap_err(), TokenError::Empty);
        assert_eq!(
            ImToken::parse("abc def").unwrap_err(),
            TokenError::Malformed
        );
        assert_eq!(
            ImToken::parse(&"x".repeat(5000)).unwrap_err(),
            TokenError::TooLong
        );
        let token = ImToken::parse("s3cr3t-token-value\n").unwrap();
        assert_eq!(token.expose(), "s3cr3t-token-value");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert_eq!(token.fingerprint().len(), 64);
    }
}
