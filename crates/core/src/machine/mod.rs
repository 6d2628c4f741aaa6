//! The deployment state machine.
//!
//! A [`Deployment`] is a value folded from [`Record`]s. The driver asks it
//! what to do next ([`Deployment::next`]) and feeds back what happened
//! ([`Deployment::apply`]). It never performs I/O and never reads the clock:
//! `now` is an argument, and every decision that depends on time (a deadline,
//! a verify budget) is itself recorded as an event, so a replay after a crash
//! reaches exactly the same state.

use std::collections::{BTreeMap, BTreeSet};

use crate::event::*;
use crate::lock::LockPhase;
use crate::model::*;
use crate::report::*;
use crate::snapshot::*;
use crate::step::*;

mod next;

pub use next::{Action, ExecGuard, Next, RestoreRequest, SnapshotRequest, Terminal, WriteRequest};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error("journal holds no Started event for this deployment")]
    NotStarted,
    #[error("event {event} does not fit phase {phase}")]
    Unexpected { event: String, phase: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    Outcome(Outcome),
    Abandon,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Snapshot,
    /// Content already identical: is it also what is served?
    PreVerify,
    /// Remove this attempt's backups, then end.
    Cleanup(End),
    Write,
    Validate,
    Reload,
    Verify,
    Commit,
    Restore,
    RetryReload,
    VerifyOriginal,
    Finishing(Outcome),
    Done,
}

/// Why a rollback (or a pre-write failure) happened.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Failure {
    step: Step,
    /// e.g. "reload command failed".
    summary: String,
    /// e.g. "exit status 1 (output: ...)".
    detail: String,
}

/// One deployment attempt, folded from its journal records.
#[derive(Clone, Debug)]
pub struct Deployment {
    plan: Plan,
    started_at: Timestamp,
    last_at: Timestamp,
    phase: Phase,
    snaps: BTreeMap<Role, Snapshot>,
    written: BTreeSet<Role>,
    begun: BTreeSet<Step>,
    reload_ok: bool,
    restored: BTreeMap<Role, (RestoreStatus, Option<String>)>,
    failure: Option<Failure>,
    step_errors: BTreeMap<Step, u32>,
    last_error: Option<String>,
    wait_until: Option<Timestamp>,
    verify_since: Timestamp,
    verify_attempts: u32,
    last_verify: Option<String>,
    retry_reload: Option<Result<(), String>>,
    original_verified: Option<bool>,
    cleanup_error: Option<String>,
    prune_error: Option<String>,
    /// Set when this attempt was resumed by a later process.
    recovering: bool,
    recovery_at: Option<Timestamp>,
    /// Replayed from a journal and not yet marked `Recovering` by this process.
    needs_mark: bool,
    /// The rollback was started by recovery (not by a failure): when it
    /// succeeds, the attempt is abandoned instead of reported.
    abandon_after_rollback: bool,
    /// The phase the target lock states (as far as this attempt wrote it).
    lock_phase: LockPhase,
    /// The target lock is no longer ours: journal `Abandoned`, touch
    /// nothing more.
    lock_lost: Option<String>,
    terminal: Option<Terminal>,
}

