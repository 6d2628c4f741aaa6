//! The deployment state machine.
//!
//! A [`Deployment`] is a value folded from [`Record`]s. The driver asks it
//! what to do next ([`Deployment::next`]) and feeds back what happened
//! ([`Deployment::apply`]). It never performs I/O and never reads the clock:
//! `now` is an argument, and every decision that depends on time (a deadline,
//! a verify budget) is itself recorded as an event, so a replay after a crash
//! reaches exactly the same state.
//!
//! The attempt is in one phase at a time, and each phase is its own type
//! holding only what that phase needs (the files written so far, a pending
//! retry, what a rollback restored...), in its own file: `snapshot`,
//! `write`, `reload` (validate and reload), `verify`, `commit` (commit and
//! cleanup), `rollback` (restore, retry-reload, verify-original), `finish`
//! (the report) and `recovery` (a later process taking over). What every
//! phase shares is `Shared`: the plan, the times, the snapshots, what the
//! host may have been changed by.

use std::collections::BTreeMap;

use crate::event::{Event, Record};
use crate::lock::LockPhase;
use crate::model::{Digest, Plan, Role, Timestamp};
use crate::snapshot::{PreState, Snapshot};
use crate::step::Step;

mod commit;
mod finish;
mod next;
mod recovery;
mod reload;
mod retry;
mod revert;
mod rollback;
mod snapshot;
mod verify;
mod write;

pub use next::{Action, ExecGuard, Next, RestoreRequest, Sharing, SnapshotRequest, Terminal, WriteRequest};
pub use snapshot::{file_unchanged, supersedes};

use commit::{CleaningUp, Committing};
use finish::Finishing;
use reload::{Reloading, Validating};
use retry::Retry;
use revert::Checking;
use rollback::{Restoring, RetryingReload, VerifyingOriginal};
use snapshot::Snapshotting;
use verify::{PreVerifying, Verifying};
use write::Writing;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error("journal holds no Started event for this deployment")]
    NotStarted,
    #[error("event {event} does not fit phase {phase}")]
    Unexpected { event: String, phase: String },
}

/// One deployment attempt, folded from its journal records.
#[derive(Clone, Debug)]
pub struct Deployment {
    shared: Shared,
    state: State,
}

/// What the phases of one attempt share.
#[derive(Clone, Debug)]
struct Shared {
    plan: Plan,
    started_at: Timestamp,
    /// The time of the latest record: retries and verify budgets count from it.
    last_at: Timestamp,
    /// What each planned path held before the attempt (complete once the
    /// snapshot phase is over).
    snapshots: BTreeMap<Role, Snapshot>,
    /// What the attempt may have changed on the host.
    touched: Touched,
    /// Transient errors per step since this process took the attempt on:
    /// each makes the next retry wait longer.
    transient_errors: BTreeMap<Step, u32>,
    /// When a later process resumed this attempt (`Recovering`).
    recovered_at: Option<Timestamp>,
    /// Replayed from a journal and not yet marked `Recovering` by this process.
    needs_mark: bool,
    /// The target lock is no longer ours (why): journal `Abandoned`, touch
    /// nothing more.
    lock_lost: Option<String>,
    /// How many deployments share this attempt's validate and reload
    /// (itself included), once journaled (`ReloadShared`).
    shared_with: Option<u32>,
}

/// What the attempt may have changed on the host, as its journal says: a
/// write or a reload counts from its `Begun` on (a takeover assumes both).
#[derive(Copy, Clone, Debug, Default)]
struct Touched {
    /// Live files may have been replaced.
    files: bool,
    /// The daemon may have been reloaded.
    daemon: bool,
}

/// The phase the attempt is in, with what that phase needs.
#[derive(Clone, Debug)]
enum State {
    Snapshot(Snapshotting),
    /// A revert: are the backups it would put back still there?
    Check(Checking),
    /// Content already identical: is it also what is served?
    PreVerify(PreVerifying),
    Write(Writing),
    Validate(Validating),
    Reload(Reloading),
    Verify(Verifying),
    Commit(Committing),
    /// Remove this attempt's backups, then end (nothing was written).
    Cleanup(CleaningUp),
    Restore(Restoring),
    RetryReload(RetryingReload),
    VerifyOriginal(VerifyingOriginal),
    /// Record the end: `Finished` with a report, or `Abandoned`.
    Finishing(Finishing),
    Done(Terminal),
}

/// What a phase makes of an event: `Ok(None)` stays in the phase (updated),
/// `Ok(Some(state))` moves on, `Err(Unfit)` refuses the event.
type Fold = Result<Option<State>, Unfit>;

