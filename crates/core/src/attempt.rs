//! One attempt of a request on a target that other workers share: take the
//! target lock, deal with what a dead holder left, deploy under the lock,
//! release it; and the resumption of an interrupted attempt after a
//! restart. "Deferred", "lock failed", "taken over" and "lock lost" are
//! decided here. The caller provides the host, journal and clock (the
//! worker's runtime, or the fleet simulation), the in-process ordering per
//! target, and the broker.

use crate::coalesce::Coalesce;
use crate::driver::{self, Clock, DriveError, Env, Host, Journal, Verifier};
use crate::event::*;
use crate::lock::{
    Acquired, Held, LOCK_VERSION, LockPhase, LockRecord, Planted, acquire, lock_path, reacquire, short_hash,
};
use crate::machine::{Deployment, Terminal};
use crate::model::*;
use crate::report::*;
use crate::snapshot::*;

/// Marks the journal key of a takeover's rollback (`<id>~takeover~<hash>`;
/// `~` is not allowed in deployment ids).
pub const TAKEOVER_KEY: &str = "~takeover~";

/// Who is taking locks, and how.
pub struct Worker<'a> {
    /// Worker name (results' `worker`, the lock's `worker`).
    pub name: &'a str,
    /// The journal's random id (the lock's `journal`).
    pub journal_id: &'a str,
    pub lease_ms: u64,
    /// Is this lock one of this journal's that no live deployment holds (a
    /// previous process of this worker died holding it)? Taken over at once.
    pub dead_own: &'a (dyn Fn(&LockRecord) -> bool + Sync),
    /// Told about takeovers and lost locks (metrics).
    pub notice: &'a (dyn Fn(Notice) + Sync),
    pub planted: Planted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Took over the expired lock of this holder.
    TookOver(String),
    /// A held lock was lost (why).
    LockLost(String),
}

/// What [`execute`] ended with.
#[derive(Debug)]
pub enum Executed {
    /// The result to publish.
    Report(Report),
    /// The target is locked by another live deployment (or a newer
    /// certdeploy): try again later. The host was not touched.
    Deferred { holder: String },
    /// The attempt ended without a result (rolled back by recovery, or its
    /// lock was lost and it stopped): the request runs again, as a new
    /// attempt.
    Abandoned(String),
}

/// Bounded exponential backoff for taking a target lock over a flaky link.
fn lock_backoff_ms(tries: u32) -> u64 {
    1000u64.saturating_mul(1 << tries.min(6)).min(60_000)
}

/// Run a new attempt of `plan` under the target lock, token `token`
/// (unique per acquisition).
pub async fn execute<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    w: &Worker<'_>,
    plan: Plan,
    payload: &Payload,
    token: String,
) -> Result<Executed, DriveError> {
    execute_coalesced(env, w, plan, payload, token, Coalesce::Off).await
}

