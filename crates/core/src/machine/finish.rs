//! The end of an attempt: the report of what happened, or `Abandoned` when
//! recovery put the host back and the redelivered request deploys afresh.

use super::rollback::Restored;
use super::{Failure, Next, Shared, State};
use crate::event::Event;
use crate::model::{Role, Timestamp};
use crate::report::{BackupStatus, Details, FailedStep, Outcome, Report};
use crate::snapshot::PreState;
use crate::step::{Step, truncate_output};

/// How the attempt ends.
#[derive(Clone, Debug)]
pub(super) enum Finishing {
    /// Publish the report.
    Report(Ending),
    /// Recovery stopped the attempt and the host is as it was before: no
    /// report, the redelivered request deploys afresh.
    Abandon {
        /// The step the attempt was stopped in.
        step: Step,
    },
    /// The validate or reload this attempt shared with `with` deployments
    /// failed and the host is as it was before: no report, the deployment
    /// runs again alone.
    Alone { failure: Failure, with: u32 },
}

/// An outcome with what its report needs.
#[derive(Clone, Debug)]
pub(super) enum Ending {
    Deployed {
        prune_error: Option<String>,
    },
    Unchanged {
        cleanup_error: Option<String>,
    },
    Superseded {
        cleanup_error: Option<String>,
    },
    /// Nothing written.
    Failed {
        failure: Failure,
        cleanup_error: Option<String>,
    },
    RolledBack {
        failure: Failure,
        restored: Restored,
        /// Whether the original certificate is served again (when checked).
        original_verified: Option<bool>,
    },
    RolledBackDaemonUnknown {
        failure: Failure,
        restored: Restored,
        retry_reload_error: String,
    },
    RollbackFailed {
        failure: Failure,
        restored: Restored,
    },
}

impl Finishing {
    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        match self {
            Finishing::Report(ending) => Next::Record(Event::Finished { report: ending.report(cx, now) }),
            Finishing::Abandon { step } => Next::Record(Event::Abandoned {
                reason: format!(
                    "a worker stopped during {step}; the host was rolled back to its pre-deploy state and the request will deploy afresh"
                ),
            }),
            Finishing::Alone { failure, with } => Next::Record(Event::Abandoned {
                reason: format!(
                    "the {} shared by {with} deployments failed{}; rolled back to the pre-deploy state, deploying again alone",
                    failure.step,
                    failure.detail_suffix()
                ),
            }),
        }
    }
}

impl Ending {
    pub(super) fn state(self) -> State {
        State::Finishing(Finishing::Report(self))
    }

