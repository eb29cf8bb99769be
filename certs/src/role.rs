use std::fmt;

/// What a certificate holder is allowed to be. Encoded as the subject's
/// organisational unit (OU) and enforced together with the EKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Controller,
    Agent,
    /// A person's client certificate for the daemon's API (never accepted
    /// by an agent).
    Operator,
    /// The daemon's API server certificate (what an operator's CLI checks).
    Daemon,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Daemon => "daemon",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "controller" => Some(Role::Controller),
            "agent" => Some(Role::Agent),
            "operator" => Some(Role::Operator),
            "daemon" => Some(Role::Daemon),
            _ => None,
        }
    }
}

impl Role {
    /// Whether the role's certificates are TLS clients (else servers).
    pub fn is_client(self) -> bool {
        matches!(self, Role::Controller | Role::Operator)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
