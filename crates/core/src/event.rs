//! Journaled events. A deployment is the fold of its events; nothing else
//! about it needs to survive a crash.

use serde::{Deserialize, Serialize};

use crate::model::{Digest, Plan, Role, Timestamp};
use crate::report::Report;
use crate::snapshot::{RestoreStatus, Snapshot};
use crate::step::{ExecResult, Step, StepError};

/// One journal entry: an event and when it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub at: Timestamp,
    pub event: Event,
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
    /// Before the validate step: this attempt shares its validate and
    /// reload with `with` deployments in all (itself included; 1 when
    /// alone).
    ReloadShared {
        with: u32,
    },
    Snapshotted {
        role: Role,
        snapshot: Snapshot,
    },
    Written {
        role: Role,
    },
    /// A revert read the backup it would put back for `role` (changing
    /// nothing): its digest, `None` when there is no such file.
    BackupChecked {
        role: Role,
        sha256: Option<Digest>,
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