/// An event that does not fit the phase.
struct Unfit;

/// Why a rollback (or a pre-write failure) happened.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Failure {
    step: Step,
    /// e.g. "reload command failed".
    summary: String,
    /// e.g. "exit status 1 (output: ...)".
    detail: String,
}

impl Failure {
    fn new(step: Step, summary: impl Into<String>, detail: impl Into<String>) -> Failure {
        Failure { step, summary: summary.into(), detail: detail.into() }
    }
}

/// The write-ahead rule for a step whose side effects recovery must know
/// of: until its `Begun` is journaled (durably, before anything else
/// happens), recording it is what comes next; then the step is performed.
fn begun_first(step: Step, begun: bool, perform: impl FnOnce() -> Next) -> Next {
    if begun { perform() } else { Next::Record(Event::Begun { step }) }
}

impl Deployment {
    /// A new attempt. The caller records `Event::Started { plan }` first.
    pub fn start(plan: Plan, at: Timestamp) -> Deployment {
        Deployment {
            shared: Shared {
                plan,
                started_at: at,
                last_at: at,
                snapshots: BTreeMap::new(),
                touched: Touched::default(),
                transient_errors: BTreeMap::new(),
                recovered_at: None,
                needs_mark: false,
                lock_lost: None,
                shared_with: None,
            },
            state: State::Snapshot(Snapshotting::default()),
        }
    }

    /// Rebuild the latest attempt from journal records (in order). The
    /// result asks to be marked `Recovering` before anything else unless it
    /// is already terminal.
    pub fn replay(records: &[Record]) -> Result<Deployment, CoreError> {
        let start =
            records.iter().rposition(|r| matches!(r.event, Event::Started { .. })).ok_or(CoreError::NotStarted)?;
        let Event::Started { plan } = &records[start].event else {
            return Err(CoreError::NotStarted);
        };
        let mut d = Deployment::start(plan.clone(), records[start].at);
        for r in &records[start + 1..] {
            d.apply(r)?;
        }
        d.shared.needs_mark = d.terminal().is_none();
        Ok(d)
    }

    pub fn plan(&self) -> &Plan {
        &self.shared.plan
    }
    /// What each planned path held before the attempt, as far as the
    /// snapshot got (a revert puts back a deployed attempt's).
    pub fn snapshots(&self) -> &BTreeMap<Role, Snapshot> {
        &self.shared.snapshots
    }
    pub fn terminal(&self) -> Option<&Terminal> {
        match &self.state {
            State::Done(t) => Some(t),
            _ => None,
        }
    }
    pub fn is_recovering(&self) -> bool {
        self.shared.recovered_at.is_some()
    }
    /// Has a write (or a reload) possibly changed the host?
    pub fn may_have_written(&self) -> bool {
        self.shared.touched.files || self.shared.touched.daemon
    }
    /// How the command this attempt asks for next relates to others'
    /// (see [`crate::coalesce`]).
    pub fn sharing(&self) -> Sharing {
        let cx = &self.shared;
        if cx.recovered_at.is_some() {
            return Sharing::Own;
        }
        let shared = cx.shared_with.is_some_and(|n| n > 1);
        match &self.state {
            State::Validate(_) | State::Reload(_) if cx.shared_with.is_none() => Sharing::Join,
            State::Validate(_) if shared => Sharing::Shared(Step::Validate),
            State::Reload(_) if shared => Sharing::Shared(Step::Reload),
            State::RetryReload(r) if shared && r.after_shared_failure() => Sharing::Shared(Step::RetryReload),
            _ => Sharing::Own,
        }
    }

    /// How many deployments shared this attempt's validate and reload, once
    /// journaled.
    pub fn shared_with(&self) -> Option<u32> {
        self.shared.shared_with
    }

