//! The driver: runs a [`Deployment`] against a host, a verifier, a journal
//! and a clock, all passed in as traits. It holds no policy of its own: the
//! state machine decides, the driver journals and performs.
//!
//! The one rule it enforces: an event returned as [`Next::Record`] is
//! appended *and made durable* before anything else happens, and the state
//! machine asks for such a record before every side effect that recovery
//! must know about. Results of actions are only appended; the next durable
//! record covers them (one flush per step, shared by group commit).

use std::future::Future;

use crate::coalesce::{Coalesce, Ticket};
use crate::event::*;
use crate::lock::{Created, Held, LockFile, LockPhase};
use crate::machine::*;
use crate::model::*;
use crate::snapshot::*;
use crate::step::*;

/// Asked by a host operation made of several requests, before the request
/// that changes what others see: may this worker still change the host?
/// A worker can stall between two requests of one operation (paused,
/// swapped out, cut off) for longer than its lease; the answer is taken
/// from its own clock at that moment, not from before the stall.
pub type Fence<'a> = &'a (dyn Fn() -> bool + Sync);

/// A rewrite of the target lock handed to a host operation that carries
/// it in its own pipeline ([`Host::write_locked`], [`Host::prune_locked`]):
/// replace `path` with `bytes` as [`Host::lock_replace`] does (fsynced
/// first if `durable`; `fence` asked just before the rename is sent).
pub struct LockWrite<'a> {
    pub path: &'a str,
    pub bytes: Vec<u8>,
    pub durable: bool,
    pub fence: Box<dyn Fn() -> bool + Send + Sync + 'a>,
    /// Asked once the rename is confirmed, before the requests that need
    /// it (a write's live renames): may this worker still change the host,
    /// its lease extended by this rewrite?
    pub after: Box<dyn Fn() -> bool + Send + Sync + 'a>,
}

/// A lock rewrite's answer: the host's clock once replaced, `None` when the
/// fence said no ([`Host::lock_replace`]).
pub type Replaced = Result<Option<u64>, StepError>;
/// [`Host::write_locked`]'s answer: the lock's, then the write's.
pub type WrittenLocked = (Replaced, Vec<Result<(), StepError>>);
/// [`Host::prune_locked`]'s answer: the lock's, then the prune's (`None`:
/// not run).
pub type PrunedLocked = (Replaced, Option<Result<(), StepError>>);

impl LockWrite<'_> {
    pub fn fence(&self) -> Fence<'_> {
        &*self.fence
    }
    pub fn after(&self) -> Fence<'_> {
        &*self.after
    }
}