    fn report(&self, cx: &Shared, now: Timestamp) -> Report {
        let plan = &cx.plan;
        let host = &plan.host;
        let mut details = Details { recovered: cx.recovered_at.is_some(), ..Details::default() };
        let (outcome, restored, message) = match self {
            Ending::Deployed { prune_error } => {
                details.prune_error = prune_error.clone();
                match &plan.revert {
                    Some(r) => {
                        let message = format!(
                            "deployment {} reverted on {host}: the files it replaced are back{}",
                            r.deployment_id,
                            if plan.verify.is_some() { " and the old certificate is served" } else { "" }
                        );
                        (Outcome::Reverted, None, message)
                    }
                    None => (Outcome::Deployed, None, format!("certificate deployed to {host}")),
                }
            }
            Ending::Unchanged { cleanup_error } => {
                details.backup_cleanup_error = cleanup_error.clone();
                (Outcome::Unchanged, None, format!("certificate already deployed on {host}; nothing written"))
            }
            Ending::Superseded { cleanup_error } => {
                details.backup_cleanup_error = cleanup_error.clone();
                let (old, new) = match (cx.snapshots.get(&Role::Cert).map(|s| &s.pre), plan.new_not_before) {
                    (Some(PreState::Existing { cert: Some(c), .. }), Some(n)) => (c.not_before, n),
                    _ => (0, 0),
                };
                details.existing_not_before = Some(old);
                details.new_not_before = Some(new);
                let message = format!(
                    "{host} already has a newer certificate at {} (notBefore {old} > {new}); nothing written",
                    cx.live_path(Role::Cert)
                );
                (Outcome::Superseded, None, message)
            }
            Ending::Failed { failure, cleanup_error } => {
                details.backup_cleanup_error = cleanup_error.clone();
                failure.describe(&mut details);
                let message = format!("{} on {host}; nothing written{}", failure.summary, failure.detail_suffix());
                (Outcome::Failed, None, message)
            }
            Ending::RolledBack { failure, restored, original_verified } => {
                failure.describe(&mut details);
                details.rolled_back = Some(true);
                details.original_verified = *original_verified;
                let message =
                    format!("{}; rolled back to pre-deploy state{}", failure.summary, failure.detail_suffix());
                (Outcome::RolledBack, Some(restored), message)
            }
            Ending::RolledBackDaemonUnknown { failure, restored, retry_reload_error } => {
                failure.describe(&mut details);
                details.rolled_back = Some(true);
                details.daemon_state_unknown = true;
                details.retry_reload_error = Some(truncate_output(retry_reload_error));
                let message = format!(
                    "{}; rolled back files; retry-reload also failed; daemon may need manual restart{}; retry-reload: {retry_reload_error}",
                    failure.summary,
                    failure.detail_suffix()
                );
                (Outcome::RolledBackDaemonUnknown, Some(restored), message)
            }
            Ending::RollbackFailed { failure, restored } => {
                failure.describe(&mut details);
                details.rolled_back = Some(false);
                details.manual_action_required = true;
                let errors: Vec<String> = restored
                    .iter()
                    .filter(|(_, (s, _))| !s.ok())
                    .map(|(r, (s, e))| format!("{r} {}: {}", s.as_str(), e.as_deref().unwrap_or_default()))
                    .collect();
                let rollback_error = errors.join("; ");
                details.rollback_error = Some(truncate_output(&rollback_error));
                // The backups of the files not restored stay for the operator.
                for (role, s) in &cx.snapshots {
                    if let PreState::Existing { backup_path, .. } = &s.pre
                        && restored.get(role).is_some_and(|(st, _)| !st.ok())
                    {
                        details.backups_left.insert(*role, backup_path.clone());
                    }
                }
                let left: Vec<&str> = details.backups_left.values().map(String::as_str).collect();
                let left =
                    if left.is_empty() { String::new() } else { format!("; backups left at {}", left.join(", ")) };
                let message = format!(
                    "{}{}; rollback failed on {host}: {rollback_error}; manual action required{left}",
                    failure.summary,
                    failure.detail_suffix()
                );
                (Outcome::RollbackFailed, Some(restored), message)
            }
        };
        // The extra files (bundle, keystore) only when the plan has them, so
        // that results of targets without them read as before.
        let extra = Role::EXTRA.into_iter().filter(|r| plan.file(*r).is_some());
        details.backups = Role::ALL.into_iter().chain(extra).map(|r| (r, backup_status(cx, restored, r))).collect();
        Report {
            deployment_id: plan.deployment_id.clone(),
            target: plan.target.clone(),
            host: host.clone(),
            outcome,
            message,
            details: Box::new(details),
            attempts: plan.attempt,
            reload_shared_with: cx.shared_with,
            started_at: cx.started_at,
            finished_at: now.max(cx.last_at),
            reverts: plan.revert.as_ref().map(|r| r.deployment_id.clone()),
        }
    }
}

/// What became of `role`'s pre-deploy file: what the rollback's restore
/// did, if one ran, else what the snapshot found.
fn backup_status(cx: &Shared, restored: Option<&Restored>, role: Role) -> BackupStatus {
    if cx.plan.file(role).is_none() {
        return BackupStatus::NotApplicable;
    }
    match restored.filter(|r| !r.is_empty()) {
        Some(r) => r.get(&role).map_or(BackupStatus::NotApplicable, |(s, _)| BackupStatus::Rollback(*s)),
        None => match cx.snapshots.get(&role).map(|s| &s.pre) {
            Some(PreState::Existing { .. }) => BackupStatus::Snapshotted,
            Some(PreState::Missing) => BackupStatus::NoPreExisting,
            None => BackupStatus::NotApplicable,
        },
    }
}

impl Failure {
    /// The failure's part of the report: the step, and the command's or
    /// the check's error where the outcome has a key for it.
    fn describe(&self, details: &mut Details) {
        details.failed_step = Some(FailedStep::Step(self.step));
        match self.step {
            Step::Reload | Step::Verify => details.reload_error = Some(truncate_output(&self.detail)),
            Step::Validate => details.validate_error = Some(truncate_output(&self.detail)),
            _ => {}
        }
    }

    /// `: <detail>` when there is one.
    fn detail_suffix(&self) -> String {
        if self.detail.is_empty() { String::new() } else { format!(": {}", self.detail) }
    }
}
