//! What each operation needs of the agent's protocol. An agent reports its
//! `protocol_revision` in every ping; the controller refuses, with the fix, an
//! operation an older agent would misunderstand or half-do.

/// An operation that needs more than the first protocol revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Deploy: the agent checks requests against its roots (6), reports the
    /// ports its firewall admits and opens every port the spec lists (7).
    Apply,
    /// `rm --purge`: only directories recorded for the deployment (6).
    Purge,
    /// The health stream `controller serve` follows (8).
    WatchHealth,
    /// Rollouts: images staged and the Engine's free space reported (9).
    PrepareImages,
    /// The agent replaces its own binary over mTLS (10).
    UpgradeAgent,
    /// The agent renews its certificate over mTLS (11).
    Renewal,
    /// The agent replaces the CAs it trusts (11).
    CaRotation,
}

impl Feature {
    /// The first protocol revision that has the feature.
    pub fn revision(self) -> u32 {
        match self {
            Feature::Apply => 7,
            Feature::Purge => 6,
            Feature::WatchHealth => 8,
            Feature::PrepareImages => 9,
            Feature::UpgradeAgent => 10,
            Feature::Renewal | Feature::CaRotation => 11,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Feature::Apply => "deploying",
            Feature::Purge => "purging data",
            Feature::WatchHealth => "streaming health",
            Feature::PrepareImages => "rolling upgrades",
            Feature::UpgradeAgent => "upgrading the agent over mTLS",
            Feature::Renewal => "renewing the agent's certificate",
            Feature::CaRotation => "rotating the fleet CA",
        }
    }

    /// `Err(needed revision)` when an agent speaking `have` lacks it.
    pub fn check(self, have: u32) -> Result<(), u32> {
        if have >= self.revision() {
            Ok(())
        } else {
            Err(self.revision())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_agents_are_refused_newer_ones_accepted() {
        assert_eq!(Feature::Apply.check(6), Err(7));
        assert_eq!(Feature::Apply.check(7), Ok(()));
        assert_eq!(Feature::Apply.check(8), Ok(()));
        assert_eq!(Feature::Purge.check(5), Err(6));
        assert_eq!(Feature::Purge.check(6), Ok(()));
        // Nothing this build needs is newer than what it speaks itself.
        for f in [
            Feature::Apply,
            Feature::Purge,
            Feature::WatchHealth,
            Feature::PrepareImages,
            Feature::UpgradeAgent,
            Feature::Renewal,
            Feature::CaRotation,
        ] {
            assert!(f.check(imfleet_proto::PROTOCOL_REVISION).is_ok());
        }
    }

    #[test]
    fn the_refusal_names_the_fix() {
        let err = crate::agent_client::AgentError::TooOld {
            address: "10.0.0.5:7443".into(),
            have: 5,
            need: Feature::Apply.revision(),
            what: Feature::Apply.describe(),
        };
        let text = err.to_string();
        assert!(text.contains("revision 5"), "{text}");
        assert!(text.contains("revision 7 or later"), "{text}");
        assert!(text.contains("controller bootstrap"), "{text}");
    }
}