/// A host's file operations and commands. Implementations must be
/// idempotent per request (a step may run more than once after a crash).
pub trait Host: Send + Sync {
    /// Results align with `files`. For an existing cert file, `content`
    /// holds its (public) bytes so supersede and verify-original can be
    /// decided; never for keys.
    fn snapshot(
        &self,
        deployment_id: &str,
        files: &[SnapshotRequest],
    ) -> impl Future<Output = Vec<Result<Snapped, StepError>>> + Send;
    /// What `snapshot` reads (the same link and owner rules, the digest,
    /// size, mode and owner of an existing file, a cert file's bytes), with
    /// no change on the host at all: no backup, temp or probe file. For a
    /// dry run; an existing file's `backup_path` is empty. Results align
    /// with `files`. A host that cannot read without writing refuses.
    fn inspect(&self, files: &[SnapshotRequest]) -> impl Future<Output = Vec<Result<Snapped, StepError>>> + Send {
        let e = StepError::permanent("this host cannot be read without changing it (no dry run)");
        std::future::ready(files.iter().map(|_| Err(e.clone())).collect())
    }
    /// A revert's write: put each file back as `pre` says, keeping the
    /// backup where it is (an interrupted revert must be able to run
    /// again): an existing file's backup, which must hold `pre`'s digest,
    /// is hard-linked (or copied, with its mode and owner) to a temp and
    /// renamed over the live path; a file that did not exist is removed.
    /// Results align with `files`; a shorter vector means the rest were not
    /// attempted.
    fn reinstate(
        &self,
        deployment_id: &str,
        files: &[RestoreRequest],
    ) -> impl Future<Output = Vec<Result<(), StepError>>> + Send {
        let _ = deployment_id;
        let e = StepError::permanent("this host cannot put backups back (no revert)");
        std::future::ready(files.iter().map(|_| Err(e.clone())).collect())
    }
    /// Results align with `files`; a shorter vector means the rest were not
    /// attempted.
    fn write(
        &self,
        deployment_id: &str,
        files: &[(WriteRequest, &[u8])],
    ) -> impl Future<Output = Vec<Result<(), StepError>>> + Send;
    fn exec(&self, command: &str, timeout_ms: u64) -> impl Future<Output = Result<ExecResult, StepError>> + Send;
    /// The lock rewrite `lock`, then `write`, as one operation: the
    /// write's temps may be created and filled in the same pipeline as the
    /// lock's temp, but no live path changes before the lock's rename is
    /// confirmed. The lock's answer is [`Host::lock_replace`]'s; the
    /// write's results are empty unless the lock was replaced and then
    /// `lock.after` allowed the live renames (otherwise every temp made for
    /// the write is gone again).
    fn write_locked(
        &self,
        deployment_id: &str,
        files: &[(WriteRequest, &[u8])],
        lock: LockWrite<'_>,
    ) -> impl Future<Output = WrittenLocked> + Send;
    fn restore(
        &self,
        deployment_id: &str,
        files: &[RestoreRequest],
    ) -> impl Future<Output = Vec<Result<RestoreStatus, StepError>>> + Send;
    fn remove_backups(
        &self,
        deployment_id: &str,
        paths: &[String],
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    fn prune(
        &self,
        deployment_id: &str,
        live_paths: &[String],
        keep: u32,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    /// Remove the temp files a write of `deployment_id` may have left for
    /// these configured paths (the host resolves symlinks again), and
    /// nothing else: its backups stay. For a taker of a lock whose dead
    /// holder had not said `writing` yet, whose write may have made its
    /// temps in the same pipeline as that rewrite. A host whose writes
    /// leave no temps has nothing to do.
    // (No default for this and the `*_locked` operations: a wrapper of a
    // host must pass them on, or it silently loses what they do.)
    fn discard_temps(
        &self,
        deployment_id: &str,
        paths: &[String],
    ) -> impl Future<Output = Result<(), StepError>> + Send;
    /// The lock rewrite `lock` and `prune` as one operation: the prune's
    /// listing may travel with the lock's temp, and its removals with the
    /// lock's rename, so they may happen whether or not that rename
    /// succeeds, but never when the fence said no (then nothing was
    /// removed and the prune's answer is `None`). The lock's answer is
    /// [`Host::lock_replace`]'s.
    fn prune_locked(
        &self,
        deployment_id: &str,
        live_paths: &[String],
        keep: u32,
        lock: LockWrite<'_>,
    ) -> impl Future<Output = PrunedLocked> + Send;

    /// `exec`, but in the same remote command first check that the lock
    /// file at `guard.lock_path` still holds `guard.token`; if it does not,
    /// run nothing and fail with [`ErrorKind::LockLost`].
    fn exec_guarded(
        &self,
        command: &str,
        timeout_ms: u64,
        guard: &ExecGuard,
    ) -> impl Future<Output = Result<ExecResult, StepError>> + Send;

    // The target lock's file operations. They move whole small files
    // atomically and report the host's own clock, so that no two workers'
    // clocks are ever compared. Each is bounded by a timeout.

    /// Create `path` with `bytes` (mode 0600, content complete from the
    /// first instant) unless it exists; then nothing changes.
    fn lock_create(&self, path: &str, bytes: &[u8]) -> impl Future<Output = Result<Created, StepError>> + Send;
    /// Replace `path` (present or not) with `bytes`, atomically, fsyncing
    /// the content first if `durable`: a temp file, then a rename over
    /// `path`. `fence` is asked once the temp is written, just before the
    /// rename is sent: when it says no (the caller's lease ran out while
    /// it was stalled in between), the temp is removed, `path` is left
    /// alone and the answer is `None`. Otherwise the host's clock (whole
    /// seconds) as the new file's mtime.
    fn lock_replace(
        &self,
        path: &str,
        bytes: &[u8],
        durable: bool,
        fence: Fence<'_>,
    ) -> impl Future<Output = Result<Option<u64>, StepError>> + Send;
    /// Content and mtime, `None` when there is no such file.
    fn lock_read(&self, path: &str) -> impl Future<Output = Result<Option<LockFile>, StepError>> + Send;
    /// Remove `path`; a missing file is fine.
    fn lock_remove(&self, path: &str) -> impl Future<Output = Result<(), StepError>> + Send;
    /// Remove the temp and claim files of the lock `lock` (names for which
    /// [`crate::lock::is_lock_litter`] holds) whose mtime is before `before`
    /// (host seconds). Returns how many went.
    fn lock_sweep(&self, lock: &str, before: u64) -> impl Future<Output = Result<u32, StepError>> + Send;
    /// The path with every symlink resolved.
    fn resolve_path(&self, path: &str) -> impl Future<Output = Result<String, StepError>> + Send;
}

/// What `Host::snapshot` found at one path.
#[derive(Clone, Debug)]
pub struct Snapped {
    pub snapshot: Snapshot,
    pub content: Option<Vec<u8>>,
}

/// Fetches the leaf certificate an endpoint serves.
pub trait Verifier: Send + Sync {
    fn served_leaf(&self, endpoint: &str, sni: Option<&str>) -> impl Future<Output = Result<Digest, String>> + Send;
}

/// A verifier for deployments without `verify_endpoint`.
pub struct NoVerifier;

impl Verifier for NoVerifier {
    async fn served_leaf(&self, endpoint: &str, _sni: Option<&str>) -> Result<Digest, String> {
        Err(format!("no verifier configured for {endpoint}"))
    }
}

/// A journal that failed to append or to make records durable. The
/// journal's own error is kept as the source; its kind is what a caller
/// decides on (never the text).
#[derive(Debug, Clone)]
pub struct JournalError {
    kind: JournalErrorKind,
    source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "journal: {}", self.source)
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// What kind of journal failure a [`JournalError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalErrorKind {
    /// A flush or fsync failed earlier: what reached the disk is unknown,
    /// every later sync fails too, and only a restart (recovering from what
    /// is on disk) makes the journal trustworthy again.
    Poisoned,
    /// Any other failure (storage, I/O, encoding, a closed journal...).
    Other,
}

impl JournalError {
    pub fn new(kind: JournalErrorKind, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        JournalError { kind, source: std::sync::Arc::from(source.into()) }
    }