    /// The name of the current phase, for logs and `journal show`.
    pub fn phase_name(&self) -> &'static str {
        self.state.name()
    }

    /// The next thing to do. Pure: depends only on the state and `now`.
    pub fn next(&self, now: Timestamp) -> Next {
        let cx = &self.shared;
        if let Some(t) = self.terminal() {
            return Next::Done(t.clone());
        }
        if cx.needs_mark {
            return Next::Record(Event::Recovering);
        }
        if let Some(why) = &cx.lock_lost {
            return Next::Record(Event::Abandoned {
                reason: format!(
                    "{why}; this worker stopped touching the host for this attempt, whose redelivery deploys afresh"
                ),
            });
        }
        // A transient failure is waiting for its retry: give up once the
        // deadline (or, in a rollback, the rollback budget) has passed.
        if let Some(retry) = self.state.retry() {
            let limit = if self.state.in_rollback() { cx.rollback_deadline() } else { cx.deadline() };
            let step = self.state.step();
            if now >= limit {
                let reason = format!("deadline passed while retrying {step}: {}", retry.error);
                return Next::Record(Event::GaveUp { step, reason });
            }
            if now < retry.at {
                return Next::Wait(retry.at.min(limit));
            }
        }
        match &self.state {
            State::Snapshot(s) => s.next(cx, now),
            State::Check(s) => s.next(cx, now),
            State::PreVerify(s) => s.next(),
            State::Write(s) => s.next(cx, now),
            State::Validate(s) => s.next(cx),
            State::Reload(s) => s.next(cx),
            State::Verify(s) => s.next(cx, now),
            State::Commit(s) => s.next(cx),
            State::Cleanup(s) => s.next(cx),
            State::Restore(s) => s.next(cx),
            State::RetryReload(s) => s.next(cx),
            State::VerifyOriginal(s) => s.next(cx, now),
            State::Finishing(s) => s.next(cx, now),
            State::Done(t) => Next::Done(t.clone()),
        }
    }

    /// Fold one record into the state.
    pub fn apply(&mut self, record: &Record) -> Result<(), CoreError> {
        if self.terminal().is_some() {
            return Err(self.unexpected(&record.event));
        }
        let cx = &mut self.shared;
        cx.last_at = cx.last_at.max(record.at);
        let next = match &record.event {
            Event::Started { .. } => Err(Unfit),
            Event::Recovering => {
                self.mark_recovering(record.at);
                Ok(None)
            }
            Event::StepFailed { error, .. } if error.is_lock_lost() => {
                self.state.drop_retry();
                cx.lock_lost = Some(error.message.clone());
                Ok(None)
            }
            Event::ReloadShared { with } => match self.state {
                State::Validate(_) | State::Reload(_) if cx.shared_with.is_none() && *with >= 1 => {
                    cx.shared_with = Some(*with);
                    Ok(None)
                }
                _ => Err(Unfit),
            },
            Event::Finished { report } => Ok(Some(State::Done(Terminal::Finished(report.clone())))),
            Event::Abandoned { reason } => Ok(Some(State::Done(Terminal::Abandoned(reason.clone())))),
            event => match &mut self.state {
                State::Snapshot(s) => s.apply(cx, event),
                State::Check(s) => s.apply(cx, event),
                State::PreVerify(s) => s.apply(cx, event),
                State::Write(s) => s.apply(cx, event),
                State::Validate(s) => s.apply(cx, event),
                State::Reload(s) => s.apply(cx, event),
                State::Verify(s) => s.apply(cx, event),
                State::Commit(s) => s.apply(cx, event),
                State::Cleanup(s) => s.apply(event),
                State::Restore(s) => s.apply(cx, event),
                State::RetryReload(s) => s.apply(cx, event),
                State::VerifyOriginal(s) => s.apply(cx, event),
                State::Finishing(_) | State::Done(_) => Err(Unfit),
            },
        };
        match next {
            Ok(Some(state)) => self.state = state,
            Ok(None) => {}
            Err(Unfit) => return Err(self.unexpected(&record.event)),
        }
        Ok(())
    }

    fn unexpected(&self, event: &Event) -> CoreError {
        let mut name = format!("{event:?}");
        name.truncate(120);
        CoreError::Unexpected { event: name, phase: self.phase_name().to_string() }
    }
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Snapshot(_) => "snapshot",
            State::Check(_) => "check_backups",
            State::PreVerify(_) => "pre_verify",
            State::Cleanup(_) => "cleanup",
            State::Write(_) => "write",
            State::Validate(_) => "validate",
            State::Reload(_) => "reload",
            State::Verify(_) => "verify",
            State::Commit(_) => "commit",
            State::Restore(_) => "restore",
            State::RetryReload(_) => "retry_reload",
            State::VerifyOriginal(_) => "verify_original",
            State::Finishing(_) => "finishing",
            State::Done(_) => "done",
        }
    }

    /// The step this phase performs, as results and messages name it.
    fn step(&self) -> Step {
        match self {
            State::Snapshot(_) | State::Check(_) => Step::Snapshot,
            State::PreVerify(_) | State::Verify(_) => Step::Verify,
            State::Cleanup(_) | State::Finishing(_) | State::Done(_) => Step::Cleanup,
            State::Write(_) => Step::Write,
            State::Validate(_) => Step::Validate,
            State::Reload(_) => Step::Reload,
            State::Commit(_) => Step::Commit,
            State::Restore(_) => Step::Restore,
            State::RetryReload(_) => Step::RetryReload,
            State::VerifyOriginal(_) => Step::VerifyOriginal,
        }
    }

    /// Rolling back: transient errors may be retried for the rollback
    /// budget beyond the deadline.
    fn in_rollback(&self) -> bool {
        matches!(self, State::Restore(_) | State::RetryReload(_) | State::VerifyOriginal(_))
    }

    /// The retry this phase waits for, in the phases that retry.
    fn retry(&self) -> Option<&Retry> {
        match self {
            State::Snapshot(s) => s.retry.as_ref(),
            State::Check(s) => s.retry.as_ref(),
            State::Write(s) => s.retry.as_ref(),
            State::Validate(s) => s.retry.as_ref(),
            State::Reload(s) => s.retry.as_ref(),
            State::Commit(s) => s.retry.as_ref(),
            State::Restore(s) => s.retry.as_ref(),
            State::RetryReload(s) => s.retry.as_ref(),
            State::PreVerify(_)
            | State::Verify(_)
            | State::Cleanup(_)
            | State::VerifyOriginal(_)
            | State::Finishing(_)
            | State::Done(_) => None,
        }
    }

    fn drop_retry(&mut self) {
        let slot = match self {
            State::Snapshot(s) => &mut s.retry,
            State::Check(s) => &mut s.retry,
            State::Write(s) => &mut s.retry,
            State::Validate(s) => &mut s.retry,
            State::Reload(s) => &mut s.retry,
            State::Commit(s) => &mut s.retry,
            State::Restore(s) => &mut s.retry,
            State::RetryReload(s) => &mut s.retry,
            State::PreVerify(_)
            | State::Verify(_)
            | State::Cleanup(_)
            | State::VerifyOriginal(_)
            | State::Finishing(_)
            | State::Done(_) => return,
        };
        *slot = None;
    }
}

