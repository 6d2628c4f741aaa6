//! Another process takes the attempt on: this worker after a restart
//! (`Recovering`), or another worker that found this attempt's target lock
//! expired (`TakenOver`). Either way, whatever may have changed the host is
//! rolled back and the redelivered request deploys afresh; an attempt that
//! got as far as its reload verifies again instead.

use super::commit::{CleaningUp, End};
use super::{Deployment, Failure, Fold, Shared, State, Unfit, rollback};
use crate::model::{Role, Timestamp};
use crate::snapshot::Snapshot;
use crate::step::Step;

impl Deployment {
    /// `Recovering`: decide per phase.
    pub(super) fn mark_recovering(&mut self, at: Timestamp) {
        let cx = &mut self.shared;
        cx.needs_mark = false;
        cx.recovered_at = Some(at);
        cx.transient_errors.clear();
        self.state.drop_retry();
        let step = self.state.step();
        let next = match &mut self.state {
            // Nothing written yet: remove this attempt's backups; the
            // redelivered request starts afresh.
            State::Snapshot(_) | State::Check(_) | State::PreVerify(_) => Some(CleaningUp::state(End::Abandon)),
            State::Write(_) | State::Validate(_) | State::Reload(_) => {
                // --- planted bug for the mutation tests (feature `mutations`) ---
                #[cfg(feature = "mutations")]
                let skip_rollback = crate::mutation::active(crate::mutation::Mutation::RecoveryWithoutRollback);
                #[cfg(not(feature = "mutations"))]
                let skip_rollback = false;
                // --- end of planted bug ---
                if (cx.touched.files || cx.touched.daemon) && !skip_rollback {
                    let failure = Failure::new(
                        step,
                        format!("worker stopped during {step}"),
                        "interrupted before the outcome was journaled",
                    );
                    Some(rollback::start(failure, true))
                } else {
                    Some(CleaningUp::state(End::Abandon))
                }
            }
            // Reload succeeded, verify pending: verify again from now.
            State::Verify(v) => {
                v.check.restart(at);
                None
            }
            State::VerifyOriginal(v) => {
                v.check.restart(at);
                None
            }
            // Rolling back, committing, cleaning up, finishing: carry on.
            State::Cleanup(_)
            | State::Commit(_)
            | State::Restore(_)
            | State::RetryReload(_)
            | State::Finishing(_)
            | State::Done(_) => None,
        };
        if let Some(next) = next {
            self.state = next;
        }
    }
}

/// `TakenOver`, right after `Started`: another worker's interrupted
/// attempt, with the snapshots its target lock carried. How far it got is
/// unknown: assume the new files were written and a reload started (a
/// retry-reload of the originals is harmless; a missing one could leave the
/// daemon on the new files), and roll back.
pub(super) fn taken_over(cx: &mut Shared, from: &str, snapshots: &[(Role, Snapshot)]) -> Fold {
    let roles_match =
        snapshots.len() == cx.plan.files.len() && cx.plan.roles().all(|r| snapshots.iter().any(|(s, _)| *s == r));
    if !cx.snapshots.is_empty() || !roles_match {
        return Err(Unfit);
    }
    cx.snapshots = snapshots.iter().cloned().collect();
    cx.touched.files = true;
    cx.touched.daemon = true;
    let failure = Failure::new(
        Step::Write,
        format!("{from} stopped during this deployment and its target lock expired"),
        "taken over by another worker, which rolled the host back",
    );
    Ok(Some(rollback::start(failure, true)))
}
