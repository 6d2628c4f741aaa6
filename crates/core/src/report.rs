//! The end of an attempt: its outcome and the report published for it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Role, Timestamp};
use crate::snapshot::RestoreStatus;
use crate::step::Step;

/// Terminal outcomes, exact strings of the result contract.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Deployed,
    Unchanged,
    RolledBack,
    RolledBackDaemonUnknown,
    RollbackFailed,
    Failed,
    Rejected,
    Superseded,
    /// A dry run: the host was read and compared, nothing changed.
    Planned,
    /// A revert put back the files a deployment replaced.
    Reverted,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Deployed,
        Outcome::Unchanged,
        Outcome::RolledBack,
        Outcome::RolledBackDaemonUnknown,
        Outcome::RollbackFailed,
        Outcome::Failed,
        Outcome::Rejected,
        Outcome::Superseded,
        Outcome::Planned,
        Outcome::Reverted,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Unchanged => "unchanged",
            Outcome::RolledBack => "rolled_back",
            Outcome::RolledBackDaemonUnknown => "rolled_back_daemon_unknown",
            Outcome::RollbackFailed => "rollback_failed",
            Outcome::Failed => "failed",
            Outcome::Rejected => "rejected",
            Outcome::Superseded => "superseded",
            Outcome::Planned => "planned",
            Outcome::Reverted => "reverted",
        }
    }
    pub fn success(self) -> bool {
        matches!(self, Outcome::Deployed | Outcome::Unchanged | Outcome::Planned | Outcome::Reverted)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The terminal report of a deployment attempt; the result event is built
/// from it. Journaled in `Finished`, so redeliveries re-publish it verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub deployment_id: String,
    pub target: String,
    pub host: String,
    pub outcome: Outcome,
    pub message: String,
    /// The facts behind the outcome. The result event (and the journal)
    /// spell them as the string map `metadata` ([`Report::metadata`]).
    /// Boxed: they outweigh the rest of the report, which is moved whole
    /// inside small enums.
    #[serde(rename = "metadata")]
    pub details: Box<Details>,
    pub attempts: u32,
    /// How many deployments shared this attempt's validate and reload
    /// (itself included; 1 when alone); `None` when it never got there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_shared_with: Option<u32>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// A revert's report: the deployment it reverts (the result's
    /// `reverts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
}

/// What a report states besides its outcome and message. Each field is
/// one key (or one key per role) of the result's `metadata` map; absent
/// fields are absent keys. The spelling is the wire's (`crate::wire`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "BTreeMap<String, String>", from = "BTreeMap<String, String>")]
pub struct Details {
    /// Per role: what became of the file that was there before
    /// (`backup_status_<role>`).
    pub backups: BTreeMap<Role, BackupStatus>,
    /// Per role: the backup a failed rollback left for the operator
    /// (`backup_path_<role>`).
    pub backups_left: BTreeMap<Role, String>,
    /// The step that failed: on every outcome but a success or `superseded`.
    pub failed_step: Option<FailedStep>,
    /// Why the new certificate is not served: the reload's (or the
    /// verify's) error, truncated like command output.
    pub reload_error: Option<String>,
    /// The validate command's error, truncated like command output.
    pub validate_error: Option<String>,
    /// The retry-reload's error after a rollback, truncated.
    pub retry_reload_error: Option<String>,
    /// Every restore that failed, truncated.
    pub rollback_error: Option<String>,
    /// Removing this attempt's backups failed (nothing was written).
    pub backup_cleanup_error: Option<String>,
    /// Pruning old backups failed (the deployment itself succeeded).
    pub prune_error: Option<String>,
    /// Whether the host is back in its pre-deploy state, once a rollback ran.
    pub rolled_back: Option<bool>,
    /// The retry-reload failed: the daemon may still run the new files' config.
    pub daemon_state_unknown: bool,
    /// A rollback failed: an operator must put the host right.
    pub manual_action_required: bool,
    /// After a rollback: whether the original certificate is served again.
    pub original_verified: Option<bool>,
    /// A later process finished this attempt (after a crash or a takeover).
    pub recovered: bool,
    /// `superseded`: notBefore (unix seconds) of the certificate on the host.
    pub existing_not_before: Option<i64>,
    /// `superseded`: notBefore (unix seconds) of the certificate refused.
    pub new_not_before: Option<i64>,
    /// A dry run, per role of the plan: whether a deployment would write
    /// the file or finds it identical already (`plan_<role>`).
    pub plans: BTreeMap<Role, FileAction>,
    /// A dry run: whether the host holds a newer certificate, so that a
    /// deployment would end `superseded` (`plan_supersede`).
    pub plan_supersede: Option<bool>,
    /// A dry run: the outcome a deployment would aim for: `deployed`,
    /// `unchanged` or `superseded` (`plan_outcome`).
    pub plan_outcome: Option<Outcome>,
    /// Keys this version does not know, or values it cannot read back, as
    /// they came (from a journal written by another version).
    pub other: BTreeMap<String, String>,
}

