//! One process driving one rollout: reads the record, asks `decide`, runs
//! each action as a host task, goes round again (every second at least, so
//! an `--abort` written by another process is seen).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::RolloutError;
use super::decide::{Action, decide};
use super::host::{Ctx, HostTarget, HostTask};
use super::run::{RECHECK, RolloutOutcome, only, steps_of};
use super::{EventSink, RolloutEvent, RolloutParams};
use crate::deployment::run::obtain_token;
use crate::deployment::{ImToken, TokenSource};
use crate::fleet::Fleet;
use crate::pbx::PbxClient;
use crate::store::{HostRecord, Rollout, RolloutState, StepPhase};

/// One process driving one rollout.
pub(super) struct Driver<'a> {
    fleet: &'a Fleet,
    hosts: BTreeMap<String, HostRecord>,
    targets: Vec<HostTarget>,
    ctx: Ctx<'a>,
}

impl<'a> Driver<'a> {
    pub(super) fn new(
        fleet: &'a Fleet,
        rollout: i64,
        params: &'a RolloutParams,
        targets: Vec<HostTarget>,
        events: &'a EventSink,
        pbx: Option<&'a PbxClient>,
    ) -> Driver<'a> {
        Driver {
            fleet,
            hosts: BTreeMap::new(),
            targets,
            ctx: Ctx {
                store: fleet.store(),
                rollout,
                params,
                pbx,
                events,
                phases: Arc::new(Mutex::new(Vec::new())),
            },
        }
    }

    pub(super) async fn run(
        mut self,
        token_source: &TokenSource,
    ) -> Result<RolloutOutcome, RolloutError> {
        let id = self.ctx.rollout;
        for target in &self.targets {
            let host = self.fleet.host(&target.host).await?;
            self.hosts.insert(target.host.clone(), host);
        }
        let mut token: Option<ImToken> = None;
        let mut busy = BTreeSet::new();
        let mut tried = BTreeSet::new();
        let mut fatal: Option<RolloutError> = None;
        let mut tasks = FuturesUnordered::new();
        let this = &self;
        'drive: loop {
            let rollout = this
                .ctx
                .store
                .rollout(id)
                .await?
                .ok_or(RolloutError::NoActive("drive"))?;
            *this.ctx.phases.lock().unwrap_or_else(|p| p.into_inner()) = rollout
                .steps
                .iter()
                .map(|s| (s.host.clone(), s.phase))
                .collect();
            let aborting = rollout.state == RolloutState::Aborting;
            if fatal.is_none() {
                for action in decide(
                    rollout.state,
                    &this.ctx.params.limits,
                    &steps_of(&rollout),
                    &busy,
                    &tried,
                ) {
                    let host = match &action {
                        Action::Finish(state, detail) => {
                            // Only from the state decided on: an --abort
                            // written meanwhile is not overwritten.
                            let from = only(rollout.state);
                            if !this
                                .ctx
                                .store
                                .move_rollout(id, from, *state, detail)
                                .await?
                            {
                                continue 'drive;
                            }
                            (this.ctx.events)(RolloutEvent::Finished {
                                rollout: id,
                                state: *state,
                                detail: detail.clone(),
                            });
                            return Ok(this.ctx.store.rollout(id).await?.unwrap_or(rollout));
                        }
                        Action::Stage(h)
                        | Action::Observe(h)
                        | Action::Upgrade(h)
                        | Action::Verify(h)
                        | Action::RollBack(h) => h.clone(),
                    };
                    let needs_token = !matches!(action, Action::Stage(_));
                    if needs_token && token.is_none() {
                        // As late as it can be: a new token revokes the old one.
                        let obtained = match obtain_token(token_source, this.ctx.pbx).await {
                            Ok((t, _)) => this.check_token(&rollout, &t).await.map(|()| t),
                            Err(e) => Err(RolloutError::Token(e.to_string())),
                        };
                        match obtained {
                            Ok(t) => token = Some(t),
                            Err(e) => {
                                fatal = Some(e);
                                break;
                            }
                        }
                    }
                    busy.insert(host.clone());
                    tasks.push(this.task(host, action, token.clone(), aborting));
                }
            }
            if tasks.is_empty() {
                let cause = fatal.take().unwrap_or_else(|| {
                    RolloutError::Usage(format!(
                        "rollout {id} is {} with nothing to do",
                        rollout.state.as_str()
                    ))
                });
                if !rollout.state.is_active() || rollout.state == RolloutState::Paused {
                    return Ok(rollout);
                }
                return Err(RolloutError::Stopped {
                    id,
                    cause: Box::new(cause),
                });
            }
            tokio::select! {
                Some((host, rolled_back, result)) = tasks.next() => {
                    busy.remove(&host);
                    if rolled_back {
                        tried.insert(host);
                    }
                    if let Err(e) = result {
                        fatal.get_or_insert(e);
                    }
                }
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// A resumed rollout must install the token it started with: hosts it
    /// finished run it (their recorded configuration says so).
    async fn check_token(&self, rollout: &Rollout, token: &ImToken) -> Result<(), RolloutError> {
        for step in rollout.steps.iter().filter(|s| s.phase == StepPhase::Done) {
            let Some(target) = self.targets.iter().find(|t| t.host == step.host) else {
                continue;
            };
            let recorded = self.ctx.store.deployment(&step.host).await?;
            let want = self.ctx.hash_of(&step.host, &target.to, token)?;
            if recorded.is_some_and(|r| r.config_hash != want) {
                return Err(RolloutError::Token(format!(
                    "it is not the token this rollout installed on {}; give the one it was started with",
                    step.host
                )));
            }
        }
        Ok(())
    }

    /// One action on one host; says whether it was a rollback.
    async fn task(
        &self,
        host: String,
        action: Action,
        token: Option<ImToken>,
        aborting: bool,
    ) -> (String, bool, Result<(), RolloutError>) {
        let rollback = matches!(action, Action::RollBack(_));
        let result = async {
            let target = self
                .targets
                .iter()
                .find(|t| t.host == host)
                .ok_or_else(|| RolloutError::Usage(format!("{host} is not in the rollout")))?;
            let record = &self.hosts[&host];
            let agent = match self.fleet.connect(record).await {
                Ok(agent) => agent,
                // A host caught mid-way that cannot be reached is failed (it
                // holds its slot); it does not stop the rest for good.
                Err(e) if !matches!(action, Action::Stage(_) | Action::Upgrade(_)) => {
                    let detail = format!("agent unreachable: {}", crate::error_chain(&e));
                    return self.ctx.set(&host, StepPhase::Failed, &detail).await;
                }
                Err(e) => return Err(RolloutError::Deploy(host.clone(), Box::new(e.into()))),
            };
            let task = HostTask {
                ctx: &self.ctx,
                target,
                agent,
            };
            let token = || {
                token
                    .as_ref()
                    .ok_or_else(|| RolloutError::Token("not obtained".into()))
            };
            match &action {
                Action::Stage(_) => task.stage().await,
                Action::Upgrade(_) => task.upgrade(token()?).await,
                Action::Verify(_) => task.verify(token()?).await,
                Action::Observe(_) => task.observe(token()?, aborting).await,
                Action::RollBack(_) => {
                    let reason = if aborting {
                        "rollout aborted"
                    } else {
                        "restoring the previous version (resumed)"
                    };
                    task.roll_back(token()?, reason).await
                }
                Action::Finish(..) => Ok(()),
            }
        }
        .await;
        (host, rollback, result)
    }
}
