//! Putting the host back: restore every file from its snapshot, reload the
//! daemon again if a reload may have run, and check that the original
//! certificate is served again.

use std::collections::BTreeMap;

use super::finish::{Ending, Finishing};
use super::retry::Retry;
use super::verify::Check;
use super::{Action, Failure, Fold, Next, RestoreRequest, Shared, State, Unfit, begun_first};
use crate::event::Event;
use crate::model::{Role, Timestamp};
use crate::snapshot::{PreState, RestoreStatus};
use crate::step::{Step, StepError};

/// Per file: what restoring it did (and why it failed).
pub(super) type Restored = BTreeMap<Role, (RestoreStatus, Option<String>)>;

/// Why the host is being put back, and what putting it back did so far.
#[derive(Clone, Debug)]
struct Rollback {
    failure: Failure,
    /// Recovery (not a failure) started it: when it succeeds the attempt
    /// is abandoned instead of reported, and the redelivery deploys afresh.
    abandon: bool,
    /// A validate or reload shared by this many deployments failed: when
    /// the rollback succeeds the attempt ends without a result, and the
    /// deployment runs again alone.
    alone: Option<u32>,
    restored: Restored,
}

impl Rollback {
    /// The files are back and the daemon serves them (as far as checked).
    fn rolled_back(&self, original_verified: Option<bool>) -> State {
        if let Some(with) = self.alone {
            return State::Finishing(Finishing::Alone { failure: self.failure.clone(), with });
        }
        if self.abandon {
            return State::Finishing(Finishing::Abandon { step: self.failure.step });
        }
        let (failure, restored) = (self.failure.clone(), self.restored.clone());
        Ending::RolledBack { failure, restored, original_verified }.state()
    }
}

/// Start rolling back.
pub(super) fn start(failure: Failure, abandon: bool) -> State {
    let rollback = Rollback { failure, abandon, alone: None, restored: BTreeMap::new() };
    State::Restore(Restoring { rollback, begun: false, retry: None })
}

/// Start rolling back after the validate or reload shared by `with`
/// deployments failed.
pub(super) fn start_shared(failure: Failure, with: u32) -> State {
    let rollback = Rollback { failure, abandon: false, alone: Some(with), restored: BTreeMap::new() };
    State::Restore(Restoring { rollback, begun: false, retry: None })
}

/// The target lock could not be rewritten while this attempt's files may be
/// on the host (before the write's renames, or to say `committing`): a
/// transient error waits for `retry`, any other rolls back.
pub(super) fn after_lock_step_failed(retry: &mut Option<Retry>, cx: &mut Shared, error: &StepError) -> Fold {
    if error.is_transient() {
        *retry = Some(cx.retry(Step::Lock, error));
        return Ok(None);
    }
    let summary = "recording the deployment in the target lock failed";
    Ok(Some(start(Failure::new(Step::Lock, summary, &error.message), false)))
}

/// Restoring every file from its snapshot (a file that did not exist is
/// removed again).
#[derive(Clone, Debug)]
pub(super) struct Restoring {
    rollback: Rollback,
    begun: bool,
    pub(super) retry: Option<Retry>,
}

impl Restoring {
    pub(super) fn next(&self, cx: &Shared) -> Next {
        begun_first(Step::Restore, self.begun, || {
            let files = cx
                .plan
                .files
                .iter()
                .filter(|f| !self.rollback.restored.contains_key(&f.role))
                .filter_map(|f| {
                    cx.snapshots.get(&f.role).map(|s| RestoreRequest {
                        role: f.role,
                        live_path: s.live_path.clone(),
                        pre: s.pre.clone(),
                    })
                })
                .collect();
            Next::Perform(Action::Restore { deployment_id: cx.plan.deployment_id.clone(), files })
        })
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        match event {
            Event::Begun { step: Step::Restore } => {
                self.begun = true;
                return Ok(None);
            }
            Event::Restored { role, status, error } if cx.plan.file(*role).is_some() => {
                self.rollback.restored.insert(*role, (*status, error.clone()));
            }
            Event::StepFailed { step: Step::Restore, role: Some(role), error } => {
                if error.is_transient() {
                    self.retry = Some(cx.retry(Step::Restore, error));
                    return Ok(None);
                }
                self.rollback.restored.insert(*role, (failed(cx, *role), Some(error.message.clone())));
            }
            // Out of time: every file not restored yet stays as it is.
            Event::GaveUp { reason, .. } => {
                for f in &cx.plan.files {
                    self.rollback.restored.entry(f.role).or_insert_with(|| (failed(cx, f.role), Some(reason.clone())));
                }
            }
            _ => return Err(Unfit),
        }
        Ok(self.after_restore(cx))
    }

