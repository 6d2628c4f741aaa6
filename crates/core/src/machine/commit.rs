//! The two ways out that need one more host operation: committing a
//! deployment (prune old backups, under a lock that says `committing`) and
//! cleaning up after an attempt that wrote nothing (remove its backups).

use super::finish::{Ending, Finishing};
use super::retry::Retry;
use super::{Action, Failure, Fold, Next, Shared, State, Unfit, begun_first, rollback};
use crate::event::Event;
use crate::lock::LockPhase;
use crate::step::Step;

/// Deployed (and verified): prune backups beyond retention.
#[derive(Clone, Debug, Default)]
pub(super) struct Committing {
    begun: bool,
    /// The target lock says `committing`.
    lock_stated: bool,
    pub(super) retry: Option<Retry>,
}

impl Committing {
    pub(super) fn next(&self, cx: &Shared) -> Next {
        begun_first(Step::Commit, self.begun, || {
            if let Some(a) = cx.lock_rewrite(LockPhase::Committing, self.lock_stated) {
                return Next::Perform(a);
            }
            Next::Perform(Action::Prune {
                deployment_id: cx.plan.deployment_id.clone(),
                live_paths: cx.plan.files.iter().map(|f| cx.live_path(f.role)).collect(),
                keep: cx.plan.policy.keep_backups.max(1),
            })
        })
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        match event {
            Event::Begun { step: Step::Commit } => {
                self.begun = true;
                Ok(None)
            }
            Event::LockPhase { phase: LockPhase::Committing } if cx.plan.lock.is_some() => {
                self.lock_stated = true;
                self.retry = None;
                Ok(None)
            }
            Event::Pruned { error } if self.begun => Ok(Some(Ending::Deployed { prune_error: error.clone() }.state())),
            Event::StepFailed { step: Step::Lock, error, .. } => {
                rollback::after_lock_step_failed(&mut self.retry, cx, error)
            }
            // Deployed, but the target lock cannot say so: not committed.
            Event::GaveUp { step, reason } => {
                let failure = Failure::new(*step, "recording the commit in the target lock gave up", reason);
                Ok(Some(rollback::start(failure, false)))
            }
            _ => Err(Unfit),
        }
    }
}

/// How an attempt that wrote nothing ends, once its backups are removed.
#[derive(Clone, Debug)]
pub(super) enum End {
    Failed(Failure),
    Superseded,
    Unchanged,
    /// Recovery stopped it before anything was written: the redelivered
    /// request starts afresh.
    Abandon,
}

/// Removing this attempt's backups, then ending.
#[derive(Clone, Debug)]
pub(super) struct CleaningUp {
    end: End,
}

impl CleaningUp {
    pub(super) fn state(end: End) -> State {
        State::Cleanup(CleaningUp { end })
    }

    pub(super) fn next(&self, cx: &Shared) -> Next {
        Next::Perform(Action::RemoveBackups {
            deployment_id: cx.plan.deployment_id.clone(),
            paths: cx.plan.files.iter().map(|f| f.path.clone()).collect(),
        })
    }

    pub(super) fn apply(&mut self, event: &Event) -> Fold {
        let Event::BackupsRemoved { error } = event else { return Err(Unfit) };
        let cleanup_error = error.clone();
        Ok(Some(match &self.end {
            End::Failed(failure) => Ending::Failed { failure: failure.clone(), cleanup_error }.state(),
            End::Superseded => Ending::Superseded { cleanup_error }.state(),
            End::Unchanged => Ending::Unchanged { cleanup_error }.state(),
            // Stopped at or before its first write: the reason names the write.
            End::Abandon => State::Finishing(Finishing::Abandon { step: Step::Write }),
        }))
    }
}