    pub fn kind(&self) -> JournalErrorKind {
        self.kind
    }

    /// The journal can no longer be trusted to make anything durable: the
    /// process must stop and recover from what is on disk.
    pub fn is_poisoned(&self) -> bool {
        self.kind == JournalErrorKind::Poisoned
    }
}

/// Where records go. `append` returns a sequence number; `sync(seq)`
/// returns once every record up to `seq` is durable (group commit: many
/// callers may share one flush).
pub trait Journal: Send + Sync {
    fn append(&self, deployment_id: &str, record: &Record) -> Result<u64, JournalError>;
    fn sync(&self, seq: u64) -> impl Future<Output = Result<(), JournalError>> + Send;
}

pub trait Clock: Send + Sync {
    /// Wall-clock time (journal records, deadlines).
    fn now(&self) -> Timestamp;
    fn sleep_until(&self, t: Timestamp) -> impl Future<Output = ()> + Send;
    /// A monotonic clock in ms (the holder's side of a lock lease): never
    /// steps, counts on while the process is paused. The default is the
    /// wall clock, for clocks that never step (tests).
    fn mono_ms(&self) -> u64 {
        self.now().0
    }
    fn sleep_mono_until(&self, ms: u64) -> impl Future<Output = ()> + Send {
        self.sleep_until(Timestamp(ms))
    }
}

/// Everything a deployment runs against.
pub struct Env<'a, H, V, J, C> {
    pub host: &'a H,
    pub verifier: &'a V,
    pub journal: &'a J,
    pub clock: &'a C,
    /// Parses public facts from a certificate file's bytes (pki crate).
    pub cert_facts: fn(&[u8]) -> Option<CertFacts>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("journal replay: {0}")]
    Core(#[from] CoreError),
    #[error("no content for {0} in this process (a recovered attempt never writes)")]
    MissingPayload(Role),
    #[error("target lock: {0}")]
    Lock(StepError),
}

macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

/// Start a new attempt: journal `Started` durably, then run it.
pub async fn start<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    plan: Plan,
    payload: &Payload,
) -> Result<Terminal, DriveError> {
    start_locked(env, plan, payload, None).await
}

/// [`start`] for an attempt holding the target lock `lock`.
pub async fn start_locked<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    plan: Plan,
    payload: &Payload,
    lock: Option<&Held>,
) -> Result<Terminal, DriveError> {
    start_coalesced(env, plan, payload, lock, Coalesce::Off).await
}

/// [`start_locked`], the validate and reload shared as `coalesce` says.
pub async fn start_coalesced<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    plan: Plan,
    payload: &Payload,
    lock: Option<&Held>,
    coalesce: Coalesce<'_>,
) -> Result<Terminal, DriveError> {
    let at = env.clock.now();
    let key = plan.deployment_id.clone();
    let rec = Record { at, event: Event::Started { plan: plan.clone() } };
    record(env, &key, &rec).await?;
    run_coalesced(env, &key, Deployment::start(plan, at), Some(payload), lock, coalesce).await
}

/// Resume an interrupted attempt from its journal records.
pub async fn resume<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    records: &[Record],
) -> Result<Terminal, DriveError> {
    let dep = Deployment::replay(records)?;
    run(env, dep, None).await
}

pub(crate) async fn record<H, V, J: Journal, C>(
    env: &Env<'_, H, V, J, C>,
    id: &str,
    rec: &Record,
) -> Result<(), DriveError> {
    failpoint!("before_journal_append");
    let seq = env.journal.append(id, rec)?;
    failpoint!("after_journal_append");
    #[cfg(feature = "mutations")]
    if crate::mutation::active(crate::mutation::Mutation::UnflushedBegunWrite)
        && matches!(rec.event, Event::Begun { step: Step::Write })
    {
        return Ok(());
    }
    env.journal.sync(seq).await?;
    failpoint!("after_journal_sync");
    Ok(())
}

/// Drive a deployment until it reaches a terminal state.
pub async fn run<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    dep: Deployment,
    payload: Option<&Payload>,
) -> Result<Terminal, DriveError> {
    let key = dep.plan().deployment_id.clone();
    run_keyed(env, &key, dep, payload, None).await
}

/// [`run`] with the journal key given (a takeover's rollback is journaled
/// under its own key) and, for an attempt that holds the target lock,
/// that lock: the machine's `LockPhase` actions rewrite it. The caller
/// races this against the lock's [`Held::watch`].
pub async fn run_keyed<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    key: &str,
    dep: Deployment,
    payload: Option<&Payload>,
    lock: Option<&Held>,
) -> Result<Terminal, DriveError> {
    run_coalesced(env, key, dep, payload, lock, Coalesce::Off).await
}