impl Shared {
    fn deadline(&self) -> Timestamp {
        self.started_at.plus_ms(self.plan.policy.deadline_ms)
    }

    /// A rollback may retry for its budget past the deadline, or past the
    /// moment recovery took it on.
    fn rollback_deadline(&self) -> Timestamp {
        let base = self.recovered_at.unwrap_or_else(|| self.deadline());
        base.plus_ms(self.plan.policy.rollback_budget_ms)
    }

    /// The path written for `role`: the snapshot's (symlinks resolved), or
    /// the configured one before the snapshot.
    fn live_path(&self, role: Role) -> String {
        match self.snapshots.get(&role) {
            Some(s) => s.live_path.clone(),
            None => self.plan.file(role).map(|f| f.path.clone()).unwrap_or_default(),
        }
    }

    /// A step on one file (`write of key (/etc/ssl/site.key)`), or the step.
    fn place(&self, step: Step, role: Option<Role>) -> String {
        match role {
            Some(r) => format!("{step} of {} ({})", r, self.live_path(r)),
            None => step.to_string(),
        }
    }

    /// The leaf certificate served before the attempt, when it is known.
    fn original_leaf(&self) -> Option<Digest> {
        match &self.snapshots.get(&Role::Cert)?.pre {
            PreState::Existing { cert: Some(c), .. } => Some(c.leaf_sha256),
            _ => None,
        }
    }

    /// The lock rewrite to ask for before the side effects of `phase`, if
    /// this attempt holds a target lock that does not state it yet.
    fn lock_rewrite(&self, phase: LockPhase, stated: bool) -> Option<Action> {
        if self.plan.lock.is_none() || stated {
            return None;
        }
        let snapshots = self.snapshots.iter().map(|(r, s)| (*r, s.clone())).collect();
        Some(Action::LockPhase { phase, snapshots })
    }

    /// What a command run under the target lock checks first.
    fn guard(&self) -> Option<ExecGuard> {
        let token = self.plan.lock.clone()?;
        Some(ExecGuard { lock_path: self.plan.lock_path()?, token })
    }

    /// Run a configured command (validate, reload, retry-reload).
    fn exec(&self, step: Step, command: &str) -> Next {
        Next::Perform(Action::Exec {
            step,
            command: command.to_string(),
            timeout_ms: self.plan.policy.exec_timeout_ms,
            guard: self.guard(),
        })
    }
}
