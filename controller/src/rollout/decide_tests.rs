use super::*;
use StepPhase::*;

fn limits(max_parallel: u32, max_failures: u32) -> Limits {
    Limits {
        max_parallel,
        max_failures,
        auto_rollback: true,
        accepted_failures: 0,
        accepted_canary_failures: 0,
    }
}

fn steps(spec: &[(&str, bool, StepPhase)]) -> Vec<Step> {
    spec.iter()
        .map(|(h, canary, phase)| Step {
            host: (*h).into(),
            canary: *canary,
            phase: *phase,
        })
        .collect()
}

fn none() -> BTreeSet<String> {
    BTreeSet::new()
}

fn set(hosts: &[&str]) -> BTreeSet<String> {
    hosts.iter().map(|h| (*h).to_owned()).collect()
}

fn run(l: &Limits, s: &[Step]) -> Vec<Action> {
    decide(RolloutState::Running, l, s, &none(), &none())
}

fn up(h: &str) -> Action {
    Action::Upgrade(h.into())
}

#[test]
fn batches_put_canaries_first_then_waves() {
    assert_eq!(
        batches(5, 1, 2),
        vec![(0, true), (1, false), (1, false), (2, false), (2, false)]
    );
    assert_eq!(batches(3, 0, 1), vec![(0, false), (1, false), (2, false)]);
    assert_eq!(batches(2, 5, 1), vec![(0, true), (0, true)]);
    assert_eq!(
        batches(2, 0, 0),
        vec![(0, false), (1, false)],
        "0 acts as 1"
    );
}

#[test]
fn every_host_is_staged_before_any_is_touched() {
    let s = steps(&[
        ("a", false, Staged),
        ("b", false, Pending),
        ("c", false, Staging),
    ]);
    assert_eq!(
        run(&limits(3, 0), &s),
        vec![Action::Stage("b".into()), Action::Stage("c".into())]
    );
    // A stage in progress is waited for, not repeated.
    assert_eq!(
        decide(
            RolloutState::Running,
            &limits(3, 0),
            &s,
            &set(&["b", "c"]),
            &none()
        ),
        vec![]
    );
}

#[test]
fn one_host_at_a_time_by_default() {
    let l = limits(1, 0);
    let s = steps(&[("a", false, Staged), ("b", false, Staged)]);
    assert_eq!(run(&l, &s), vec![up("a")]);
    let s = steps(&[("a", false, Verifying), ("b", false, Staged)]);
    assert_eq!(
        decide(RolloutState::Running, &l, &s, &set(&["a"]), &none()),
        vec![]
    );
    let s = steps(&[("a", false, Done), ("b", false, Staged)]);
    assert_eq!(run(&l, &s), vec![up("b")]);
}

#[test]
fn max_parallel_counts_every_host_out_of_service() {
    let l = limits(2, 5);
    let s = steps(&[
        ("a", false, RollingBack),
        ("b", false, Staged),
        ("c", false, Staged),
    ]);
    // a's rollback holds one of the two slots.
    assert_eq!(
        decide(RolloutState::Running, &l, &s, &set(&["a"]), &none()),
        vec![up("b")]
    );
    let s = steps(&[
        ("a", false, Failed),
        ("b", false, Failed),
        ("c", false, Staged),
    ]);
    assert_eq!(
        run(&l, &s),
        vec![Action::Finish(
            RolloutState::Paused,
            "failed host(s) a, b hold every slot of --max-parallel 2".into()
        )]
    );
}

#[test]
fn canaries_go_first_and_the_rest_waits_for_them() {
    let l = limits(3, 1);
    let s = steps(&[
        ("a", true, Staged),
        ("b", false, Staged),
        ("c", false, Staged),
    ]);
    assert_eq!(run(&l, &s), vec![up("a")]);
    let s = steps(&[
        ("a", true, Verifying),
        ("b", false, Staged),
        ("c", false, Staged),
    ]);
    assert_eq!(
        decide(RolloutState::Running, &l, &s, &set(&["a"]), &none()),
        vec![]
    );
    let s = steps(&[
        ("a", true, Done),
        ("b", false, Staged),
        ("c", false, Staged),
    ]);
    assert_eq!(run(&l, &s), vec![up("b"), up("c")]);
}