    /// Once every file is accounted for: a failed restore needs an
    /// operator; a reload may have run on the new files, so the daemon is
    /// reloaded on the originals; else the rollback is complete.
    fn after_restore(&self, cx: &Shared) -> Option<State> {
        if cx.plan.files.iter().any(|f| !self.rollback.restored.contains_key(&f.role)) {
            return None;
        }
        let rollback = &self.rollback;
        Some(if rollback.restored.values().any(|(s, _)| !s.ok()) {
            let (failure, restored) = (rollback.failure.clone(), rollback.restored.clone());
            Ending::RollbackFailed { failure, restored }.state()
        } else if cx.touched.daemon {
            State::RetryReload(RetryingReload { rollback: rollback.clone(), begun: false, retry: None })
        } else {
            rollback.rolled_back(None)
        })
    }
}

/// How a failed restore of `role` is reported.
fn failed(cx: &Shared, role: Role) -> RestoreStatus {
    match cx.snapshots.get(&role).map(|s| &s.pre) {
        Some(PreState::Missing) => RestoreStatus::RemoveFailed,
        _ => RestoreStatus::RestoreFailed,
    }
}

/// Reloading the daemon on the restored originals.
#[derive(Clone, Debug)]
pub(super) struct RetryingReload {
    rollback: Rollback,
    begun: bool,
    pub(super) retry: Option<Retry>,
}

impl RetryingReload {
    /// This retry-reload follows a failed shared validate or reload: the
    /// members share it too, once every one has restored its files.
    pub(super) fn after_shared_failure(&self) -> bool {
        self.rollback.alone.is_some()
    }

    pub(super) fn next(&self, cx: &Shared) -> Next {
        begun_first(Step::RetryReload, self.begun, || cx.exec(Step::RetryReload, &cx.plan.reload_command))
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        let result = match event {
            Event::Begun { step: Step::RetryReload } => {
                self.begun = true;
                return Ok(None);
            }
            Event::Executed { step: Step::RetryReload, result } if result.success() => Ok(()),
            Event::Executed { step: Step::RetryReload, result } => Err(result.describe()),
            Event::StepFailed { step: Step::RetryReload, error, .. } => {
                if error.is_transient() {
                    self.retry = Some(cx.retry(Step::RetryReload, error));
                    return Ok(None);
                }
                Err(error.message.clone())
            }
            Event::GaveUp { reason, .. } => Err(reason.clone()),
            _ => return Err(Unfit),
        };
        Ok(Some(self.reloaded(cx, result)))
    }

    /// Reloaded on the originals: check that the original certificate is
    /// served (when there is an endpoint and its fingerprint is known).
    /// Not reloaded: the daemon's state is unknown.
    fn reloaded(&self, cx: &Shared, result: Result<(), String>) -> State {
        let rollback = &self.rollback;
        if let Err(retry_reload_error) = result {
            let (failure, restored) = (rollback.failure.clone(), rollback.restored.clone());
            return Ending::RolledBackDaemonUnknown { failure, restored, retry_reload_error }.state();
        }
        match (&cx.plan.verify, cx.original_leaf()) {
            (Some(v), Some(leaf)) => State::VerifyOriginal(VerifyingOriginal {
                rollback: rollback.clone(),
                check: Check::new(Step::VerifyOriginal, v, leaf, cx.last_at),
            }),
            _ => rollback.rolled_back(None),
        }
    }
}

/// Is the original certificate served again?
#[derive(Clone, Debug)]
pub(super) struct VerifyingOriginal {
    rollback: Rollback,
    pub(super) check: Check,
}

impl VerifyingOriginal {
    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        self.check.next(cx, now)
    }

    pub(super) fn apply(&mut self, cx: &Shared, event: &Event) -> Fold {
        let verified = match event {
            Event::GaveUp { .. } => false,
            event => match self.check.matched(&cx.plan.policy, cx.last_at, event) {
                Some(true) => true,
                Some(false) => return Ok(None),
                None => return Err(Unfit),
            },
        };
        Ok(Some(self.rollback.rolled_back(Some(verified))))
    }
}
