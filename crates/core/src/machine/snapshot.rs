//! The first phase: back up every planned path (a hard link and its hash)
//! before anything is written, then decide whether there is anything to do.

use super::commit::{CleaningUp, End};
use super::retry::Retry;
use super::verify::PreVerifying;
use super::write::Writing;
use super::{Action, Failure, Fold, Next, Shared, SnapshotRequest, State, Unfit, recovery};
use crate::event::Event;
use crate::model::{FilePlan, Plan, Role, Timestamp};
use crate::snapshot::PreState;
use crate::step::Step;

/// Snapshotting the planned paths (`Shared::snapshots` fills up).
#[derive(Clone, Debug, Default)]
pub(super) struct Snapshotting {
    pub(super) retry: Option<Retry>,
}

impl Snapshotting {
    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        if now >= cx.deadline() {
            return Next::Record(Event::GaveUp {
                step: Step::Snapshot,
                reason: "deadline passed before the snapshot".into(),
            });
        }
        let files = cx
            .plan
            .files
            .iter()
            .filter(|f| !cx.snapshots.contains_key(&f.role))
            .map(|f| SnapshotRequest { role: f.role, path: f.path.clone() })
            .collect();
        Next::Perform(Action::Snapshot { deployment_id: cx.plan.deployment_id.clone(), files })
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        match event {
            Event::Snapshotted { role, snapshot } if cx.plan.file(*role).is_some() => {
                cx.snapshots.insert(*role, snapshot.clone());
                self.retry = None;
                Ok(cx.plan.roles().all(|r| cx.snapshots.contains_key(&r)).then(|| decide(cx)))
            }
            Event::StepFailed { step: Step::Snapshot, role, error } => {
                if error.is_transient() {
                    self.retry = Some(cx.retry(Step::Snapshot, error));
                    return Ok(None);
                }
                let summary = format!("{} failed", cx.place(Step::Snapshot, *role));
                Ok(Some(CleaningUp::state(End::Failed(Failure::new(Step::Snapshot, summary, &error.message)))))
            }
            Event::GaveUp { step, reason } => {
                Ok(Some(CleaningUp::state(End::Failed(Failure::new(*step, format!("{step} gave up"), reason)))))
            }
            Event::TakenOver { from, snapshots } => recovery::taken_over(cx, from, snapshots),
            _ => Err(Unfit),
        }
    }
}

/// Every path is snapshotted: a newer certificate on the host stops the
/// attempt (`superseded`); identical content needs no write, only a check
/// that it is served; anything else is written.
fn decide(cx: &Shared) -> State {
    if let Some(revert) = &cx.plan.revert {
        return super::revert::decide(cx, revert);
    }
    if supersedes(&cx.plan, cx.snapshots.get(&Role::Cert).map(|s| &s.pre)) {
        return CleaningUp::state(End::Superseded);
    }
    let identical = cx.plan.files.iter().all(|f| file_unchanged(f, cx.snapshots.get(&f.role).map(|s| &s.pre)));
    match (identical, &cx.plan.verify) {
        (true, Some(v)) => State::PreVerify(PreVerifying::new(v)),
        (true, None) => CleaningUp::state(End::Unchanged),
        (false, _) => State::Write(Writing::default()),
    }
}

/// Whether the certificate found at the cert path (`cert`: what was there,
/// with its facts read) is newer than the plan's, so that the deployment
/// stops `superseded` (unless the policy allows a downgrade).
pub fn supersedes(plan: &Plan, cert: Option<&PreState>) -> bool {
    matches!(
        (plan.policy.allow_downgrade, plan.new_not_before, cert),
        (false, Some(new_nb), Some(PreState::Existing { cert: Some(facts), .. })) if facts.not_before > new_nb
    )
}

/// Whether the file found at a planned path (`pre`) is already what the
/// plan would write there: same content, same mode.
pub fn file_unchanged(file: &FilePlan, pre: Option<&PreState>) -> bool {
    // A keystore's bytes differ at every build (random salts): one that
    // holds the same aliases, key and certificates under the same password
    // is identical.
    matches!(pre, Some(PreState::Existing { sha256, mode, holds, .. })
        if (*sha256 == file.sha256 || (file.holds.is_some() && *holds == file.holds)) && *mode == file.mode)
}