#[test]
fn a_failed_canary_stops_everything_whatever_the_budget() {
    let l = limits(3, 5);
    let s = steps(&[("a", true, RolledBack), ("b", false, Staged)]);
    assert_eq!(
        run(&l, &s),
        vec![Action::Finish(
            RolloutState::Paused,
            "1 canary host(s) failed; the rest was not touched".into()
        )]
    );
    // Resuming accepts it: the rest goes on.
    let resumed = Limits {
        accepted_failures: 1,
        accepted_canary_failures: 1,
        ..l
    };
    assert_eq!(run(&resumed, &s), vec![up("b")]);
}

#[test]
fn the_failure_budget_stops_new_hosts_but_lets_running_ones_finish() {
    let l = limits(2, 1);
    let s = steps(&[
        ("a", false, RolledBack),
        ("b", false, Verifying),
        ("c", false, Staged),
    ]);
    // One failure is within the budget.
    assert_eq!(
        decide(RolloutState::Running, &l, &s, &set(&["b"]), &none()),
        vec![up("c")]
    );
    let s = steps(&[
        ("a", false, RolledBack),
        ("b", false, RolledBack),
        ("c", false, Staged),
        ("d", false, Swapping),
    ]);
    assert_eq!(
        decide(RolloutState::Running, &l, &s, &set(&["d"]), &none()),
        vec![],
        "d finishes first"
    );
    let s = steps(&[
        ("a", false, RolledBack),
        ("b", false, RolledBack),
        ("c", false, Staged),
        ("d", false, Done),
    ]);
    assert_eq!(
        run(&l, &s),
        vec![Action::Finish(
            RolloutState::Paused,
            "2 host(s) failed, more than --max-failures 1".into()
        )]
    );
    // Stopped with nothing left to start: over, not paused.
    let s = steps(&[("a", false, RolledBack), ("b", false, RolledBack)]);
    assert_eq!(
        run(&l, &s),
        vec![Action::Finish(
            RolloutState::Failed,
            "0 of 2 host(s) upgraded; failed: a, b".into()
        )]
    );
}

#[test]
fn endings_say_what_happened() {
    let l = limits(1, 1);
    assert_eq!(
        run(&l, &steps(&[("a", false, Done), ("b", false, Done)])),
        vec![Action::Finish(
            RolloutState::Succeeded,
            "2 host(s) upgraded".into()
        )]
    );
    assert_eq!(
        run(&l, &steps(&[("a", false, Done), ("b", false, RolledBack)])),
        vec![Action::Finish(
            RolloutState::Failed,
            "1 of 2 host(s) upgraded; failed: b".into()
        )]
    );
}

#[test]
fn interrupted_hosts_are_taken_up_before_new_ones() {
    let l = limits(2, 0);
    let s = steps(&[
        ("a", false, Swapping),
        ("b", false, Verifying),
        ("c", false, Staged),
    ]);
    assert_eq!(
        run(&l, &s),
        vec![Action::Observe("a".into()), Action::Verify("b".into())]
    );
    let s = steps(&[("a", false, RollingBack), ("b", false, Staged)]);
    assert_eq!(run(&limits(1, 0), &s), vec![Action::RollBack("a".into())]);
}

#[test]
fn abort_restores_changed_hosts_within_the_limit() {
    let l = limits(2, 0);
    let s = steps(&[
        ("a", false, Done),
        ("b", false, Done),
        ("c", false, Done),
        ("d", false, Staged),
        ("e", false, Verifying),
    ]);
    // e is down already and takes one slot: one more rollback may start.
    assert_eq!(
        decide(RolloutState::Aborting, &l, &s, &none(), &none()),
        vec![Action::RollBack("e".into()), Action::RollBack("a".into())]
    );
    let s = steps(&[
        ("a", false, RolledBack),
        ("b", false, RolledBack),
        ("d", false, Staged),
        ("f", false, Pending),
    ]);
    assert_eq!(
        decide(RolloutState::Aborting, &l, &s, &none(), &none()),
        vec![Action::Finish(
            RolloutState::Aborted,
            "2 host(s) run the previous version again".into()
        )]
    );
}