/// [`run_keyed`], with the validate and reload shared with other
/// deployments as `coalesce` says (see [`crate::coalesce`]). Each member
/// journals its own records around a shared command: `ReloadShared`
/// before it, its own `Begun` before the reload, its own result after.
pub async fn run_coalesced<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    key: &str,
    mut dep: Deployment,
    payload: Option<&Payload>,
    lock: Option<&Held>,
    coalesce: Coalesce<'_>,
) -> Result<Terminal, DriveError> {
    let mut ticket: Option<Ticket> = None;
    loop {
        let now = env.clock.now();
        match dep.next(now) {
            Next::Done(t) => {
                if let (Some(t), Coalesce::Join { slot, .. }) = (ticket.take(), coalesce) {
                    t.leave();
                    slot.put(t);
                }
                return Ok(t);
            }
            Next::Wait(t) => env.clock.sleep_until(t).await,
            Next::Record(event) => {
                // A member of a batch enters it before its first write.
                if let (Event::Begun { step: Step::Write }, Coalesce::Join { reloads, key: k, expected, .. }, None) =
                    (&event, coalesce, &ticket)
                {
                    ticket = Some(reloads.enter_expected(k, env.clock, expected).await);
                }
                tracing::debug!(deployment_id = %key, event = event_name(&event), "journal");
                let rec = Record { at: now, event };
                record(env, key, &rec).await?;
                dep.apply(&rec)?;
            }
            Next::Perform(Action::Exec { .. }) if dep.sharing() == Sharing::Join && coalesce.on() => {
                let with = match coalesce {
                    Coalesce::Join { reloads, key: k, expected, .. } => {
                        let t = match &mut ticket {
                            Some(t) => t,
                            None => ticket.insert(reloads.enter_expected(k, env.clock, expected).await),
                        };
                        t.close(env.clock).await
                    }
                    _ => 1,
                };
                // Appended, not waited for: it guards no side effect of
                // its own (a validate changes nothing), and the `Begun`
                // made durable before the reload makes it durable too (the
                // journal syncs in order). Lost in a crash before that, the
                // member recovers like one that never joined a batch.
                let rec = Record { at: env.clock.now(), event: Event::ReloadShared { with } };
                env.journal.append(key, &rec)?;
                dep.apply(&rec)?;
            }
            Next::Perform(action) => {
                // The fence: no host operation starts once the lease has
                // run out by this worker's own clock.
                let events = match lock {
                    Some(l) if !l.valid(env.clock.mono_ms()) => vec![Event::StepFailed {
                        step: Step::Lock,
                        role: None,
                        error: StepError::lock_lost(l.lost_reason()),
                    }],
                    _ => match (&action, dep.sharing(), &ticket, lock) {
                        (Action::Exec { step, command, timeout_ms, guard }, Sharing::Shared(_), Some(t), _) => {
                            let r = t.exec(*step, || exec(env, *step, command, *timeout_ms, guard.as_ref())).await;
                            vec![exec_event(*step, r)]
                        }
                        (Action::LockPhase { phase, snapshots }, _, _, Some(held)) => {
                            match after_lock_phase(&dep, *phase, now)? {
                                Some(then) => perform_locked(env, held, *phase, snapshots, &then, payload).await?,
                                None => perform(env, &action, payload, lock).await?,
                            }
                        }
                        _ => perform(env, &action, payload, lock).await?,
                    },
                };
                for event in events {
                    let rec = Record { at: env.clock.now(), event };
                    env.journal.append(key, &rec)?;
                    dep.apply(&rec)?;
                }
            }
        }
    }
}

/// The action the machine asks for right after the lock says `phase`,
/// when it is one whose requests can carry the lock's rewrite (the write
/// after `writing`, the prune after `committing`): asked of a copy of the
/// attempt with the rewrite applied, so the machine decides as it would
/// one step later.
fn after_lock_phase(dep: &Deployment, phase: LockPhase, now: Timestamp) -> Result<Option<Action>, CoreError> {
    let mut ahead = dep.clone();
    ahead.apply(&Record { at: now, event: Event::LockPhase { phase } })?;
    Ok(match ahead.next(now) {
        Next::Perform(a @ (Action::Write { .. } | Action::Prune { .. })) => Some(a),
        _ => None,
    })
}