/// What became of a role's pre-deploy file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BackupStatus {
    /// The target has no file of this role.
    NotApplicable,
    /// The file was backed up before anything was written.
    Snapshotted,
    /// There was no file at the path before.
    NoPreExisting,
    /// A rollback ran: what restoring the file did.
    Rollback(RestoreStatus),
}

/// What a deployment would do with one file (a dry run's `plan_<role>`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FileAction {
    /// The host's file differs (content or mode) or is missing.
    Write,
    /// The host's file is already byte-identical, with the planned mode.
    Unchanged,
}

impl FileAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FileAction::Write => "write",
            FileAction::Unchanged => "unchanged",
        }
    }
}

/// The step a failed attempt names (`failed_step`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FailedStep {
    Step(Step),
    /// The request was refused before any remote contact.
    Request,
    /// The broker's delivery limit ended the request.
    DeliveryLimit,
    /// A group member never started: its group halted before its wave.
    Halted,
}

impl Report {
    /// The report of a request refused before any remote contact.
    pub fn rejected(deployment_id: &str, target: &str, host: &str, message: String, at: Timestamp) -> Report {
        Report::before_any_step(Outcome::Rejected, FailedStep::Request, deployment_id, target, host, message, at)
    }

    /// `failed` before the deployment's first step: its target lock could
    /// not be taken (unreachable host, deferred too often). The host was
    /// not touched.
    pub fn lock_failed(deployment_id: &str, target: &str, host: &str, message: String, at: Timestamp) -> Report {
        let step = FailedStep::Step(Step::Lock);
        Report::before_any_step(Outcome::Failed, step, deployment_id, target, host, message, at)
    }

    /// `failed` before a revert's first step: the journal alone says the
    /// deployment `reverts` cannot be reverted (`message` says why). The
    /// host was not contacted; nothing is journaled.
    pub fn revert_refused(reverts: &str, target: &str, host: &str, message: String, at: Timestamp) -> Report {
        let id = crate::revert::revert_id(reverts);
        let mut r = Report::before_any_step(Outcome::Failed, FailedStep::Request, &id, target, host, message, at);
        r.reverts = Some(reverts.to_string());
        r
    }

    /// `failed` on the last delivery the broker will make of a request
    /// (its delivery limit): earlier deliveries ended without an answer
    /// (a worker died holding it). The host is in whatever state recovery
    /// left it: never half-deployed.
    pub fn delivery_limit(deployment_id: &str, target: &str, message: String, at: Timestamp) -> Report {
        let step = FailedStep::DeliveryLimit;
        Report::before_any_step(Outcome::Failed, step, deployment_id, target, "", message, at)
    }

    /// `failed` for a group member that never started because its group
    /// halted before the member's wave: the host was not touched.
    pub fn halted(deployment_id: &str, target: &str, message: String, at: Timestamp) -> Report {
        Report::before_any_step(Outcome::Failed, FailedStep::Halted, deployment_id, target, "", message, at)
    }

    fn before_any_step(
        outcome: Outcome,
        step: FailedStep,
        deployment_id: &str,
        target: &str,
        host: &str,
        message: String,
        at: Timestamp,
    ) -> Report {
        let details = Details {
            backups: Role::ALL.into_iter().map(|r| (r, BackupStatus::NotApplicable)).collect(),
            failed_step: Some(step),
            ..Details::default()
        };
        Report {
            deployment_id: deployment_id.to_string(),
            target: target.to_string(),
            host: host.to_string(),
            outcome,
            message,
            details: Box::new(details),
            attempts: 1,
            reload_shared_with: None,
            started_at: at,
            finished_at: at,
            reverts: None,
        }
    }
}