/// [`execute`], the validate and reload shared with other deployments as
/// `coalesce` says (see [`crate::coalesce`]).
pub async fn execute_coalesced<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    w: &Worker<'_>,
    mut plan: Plan,
    payload: &Payload,
    token: String,
    coalesce: Coalesce<'_>,
) -> Result<Executed, DriveError> {
    let path = lock_path(plan.cert_path());
    let mine = LockRecord {
        v: LOCK_VERSION,
        token: token.clone(),
        worker: w.name.to_string(),
        journal: w.journal_id.to_string(),
        deployment_id: plan.deployment_id.clone(),
        attempt: plan.attempt,
        phase: LockPhase::Locked,
        lease_ms: w.lease_ms,
        seq: 0,
        acquired_at_ms: env.clock.now().0,
        snapshots: vec![],
    };
    let lock_failed = |msg: String| {
        tracing::warn!(deployment_id = %plan.deployment_id, "{msg}");
        Executed::Report(Report::lock_failed(&plan.deployment_id, &plan.target, &plan.host, msg, env.clock.now()))
    };
    let deadline = env.clock.now().plus_ms(plan.policy.deadline_ms);
    let mut tries = 0;
    let (held, took_over) = loop {
        let since = env.clock.mono_ms();
        match acquire(env.host, env.clock, &path, &mine, w.dead_own, w.planted).await {
            Ok(Acquired::Ours { took_over, written, host_now }) => {
                break (Held::new(path.clone(), *written, since, host_now, w.planted), took_over);
            }
            Ok(Acquired::Held { holder }) => {
                tracing::info!(lock = %path, "target locked by {holder}: deferring");
                return Ok(Executed::Deferred { holder });
            }
            Err(e) if e.is_transient() && env.clock.now().plus_ms(lock_backoff_ms(tries)) < deadline => {
                tracing::warn!(lock = %path, "taking the target lock failed (will retry): {}", e.message);
                env.clock.sleep_until(env.clock.now().plus_ms(lock_backoff_ms(tries))).await;
                tries += 1;
            }
            Err(e) => {
                return Ok(lock_failed(format!(
                    "could not take the target lock {path}; the host was not changed: {}",
                    e.message
                )));
            }
        }
    };
    if let Some(dead) = took_over {
        tracing::warn!(lock = %path, "took over the target lock of {}", dead.describe());
        (w.notice)(Notice::TookOver(dead.describe()));
        match settle(env, w, &plan, &held, &dead).await? {
            Settled::Done => {}
            // The lock stays, with the instructions, for the next taker or
            // a person.
            Settled::Refused(msg) => return Ok(lock_failed(msg)),
            // Lost in the middle: whoever has it now deals with the host.
            Settled::Lost(why) => return Ok(Executed::Abandoned(why)),
        }
        let (id, attempt) = (plan.deployment_id.clone(), plan.attempt);
        let own = held.rewrite(env.host, env.clock, |r| {
            r.deployment_id = id;
            r.attempt = attempt;
            r.phase = LockPhase::Locked;
            r.snapshots.clear();
        });
        match own.await {
            Ok(()) => {}
            // Someone else has it now: this request runs again (the host
            // was not touched for it).
            Err(e) if e.is_lock_lost() => {
                return Ok(Executed::Abandoned(format!("target lock {path} lost after a takeover: {}", e.message)));
            }
            Err(e) => {
                return Ok(lock_failed(format!(
                    "target lock {path} could not be rewritten after a takeover: {}",
                    e.message
                )));
            }
        }
    }
    plan.lock = Some(token);
    let key = plan.deployment_id.clone();
    let run = driver::start_coalesced(env, plan, payload, Some(&held), coalesce);
    let t = match held.guard(env.host, env.clock, run).await {
        Some(t) => t?,
        None => return lost(env, w, &key, &held).await.map(Executed::Abandoned),
    };
    // Only after the terminal record is durable (and never after a driver
    // error: the lock then keeps the instructions for whoever comes next).
    release(env, &held).await;
    Ok(match t {
        Terminal::Finished(r) => Executed::Report(r),
        Terminal::Abandoned(why) => Executed::Abandoned(why),
    })
}

/// Finish an interrupted attempt journaled under `key` (its `records`), per
/// the recovery table, first making sure its target lock is still ours:
/// if another worker took it over meanwhile, journal `Abandoned` without
/// touching the host.
pub async fn resume<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    w: &Worker<'_>,
    key: &str,
    records: &[Record],
) -> Result<Terminal, DriveError> {
    let dep = Deployment::replay(records)?;
    let plan = dep.plan().clone();
    let Some(token) = plan.lock.clone() else {
        // Journaled before host locks existed.
        return driver::run_keyed(env, key, dep, None, None).await;
    };
    let path = lock_path(plan.cert_path());
    let mut tries = 0;
    let held = loop {
        let since = env.clock.mono_ms();
        match reacquire(env.host, env.clock, &path, &token, w.planted).await {
            Ok(Some((rec, host_now))) => break Held::new(path.clone(), rec, since, host_now, w.planted),
            Ok(None) => {
                let why = format!(
                    "the target lock {path} was taken over by another worker while this one was down; this worker did not touch the host again for this attempt"
                );
                tracing::warn!(key, "{why}");
                abandon(env, key, &why).await?;
                return Ok(Terminal::Abandoned(why));
            }
            Err(e) if e.is_transient() && tries < 5 => {
                tracing::warn!(key, lock = %path, "re-taking the target lock failed (will retry): {}", e.message);
                env.clock.sleep_until(env.clock.now().plus_ms(lock_backoff_ms(tries))).await;
                tries += 1;
            }
            Err(e) => return Err(DriveError::Lock(e)),
        }
    };
    let run = driver::run_keyed(env, key, dep, None, Some(&held));
    let t = match held.guard(env.host, env.clock, run).await {
        Some(t) => t?,
        None => return lost(env, w, key, &held).await.map(Terminal::Abandoned),
    };
    release(env, &held).await;
    Ok(t)
}

