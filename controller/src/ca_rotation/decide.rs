//! What a CA rotation does next with each host, and when a phase is done:
//! pure functions over what was observed.

use serde::Serialize;

use super::Phase;

/// A host as seen at one moment of the rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub reachable: bool,
    /// Its agent speaks the revision that rotates CAs.
    pub can_rotate: bool,
    pub trusts_old: bool,
    pub trusts_new: bool,
    /// Its certificate is one the new CA issued.
    pub serves_new: bool,
}

/// What the rotation does with a host now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Make it trust the old and the new CA.
    TrustBoth,
    /// Re-issue its certificate under the new CA.
    Reissue,
    /// Make it trust only the new CA.
    TrustNew,
    /// Nothing left for this phase.
    Done,
    /// Cannot be reached now: the phase waits for it.
    Unreachable,
    /// Its agent is too old: upgrade it first (`controller agents upgrade`).
    TooOld,
    /// The operator went on without it.
    Skipped,
}

impl Step {
    /// Whether the phase may complete with the host in this step.
    pub fn settled(self) -> bool {
        matches!(self, Step::Done | Step::Skipped)
    }
}

pub fn step(phase: Phase, host: &Observed, skipped: bool) -> Step {
    if skipped {
        return Step::Skipped;
    }
    if !host.reachable {
        return Step::Unreachable;
    }
    if !host.can_rotate {
        return Step::TooOld;
    }
    match phase {
        Phase::Trust if host.trusts_old && host.trusts_new => Step::Done,
        Phase::Trust => Step::TrustBoth,
        Phase::Reissue if host.serves_new => Step::Done,
        Phase::Reissue => Step::Reissue,
        Phase::Drop if !host.serves_new => Step::Reissue,
        Phase::Drop if host.trusts_new && !host.trusts_old => Step::Done,
        Phase::Drop => Step::TrustNew,
        Phase::Finishing => Step::Done,
    }
}

/// Whether every host is settled for the phase.
pub fn phase_done(steps: &[Step]) -> bool {
    steps.iter().all(|s| s.settled())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(trusts_old: bool, trusts_new: bool, serves_new: bool) -> Observed {
        Observed {
            reachable: true,
            can_rotate: true,
            trusts_old,
            trusts_new,
            serves_new,
        }
    }

    #[test]
    fn each_phase_asks_only_what_is_missing() {
        use Phase::*;
        assert_eq!(
            step(Trust, &seen(true, false, false), false),
            Step::TrustBoth
        );
        assert_eq!(step(Trust, &seen(true, true, false), false), Step::Done);
        assert_eq!(
            step(Reissue, &seen(true, true, false), false),
            Step::Reissue
        );
        assert_eq!(step(Reissue, &seen(true, true, true), false), Step::Done);
        assert_eq!(step(Drop, &seen(true, true, true), false), Step::TrustNew);
        assert_eq!(step(Drop, &seen(false, true, true), false), Step::Done);
        // A host that missed the re-issue is re-issued before it drops the old CA.
        assert_eq!(step(Drop, &seen(true, true, false), false), Step::Reissue);
    }

    #[test]
    fn a_phase_waits_for_every_host_unless_the_operator_skips_it() {
        let away = Observed::default();
        assert_eq!(step(Phase::Trust, &away, false), Step::Unreachable);
        assert_eq!(step(Phase::Trust, &away, true), Step::Skipped);
        let old = Observed {
            reachable: true,
            ..Default::default()
        };
        assert_eq!(step(Phase::Trust, &old, false), Step::TooOld);
        assert!(!phase_done(&[Step::Done, Step::Unreachable]));
        assert!(!phase_done(&[Step::Done, Step::TooOld]));
        assert!(phase_done(&[Step::Done, Step::Skipped]));
        assert!(phase_done(&[]));
    }
}
