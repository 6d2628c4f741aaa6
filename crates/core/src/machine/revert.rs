//! The phase only a revert has, between its snapshot and its write: the
//! live files must still be exactly what the reverted deployment wrote,
//! and the backups it kept must still hold what it found; otherwise the
//! revert ends `failed`, its own backup links removed, nothing changed.

use std::collections::BTreeSet;

use super::commit::{CleaningUp, End};
use super::retry::Retry;
use super::write::Writing;
use super::{Action, Failure, Fold, Next, Shared, SnapshotRequest, State, Unfit};
use crate::event::Event;
use crate::model::{RevertOf, Role, Timestamp};
use crate::snapshot::PreState;
use crate::step::Step;

/// The revert's snapshot is complete: go on only while every live file
/// holds exactly what the reverted deployment wrote there.
pub(super) fn decide(cx: &Shared, revert: &RevertOf) -> State {
    let of = &revert.deployment_id;
    for f in &revert.files {
        let path = &f.before.live_path;
        let problem = match cx.snapshots.get(&f.role) {
            None => Some(format!("{path} was not snapshotted")),
            Some(s) if s.live_path != *path => {
                Some(format!("{} now leads to {}, not to {path} where {of} wrote", f.role, s.live_path))
            }
            Some(s) => match &s.pre {
                PreState::Missing => Some(format!("{path} no longer exists")),
                PreState::Existing { sha256, .. } if *sha256 != f.written => {
                    Some(format!("{path} holds sha256:{sha256}, not what {of} wrote there (sha256:{})", f.written))
                }
                PreState::Existing { .. } => None,
            },
        };
        if let Some(problem) = problem {
            let summary = format!("cannot revert {of}: {path} changed since it was deployed");
            return CleaningUp::state(End::Failed(Failure::new(Step::Snapshot, summary, problem)));
        }
    }
    Checking::state(revert)
}

/// Reading the backups the revert would put back.
#[derive(Clone, Debug, Default)]
pub(super) struct Checking {
    checked: BTreeSet<Role>,
    /// The first backup found missing or changed: the revert fails once
    /// every answer of the batch is in.
    problem: Option<Failure>,
    pub(super) retry: Option<Retry>,
}

/// The backups of `revert`'s files that existed before it (a file that
/// did not is removed, and needs none).
fn backups(revert: &RevertOf) -> impl Iterator<Item = (Role, &String, &crate::model::Digest)> {
    revert.files.iter().filter_map(|f| match &f.before.pre {
        PreState::Existing { backup_path, sha256, .. } => Some((f.role, backup_path, sha256)),
        PreState::Missing => None,
    })
}

impl Checking {
    fn state(revert: &RevertOf) -> State {
        let c = Checking::default();
        c.done(revert).unwrap_or(State::Check(c))
    }

    /// Every backup checked: write (put them back), unless one is gone or
    /// changed.
    fn done(&self, revert: &RevertOf) -> Option<State> {
        if !backups(revert).all(|(r, _, _)| self.checked.contains(&r)) {
            return None;
        }
        Some(match &self.problem {
            Some(failure) => CleaningUp::state(End::Failed(failure.clone())),
            None => State::Write(Writing::default()),
        })
    }

    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        if now >= cx.deadline() {
            return Next::Record(Event::GaveUp {
                step: Step::Snapshot,
                reason: "deadline passed before the backups were checked".into(),
            });
        }
        let Some(revert) = &cx.plan.revert else {
            return Next::Record(Event::GaveUp { step: Step::Snapshot, reason: "not a revert".into() });
        };
        let files = backups(revert)
            .filter(|(r, _, _)| !self.checked.contains(r))
            .map(|(role, path, _)| SnapshotRequest { role, path: path.clone() })
            .collect();
        Next::Perform(Action::CheckBackups { files })
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        let Some(revert) = cx.plan.revert.clone() else { return Err(Unfit) };
        let of = &revert.deployment_id;
        let failed = |summary: String, detail: String| {
            Ok(Some(CleaningUp::state(End::Failed(Failure::new(Step::Snapshot, summary, detail)))))
        };
        match event {
            Event::BackupChecked { role, sha256 } => {
                let Some((_, path, want)) = backups(&revert).find(|(r, _, _)| r == role) else { return Err(Unfit) };
                self.retry = None;
                let problem = match sha256 {
                    Some(d) if d == want => None,
                    Some(d) => Some(Failure::new(
                        Step::Snapshot,
                        format!("cannot revert {of}: its backup {path} changed"),
                        format!("it holds sha256:{d}, not the sha256:{want} {of} backed up"),
                    )),
                    None => Some(Failure::new(
                        Step::Snapshot,
                        format!("cannot revert {of}: its backup {path} is gone"),
                        "pruned or removed since (keep_backups decides how many backups a deployment keeps)",
                    )),
                };
                if self.problem.is_none() {
                    self.problem = problem;
                }
                self.checked.insert(*role);
                Ok(self.done(&revert))
            }
            Event::StepFailed { step: Step::Snapshot, role, error } => {
                if error.is_transient() {
                    self.retry = Some(cx.retry(Step::Snapshot, error));
                    return Ok(None);
                }
                let what = role
                    .and_then(|r| backups(&revert).find(|(x, _, _)| *x == r).map(|(_, p, _)| p.clone()))
                    .unwrap_or_else(|| "a backup".into());
                failed(format!("cannot revert {of}: reading its backup {what} failed"), error.message.clone())
            }
            Event::GaveUp { step, reason } => failed(format!("{step} gave up"), reason.clone()),
            _ => Err(Unfit),
        }
    }
}
