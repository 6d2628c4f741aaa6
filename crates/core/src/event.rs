//! Journaled events. A deployment is the fold of its events; nothing else
//! about it needs to survive a crash.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Digest, Plan, Role, Timestamp};

/// One journal entry: an event and when it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub at: Timestamp,
    pub event: Event,
}

/// The steps of a deployment, as named in results (`failed_step`) and logs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Snapshot,
    Write,
    Validate,
    Reload,
    Verify,
    Restore,
    RetryReload,
    VerifyOriginal,
    Cleanup,
    Commit,
    /// Taking or rewriting the target lock.
    Lock,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Snapshot => "snapshot",
            Step::Write => "write",
            Step::Validate => "validate",
            Step::Reload => "reload",
            Step::Verify => "verify",
            Step::Restore => "restore",
            Step::RetryReload => "retry_reload",
            Step::VerifyOriginal => "verify_original",
            Step::Cleanup => "cleanup",
            Step::Commit => "commit",
            Step::Lock => "lock",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether retrying a failed step can help.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Connection refused/reset, timeouts, channel loss, "outcome unknown".
    Transient,
    /// Host key, auth, permission denied, missing extension, bad path.
    Permanent,
    /// The target lock is no longer this attempt's (lease ran out, taken
    /// over): the attempt stops touching the host at once.
    LockLost,
}

/// A failed remote operation. The message must never hold key bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StepError {
    pub fn transient(message: impl Into<String>) -> Self {
        StepError { kind: ErrorKind::Transient, message: message.into() }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError { kind: ErrorKind::Permanent, message: message.into() }
    }
    pub fn lock_lost(message: impl Into<String>) -> Self {
        StepError { kind: ErrorKind::LockLost, message: message.into() }
    }
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
    pub fn is_lock_lost(&self) -> bool {
        self.kind == ErrorKind::LockLost
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Public facts about a certificate already on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertFacts {
    pub not_before: i64,
    pub leaf_sha256: Digest,
}

/// What was at a path before this deployment touched it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PreState {
    Missing,
    Existing {
        backup_path: String,
        sha256: Digest,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert: Option<CertFacts>,
    },
}

/// The journaled result of snapshotting one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The path actually written: the configured path with symlinks resolved.
    pub live_path: String,
    pub pre: PreState,
}

/// Output of a remote command. `output` is truncated to 4 KiB.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub output: String,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    pub fn describe(&self) -> String {
        let status = match self.exit_code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        if self.output.trim().is_empty() { status } else { format!("{status} (output: {})", self.output.trim()) }
    }
}

pub const OUTPUT_LIMIT: usize = 4096;

/// Truncate command output to [`OUTPUT_LIMIT`] bytes on a char boundary.
pub fn truncate_output(s: &str) -> String {
    if s.len() <= OUTPUT_LIMIT {
        return s.to_string();
    }
    let mut end = OUTPUT_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated]", &s[..end])
}

/// Per-path result of a restore.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreStatus {
    Restored,
    Removed,
    RestoreFailed,
    RemoveFailed,
}

impl RestoreStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreStatus::Restored => "restored",
            RestoreStatus::Removed => "removed",
            RestoreStatus::RestoreFailed => "restore_failed",
            RestoreStatus::RemoveFailed => "remove_failed",
        }
    }
    pub fn ok(self) -> bool {
        matches!(self, RestoreStatus::Restored | RestoreStatus::Removed)
    }
}

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
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Deployed,
        Outcome::Unchanged,
        Outcome::RolledBack,
        Outcome::RolledBackDaemonUnknown,
        Outcome::RollbackFailed,
        Outcome::Failed,
        Outcome::Rejected,
        Outcome::Superseded,
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
        }
    }
    pub fn success(self) -> bool {
        matches!(self, Outcome::Deployed | Outcome::Unchanged)
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
    pub metadata: BTreeMap<String, String>,
    pub attempts: u32,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

/// Everything that happens to a deployment.
// `Started` carries the plan; events are few per deployment and moved
// rarely, so boxing it would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A new attempt. Starts a fresh fold; earlier events of the same id
    /// belong to earlier attempts.
    Started {
        plan: Plan,
    },
    /// A process resumed this attempt from the journal after a crash.
    Recovering,
    /// Right after `Started`: this attempt is another worker's interrupted
    /// deployment, found through an expired target lock. Its
    /// snapshots come from that lock; writes and a reload may have happened,
    /// so the fold goes straight to the rollback (restore, retry-reload) and
    /// then ends `Abandoned` like a recovered attempt.
    TakenOver {
        /// Who held the lock (worker name, lock token).
        from: String,
        snapshots: Vec<(Role, Snapshot)>,
    },
    /// About to perform a step whose side effects recovery must know of.
    /// Always durable before the step's first side effect.
    Begun {
        step: Step,
    },
    Snapshotted {
        role: Role,
        snapshot: Snapshot,
    },
    Written {
        role: Role,
    },
    Executed {
        step: Step,
        result: ExecResult,
    },
    Verified {
        step: Step,
        served: Option<Digest>,
        matched: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Restored {
        role: Role,
        status: RestoreStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// This attempt's backup links removed (nothing was written).
    BackupsRemoved {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The target lock now states `phase` (see `Action::LockPhase`).
    LockPhase {
        phase: crate::lock::LockPhase,
    },
    /// Old backups beyond retention pruned (errors are reported, not fatal).
    Pruned {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    StepFailed {
        step: Step,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<Role>,
        error: StepError,
    },
    /// A step ran out of time or attempts (deadline, verify budget).
    GaveUp {
        step: Step,
        reason: String,
    },
    /// Terminal: the result to publish for this deployment id.
    Finished {
        report: Report,
    },
    /// Recovery ended this attempt without a result: the host is back in its
    /// pre-deploy state and the redelivered request deploys afresh.
    Abandoned {
        reason: String,
    },
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Abandoned { .. })
    }
}