#[test]
fn abort_tries_a_failed_host_once_and_never_exceeds_the_limit() {
    let l = limits(1, 0);
    let s = steps(&[("a", false, Failed), ("b", false, Done)]);
    assert_eq!(
        decide(RolloutState::Aborting, &l, &s, &none(), &none()),
        vec![Action::RollBack("a".into())]
    );
    let out = decide(RolloutState::Aborting, &l, &s, &none(), &set(&["a"]));
    match out.as_slice() {
        [Action::Finish(RolloutState::Failed, why)] => {
            assert!(why.contains("could not restore a"), "{why}");
            assert!(why.contains("b still run"), "{why}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn other_states_do_nothing() {
    let s = steps(&[("a", false, Staged)]);
    for state in [
        RolloutState::Paused,
        RolloutState::Succeeded,
        RolloutState::Failed,
        RolloutState::Aborted,
    ] {
        assert!(decide(state, &limits(1, 0), &s, &none(), &none()).is_empty());
    }
}

#[test]
fn reconcile_believes_the_host_not_the_record() {
    let obs = |runs, healthy| Observed { runs, healthy };
    assert_eq!(reconcile(obs(Runs::Target, true), true, false), Verifying);
    assert_eq!(reconcile(obs(Runs::Target, true), true, true), Done);
    assert_eq!(reconcile(obs(Runs::Previous, true), true, false), Staged);
    assert_eq!(
        reconcile(obs(Runs::Previous, false), true, false),
        RollingBack
    );
    assert_eq!(
        reconcile(obs(Runs::Target, false), true, false),
        RollingBack
    );
    assert_eq!(reconcile(obs(Runs::Other, true), false, false), Failed);
    assert_eq!(reconcile(obs(Runs::Other, false), false, true), RollingBack);
}

fn index(s: &[Step], host: &str) -> usize {
    s.iter().position(|x| x.host == host).unwrap()
}

#[test]
fn a_failed_host_is_looked_at_again_on_resume() {
    let obs = |runs, healthy| Observed { runs, healthy };
    assert_eq!(reexamine(obs(Runs::Previous, true)), RolledBack);
    assert_eq!(reexamine(obs(Runs::Target, true)), Verifying);
    assert_eq!(reexamine(obs(Runs::Target, false)), Failed);
    assert_eq!(reexamine(obs(Runs::Other, true)), Failed);
}

/// A small deterministic PRNG: the property test below needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Runs random rollouts through `decide` the way the driver does (tasks
/// ending in random order, random host fates, crashes that lose every
/// task, an abort at a random moment) and checks the invariants at every
/// point: never more hosts out of service than allowed, nobody past a
/// canary that has not ended, nothing new once stopped, always an end.
#[test]
fn random_rollouts_keep_every_invariant() {
    for seed in 1..=3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let n = 1 + rng.below(6) as usize;
        let canaries = rng.below(3) as usize;
        let l = Limits {
            max_parallel: 1 + rng.below(3) as u32,
            max_failures: rng.below(3) as u32,
            auto_rollback: rng.chance(70),
            accepted_failures: 0,
            accepted_canary_failures: 0,
        };
        let plan = batches(n, canaries, l.max_parallel);
        let mut s: Vec<Step> = plan
            .iter()
            .enumerate()
            .map(|(i, (_, canary))| Step {
                host: format!("h{i}"),
                canary: *canary,
                phase: Pending,
            })
            .collect();
        let upgrade_ok: Vec<bool> = (0..n).map(|_| rng.chance(70)).collect();
        let rollback_ok: Vec<bool> = (0..n).map(|_| rng.chance(85)).collect();
        let mut state = RolloutState::Running;
        let mut busy: Vec<(usize, Action, bool)> = Vec::new();
        let mut tried = BTreeSet::new();
        let ctx = format!("seed {seed}: {l:?}");
        let mut finished = None;
        for _ in 0..1000 {
            if state == RolloutState::Running && rng.chance(3) {
                state = RolloutState::Aborting;
            }
            if rng.chance(3) {
                busy.clear(); // the controller died; its tasks are gone
                tried.clear();
            }
            let busy_hosts: BTreeSet<String> =
                busy.iter().map(|(i, _, _)| s[*i].host.clone()).collect();
            let stopped = state == RolloutState::Running && stop_reason(&l, &s).is_some();
            for action in decide(state, &l, &s, &busy_hosts, &tried) {
                match &action {
                    Action::Finish(end, _) => finished = Some(*end),
                    Action::Upgrade(h) => {
                        assert!(!stopped, "{ctx}: upgrade after a stop");
                        let i = index(&s, h);
                        assert_eq!(s[i].phase, Staged, "{ctx}");
                        assert!(
                            s[i].canary || s.iter().all(|x| !x.canary || x.phase.has_ended()),
                            "{ctx}: {h} started before the canaries ended"
                        );
                    }
                    _ => {}
                }
                if let Action::Stage(h)
                | Action::Upgrade(h)
                | Action::RollBack(h)
                | Action::Verify(h)
                | Action::Observe(h) = &action
                {
                    assert!(!busy_hosts.contains(h), "{ctx}: {h} given two tasks");
                    busy.push((index(&s, h), action.clone(), false));
                }
            }
            let down = s.iter().filter(|x| out_of_service(x.phase)).count() as u32;
            assert!(
                down <= l.max_parallel,
                "{ctx}: {down} hosts out of service: {s:?}"
            );
            if let Some(end) = finished {
                assert!(busy.is_empty(), "{ctx}: finished with tasks running");
                match end {
                    RolloutState::Succeeded => assert!(s.iter().all(|x| x.phase == Done)),
                    RolloutState::Aborted => {
                        assert!(
                            s.iter()
                                .all(|x| !matches!(x.phase, Done | Swapping | Verifying))
                        )
                    }
                    RolloutState::Paused => assert_eq!(state, RolloutState::Running),
                    _ => {}
                }
                break;
            }
            if busy.is_empty() {
                continue;
            }
            // A task runs (recording the phase it enters: not necessarily
            // before the next decision), or one that runs ends.
            let pick = rng.below(busy.len() as u64) as usize;
            if !busy[pick].2 {
                let (i, action, _) = &busy[pick];
                let entered = match action {
                    Action::Stage(_) => Some(Staging),
                    Action::Upgrade(_) => Some(Swapping),
                    Action::RollBack(_) => Some(RollingBack),
                    _ => None,
                };
                if let Some(phase) = entered {
                    s[*i].phase = phase;
                }
                busy[pick].2 = true;
                let down = s.iter().filter(|x| out_of_service(x.phase)).count() as u32;
                assert!(
                    down <= l.max_parallel,
                    "{ctx}: {down} hosts out of service: {s:?}"
                );
                continue;
            }
            let (i, action, _) = busy.remove(pick);
            let rolled = |ok: bool| if ok { RolledBack } else { Failed };
            s[i].phase = match action {
                Action::Stage(_) => Staged,
                Action::Upgrade(_) | Action::Verify(_) if upgrade_ok[i] => Done,
                Action::Upgrade(_) | Action::Verify(_) if l.auto_rollback => rolled(rollback_ok[i]),
                Action::Upgrade(_) | Action::Verify(_) => Failed,
                Action::RollBack(_) => {
                    tried.insert(s[i].host.clone());
                    rolled(rollback_ok[i])
                }
                Action::Observe(_) => {
                    let runs = [Runs::Target, Runs::Previous, Runs::Other][rng.below(3) as usize];
                    reconcile(
                        Observed {
                            runs,
                            healthy: rng.chance(60),
                        },
                        l.auto_rollback,
                        state == RolloutState::Aborting,
                    )
                }
                Action::Finish(..) => unreachable!(),
            };
        }
        assert!(finished.is_some(), "{ctx}: never finished: {s:?}");
    }
}
