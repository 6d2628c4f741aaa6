//! What the machine asks the driver for: the next record, action, wait or
//! end, and the remote actions with their requests.

use crate::event::Event;
use crate::lock::LockPhase;
use crate::model::{Digest, Role, Timestamp};
use crate::report::Report;
use crate::snapshot::{PreState, Snapshot};
use crate::step::Step;

/// What the driver must do next.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Append this event and make it (and everything before it) durable,
    /// then apply it. Always precedes the side effects that depend on it.
    Record(Event),
    /// Perform a remote action and apply the resulting events (append them;
    /// they become durable with the next `Record`).
    Perform(Action),
    /// Nothing to do before this time (backoff between retries).
    Wait(Timestamp),
    /// The attempt is over.
    Done(Terminal),
}

/// How the command an attempt asks for next relates to other attempts'
/// (see [`crate::coalesce`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// The attempt is at its validate (or reload) step and has not
    /// journaled with how many it shares them: join a batch, journal
    /// `ReloadShared`, then run.
    Join,
    /// The command is the batch's shared run of this step.
    Shared(crate::step::Step),
    /// The command is this attempt's own.
    Own,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Terminal {
    Finished(Report),
    /// Rolled back by recovery; the redelivered request deploys afresh.
    Abandoned(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub role: Role,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    pub role: Role,
    pub live_path: String,
    pub mode: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreRequest {
    pub role: Role,
    pub live_path: String,
    pub pre: PreState,
}

/// A remote (or network) action. Results come back as events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Per path: stat; hard-link an existing file to its backup name; hash
    /// it. Results: `Snapshotted` or `StepFailed{Snapshot}` per role.
    Snapshot { deployment_id: String, files: Vec<SnapshotRequest> },
    /// Atomic writes (temp, mode, content, fsync, posix-rename). Results:
    /// `Written` or `StepFailed{Write}` per role.
    Write { deployment_id: String, files: Vec<WriteRequest> },
    /// A revert: read each backup it would put back, changing nothing
    /// (`Host::inspect`). Results: `BackupChecked` or
    /// `StepFailed{Snapshot}` per role.
    CheckBackups { files: Vec<SnapshotRequest> },
    /// A revert's write: put the files back from the reverted deployment's
    /// backups, keeping them (`Host::reinstate`). Results: `Written` or
    /// `StepFailed{Write}` per role.
    Reinstate { deployment_id: String, files: Vec<RestoreRequest> },
    /// Run a configured command; with a `guard`, only if the target lock
    /// still holds this attempt's token, checked in the same remote
    /// command. Result: `Executed` or `StepFailed`.
    Exec { step: Step, command: String, timeout_ms: u64, guard: Option<ExecGuard> },
    /// TLS handshake; compare the served leaf. Result: `Verified`.
    Verify { step: Step, endpoint: String, sni: Option<String>, expected: Digest },
    /// Put the pre-deploy state back. Results: `Restored` or `StepFailed{Restore}` per role.
    Restore { deployment_id: String, files: Vec<RestoreRequest> },
    /// Remove this attempt's backup links and temp files for the configured
    /// paths (the host resolves symlinks again). Result: `BackupsRemoved`.
    RemoveBackups { deployment_id: String, paths: Vec<String> },
    /// Remove backups of these live paths beyond `keep`, never this
    /// attempt's own. Result: `Pruned`.
    Prune { deployment_id: String, live_paths: Vec<String>, keep: u32 },
    /// Rewrite the target lock this attempt holds with `phase` (and the
    /// snapshots a taker would roll back from), durably, before the side
    /// effects that phase announces: `writing` before the first write,
    /// `committing` before the commit's prune. Result: `LockPhase` or
    /// `StepFailed{Lock}`.
    LockPhase { phase: LockPhase, snapshots: Vec<(Role, Snapshot)> },
}

/// What a guarded command checks first: the lock file at `lock_path`
/// still holds `token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecGuard {
    pub lock_path: String,
    pub token: String,
}
