//! Writing the new files: atomically, one after the other, only once the
//! journal durably says so (`Begun { write }`) and, under a target lock,
//! once the lock says `writing`.

use std::collections::BTreeSet;

use super::commit::{CleaningUp, End};
use super::retry::Retry;
use super::{Action, Failure, Fold, Next, RestoreRequest, Shared, Unfit, WriteRequest, begun_first, reload, rollback};
use crate::event::Event;
use crate::lock::LockPhase;
use crate::model::{Role, Timestamp};
use crate::step::Step;

/// Writing the planned files. Begun once `Touched::files` is set.
#[derive(Clone, Debug, Default)]
pub(super) struct Writing {
    /// The files written so far.
    written: BTreeSet<Role>,
    /// The target lock says `writing`.
    lock_stated: bool,
    pub(super) retry: Option<Retry>,
}

impl Writing {
    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        let begun = cx.touched.files;
        if !begun && now >= cx.deadline() {
            return Next::Record(Event::GaveUp {
                step: Step::Write,
                reason: "deadline passed before the first write".into(),
            });
        }
        begun_first(Step::Write, begun, || {
            if let Some(a) = cx.lock_rewrite(LockPhase::Writing, self.lock_stated) {
                return Next::Perform(a);
            }
            if let Some(revert) = &cx.plan.revert {
                let files = revert
                    .files
                    .iter()
                    .filter(|f| !self.written.contains(&f.role))
                    .map(|f| RestoreRequest {
                        role: f.role,
                        live_path: f.before.live_path.clone(),
                        pre: f.before.pre.clone(),
                    })
                    .collect();
                return Next::Perform(Action::Reinstate { deployment_id: cx.plan.deployment_id.clone(), files });
            }
            let files = cx
                .plan
                .files
                .iter()
                .filter(|f| !self.written.contains(&f.role))
                .map(|f| WriteRequest { role: f.role, live_path: cx.live_path(f.role), mode: f.mode })
                .collect();
            Next::Perform(Action::Write { deployment_id: cx.plan.deployment_id.clone(), files })
        })
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        let begun = cx.touched.files;
        match event {
            Event::Begun { step: Step::Write } => {
                cx.touched.files = true;
                Ok(None)
            }
            Event::LockPhase { phase: LockPhase::Writing } if cx.plan.lock.is_some() => {
                self.lock_stated = true;
                self.retry = None;
                Ok(None)
            }
            Event::Written { role } if begun => {
                self.written.insert(*role);
                Ok(cx.plan.roles().all(|r| self.written.contains(&r)).then(|| reload::validate_then_reload(cx)))
            }
            Event::StepFailed { step: Step::Write, role, error } if begun => {
                if error.is_transient() {
                    self.retry = Some(cx.retry(Step::Write, error));
                    return Ok(None);
                }
                let summary = format!("{} failed", cx.place(Step::Write, *role));
                Ok(Some(rollback::start(Failure::new(Step::Write, summary, &error.message), false)))
            }
            Event::StepFailed { step: Step::Lock, error, .. } => {
                rollback::after_lock_step_failed(&mut self.retry, cx, error)
            }
            Event::GaveUp { step, reason } => {
                let failure = Failure::new(*step, format!("{step} gave up"), reason);
                // Nothing written yet: only the backups to remove.
                Ok(Some(if begun { rollback::start(failure, false) } else { CleaningUp::state(End::Failed(failure)) }))
            }
            _ => Err(Unfit),
        }
    }
}