async fn abandon<H, V, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    key: &str,
    why: &str,
) -> Result<(), DriveError> {
    let rec = Record { at: env.clock.now(), event: Event::Abandoned { reason: why.to_string() } };
    driver::record(env, key, &rec).await
}

/// The lock went away under a running attempt: journal it abandoned; this
/// worker does not touch the host for it again.
async fn lost<H, V, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    w: &Worker<'_>,
    key: &str,
    held: &Held,
) -> Result<String, DriveError> {
    let why = format!("{}; this worker stopped touching the host for this attempt", held.lost_reason());
    tracing::warn!(key, "{why}");
    (w.notice)(Notice::LockLost(why.clone()));
    abandon(env, key, &why).await?;
    Ok(why)
}

async fn release<H: Host, V, J, C: Clock>(env: &Env<'_, H, V, J, C>, held: &Held) {
    if let Err(e) = held.release(env.host, env.clock).await {
        tracing::warn!(lock = %held.path(), "releasing the target lock failed (it expires): {}", e.message);
    }
}

/// How a takeover's clean-up ended.
enum Settled {
    /// The host is in order: the taker's own request may go on.
    Done,
    /// The host is not in order (the message says why) and this request
    /// must not deploy.
    Refused(String),
    /// The lock was lost in the middle.
    Lost(String),
}