fn retry_delay(initial: u64, max: u64, attempt: u32, seed: u64) -> u64 {
    let exp = initial.saturating_mul(1u64 << attempt.saturating_sub(1).min(30)).min(max);
    // Full jitter from a deterministic hash, so replays agree.
    let mut x = seed ^ (attempt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % (exp + 1)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl Deployment {
    /// A new attempt. The caller records `Event::Started { plan }` first
    /// (see [`Deployment::start_event`]).
    pub fn start(plan: Plan, at: Timestamp) -> Deployment {
        Deployment {
            plan,
            started_at: at,
            last_at: at,
            phase: Phase::Snapshot,
            snaps: BTreeMap::new(),
            written: BTreeSet::new(),
            begun: BTreeSet::new(),
            reload_ok: false,
            restored: BTreeMap::new(),
            failure: None,
            step_errors: BTreeMap::new(),
            last_error: None,
            wait_until: None,
            verify_since: at,
            verify_attempts: 0,
            last_verify: None,
            retry_reload: None,
            original_verified: None,
            cleanup_error: None,
            prune_error: None,
            recovering: false,
            recovery_at: None,
            needs_mark: false,
            abandon_after_rollback: false,
            lock_phase: LockPhase::Locked,
            lock_lost: None,
            terminal: None,
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
        d.needs_mark = d.terminal.is_none();
        Ok(d)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn terminal(&self) -> Option<&Terminal> {
        self.terminal.as_ref()
    }
    pub fn is_recovering(&self) -> bool {
        self.recovering
    }
    /// Has a write (or a reload) possibly changed the host?
    pub fn may_have_written(&self) -> bool {
        self.begun.contains(&Step::Write) || self.begun.contains(&Step::Reload)
    }
    /// The name of the current phase, for logs and `journal show`.
    pub fn phase_name(&self) -> &'static str {
        match &self.phase {
            Phase::Snapshot => "snapshot",
            Phase::PreVerify => "pre_verify",
            Phase::Cleanup(_) => "cleanup",
            Phase::Write => "write",
            Phase::Validate => "validate",
            Phase::Reload => "reload",
            Phase::Verify => "verify",
            Phase::Commit => "commit",
            Phase::Restore => "restore",
            Phase::RetryReload => "retry_reload",
            Phase::VerifyOriginal => "verify_original",
            Phase::Finishing(_) => "finishing",
            Phase::Done => "done",
        }
    }

    fn deadline(&self) -> Timestamp {
        self.started_at.plus_ms(self.plan.policy.deadline_ms)
    }

    fn rollback_deadline(&self) -> Timestamp {
        let base = match self.recovery_at {
            Some(r) => r,
            None => self.deadline(),
        };
        base.plus_ms(self.plan.policy.rollback_budget_ms)
    }

    fn in_rollback(&self) -> bool {
        matches!(self.phase, Phase::Restore | Phase::RetryReload | Phase::VerifyOriginal)
    }

    /// The next thing to do. Pure: depends only on the state and `now`.
    pub fn next(&self, now: Timestamp) -> Next {
        if let Some(t) = &self.terminal {
            return Next::Done(t.clone());
        }
        if self.needs_mark {
            return Next::Record(Event::Recovering);
        }
        if let Some(why) = &self.lock_lost {
            return Next::Record(Event::Abandoned {
                reason: format!(
                    "{why}; this worker stopped touching the host for this attempt, whose redelivery deploys afresh"
                ),
            });
        }
        let id = &self.plan.deployment_id;
        let rollback = self.in_rollback();
        let limit = if rollback { self.rollback_deadline() } else { self.deadline() };
        let step = self.current_step();
        // A transient failure is waiting for its retry: give up once the
        // deadline (or, in a rollback, the rollback budget) has passed.
        if let Some(at) = self.wait_until {
            if now >= limit {
                let why = match &self.last_error {
                    Some(e) => format!("deadline passed while retrying {step}: {e}"),
                    None => format!("deadline passed during {step}"),
                };
                return Next::Record(Event::GaveUp { step, reason: why });
            }
            if now < at {
                return Next::Wait(at.min(limit));
            }
        }
        match &self.phase {
            Phase::Snapshot => {
                if now >= limit {
                    return Next::Record(Event::GaveUp {
                        step: Step::Snapshot,
                        reason: "deadline passed before the snapshot".into(),
                    });
                }
                let files = self
                    .plan
                    .files
                    .iter()
                    .filter(|f| !self.snaps.contains_key(&f.role))
                    .map(|f| SnapshotRequest { role: f.role, path: f.path.clone() })
                    .collect();
                Next::Perform(Action::Snapshot { deployment_id: id.clone(), files })
            }
            Phase::PreVerify => {
                let v = self.plan.verify.as_ref().expect("PreVerify only with a verify plan");
                Next::Perform(Action::Verify {
                    step: Step::Verify,
                    endpoint: v.endpoint.clone(),
                    sni: v.sni.clone(),
                    expected: v.expected,
                })
            }
            Phase::Cleanup(_) => Next::Perform(Action::RemoveBackups {
                deployment_id: id.clone(),
                paths: self.plan.files.iter().map(|f| f.path.clone()).collect(),
            }),
            Phase::Write => {
                if !self.begun.contains(&Step::Write) {
                    if now >= limit {
                        return Next::Record(Event::GaveUp {
                            step: Step::Write,
                            reason: "deadline passed before the first write".into(),
                        });
                    }
                    return Next::Record(Event::Begun { step: Step::Write });
                }
                if let Some(a) = self.lock_rewrite(LockPhase::Writing) {
                    return Next::Perform(a);
                }
                let files = self
                    .plan
                    .files
                    .iter()
                    .filter(|f| !self.written.contains(&f.role))
                    .map(|f| WriteRequest { role: f.role, live_path: self.live_path(f.role), mode: f.mode })
                    .collect();
                Next::Perform(Action::Write { deployment_id: id.clone(), files })
            }
            Phase::Validate => Next::Perform(Action::Exec {
                step: Step::Validate,
                command: self.plan.validate_command.clone().unwrap_or_default(),
                timeout_ms: self.plan.policy.exec_timeout_ms,
                guard: self.guard(),
            }),
            Phase::Reload => {
                if !self.begun.contains(&Step::Reload) {
                    return Next::Record(Event::Begun { step: Step::Reload });
                }
                Next::Perform(Action::Exec {
                    step: Step::Reload,
                    command: self.plan.reload_command.clone(),
                    timeout_ms: self.plan.policy.exec_timeout_ms,
                    guard: self.guard(),
                })
            }
            Phase::Verify | Phase::VerifyOriginal => {
                let verify_step = if self.phase == Phase::Verify { Step::Verify } else { Step::VerifyOriginal };
                // Make the reload's success durable before verifying, so a
                // crash here recovers as "reload succeeded, verify pending".
                if verify_step == Step::Verify && !self.begun.contains(&Step::Verify) {
                    return Next::Record(Event::Begun { step: Step::Verify });
                }
                if self.verify_attempts > 0 {
                    let budget_end = self.verify_since.plus_ms(self.plan.policy.verify_budget_ms);
                    let delay =
                        self.plan.policy.verify_initial_ms.saturating_mul(1u64 << (self.verify_attempts - 1).min(20));
                    let retry_at = self.last_at.plus_ms(delay);
                    if retry_at > budget_end || now >= budget_end {
                        return Next::Record(Event::GaveUp {
                            step: verify_step,
                            reason: format!(
                                "after {} attempts over {} ms: {}",
                                self.verify_attempts,
                                self.last_at.since(self.verify_since),
                                self.last_verify.clone().unwrap_or_default()
                            ),
                        });
                    }
                    if now < retry_at {
                        return Next::Wait(retry_at);
                    }
                }
                let v = self.plan.verify.as_ref().expect("verify phase only with a verify plan");
                let expected = if verify_step == Step::Verify {
                    v.expected
                } else {
                    match self.original_leaf() {
                        Some(d) => d,
                        None => {
                            return Next::Record(Event::GaveUp {
                                step: verify_step,
                                reason: "original certificate fingerprint unknown".into(),
                            });
                        }
                    }
                };
                Next::Perform(Action::Verify {
                    step: verify_step,
                    endpoint: v.endpoint.clone(),
                    sni: v.sni.clone(),
                    expected,
                })
            }
            Phase::Commit => {
                if !self.begun.contains(&Step::Commit) {
                    return Next::Record(Event::Begun { step: Step::Commit });
                }
                if let Some(a) = self.lock_rewrite(LockPhase::Committing) {
                    return Next::Perform(a);
                }
                Next::Perform(Action::Prune {
                    deployment_id: id.clone(),
                    live_paths: self.plan.files.iter().map(|f| self.live_path(f.role)).collect(),
                    keep: self.plan.policy.keep_backups.max(1),
                })
            }
            Phase::Restore => {
                if !self.begun.contains(&Step::Restore) {
                    return Next::Record(Event::Begun { step: Step::Restore });
                }
                let files = self
                    .plan
                    .files
                    .iter()
                    .filter(|f| !self.restored.contains_key(&f.role))
                    .filter_map(|f| {
                        self.snaps.get(&f.role).map(|s| RestoreRequest {
                            role: f.role,
                            live_path: s.live_path.clone(),
                            pre: s.pre.clone(),
                        })
                    })
                    .collect();
                Next::Perform(Action::Restore { deployment_id: id.clone(), files })
            }
            Phase::RetryReload => {
                if !self.begun.contains(&Step::RetryReload) {
                    return Next::Record(Event::Begun { step: Step::RetryReload });
                }
                Next::Perform(Action::Exec {
                    step: Step::RetryReload,
                    command: self.plan.reload_command.clone(),
                    timeout_ms: self.plan.policy.exec_timeout_ms,
                    guard: self.guard(),
                })
            }
            Phase::Finishing(outcome) => {
                if self.abandon_after_rollback && *outcome == Outcome::RolledBack {
                    return Next::Record(Event::Abandoned {
                        reason: format!(
                            "a worker stopped during {}; the host was rolled back to its pre-deploy state and the request will deploy afresh",
                            self.failure.as_ref().map(|f| f.step).unwrap_or(Step::Write)
                        ),
                    });
                }
                Next::Record(Event::Finished { report: self.report(*outcome, now) })
            }
            Phase::Done => unreachable!("Done always has a terminal"),
        }
    }

    /// The lock rewrite to ask for before the side effects of `phase`, if
    /// this attempt holds a target lock that does not state it yet.
    fn lock_rewrite(&self, phase: LockPhase) -> Option<Action> {
        if self.plan.lock.is_none() || self.lock_phase == phase {
            return None;
        }
        let snapshots = self.snaps.iter().map(|(r, s)| (*r, s.clone())).collect();
        Some(Action::LockPhase { phase, snapshots })
    }

    fn guard(&self) -> Option<ExecGuard> {
        let token = self.plan.lock.clone()?;
        Some(ExecGuard { lock_path: self.plan.lock_path()?, token })
    }

    fn current_step(&self) -> Step {
        match &self.phase {
            Phase::Snapshot => Step::Snapshot,
            Phase::PreVerify | Phase::Verify => Step::Verify,
            Phase::Cleanup(_) | Phase::Finishing(_) | Phase::Done => Step::Cleanup,
            Phase::Write => Step::Write,
            Phase::Validate => Step::Validate,
            Phase::Reload => Step::Reload,
            Phase::Commit => Step::Commit,
            Phase::Restore => Step::Restore,
            Phase::RetryReload => Step::RetryReload,
            Phase::VerifyOriginal => Step::VerifyOriginal,
        }
    }

    fn live_path(&self, role: Role) -> String {
        match self.snaps.get(&role) {
            Some(s) => s.live_path.clone(),
            None => self.plan.file(role).map(|f| f.path.clone()).unwrap_or_default(),
        }
    }

    fn original_leaf(&self) -> Option<Digest> {
        match &self.snaps.get(&Role::Cert)?.pre {
            PreState::Existing { cert: Some(c), .. } => Some(c.leaf_sha256),
            _ => None,
        }
    }

    fn unexpected(&self, event: &Event) -> CoreError {
        let mut name = format!("{event:?}");
        name.truncate(120);
        CoreError::Unexpected { event: name, phase: self.phase_name().to_string() }
    }

    fn fail(&mut self, step: Step, summary: impl Into<String>, detail: impl Into<String>) {
        if self.failure.is_none() {
            self.failure = Some(Failure { step, summary: summary.into(), detail: detail.into() });
        }
    }

    fn start_rollback(&mut self) {
        self.wait_until = None;
        self.phase = Phase::Restore;
    }

    fn after_snapshots(&mut self) {
        let cert = self.snaps.get(&Role::Cert).map(|s| &s.pre);
        if let (false, Some(new_nb), Some(PreState::Existing { cert: Some(facts), .. })) =
            (self.plan.policy.allow_downgrade, self.plan.new_not_before, cert)
            && facts.not_before > new_nb
        {
            self.phase = Phase::Cleanup(End::Outcome(Outcome::Superseded));
            return;
        }
        let identical = self.plan.files.iter().all(|f| {
            matches!(self.snaps.get(&f.role).map(|s| &s.pre),
                Some(PreState::Existing { sha256, mode, .. }) if *sha256 == f.sha256 && *mode == f.mode)
        });
        self.phase = match (identical, self.plan.verify.is_some()) {
            (true, true) => Phase::PreVerify,
            (true, false) => Phase::Cleanup(End::Outcome(Outcome::Unchanged)),
            (false, _) => Phase::Write,
        };
    }

    fn after_restore(&mut self) {
        if self.plan.files.iter().any(|f| !self.restored.contains_key(&f.role)) {
            return;
        }
        self.wait_until = None;
        if self.restored.values().any(|(s, _)| !s.ok()) {
            self.phase = Phase::Finishing(Outcome::RollbackFailed);
        } else if self.begun.contains(&Step::Reload) {
            self.phase = Phase::RetryReload;
        } else {
            self.phase = Phase::Finishing(Outcome::RolledBack);
        }
    }

    fn after_retry_reload(&mut self, result: Result<(), String>) {
        let ok = result.is_ok();
        self.retry_reload = Some(result);
        self.wait_until = None;
        if !ok {
            self.phase = Phase::Finishing(Outcome::RolledBackDaemonUnknown);
        } else if self.plan.verify.is_some() && self.original_leaf().is_some() {
            self.phase = Phase::VerifyOriginal;
            self.verify_since = self.last_at;
            self.verify_attempts = 0;
        } else {
            self.phase = Phase::Finishing(Outcome::RolledBack);
        }
    }

    fn after_reload_ok(&mut self) {
        self.reload_ok = true;
        self.wait_until = None;
        if self.plan.verify.is_some() {
            self.phase = Phase::Verify;
            self.verify_since = self.last_at;
            self.verify_attempts = 0;
        } else {
            self.phase = Phase::Commit;
        }
    }

    fn transient(&mut self, step: Step, err: &StepError) {
        let n = self.step_errors.entry(step).or_insert(0);
        *n += 1;
        let delay = retry_delay(
            self.plan.policy.retry_initial_ms,
            self.plan.policy.retry_max_ms,
            *n,
            fnv(&self.plan.deployment_id) ^ self.plan.attempt as u64,
        );
        self.last_error = Some(err.message.clone());
        self.wait_until = Some(self.last_at.plus_ms(delay));
    }

    /// Fold one record into the state.
    pub fn apply(&mut self, record: &Record) -> Result<(), CoreError> {
        if self.terminal.is_some() {
            return Err(self.unexpected(&record.event));
        }
        self.last_at = self.last_at.max(record.at);
        let at = record.at;
        match &record.event {
            Event::Started { .. } => return Err(self.unexpected(&record.event)),
            Event::Recovering => self.mark_recovering(at),
            Event::TakenOver { from, snapshots } => {
                let roles_match = snapshots.len() == self.plan.files.len()
                    && self.plan.roles().all(|r| snapshots.iter().any(|(s, _)| *s == r));
                if self.phase != Phase::Snapshot || !self.snaps.is_empty() || !roles_match {
                    return Err(self.unexpected(&record.event));
                }
                self.snaps = snapshots.iter().cloned().collect();
                // Unknown how far it got: assume the new files were written
                // and a reload started (a retry-reload of the originals is
                // harmless; a missing one could leave the daemon on the new
                // files).
                self.begun.insert(Step::Write);
                self.begun.insert(Step::Reload);
                self.fail(
                    Step::Write,
                    format!("{from} stopped during this deployment and its target lock expired"),
                    "taken over by another worker, which rolled the host back",
                );
                self.abandon_after_rollback = true;
                // The taker's lock inherited the dead holder's `writing`.
                self.lock_phase = LockPhase::Writing;
                self.start_rollback();
            }
            Event::LockPhase { phase } => {
                let ok = matches!(
                    (phase, &self.phase),
                    (LockPhase::Writing, Phase::Write) | (LockPhase::Committing, Phase::Commit)
                );
                if !ok || self.plan.lock.is_none() {
                    return Err(self.unexpected(&record.event));
                }
                self.lock_phase = *phase;
                self.wait_until = None;
            }
            Event::Begun { step } => {
                let ok = matches!(
                    (step, &self.phase),
                    (Step::Write, Phase::Write)
                        | (Step::Reload, Phase::Reload)
                        | (Step::Commit, Phase::Commit)
                        | (Step::Restore, Phase::Restore)
                        | (Step::RetryReload, Phase::RetryReload)
                        | (Step::Verify, Phase::Verify)
                );
                if !ok {
                    return Err(self.unexpected(&record.event));
                }
                self.begun.insert(*step);
            }
            Event::Snapshotted { role, snapshot } => {
                if self.phase != Phase::Snapshot || self.plan.file(*role).is_none() {
                    return Err(self.unexpected(&record.event));
                }
                self.snaps.insert(*role, snapshot.clone());
                self.wait_until = None;
                if self.plan.roles().all(|r| self.snaps.contains_key(&r)) {
                    self.after_snapshots();
                }
            }
            Event::Written { role } => {
                if self.phase != Phase::Write || !self.begun.contains(&Step::Write) {
                    return Err(self.unexpected(&record.event));
                }
                self.written.insert(*role);
                if self.plan.roles().all(|r| self.written.contains(&r)) {
                    self.wait_until = None;
                    self.phase = if self.plan.validate_command.is_some() { Phase::Validate } else { Phase::Reload };
                }
            }
            Event::Executed { step, result } => match (step, &self.phase) {
                (Step::Validate, Phase::Validate) => {
                    self.wait_until = None;
                    if result.success() {
                        self.phase = Phase::Reload;
                    } else {
                        self.fail(Step::Validate, "validate command failed", result.describe());
                        self.start_rollback();
                    }
                }
                (Step::Reload, Phase::Reload) if self.begun.contains(&Step::Reload) => {
                    if result.success() {
                        self.after_reload_ok();
                    } else {
                        self.fail(Step::Reload, "reload command failed", result.describe());
                        self.start_rollback();
                    }
                }
                (Step::RetryReload, Phase::RetryReload) => {
                    let r = if result.success() { Ok(()) } else { Err(result.describe()) };
                    self.after_retry_reload(r);
                }
                _ => return Err(self.unexpected(&record.event)),
            },
            Event::Verified { step, served, matched, error } => {
                let describe = || match (error, served) {
                    (Some(e), _) => e.clone(),
                    (None, Some(s)) => format!("served certificate sha256:{s}"),
                    (None, None) => "no certificate served".to_string(),
                };
                match (step, &self.phase) {
                    (Step::Verify, Phase::PreVerify) => {
                        if *matched {
                            self.phase = Phase::Cleanup(End::Outcome(Outcome::Unchanged));
                        } else {
                            // Files are right but not served: a reload was
                            // lost. Validate first (when configured), then reload.
                            self.phase =
                                if self.plan.validate_command.is_some() { Phase::Validate } else { Phase::Reload };
                        }
                    }
                    (Step::Verify, Phase::Verify) => {
                        if *matched {
                            self.phase = Phase::Commit;
                        } else {
                            self.verify_attempts += 1;
                            self.last_verify = Some(describe());
                        }
                    }
                    (Step::VerifyOriginal, Phase::VerifyOriginal) => {
                        if *matched {
                            self.original_verified = Some(true);
                            self.phase = Phase::Finishing(Outcome::RolledBack);
                        } else {
                            self.verify_attempts += 1;
                            self.last_verify = Some(describe());
                        }
                    }
                    _ => return Err(self.unexpected(&record.event)),
                }
            }
            Event::Restored { role, status, error } => {
                if self.phase != Phase::Restore || self.plan.file(*role).is_none() {
                    return Err(self.unexpected(&record.event));
                }
                self.restored.insert(*role, (*status, error.clone()));
                self.after_restore();
            }
            Event::BackupsRemoved { error } => {
                let Phase::Cleanup(end) = &self.phase else {
                    return Err(self.unexpected(&record.event));
                };
                self.cleanup_error = error.clone();
                match end.clone() {
                    End::Outcome(o) => self.phase = Phase::Finishing(o),
                    End::Abandon => {
                        self.phase = Phase::Finishing(Outcome::RolledBack);
                        self.abandon_after_rollback = true;
                    }
                }
            }
            Event::Pruned { error } => {
                if self.phase != Phase::Commit || !self.begun.contains(&Step::Commit) {
                    return Err(self.unexpected(&record.event));
                }
                self.prune_error = error.clone();
                self.wait_until = None;
                self.phase = Phase::Finishing(Outcome::Deployed);
            }
            Event::StepFailed { error, .. } if error.is_lock_lost() => {
                self.wait_until = None;
                self.lock_lost = Some(error.message.clone());
            }
            Event::StepFailed { step, role, error } => self.apply_failure(*step, *role, error, &record.event)?,
            Event::GaveUp { step, reason } => self.apply_gave_up(*step, reason, &record.event)?,
            Event::Finished { report } => {
                self.phase = Phase::Done;
                self.terminal = Some(Terminal::Finished(report.clone()));
            }
            Event::Abandoned { reason } => {
                self.phase = Phase::Done;
                self.terminal = Some(Terminal::Abandoned(reason.clone()));
            }
        }
        Ok(())
    }

    fn apply_failure(
        &mut self,
        step: Step,
        role: Option<Role>,
        error: &StepError,
        event: &Event,
    ) -> Result<(), CoreError> {
        let where_ = |d: &Deployment| match role {
            Some(r) => format!("{step} of {} ({})", r, d.live_path(r)),
            None => step.to_string(),
        };
        match (step, &self.phase) {
            (Step::Snapshot, Phase::Snapshot) => {
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    let w = where_(self);
                    self.fail(step, format!("{w} failed"), error.message.clone());
                    self.wait_until = None;
                    self.phase = Phase::Cleanup(End::Outcome(Outcome::Failed));
                }
            }
            (Step::Write, Phase::Write) if self.begun.contains(&Step::Write) => {
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    let w = where_(self);
                    self.fail(step, format!("{w} failed"), error.message.clone());
                    self.start_rollback();
                }
            }
            (Step::Lock, Phase::Write | Phase::Commit) => {
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    self.fail(step, "recording the deployment in the target lock failed", error.message.clone());
                    self.start_rollback();
                }
            }
            (Step::Validate, Phase::Validate) => {
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    self.fail(step, "validate command could not run", error.message.clone());
                    self.start_rollback();
                }
            }
            (Step::Reload, Phase::Reload) if self.begun.contains(&Step::Reload) => {
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    self.fail(step, "reload command could not run", error.message.clone());
                    self.start_rollback();
                }
            }
            (Step::Restore, Phase::Restore) => {
                let Some(role) = role else { return Err(self.unexpected(event)) };
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    let status = match self.snaps.get(&role).map(|s| &s.pre) {
                        Some(PreState::Missing) => RestoreStatus::RemoveFailed,
                        _ => RestoreStatus::RestoreFailed,
                    };
                    self.restored.insert(role, (status, Some(error.message.clone())));
                    self.after_restore();
                }
            }
            (Step::RetryReload, Phase::RetryReload) => {
                if error.is_transient() {
                    self.transient(step, error);
                } else {
                    self.after_retry_reload(Err(error.message.clone()));
                }
            }
            _ => return Err(self.unexpected(event)),
        }
        Ok(())
    }

    fn apply_gave_up(&mut self, step: Step, reason: &str, event: &Event) -> Result<(), CoreError> {
        self.wait_until = None;
        match &self.phase {
            Phase::Snapshot => {
                self.fail(step, format!("{step} gave up"), reason);
                self.phase = Phase::Cleanup(End::Outcome(Outcome::Failed));
            }
            Phase::Write if !self.begun.contains(&Step::Write) => {
                self.fail(step, format!("{step} gave up"), reason);
                self.phase = Phase::Cleanup(End::Outcome(Outcome::Failed));
            }
            Phase::Write | Phase::Validate | Phase::Reload => {
                self.fail(step, format!("{step} gave up"), reason);
                self.start_rollback();
            }
            // Deployed, but the target lock cannot say so: not committed.
            Phase::Commit => {
                self.fail(step, "recording the commit in the target lock gave up", reason);
                self.start_rollback();
            }
            Phase::Verify => {
                self.fail(Step::Verify, "verify failed: the new certificate is not served", reason);
                self.start_rollback();
            }
            Phase::Restore => {
                for f in &self.plan.files {
                    if !self.restored.contains_key(&f.role) {
                        let status = match self.snaps.get(&f.role).map(|s| &s.pre) {
                            Some(PreState::Missing) => RestoreStatus::RemoveFailed,
                            _ => RestoreStatus::RestoreFailed,
                        };
                        self.restored.insert(f.role, (status, Some(reason.to_string())));
                    }
                }
                self.after_restore();
            }
            Phase::RetryReload => self.after_retry_reload(Err(reason.to_string())),
            Phase::VerifyOriginal => {
                self.original_verified = Some(false);
                self.last_verify = Some(reason.to_string());
                self.phase = Phase::Finishing(Outcome::RolledBack);
            }
            _ => return Err(self.unexpected(event)),
        }
        Ok(())
    }

    /// A later process took over: decide per the recovery table.
    fn mark_recovering(&mut self, at: Timestamp) {
        self.needs_mark = false;
        self.recovering = true;
        self.recovery_at = Some(at);
        self.wait_until = None;
        self.step_errors.clear();
        match self.phase.clone() {
            // Nothing written yet: remove this attempt's backups; the
            // redelivered request starts afresh.
            Phase::Snapshot | Phase::PreVerify => self.phase = Phase::Cleanup(End::Abandon),
            Phase::Write | Phase::Validate | Phase::Reload => {
                // --- planted bug for the mutation tests (feature `mutations`) ---
                #[cfg(feature = "mutations")]
                let skip_rollback = crate::mutation::active(crate::mutation::Mutation::RecoveryWithoutRollback);
                #[cfg(not(feature = "mutations"))]
                let skip_rollback = false;
                // --- end of planted bug ---
                if self.may_have_written() && !skip_rollback {
                    let step = self.current_step();
                    self.fail(
                        step,
                        format!("worker stopped during {step}"),
                        "interrupted before the outcome was journaled",
                    );
                    self.abandon_after_rollback = true;
                    self.start_rollback();
                } else {
                    self.phase = Phase::Cleanup(End::Abandon);
                }
            }
            // Reload succeeded, verify pending: verify again from now.
            Phase::Verify | Phase::VerifyOriginal => {
                self.verify_since = at;
                self.verify_attempts = 0;
            }
            // Rolling back, committing, cleaning up, finishing: carry on.
            Phase::Cleanup(_)
            | Phase::Commit
            | Phase::Restore
            | Phase::RetryReload
            | Phase::Finishing(_)
            | Phase::Done => {}
        }
    }

    fn report(&self, outcome: Outcome, now: Timestamp) -> Report {
        let rolled_back = !self.restored.is_empty();
        let backup = |role: Role| {
            if self.plan.file(role).is_none() {
                BackupStatus::NotApplicable
            } else if rolled_back {
                self.restored.get(&role).map_or(BackupStatus::NotApplicable, |(s, _)| BackupStatus::Rollback(*s))
            } else {
                match self.snaps.get(&role).map(|s| &s.pre) {
                    Some(PreState::Existing { .. }) => BackupStatus::Snapshotted,
                    Some(PreState::Missing) => BackupStatus::NoPreExisting,
                    None => BackupStatus::NotApplicable,
                }
            }
        };
        let mut details = Details {
            backups: Role::ALL.into_iter().map(|r| (r, backup(r))).collect(),
            backup_cleanup_error: self.cleanup_error.clone(),
            prune_error: self.prune_error.clone(),
            original_verified: self.original_verified,
            recovered: self.recovering,
            ..Details::default()
        };
        let host = &self.plan.host;
        let failure = self.failure.clone().unwrap_or(Failure {
            step: self.current_step(),
            summary: "deployment failed".into(),
            detail: String::new(),
        });
        let failed = !outcome.success() && outcome != Outcome::Superseded;
        if failed {
            details.failed_step = Some(FailedStep::Step(failure.step));
        }
        if matches!(failure.step, Step::Reload | Step::Verify) && failed {
            details.reload_error = Some(truncate_output(&failure.detail));
        }
        if failure.step == Step::Validate && !outcome.success() {
            details.validate_error = Some(truncate_output(&failure.detail));
        }
        let detail = if failure.detail.is_empty() { String::new() } else { format!(": {}", failure.detail) };
        let message = match outcome {
            Outcome::Deployed => format!("certificate deployed to {host}"),
            Outcome::Unchanged => format!("certificate already deployed on {host}; nothing written"),
            Outcome::Superseded => {
                let (old, new) = match (&self.snaps.get(&Role::Cert).map(|s| &s.pre), self.plan.new_not_before) {
                    (Some(PreState::Existing { cert: Some(c), .. }), Some(n)) => (c.not_before, n),
                    _ => (0, 0),
                };
                details.existing_not_before = Some(old);
                details.new_not_before = Some(new);
                format!(
                    "{host} already has a newer certificate at {} (notBefore {old} > {new}); nothing written",
                    self.live_path(Role::Cert)
                )
            }
            Outcome::Failed => format!("{} on {host}; nothing written{detail}", failure.summary),
            Outcome::RolledBack => {
                details.rolled_back = Some(true);
                format!("{}; rolled back to pre-deploy state{detail}", failure.summary)
            }
            Outcome::RolledBackDaemonUnknown => {
                details.rolled_back = Some(true);
                details.daemon_state_unknown = true;
                let retry = match &self.retry_reload {
                    Some(Err(e)) => e.clone(),
                    _ => String::new(),
                };
                details.retry_reload_error = Some(truncate_output(&retry));
                format!(
                    "{}; rolled back files; retry-reload also failed; daemon may need manual restart{detail}; retry-reload: {retry}",
                    failure.summary
                )
            }
            Outcome::RollbackFailed => {
                details.rolled_back = Some(false);
                details.manual_action_required = true;
                let errors: Vec<String> = self
                    .restored
                    .iter()
                    .filter(|(_, (s, _))| !s.ok())
                    .map(|(r, (s, e))| format!("{r} {}: {}", s.as_str(), e.clone().unwrap_or_default()))
                    .collect();
                let rollback_error = errors.join("; ");
                details.rollback_error = Some(truncate_output(&rollback_error));
                let mut left = Vec::new();
                for (role, s) in &self.snaps {
                    if let PreState::Existing { backup_path, .. } = &s.pre
                        && self.restored.get(role).is_some_and(|(st, _)| !st.ok())
                    {
                        details.backups_left.insert(*role, backup_path.clone());
                        left.push(backup_path.clone());
                    }
                }
                let left =
                    if left.is_empty() { String::new() } else { format!("; backups left at {}", left.join(", ")) };
                format!(
                    "{}{detail}; rollback failed on {host}: {rollback_error}; manual action required{left}",
                    failure.summary
                )
            }
            Outcome::Rejected => format!("rejected{detail}"),
        };
        Report {
            deployment_id: self.plan.deployment_id.clone(),
            target: self.plan.target.clone(),
            host: self.plan.host.clone(),
            outcome,
            message,
            details: Box::new(details),
            attempts: self.plan.attempt,
            started_at: self.started_at,
            finished_at: now.max(self.last_at),
        }
    }
}
