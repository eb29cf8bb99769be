//! Finishing or undoing an apply the agent did not live to finish. An apply
//! notes in the deployment record, before each change, which running
//! containers it sets aside (renamed `NAME.previous`), which it creates, and
//! when every check has passed (committed). At start-up, and before the next
//! apply, [`plan`] turns that note and the containers found into steps: a
//! committed apply drops the previous set; any other is undone, so the host
//! never ends with neither set running.

use serde::{Deserialize, Serialize};

use super::PREVIOUS_SUFFIX;

/// An apply in progress, as noted in the deployment record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// The running deployment's containers it sets aside, in start order.
    pub previous: Vec<String>,
    /// Containers it has created (or is about to), in order.
    pub created: Vec<String>,
    /// Every check passed: the new set stays.
    pub committed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Remove(String),
    Rename { from: String, to: String },
    Start(String),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Remove(name) => write!(f, "remove {name}"),
            Step::Rename { from, to } => write!(f, "rename {from} to {to}"),
            Step::Start(name) => write!(f, "start {name}"),
        }
    }
}

fn aside(name: &str) -> String {
    format!("{name}{PREVIOUS_SUFFIX}")
}

/// What to do about a deployment's containers given the note of an
/// unfinished apply (`None`: no note, e.g. left by an older agent).
pub fn plan(note: Option<&InProgress>, found: &[String]) -> Vec<Step> {
    let exists = |name: &str| found.iter().any(|f| f == name);
    let set_aside: Vec<&str> = found
        .iter()
        .filter_map(|f| f.strip_suffix(PREVIOUS_SUFFIX))
        .collect();
    let mut steps = Vec::new();
    match note {
        Some(note) if note.committed => {
            for name in set_aside {
                steps.push(Step::Remove(aside(name)));
            }
        }
        Some(note) => {
            // A created name is the new container only while its old copy
            // is still aside (or it never had one): after a rollback that
            // renamed the old one back, the name is the old one again.
            let is_new = |n: &str| exists(&aside(n)) || !note.previous.iter().any(|p| p == n);
            for name in note.created.iter().rev().filter(|n| exists(n) && is_new(n)) {
                steps.push(Step::Remove(name.clone()));
            }
            let mut back: Vec<String> = note.previous.clone();
            // Set aside by an earlier interrupted apply but not in the note.
            for name in &set_aside {
                if !back.iter().any(|b| b == name) {
                    back.push((*name).to_owned());
                }
            }
            for name in &back {
                let live_is_old = exists(name) && !note.created.contains(name);
                if exists(&aside(name)) {
                    if live_is_old {
                        steps.push(Step::Remove(aside(name)));
                    } else {
                        steps.push(Step::Rename {
                            from: aside(name),
                            to: name.clone(),
                        });
                    }
                }
            }
            for name in &back {
                if exists(name) || exists(&aside(name)) {
                    steps.push(Step::Start(name.clone()));
                }
            }
        }
        None => {
            // No note: a live copy wins; a lone previous copy is the only
            // one left and comes back rather than being deleted.
            for name in set_aside {
                if exists(name) {
                    steps.push(Step::Remove(aside(name)));
                } else {
                    steps.push(Step::Rename {
                        from: aside(name),
                        to: name.to_owned(),
                    });
                    steps.push(Step::Start(name.to_owned()));
                }
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(names: &[(&str, bool)]) -> Vec<String> {
        names.iter().map(|(n, _running)| (*n).to_owned()).collect()
    }

    fn found_names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn note(previous: &[&str], created: &[&str], committed: bool) -> InProgress {
        InProgress {
            previous: previous.iter().map(|s| s.to_string()).collect(),
            created: created.iter().map(|s| s.to_string()).collect(),
            committed,
        }
    }

    fn rename(from: &str, to: &str) -> Step {
        Step::Rename {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn died_while_the_new_set_was_starting_the_old_one_comes_back() {
        let found = found(&[("db.previous", false), ("im.previous", false), ("db", true)]);
        let steps = plan(Some(&note(&["db", "im"], &["db", "im"], false)), &found);
        assert_eq!(
            steps,
            vec![
                Step::Remove("db".into()),
                rename("db.previous", "db"),
                rename("im.previous", "im"),
                Step::Start("db".into()),
                Step::Start("im".into()),
            ]
        );
    }

    #[test]
    fn died_while_setting_aside_the_stopped_ones_start_again() {
        // im was renamed aside, db only stopped; nothing new was created.
        let found = found(&[("im.previous", false), ("db", false)]);
        let steps = plan(Some(&note(&["db", "im"], &[], false)), &found);
        assert_eq!(
            steps,
            vec![
                rename("im.previous", "im"),
                Step::Start("db".into()),
                Step::Start("im".into()),
            ]
        );
    }

    #[test]
    fn died_after_the_rollback_put_the_old_set_back_nothing_is_removed() {
        // The note still lists the created names, but they are the old
        // containers again: removing them would delete the only copy.
        let found = found(&[("db", true), ("im", true)]);
        let steps = plan(
            Some(&note(&["db", "im"], &["db", "initdt", "im"], false)),
            &found,
        );
        assert_eq!(
            steps,
            vec![Step::Start("db".into()), Step::Start("im".into())]
        );
        // Half way through the rollback: im's new copy removed, its old one
        // still aside; db's old one already back.
        let found = found_names(&["db", "im.previous"]);
        let steps = plan(Some(&note(&["db", "im"], &["db", "im"], false)), &found);
        assert_eq!(
            steps,
            vec![
                rename("im.previous", "im"),
                Step::Start("db".into()),
                Step::Start("im".into()),
            ]
        );
    }

    #[test]
    fn died_after_every_check_passed_the_apply_is_finished() {
        let found = found(&[("db", true), ("im", true), ("im.previous", false)]);
        let steps = plan(Some(&note(&["db", "im"], &["db", "im"], true)), &found);
        assert_eq!(steps, vec![Step::Remove("im.previous".into())]);
    }

    #[test]
    fn a_first_apply_that_died_leaves_nothing_behind() {
        let found = found(&[("db", true)]);
        let steps = plan(Some(&note(&[], &["db", "im"], false)), &found);
        assert_eq!(steps, vec![Step::Remove("db".into())]);
    }

    #[test]
    fn without_a_note_a_lone_previous_copy_is_restored_not_deleted() {
        let steps = plan(
            None,
            &found(&[("im.previous", false), ("db", true), ("db.previous", false)]),
        );
        assert_eq!(
            steps,
            vec![
                rename("im.previous", "im"),
                Step::Start("im".into()),
                Step::Remove("db.previous".into()),
            ]
        );
        assert!(plan(None, &found(&[("db", true)])).is_empty());
    }

    #[test]
    fn whatever_the_crash_point_one_set_remains() {
        // Every prefix of an apply of [db, im] over a running [db, im]:
        // after the plan runs, each name exists exactly once and no
        // `.previous` copy is left.
        let names = ["db", "im"];
        let mut states: Vec<(InProgress, Vec<String>)> = Vec::new();
        for aside_count in 0..=2 {
            for created_count in 0..=2 {
                if created_count > 0 && aside_count < 2 {
                    continue; // creation starts after everything is aside
                }
                let mut f = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    if i < aside_count {
                        f.push(aside(n));
                    } else {
                        f.push((*n).to_owned());
                    }
                    if i < created_count {
                        f.push((*n).to_owned());
                    }
                }
                let created: Vec<&str> = names[..created_count].to_vec();
                states.push((note(&names, &created, false), f));
            }
        }
        for (note, found) in states {
            let mut after: Vec<String> = found.clone();
            for step in plan(Some(&note), &found) {
                match step {
                    Step::Remove(n) => {
                        let i = after
                            .iter()
                            .position(|a| *a == n)
                            .expect("removes what exists");
                        after.remove(i);
                    }
                    Step::Rename { from, to } => {
                        assert!(!after.contains(&to), "{to} free before the rename");
                        let i = after.iter().position(|a| *a == from).unwrap();
                        after[i] = to;
                    }
                    Step::Start(n) => assert!(after.contains(&n)),
                }
            }
            after.sort();
            assert_eq!(after, vec!["db", "im"], "{note:?} {found:?}");
        }
    }
}