/// Put the host back in order after taking over `dead`'s lock: roll a
/// `writing` deployment back (journaled under its own key), finish a
/// `committing` one's prune.
async fn settle<H: Host, V: Verifier, J: Journal, C: Clock>(
    env: &Env<'_, H, V, J, C>,
    w: &Worker<'_>,
    plan: &Plan,
    held: &Held,
    dead: &LockRecord,
) -> Result<Settled, DriveError> {
    if dead.phase != LockPhase::Locked
        && let Err(why) = check_instructions(env.host, plan, dead).await
    {
        return Ok(Settled::Refused(why));
    }
    let roll_back = match dead.phase {
        LockPhase::Locked => {
            // Nothing changed on the host, but the dead holder's write may
            // have made its temps before the lock could say `writing` (they
            // travel together): they go, by the names its id gives them.
            if valid_attempt_id(&dead.deployment_id) && held.valid(env.clock.mono_ms()) {
                let paths: Vec<String> = plan.files.iter().map(|f| f.path.clone()).collect();
                if let Err(e) = env.host.discard_temps(&dead.deployment_id, &paths).await {
                    tracing::warn!("removing the temps of taken-over {}: {}", dead.deployment_id, e.message);
                }
            }
            return Ok(Settled::Done);
        }
        LockPhase::Writing => true,
        #[cfg(feature = "testkit")]
        LockPhase::Committing if w.planted == Planted::RollBackCommitting => true,
        LockPhase::Committing => false,
    };
    if !roll_back {
        // Never rolled back: `deployed` may already be journaled. The lock
        // already says `committing` (inherited): nothing to rewrite first.
        let paths: Vec<String> = dead.snapshots.iter().map(|(_, s)| s.live_path.clone()).collect();
        if !held.valid(env.clock.mono_ms()) {
            return Ok(Settled::Lost(format!("target lock {} lost during a takeover", held.path())));
        }
        if let Err(e) = env.host.prune(&dead.deployment_id, &paths, plan.policy.keep_backups.max(1)).await {
            tracing::warn!("pruning the backups of taken-over {}: {}", dead.deployment_id, e.message);
        }
        return Ok(Settled::Done);
    }
    let key = format!("{}{TAKEOVER_KEY}{}", dead.deployment_id, short_hash(&dead.token, 6));
    let mut rb = plan.clone();
    rb.deployment_id = dead.deployment_id.clone();
    rb.attempt = dead.attempt;
    rb.lock = Some(held.token());
    rb.files.retain(|f| dead.snapshots.iter().any(|(r, _)| *r == f.role));
    if rb.files.len() != dead.snapshots.len() {
        return Ok(Settled::Refused(format!(
            "the interrupted deployment {} on this target wrote files this worker's target config does not have; roll it back by hand from {} (lock {})",
            dead.deployment_id,
            dead.snapshots.iter().map(|(_, s)| s.live_path.as_str()).collect::<Vec<_>>().join(", "),
            held.path()
        )));
    }
    let at = env.clock.now();
    let records = vec![
        Record { at, event: Event::Started { plan: rb } },
        Record { at, event: Event::TakenOver { from: dead.describe(), snapshots: dead.snapshots.clone() } },
    ];
    env.journal.append(&key, &records[0])?;
    driver::record(env, &key, &records[1]).await?;
    let dep = Deployment::replay(&records)?;
    let run = driver::run_keyed(env, &key, dep, None, Some(held));
    let t = match held.guard(env.host, env.clock, run).await {
        Some(t) => t?,
        None => return Ok(Settled::Lost(lost(env, w, &key, held).await?)),
    };
    match t {
        Terminal::Abandoned(why) if why.contains("target lock") => Ok(Settled::Lost(why)),
        Terminal::Abandoned(_) => Ok(Settled::Done),
        Terminal::Finished(r) if r.outcome == Outcome::RolledBackDaemonUnknown => Ok(Settled::Done),
        Terminal::Finished(r) => Ok(Settled::Refused(format!(
            "rolling back the interrupted deployment {} of another worker failed ({}): {}",
            dead.deployment_id, r.outcome, r.message
        ))),
    }
}

/// The lock file is only as trustworthy as the directory it lives in:
/// before acting on a dead holder's instructions, check that they name
/// exactly this target's files (as configured, or where their symlinks
/// lead) and backups under the only name a deployment gives them.
/// Otherwise a crafted lock could make a rollback rename or remove files
/// elsewhere.
async fn check_instructions<H: Host>(host: &H, plan: &Plan, dead: &LockRecord) -> Result<(), String> {
    let refuse = |why: String| {
        Err(format!(
            "the target lock {} holds rollback instructions this worker will not follow ({why}); check the host and remove the lock by hand",
            lock_path(plan.cert_path())
        ))
    };
    if !valid_attempt_id(&dead.deployment_id) {
        return refuse(format!("deployment id {:?} is not a valid id", dead.deployment_id));
    }
    for (role, snap) in &dead.snapshots {
        let Some(file) = plan.file(*role) else { return refuse(format!("no {role} file in this target")) };
        if snap.live_path != file.path {
            match host.resolve_path(&file.path).await {
                Ok(real) if real == snap.live_path => {}
                Ok(_) => return refuse(format!("{role} path {} is not this target's {}", snap.live_path, file.path)),
                // A path that resolves where a deployment may not go (other
                // local users may write the target's directories, so a link
                // there is not trusted): the instructions are not followed
                // either.
                Err(e) if !e.is_transient() => return refuse(format!("resolving {}: {}", file.path, e.message)),
                Err(e) => {
                    return Err(format!(
                        "the target lock {}: resolving {}: {}",
                        lock_path(plan.cert_path()),
                        file.path,
                        e.message
                    ));
                }
            }
        }
        if let PreState::Existing { backup_path: b, .. } = &snap.pre
            && *b != backup_path(&snap.live_path, &dead.deployment_id)
        {
            return refuse(format!("backup {b} is not named after {}", snap.live_path));
        }
    }
    Ok(())
}