/// The lock rewrite to `phase` and the action after it (`then`, see
/// [`after_lock_phase`]) as one host operation: one pipeline instead of
/// two. Its events are the two steps' in their order: the rewrite's
/// `LockPhase`, then the action's; when the rewrite fails, its
/// `StepFailed{Lock}` alone (the machine retries or rolls back, and the
/// action is asked for again; a prune that went with a failed rewrite is
/// harmless and done again).
async fn perform_locked<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    held: &Held,
    phase: LockPhase,
    snapshots: &[(Role, Snapshot)],
    then: &Action,
    payload: Option<&Payload>,
) -> Result<Vec<Event>, DriveError> {
    let edit = |rec: &mut crate::lock::LockRecord| {
        rec.phase = phase;
        rec.snapshots = snapshots.to_vec();
    };
    let lock_failed = |error| vec![Event::StepFailed { step: Step::Lock, role: None, error }];
    match then {
        Action::Write { deployment_id, files } => {
            let batch = write_batch(files, payload)?;
            failpoint!("before_write");
            let (r, results) =
                held.rewrite_with(env.clock, edit, |w| env.host.write_locked(deployment_id, &batch, w)).await;
            failpoint!("after_write");
            Ok(match r {
                Ok(()) => {
                    let mut events = vec![Event::LockPhase { phase }];
                    events.extend(written(files.iter().map(|f| f.role), results.unwrap_or_default()));
                    events
                }
                Err(error) => lock_failed(error),
            })
        }
        Action::Prune { deployment_id, live_paths, keep } => {
            failpoint!("before_prune");
            let (r, pruned) = held
                .rewrite_with(env.clock, edit, |w| env.host.prune_locked(deployment_id, live_paths, *keep, w))
                .await;
            failpoint!("after_prune");
            Ok(match (r, pruned.flatten()) {
                (Ok(()), Some(p)) => {
                    vec![Event::LockPhase { phase }, Event::Pruned { error: p.err().map(|e| e.message) }]
                }
                (Ok(()), None) => vec![Event::LockPhase { phase }],
                (Err(error), _) => lock_failed(error),
            })
        }
        // Nothing to carry it: the rewrite on its own.
        _ => {
            let alone = Action::LockPhase { phase, snapshots: snapshots.to_vec() };
            perform(env, &alone, payload, Some(held)).await
        }
    }
}

/// The bytes of each file to write, from the payload.
fn write_batch<'p>(
    files: &[WriteRequest],
    payload: Option<&'p Payload>,
) -> Result<Vec<(WriteRequest, &'p [u8])>, DriveError> {
    let payload = payload.ok_or(DriveError::MissingPayload(files.first().map_or(Role::Cert, |f| f.role)))?;
    let mut batch = Vec::with_capacity(files.len());
    for f in files {
        let bytes = payload.get(f.role).ok_or(DriveError::MissingPayload(f.role))?;
        batch.push((f.clone(), bytes));
    }
    Ok(batch)
}

/// [`Host::write_locked`] as two operations, one after the other: for a
/// host whose requests do not pipeline.
pub async fn write_locked_in_turn<H: Host>(
    host: &H,
    deployment_id: &str,
    files: &[(WriteRequest, &[u8])],
    lock: LockWrite<'_>,
) -> WrittenLocked {
    match host.lock_replace(lock.path, &lock.bytes, lock.durable, lock.fence()).await {
        Ok(Some(t)) if lock.after()() => (Ok(Some(t)), host.write(deployment_id, files).await),
        other => (other, Vec::new()),
    }
}

/// [`Host::prune_locked`] as two operations, one after the other.
pub async fn prune_locked_in_turn<H: Host>(
    host: &H,
    deployment_id: &str,
    live_paths: &[String],
    keep: u32,
    lock: LockWrite<'_>,
) -> PrunedLocked {
    match host.lock_replace(lock.path, &lock.bytes, lock.durable, lock.fence()).await {
        Ok(Some(t)) => (Ok(Some(t)), Some(host.prune(deployment_id, live_paths, keep).await)),
        other => (other, None),
    }
}

/// A short name for logs.
pub fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Started { .. } => "started",
        Event::Recovering => "recovering",
        Event::TakenOver { .. } => "taken_over",
        Event::Begun { .. } => "begun",
        Event::ReloadShared { .. } => "reload_shared",
        Event::Snapshotted { .. } => "snapshotted",
        Event::Written { .. } => "written",
        Event::BackupChecked { .. } => "backup_checked",
        Event::Executed { .. } => "executed",
        Event::Verified { .. } => "verified",
        Event::Restored { .. } => "restored",
        Event::BackupsRemoved { .. } => "backups_removed",
        Event::Pruned { .. } => "pruned",
        Event::LockPhase { .. } => "lock_phase",
        Event::StepFailed { .. } => "step_failed",
        Event::GaveUp { .. } => "gave_up",
        Event::Finished { .. } => "finished",
        Event::Abandoned { .. } => "abandoned",
    }
}

async fn perform<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    action: &Action,
    payload: Option<&Payload>,
    lock: Option<&Held>,
) -> Result<Vec<Event>, DriveError> {
    let events = match action {
        Action::Snapshot { deployment_id, files } => {
            failpoint!("before_snapshot");
            let results = env.host.snapshot(deployment_id, files).await;
            failpoint!("after_snapshot");
            let events = files
                .iter()
                .zip(results)
                .map(|(req, r)| match r {
                    Ok(s) => Event::Snapshotted {
                        role: req.role,
                        snapshot: with_facts(env.cert_facts, payload, req.role, s),
                    },
                    Err(error) => Event::StepFailed { step: Step::Snapshot, role: Some(req.role), error },
                })
                .collect();
            successes_then_one_failure(events)
        }
        Action::Write { deployment_id, files } => {
            let batch = write_batch(files, payload)?;
            failpoint!("before_write");
            let results = env.host.write(deployment_id, &batch).await;
            failpoint!("after_write");
            written(files.iter().map(|f| f.role), results)
        }
        Action::CheckBackups { files } => {
            failpoint!("before_check_backups");
            let results = env.host.inspect(files).await;
            let events = files
                .iter()
                .zip(results)
                .map(|(req, r)| match r {
                    Ok(s) => Event::BackupChecked {
                        role: req.role,
                        sha256: match s.snapshot.pre {
                            PreState::Existing { sha256, .. } => Some(sha256),
                            PreState::Missing => None,
                        },
                    },
                    Err(error) => Event::StepFailed { step: Step::Snapshot, role: Some(req.role), error },
                })
                .collect();
            successes_then_one_failure(events)
        }
        Action::Reinstate { deployment_id, files } => {
            failpoint!("before_write");
            let results = env.host.reinstate(deployment_id, files).await;
            failpoint!("after_write");
            written(files.iter().map(|f| f.role), results)
        }
        Action::Exec { step, command, timeout_ms, guard } => {
            vec![exec_event(*step, exec(env, *step, command, *timeout_ms, guard.as_ref()).await)]
        }
        Action::Verify { step, endpoint, sni, expected } => {
            failpoint!("before_verify");
            let r = env.verifier.served_leaf(endpoint, sni.as_deref()).await;
            vec![match r {
                Ok(served) => {
                    Event::Verified { step: *step, served: Some(served), matched: served == *expected, error: None }
                }
                Err(e) => Event::Verified { step: *step, served: None, matched: false, error: Some(e) },
            }]
        }
        Action::Restore { deployment_id, files } => {
            failpoint!("before_restore");
            let results = env.host.restore(deployment_id, files).await;
            failpoint!("after_restore");
            files
                .iter()
                .zip(results)
                .map(|(f, r)| match r {
                    Ok(status) => Event::Restored { role: f.role, status, error: None },
                    Err(error) => Event::StepFailed { step: Step::Restore, role: Some(f.role), error },
                })
                .collect()
        }
        Action::RemoveBackups { deployment_id, paths } => {
            failpoint!("before_cleanup");
            let r = env.host.remove_backups(deployment_id, paths).await;
            failpoint!("after_cleanup");
            vec![Event::BackupsRemoved { error: r.err().map(|e| e.message) }]
        }
        Action::Prune { deployment_id, live_paths, keep } => {
            failpoint!("before_prune");
            let r = env.host.prune(deployment_id, live_paths, *keep).await;
            failpoint!("after_prune");
            vec![Event::Pruned { error: r.err().map(|e| e.message) }]
        }
        Action::LockPhase { phase, snapshots } => {
            let r = match lock {
                Some(l) => {
                    l.rewrite(env.host, env.clock, |rec| {
                        rec.phase = *phase;
                        rec.snapshots = snapshots.clone();
                    })
                    .await
                }
                None => Err(StepError::lock_lost("this attempt holds no target lock")),
            };
            vec![match r {
                Ok(()) => Event::LockPhase { phase: *phase },
                Err(error) => Event::StepFailed { step: Step::Lock, role: None, error },
            }]
        }
    };
    Ok(events)
}

/// Run a configured command (guarded by the target lock when given).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
async fn exec<H: Host, V, J, C>(
    env: &Env<'_, H, V, J, C>,
    step: Step,
    command: &str,
    timeout_ms: u64,
    guard: Option<&ExecGuard>,
) -> Result<ExecResult, StepError> {
    failpoint!(exec_fp(step, true));
    let r = match guard {
        Some(g) => env.host.exec_guarded(command, timeout_ms, g).await,
        None => env.host.exec(command, timeout_ms).await,
    };
    failpoint!(exec_fp(step, false));
    r
}

fn exec_event(step: Step, r: Result<ExecResult, StepError>) -> Event {
    match r {
        Ok(result) => Event::Executed { step, result },
        Err(error) => Event::StepFailed { step, role: None, error },
    }
}

/// The snapshot of what `Host::snapshot` (or `Host::inspect`) found, with
/// the public facts of an existing certificate file (for supersede) and
/// what an existing keystore holds when it opens with the configured
/// password (for `unchanged`: its bytes differ at every build).
pub(crate) fn with_facts(
    cert_facts: fn(&[u8]) -> Option<CertFacts>,
    payload: Option<&Payload>,
    role: Role,
    mut s: Snapped,
) -> Snapshot {
    match (role, &mut s.snapshot.pre, s.content.as_deref()) {
        (Role::Cert, PreState::Existing { cert, .. }, Some(bytes)) => *cert = cert_facts(bytes),
        (Role::Pkcs12, PreState::Existing { holds, .. }, Some(bytes)) => {
            *holds = payload.and_then(|p| p.keystore_holds(bytes));
        }
        _ => {}
    }
    s.snapshot
}

/// The events of a write (or a reinstate from backups): `written` per
/// file put in place, then the one failure that decides.
fn written(roles: impl Iterator<Item = Role>, results: Vec<Result<(), StepError>>) -> Vec<Event> {
    let events = roles
        .zip(results)
        .map(|(role, r)| match r {
            Ok(()) => Event::Written { role },
            Err(error) => Event::StepFailed { step: Step::Write, role: Some(role), error },
        })
        .collect();
    successes_then_one_failure(events)
}

/// Within one snapshot or write batch, record every success first (they
/// happened), then the single failure that decides what comes next: the
/// first permanent one if any, else the first transient one.
fn successes_then_one_failure(events: Vec<Event>) -> Vec<Event> {
    let (mut out, failures): (Vec<Event>, Vec<Event>) =
        events.into_iter().partition(|e| !matches!(e, Event::StepFailed { .. }));
    let permanent = failures.iter().position(|e| matches!(e, Event::StepFailed { error, .. } if !error.is_transient()));
    if let Some(f) = failures.into_iter().nth(permanent.unwrap_or(0)) {
        out.push(f);
    }
    out
}

#[cfg(feature = "failpoints")]
fn exec_fp(step: Step, before: bool) -> &'static str {
    match (step, before) {
        (Step::Validate, true) => "before_validate",
        (Step::Validate, false) => "after_validate",
        (Step::Reload, true) => "before_reload",
        (Step::Reload, false) => "after_reload",
        (_, true) => "before_retry_reload",
        (_, false) => "after_retry_reload",
    }
}
