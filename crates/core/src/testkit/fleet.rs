//! A deterministic fleet: several workers, each with its own in-memory
//! journal that loses unflushed records when the worker is killed, sharing
//! one simulated host that holds the targets' files *and* the lock, claim
//! and temp files, and one broker that redelivers unacked messages to any
//! worker. The workers run the production code ([`crate::attempt`], the
//! lock protocol, the driver and the deployment machine); only the host,
//! journals, clocks and broker are simulated.
//!
//! Each worker is a future polled by the test, one step at a time, with a
//! no-op waker: every host operation takes effect on the poll that issues
//! it and answers on a later one, a journal flush completes on a later
//! poll, and sleeps end when the simulated time has come. So the test
//! chooses the interleaving, and:
//!
//! - a **kill** is dropping a worker's future (wherever it was waiting)
//!   and the unflushed tail of its journal; its unacked message goes back
//!   to the broker;
//! - a **stall** (a paused or partitioned worker) is not polling it while
//!   time passes — also between a request and its answer;
//! - a **slow lock operation** lands on the host some time after it was
//!   issued;
//! - the **host's clock** (file mtimes) is separate from each worker's
//!   monotonic clock (each with its own offset) and can jump.
//!
//! The host checks the fleet's guarantees as it goes: every side effect on
//! a target's files (snapshot, write, command, restore, backup removal,
//! prune) is made by the worker whose token the target's lock file names at
//! that moment, and no restore ever touches a deployment whose `deployed`
//! is durable in a journal. The documented timing assumption — a host
//! operation lands within the lease's margin of the worker's last check of
//! its lease, and the host's clock does not jump by more than the margin
//! within a lease — is checked too: a breach is recorded as an assumption
//! violation, so that a failure it causes is reported as such and never
//! passes silently. (One deployment step's requests are applied together,
//! as the SFTP host sends them together.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::attempt::{self, Executed, Notice, Worker};
use crate::driver::{
    Clock, DriveError, Env, Fence, Host, Journal, JournalError, LockWrite, NoVerifier, PrunedLocked, Snapped,
    WrittenLocked,
};
use crate::event::*;
use crate::lock::{
    Created, LockFile, LockPhase, LockRecord, Parsed, Planted, is_lock_litter, lock_path, margin_ms, new_token,
};
use crate::machine::*;
use crate::model::*;
use crate::report::*;
use crate::snapshot::*;
use crate::step::*;

use super::fake_cert_facts;

/// Wall-clock origin of the simulation (ms since the epoch).
const EPOCH_MS: u64 = 1_800_000_000_000;
/// The reload command's name (`reload <cert path>`).
pub const RELOAD: &str = "reload";

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub workers: usize,
    pub targets: usize,
    pub lease_ms: u64,
    /// How long a reload runs on the host.
    pub reload_ms: u64,
    pub defer_delay_ms: u64,
    pub max_deferrals: u32,
    pub planted: Planted,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            workers: 3,
            targets: 2,
            lease_ms: 4_000,
            reload_ms: 800,
            defer_delay_ms: 700,
            max_deferrals: 1_000,
            planted: Planted::None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFile {
    pub bytes: Vec<u8>,
    pub mode: u32,
    /// Host clock, whole seconds.
    pub mtime: u64,
    pub ino: u64,
}

/// The simulated host and time, shared by everyone.
#[derive(Debug, Default)]
pub struct HostWorld {
    /// True time, ms since the start.
    pub t: u64,
    /// The host's clock runs this far ahead of true time (jumps forward).
    pub host_skew: u64,
    jumps: Vec<(u64, u64)>,
    pub files: BTreeMap<String, HostFile>,
    next_ino: u64,
    /// Cert path -> the certificate bytes the daemon serves.
    pub served: BTreeMap<String, Vec<u8>>,
    /// Generations whose certificate the daemon refuses to load.
    pub rejected: BTreeSet<u32>,
    /// Lock token -> the worker that created it.
    pub tokens: BTreeMap<String, usize>,
    /// Deployment ids whose `Finished{deployed}` is durable in a journal.
    pub deployed: BTreeSet<String>,
    /// Breaches of the fleet's guarantees.
    pub violations: Vec<String>,
    /// Breaches of the documented timing assumption.
    pub assumption: Vec<String>,
    /// (cert, key) per target.
    pub targets: Vec<(String, String)>,
    /// Lock operations land this long after they are issued.
    pub lock_delay_ms: u64,
    pub lease_ms: u64,
    pub reload_ms: u64,
    temp_seq: u64,
    pub takeovers: u64,
    pub locks_lost: u64,
    /// (worker, why) of every attempt that ended abandoned, in order.
    pub abandoned: Vec<(usize, String)>,
    /// Lock operations on their way to the host: they land when due,
    /// whatever becomes of the worker that sent them.
    in_flight: InFlight,
    /// What happened on the host, for failure messages (when `tracing`).
    pub trace: Vec<String>,
    pub tracing: bool,
}

type Effect = Box<dyn FnOnce(&mut HostWorld) + Send>;
/// A lock operation's effect, with its answer.
type LockEffect<T> = Box<dyn FnOnce(&mut HostWorld) -> T + Send>;

#[derive(Default)]
struct InFlight(Vec<(u64, Effect)>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} lock operation(s) in flight", self.0.len())
    }
}

impl HostWorld {
    /// Remove the backups of `live_paths` beyond `keep`, never `id`'s own.
    fn prune(&mut self, worker: usize, id: &str, live_paths: &[String], keep: u32) {
        for live in live_paths {
            self.side_effect(worker, "prune", live);
            let own = backup_path(live, id);
            let prefix = format!("{live}.certdeploy-bak.");
            let mut others: Vec<(u64, String)> = self
                .files
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix) && **p != own)
                .map(|(p, f)| (f.ino, p.clone()))
                .collect();
            others.sort_by_key(|o| std::cmp::Reverse(o.0));
            for (_, p) in others.into_iter().skip(keep.saturating_sub(1) as usize) {
                self.files.remove(&p);
            }
        }
    }

    pub fn host_now(&self) -> u64 {
        (EPOCH_MS + self.t + self.host_skew) / 1000
    }

    fn put(&mut self, path: &str, bytes: Vec<u8>, mode: u32) -> u64 {
        self.next_ino += 1;
        let mtime = self.host_now();
        self.files.insert(path.to_string(), HostFile { bytes, mode, mtime, ino: self.next_ino });
        mtime
    }

    fn target_of(&self, path: &str) -> Option<usize> {
        self.targets.iter().position(|(c, k)| {
            [c, k].iter().any(|p| path == p.as_str() || path.starts_with(&format!("{p}.certdeploy-")))
        })
    }

    /// Who does the target's lock file name right now?
    fn lock_holder(&self, target: usize) -> Option<(String, Option<usize>)> {
        let lock = lock_path(&self.targets[target].0);
        let f = self.files.get(&lock)?;
        match LockRecord::parse(&lock, &f.bytes) {
            Ok(Parsed::Lock(r)) => Some((r.token.clone(), self.tokens.get(&r.token).copied())),
            _ => Some(("(not a lock)".into(), None)),
        }
    }

    /// A side effect on a target's file by `worker`: only while the lock
    /// names one of its tokens.
    fn side_effect(&mut self, worker: usize, what: &str, path: &str) {
        if self.tracing {
            let t = self.t;
            self.trace.push(format!("t={t} w{worker} {what} {path}"));
        }
        let Some(target) = self.target_of(path) else {
            self.violations.push(format!("worker {worker}: {what} of {path}, which is no target's"));
            return;
        };
        match self.lock_holder(target) {
            Some((_, Some(w))) if w == worker => {}
            holder => {
                let named = match holder {
                    None => "no lock".to_string(),
                    Some((token, w)) => format!("the lock of worker {w:?} (token {token})"),
                };
                self.violations
                    .push(format!("t={} worker {worker}: {what} of {path} while the host holds {named}", self.t));
            }
        }
    }

    /// A live file of a target changes only while its lock says
    /// `writing`: a taker rolls back from what that phase records, and
    /// does nothing for a `locked` holder.
    fn live_change(&mut self, worker: usize, what: &str, path: &str) {
        self.side_effect(worker, what, path);
        let Some(target) = self.target_of(path) else { return };
        let lock = lock_path(&self.targets[target].0);
        let phase = self.files.get(&lock).and_then(|f| match LockRecord::parse(&lock, &f.bytes) {
            Ok(Parsed::Lock(r)) => Some(r.phase),
            _ => None,
        });
        if phase != Some(LockPhase::Writing) {
            self.violations.push(format!(
                "t={} worker {worker}: {what} of {path} while the lock says {phase:?}, not writing",
                self.t
            ));
        }
    }

    fn note_delay(&mut self, worker: usize, what: &str, issued: u64) {
        let took = self.t - issued;
        let margin = margin_ms(self.lease_ms);
        if took > margin {
            self.assumption.push(format!(
                "t={} worker {worker}: {what} landed {took} ms after it was issued (margin {margin} ms)",
                self.t
            ));
        }
    }

    fn snapshot_one(&mut self, worker: usize, id: &str, req: &SnapshotRequest) -> Result<Snapped, StepError> {
        self.side_effect(worker, "snapshot", &req.path);
        let Some(f) = self.files.get(&req.path).cloned() else {
            return Ok(Snapped {
                snapshot: Snapshot { live_path: req.path.clone(), pre: PreState::Missing },
                content: None,
            });
        };
        let backup = backup_path(&req.path, id);
        self.put(&backup, f.bytes.clone(), f.mode);
        Ok(Snapped {
            snapshot: Snapshot {
                live_path: req.path.clone(),
                pre: PreState::Existing {
                    backup_path: backup,
                    sha256: Digest::of(&f.bytes),
                    size: f.bytes.len() as u64,
                    mode: f.mode,
                    uid: 0,
                    gid: 0,
                    cert: None,
                    holds: None,
                },
            },
            content: req.role.reads_content().then(|| f.bytes.clone()),
        })
    }

    fn restore_one(&mut self, worker: usize, id: &str, req: &RestoreRequest) -> Result<RestoreStatus, StepError> {
        self.side_effect(worker, "restore", &req.live_path);
        if self.deployed.contains(id) {
            self.violations.push(format!(
                "t={} worker {worker}: restores {} of deployment {id}, whose `deployed` is journaled",
                self.t, req.live_path
            ));
        }
        match &req.pre {
            PreState::Missing => {
                self.files.remove(&req.live_path);
                Ok(RestoreStatus::Removed)
            }
            PreState::Existing { backup_path, sha256, .. } => match self.files.remove(backup_path) {
                Some(f) => {
                    self.files.insert(req.live_path.clone(), f);
                    Ok(RestoreStatus::Restored)
                }
                None => match self.files.get(&req.live_path) {
                    Some(f) if Digest::of(&f.bytes) == *sha256 => Ok(RestoreStatus::Restored),
                    _ => Err(StepError::permanent(format!("{backup_path} is missing and {} differs", req.live_path))),
                },
            },
        }
    }

    fn exec(&mut self, worker: usize, command: &str) -> Result<ExecResult, StepError> {
        let cert = command.strip_prefix(&format!("{RELOAD} ")).unwrap_or(command).to_string();
        self.side_effect(worker, "reload", &cert);
        let live = self.files.get(&cert).map(|f| f.bytes.clone());
        let rejected = live.as_deref().and_then(generation).is_some_and(|g| self.rejected.contains(&g));
        if rejected {
            return Ok(ExecResult { exit_code: Some(1), output: "daemon refuses the certificate".into() });
        }
        match live {
            Some(b) => self.served.insert(cert, b),
            None => self.served.remove(&cert),
        };
        Ok(ExecResult { exit_code: Some(0), output: String::new() })
    }

    /// Land the lock operations that are due, each at its due time, in
    /// order.
    fn land(&mut self) {
        let now = self.t;
        loop {
            let next = self
                .in_flight
                .0
                .iter()
                .enumerate()
                .filter(|(_, (due, _))| *due <= now)
                .min_by_key(|(_, (due, _))| *due);
            let Some((i, _)) = next else { break };
            let (due, effect) = self.in_flight.0.remove(i);
            self.t = due;
            effect(self);
        }
        self.t = now;
    }

    fn temp(&mut self, path: &str, bytes: &[u8]) -> (String, u64) {
        self.temp_seq += 1;
        let temp = format!("{path}.tmp.{}", self.temp_seq);
        let now = self.put(&temp, bytes.to_vec(), 0o600);
        (temp, now)
    }
}

/// The generation in a fake certificate or key (`CERT g<n> ...`, `KEY g<n>`).
pub fn generation(bytes: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(bytes).ok()?;
    let rest = s.strip_prefix("CERT g").or_else(|| s.strip_prefix("KEY g"))?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn world(w: &Mutex<HostWorld>) -> MutexGuard<'_, HostWorld> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// One host operation: takes effect on the poll that issues it, answers
/// on a later poll once `reply_ms` have passed.
struct Op<'w, F, T> {
    world: &'w Mutex<HostWorld>,
    reply_ms: u64,
    done_at: u64,
    effect: Option<F>,
    out: Option<T>,
}

impl<F, T> Unpin for Op<'_, F, T> {}

impl<F: FnOnce(&mut HostWorld) -> T, T> Future for Op<'_, F, T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<T> {
        let wm = self.world;
        let mut w = world(wm);
        if let Some(f) = self.effect.take() {
            let out = f(&mut w);
            self.done_at = w.t;
            self.out = Some(out);
            return Poll::Pending;
        }
        if w.t < self.done_at + self.reply_ms {
            return Poll::Pending;
        }
        drop(w);
        match self.out.take() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

/// A lock operation: sent on its first poll, lands on the host after the
/// world's `lock_delay_ms` (at once when there is none), answers on a
/// later poll.
struct LockOp<'w, T> {
    world: &'w Mutex<HostWorld>,
    worker: usize,
    what: &'static str,
    /// The lock, claim or temp path, for the trace.
    path: String,
    effect: Option<LockEffect<T>>,
    slot: Arc<Mutex<Option<T>>>,
}

impl<T> Unpin for LockOp<'_, T> {}

impl<T: Send + 'static> Future for LockOp<'_, T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<T> {
        if let Some(f) = self.effect.take() {
            let wm = self.world;
            let mut w = world(wm);
            let slot = self.slot.clone();
            let (worker, what, issued) = (self.worker, self.what, w.t);
            let path = std::mem::take(&mut self.path);
            let delay = w.lock_delay_ms;
            let effect: Effect = Box::new(move |w: &mut HostWorld| {
                if delay > 0 {
                    w.note_delay(worker, what, issued);
                }
                let out = f(w);
                if w.tracing {
                    let t = w.t;
                    let holders: Vec<String> =
                        (0..w.targets.len()).map(|i| format!("{:?}", w.lock_holder(i))).collect();
                    let name = path.strip_prefix("/srv/").unwrap_or(&path);
                    w.trace.push(format!("t={t} w{worker} {what} {name}; locks {}", holders.join(" | ")));
                }
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
            });
            if delay == 0 {
                effect(&mut w);
            } else {
                w.in_flight.0.push((issued + delay, effect));
            }
            return Poll::Pending;
        }
        match self.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

/// The host as one worker sees it.
pub struct FleetHost {
    pub world: Arc<Mutex<HostWorld>>,
    pub worker: usize,
    pub planted: Planted,
}

impl FleetHost {
    fn op<T, F: FnOnce(&mut HostWorld) -> T>(&self, _what: &'static str, f: F) -> Op<'_, F, T> {
        Op { world: &self.world, reply_ms: 0, done_at: 0, effect: Some(f), out: None }
    }

    fn lock_op<T: Send + 'static>(
        &self,
        what: &'static str,
        path: &str,
        f: impl FnOnce(&mut HostWorld) -> T + Send + 'static,
    ) -> LockOp<'_, T> {
        LockOp {
            world: &self.world,
            worker: self.worker,
            what,
            path: path.to_string(),
            effect: Some(Box::new(f)),
            slot: Arc::default(),
        }
    }
}

impl Host for FleetHost {
    // A step's requests leave together (as over SFTP): one operation.
    async fn snapshot(&self, id: &str, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        let worker = self.worker;
        self.op("snapshot", |w| files.iter().map(|f| w.snapshot_one(worker, id, f)).collect()).await
    }

    async fn write(&self, _id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        let worker = self.worker;
        self.op("write", |w| {
            files
                .iter()
                .map(|(f, bytes)| {
                    w.live_change(worker, "write", &f.live_path);
                    w.put(&f.live_path, bytes.to_vec(), f.mode);
                    Ok(())
                })
                .collect()
        })
        .await
    }

    async fn write_locked(&self, id: &str, files: &[(WriteRequest, &[u8])], lock: LockWrite<'_>) -> WrittenLocked {
        #[cfg(feature = "testkit")]
        if self.planted == Planted::WriteBeforeLockSaysWriting {
            let written = self.write(id, files).await;
            return (self.lock_replace(lock.path, &lock.bytes, lock.durable, lock.fence()).await, written);
        }
        crate::driver::write_locked_in_turn(self, id, files, lock).await
    }

    // Writes here leave no temps.
    async fn discard_temps(&self, _id: &str, _paths: &[String]) -> Result<(), StepError> {
        Ok(())
    }

    async fn exec(&self, command: &str, _timeout_ms: u64) -> Result<ExecResult, StepError> {
        let worker = self.worker;
        let reply_ms = world(&self.world).reload_ms;
        Op { reply_ms, ..self.op("exec", |w| w.exec(worker, command)) }.await
    }

    async fn exec_guarded(&self, command: &str, _timeout_ms: u64, guard: &ExecGuard) -> Result<ExecResult, StepError> {
        let worker = self.worker;
        let reply_ms = world(&self.world).reload_ms;
        let op = self.op("exec", |w| {
            let holds = w.files.get(&guard.lock_path).is_some_and(|f| {
                matches!(LockRecord::parse(&guard.lock_path, &f.bytes), Ok(Parsed::Lock(r)) if r.token == guard.token)
            });
            if !holds {
                return Err(StepError::lock_lost(format!("{} no longer holds this token", guard.lock_path)));
            }
            w.exec(worker, command)
        });
        Op { reply_ms, ..op }.await
    }

    async fn restore(&self, id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        let worker = self.worker;
        self.op("restore", |w| files.iter().map(|f| w.restore_one(worker, id, f)).collect()).await
    }

    async fn remove_backups(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        let worker = self.worker;
        self.op("remove backups", |w| {
            for p in paths {
                w.side_effect(worker, "remove backups", p);
                w.files.remove(&backup_path(p, id));
                w.files.remove(&temp_path(p, id));
            }
            Ok(())
        })
        .await
    }

    async fn prune(&self, id: &str, live_paths: &[String], keep: u32) -> Result<(), StepError> {
        let worker = self.worker;
        self.op("prune", |w| {
            w.prune(worker, id, live_paths, keep);
            Ok(())
        })
        .await
    }

    // As over SFTP: the lock's temp goes first; the fence is asked before
    // the rename, and the prune's removals leave with the rename (they land
    // together, even where the rename fails to).
    async fn prune_locked(&self, id: &str, live_paths: &[String], keep: u32, lock: LockWrite<'_>) -> PrunedLocked {
        let (p, b) = (lock.path.to_string(), lock.bytes.clone());
        let (temp, host_now) = self.lock_op("lock replace (temp)", lock.path, move |w| w.temp(&p, &b)).await;
        if !(lock.fence)() {
            self.lock_op("lock replace (temp removed)", lock.path, move |w| {
                w.files.remove(&temp);
            })
            .await;
            return (Ok(None), None);
        }
        let (p, worker, id, lives) = (lock.path.to_string(), self.worker, id.to_string(), live_paths.to_vec());
        self.lock_op("lock replace (rename) and prune", lock.path, move |w| {
            if let Some(f) = w.files.remove(&temp) {
                w.files.insert(p, f);
            }
            w.prune(worker, &id, &lives, keep);
        })
        .await;
        (Ok(Some(host_now)), Some(Ok(())))
    }

    async fn lock_create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
        // A private temp with the content, then a hard link to the name.
        let (p, b) = (path.to_string(), bytes.to_vec());
        let (temp, host_now) = self.lock_op("lock create (temp)", path, move |w| w.temp(&p, &b)).await;
        let p = path.to_string();
        let created = self
            .lock_op("lock create (link)", path, move |w| {
                let created = !w.files.contains_key(&p);
                if let Some(f) = w.files.remove(&temp)
                    && created
                {
                    w.files.insert(p, f);
                }
                created
            })
            .await;
        Ok(Created { created, host_now })
    }

    async fn lock_replace(
        &self,
        path: &str,
        bytes: &[u8],
        _durable: bool,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        let (p, b) = (path.to_string(), bytes.to_vec());
        let (temp, host_now) = self.lock_op("lock replace (temp)", path, move |w| w.temp(&p, &b)).await;
        // Asked on the poll that would send the rename (after a stall).
        if !fence() {
            self.lock_op("lock replace (temp removed)", path, move |w| {
                w.files.remove(&temp);
            })
            .await;
            return Ok(None);
        }
        let p = path.to_string();
        self.lock_op("lock replace (rename)", path, move |w| {
            if let Some(f) = w.files.remove(&temp) {
                w.files.insert(p, f);
            }
        })
        .await;
        Ok(Some(host_now))
    }

    async fn lock_read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
        let p = path.to_string();
        Ok(self
            .lock_op("lock read", path, move |w| {
                w.files.get(&p).map(|f| LockFile { bytes: f.bytes.clone(), mtime: f.mtime })
            })
            .await)
    }

    async fn lock_remove(&self, path: &str) -> Result<(), StepError> {
        let p = path.to_string();
        self.lock_op("lock remove", path, move |w| {
            w.files.remove(&p);
        })
        .await;
        Ok(())
    }

    async fn lock_sweep(&self, lock: &str, before: u64) -> Result<u32, StepError> {
        let lock = lock.to_string();
        Ok(self
            .lock_op("lock sweep", &lock.clone(), move |w| {
                let doomed: Vec<String> = w
                    .files
                    .iter()
                    .filter(|(p, f)| is_lock_litter(&lock, p) && f.mtime < before)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in &doomed {
                    w.files.remove(p);
                }
                doomed.len() as u32
            })
            .await)
    }

    async fn resolve_path(&self, path: &str) -> Result<String, StepError> {
        Ok(path.to_string())
    }
}

/// One worker's journal: records, and whether each is durable yet.
#[derive(Debug, Default)]
pub struct JournalState {
    pub records: Vec<(String, Record, bool)>,
}

impl JournalState {
    pub fn of(&self, key: &str) -> Vec<Record> {
        self.records.iter().filter(|(k, _, _)| k == key).map(|(_, r, _)| r.clone()).collect()
    }
    /// Keys whose latest attempt has no terminal record.
    pub fn unfinished(&self) -> Vec<String> {
        let mut last: BTreeMap<&str, bool> = BTreeMap::new();
        for (k, r, _) in &self.records {
            match &r.event {
                Event::Started { .. } => {
                    last.insert(k, false);
                }
                e if e.is_terminal() => {
                    last.insert(k, true);
                }
                _ => {}
            }
        }
        last.into_iter().filter(|(_, t)| !t).map(|(k, _)| k.to_string()).collect()
    }
}

pub struct FleetJournal {
    pub st: Arc<Mutex<JournalState>>,
    pub world: Arc<Mutex<HostWorld>>,
}

/// A flush: completes on the poll after the one that started it.
struct Flush<'a> {
    j: &'a FleetJournal,
    started: bool,
}

impl Future for Flush<'_> {
    type Output = Result<(), JournalError>;
    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.started {
            self.started = true;
            return Poll::Pending;
        }
        let mut st = self.j.st.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = world(&self.j.world);
        for (_, r, durable) in st.records.iter_mut() {
            if !*durable {
                *durable = true;
                if let Event::Finished { report } = &r.event
                    && report.outcome == Outcome::Deployed
                {
                    w.deployed.insert(report.deployment_id.clone());
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Journal for FleetJournal {
    fn append(&self, key: &str, record: &Record) -> Result<u64, JournalError> {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.records.push((key.to_string(), record.clone(), false));
        Ok(st.records.len() as u64)
    }
    async fn sync(&self, _seq: u64) -> Result<(), JournalError> {
        Flush { j: self, started: false }.await
    }
}

/// A worker's clocks: wall time, and a monotonic clock with its own
/// offset (never compared with anyone else's).
pub struct FleetClock {
    pub world: Arc<Mutex<HostWorld>>,
    pub mono_offset: u64,
}

struct Until<'a> {
    world: &'a Mutex<HostWorld>,
    at: u64,
}

impl Future for Until<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if world(self.world).t >= self.at { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Clock for FleetClock {
    fn now(&self) -> Timestamp {
        Timestamp(EPOCH_MS + world(&self.world).t)
    }
    async fn sleep_until(&self, t: Timestamp) {
        Until { world: &self.world, at: t.0.saturating_sub(EPOCH_MS) }.await
    }
    fn mono_ms(&self) -> u64 {
        world(&self.world).t + self.mono_offset
    }
    async fn sleep_mono_until(&self, ms: u64) {
        Until { world: &self.world, at: ms.saturating_sub(self.mono_offset) }.await
    }
}

/// A request on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub id: String,
    pub target: usize,
    pub generation: u32,
    pub deferrals: u32,
}

#[derive(Debug, Default)]
pub struct Broker {
    pub ready: VecDeque<Msg>,
    /// Deferred: back on the queue at the given time.
    pub delayed: Vec<(u64, Msg)>,
    pub requests: Vec<Msg>,
    /// Every result published, per deployment id.
    pub results: BTreeMap<String, Vec<Report>>,
}

enum TaskOut {
    Recovered,
    Report(Report),
    Deferred(String),
}

type Task = Pin<Box<dyn Future<Output = Result<TaskOut, DriveError>> + Send>>;

pub struct WorkerSlot {
    pub name: String,
    pub journal: Arc<Mutex<JournalState>>,
    pub journal_id: String,
    /// Tokens of the locks this process holds right now.
    live: Arc<Mutex<BTreeSet<String>>>,
    pub alive: bool,
    pub paused_until: u64,
    pub mono_offset: u64,
    recovering: bool,
    task: Option<Task>,
    unacked: Option<Msg>,
}

pub struct Fleet {
    pub cfg: FleetConfig,
    pub world: Arc<Mutex<HostWorld>>,
    pub workers: Vec<WorkerSlot>,
    pub broker: Broker,
    entropy: u64,
    generation: u32,
}

fn fleet_plan(cfg: &FleetConfig, target: (&str, &str), id: &str, generation: u32, attempt: u32) -> (Plan, Payload) {
    let spec = TargetSpec {
        host: "fleet-host".into(),
        port: 22,
        user: "deploy".into(),
        cert_path: target.0.into(),
        key_path: target.1.into(),
        chain_path: None,
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: None,
        reload_command: format!("{RELOAD} {}", target.0),
        verify_endpoint: None,
        verify_sni: None,
    };
    let cert = cert_bytes(generation);
    let material = Material {
        certificate_pem: String::from_utf8_lossy(&cert).into_owned(),
        private_key_pem: Secret::new(key_bytes(generation)),
        chain_pem: None,
    };
    let facts = fake_cert_facts(&cert)
        .map(|f| MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) })
        .unwrap_or_default();
    let _ = cfg;
    let policy = Policy { deadline_ms: 3_600_000, rollback_budget_ms: 3_600_000, ..Policy::default() };
    let r = build_plan(id, "fleet-target", &spec, &material, &facts, policy, attempt);
    r.unwrap_or_else(|e| panic!("fleet plan: {e}"))
}

pub fn cert_bytes(generation: u32) -> Vec<u8> {
    format!("CERT g{generation} nb={}\n", 1000 + generation).into_bytes()
}
pub fn key_bytes(generation: u32) -> Vec<u8> {
    format!("KEY g{generation}\n").into_bytes()
}

/// What a request's journal records say about it.
enum Status {
    Finished(Report),
    InFlight,
    Abandoned(u32),
    New,
}

fn status(records: &[Record]) -> Status {
    match Deployment::replay(records) {
        Err(_) => Status::New,
        Ok(d) => match d.terminal() {
            Some(Terminal::Finished(r)) => Status::Finished(r.clone()),
            Some(Terminal::Abandoned(_)) => Status::Abandoned(d.plan().attempt),
            None => Status::InFlight,
        },
    }
}

/// Everything a worker's futures own.
#[derive(Clone)]
struct Parts {
    cfg: FleetConfig,
    world: Arc<Mutex<HostWorld>>,
    journal: Arc<Mutex<JournalState>>,
    journal_id: String,
    live: Arc<Mutex<BTreeSet<String>>>,
    name: String,
    index: usize,
    mono_offset: u64,
}

impl Parts {
    fn dead_own(&self, r: &LockRecord) -> bool {
        if r.journal != self.journal_id || self.live.lock().unwrap_or_else(|e| e.into_inner()).contains(&r.token) {
            return false;
        }
        let st = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        !st.unfinished()
            .iter()
            .any(|k| Deployment::replay(&st.of(k)).is_ok_and(|d| d.plan().lock.as_deref() == Some(r.token.as_str())))
    }

    fn notice(&self, n: Notice) {
        let mut w = world(&self.world);
        match n {
            Notice::TookOver(_) => w.takeovers += 1,
            Notice::LockLost(_) => w.locks_lost += 1,
        }
    }

    fn records(&self, key: &str) -> Vec<Record> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner()).of(key)
    }

    /// This worker's view of the simulated host, its journal and its clock.
    fn adapters(&self) -> (FleetHost, FleetJournal, FleetClock) {
        (
            FleetHost { world: self.world.clone(), worker: self.index, planted: self.cfg.planted },
            FleetJournal { st: self.journal.clone(), world: self.world.clone() },
            FleetClock { world: self.world.clone(), mono_offset: self.mono_offset },
        )
    }

    /// The worker's identity and lock settings, as the binary builds them.
    fn worker<'a>(
        &'a self,
        dead_own: &'a (dyn Fn(&LockRecord) -> bool + Sync),
        notice: &'a (dyn Fn(Notice) + Sync),
    ) -> Worker<'a> {
        Worker {
            name: &self.name,
            journal_id: &self.journal_id,
            lease_ms: self.cfg.lease_ms,
            dead_own,
            notice,
            planted: self.cfg.planted,
        }
    }

    /// Resume every unfinished deployment of this journal, in order.
    async fn recover(self) -> Result<TaskOut, DriveError> {
        let (host, journal, clock) = self.adapters();
        let env =
            Env { host: &host, verifier: &NoVerifier, journal: &journal, clock: &clock, cert_facts: fake_cert_facts };
        let dead_own = |r: &LockRecord| self.dead_own(r);
        let notice = |n: Notice| self.notice(n);
        let w = self.worker(&dead_own, &notice);
        let keys = self.journal.lock().unwrap_or_else(|e| e.into_inner()).unfinished();
        for key in keys {
            let recs = self.records(&key);
            let token = Deployment::replay(&recs).ok().and_then(|d| d.plan().lock.clone());
            if let Some(t) = &token {
                self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(t.clone());
            }
            attempt::resume(&env, &w, &key, &recs).await?;
            if let Some(t) = &token {
                self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(t);
            }
        }
        Ok(TaskOut::Recovered)
    }

    /// The worker's handling of one delivery (`Runtime::execute`).
    async fn deliver(self, msg: Msg, entropy: u64) -> Result<TaskOut, DriveError> {
        let (host, journal, clock) = self.adapters();
        let env =
            Env { host: &host, verifier: &NoVerifier, journal: &journal, clock: &clock, cert_facts: fake_cert_facts };
        let dead_own = |r: &LockRecord| self.dead_own(r);
        let notice = |n: Notice| self.notice(n);
        let w = self.worker(&dead_own, &notice);
        let target = {
            let wd = world(&self.world);
            wd.targets[msg.target].clone()
        };
        for round in 0u64..100 {
            let attempt = match status(&self.records(&msg.id)) {
                Status::Finished(r) => return Ok(TaskOut::Report(r)),
                Status::InFlight => {
                    let recs = self.records(&msg.id);
                    attempt::resume(&env, &w, &msg.id, &recs).await?;
                    continue;
                }
                Status::Abandoned(n) => n + 1,
                Status::New => 1,
            };
            let (plan, payload) = fleet_plan(&self.cfg, (&target.0, &target.1), &msg.id, msg.generation, attempt);
            let token = new_token(&self.journal_id, &msg.id, attempt, entropy.wrapping_mul(101).wrapping_add(round));
            world(&self.world).tokens.insert(token.clone(), self.index);
            self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone());
            let r = attempt::execute(&env, &w, plan, &payload, token.clone()).await;
            self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
            match r? {
                Executed::Report(r) => return Ok(TaskOut::Report(r)),
                Executed::Deferred { holder } => return Ok(TaskOut::Deferred(holder)),
                Executed::Abandoned(why) => world(&self.world).abandoned.push((self.index, why)),
            }
        }
        panic!("{}: 100 attempts abandoned in a row", msg.id)
    }
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Fleet {
        let mut w = HostWorld { lease_ms: cfg.lease_ms, reload_ms: cfg.reload_ms, ..HostWorld::default() };
        for i in 0..cfg.targets {
            let (cert, key) = (format!("/srv/t{i}/cert.pem"), format!("/srv/t{i}/key.pem"));
            w.put(&cert, cert_bytes(0), 0o644);
            w.put(&key, key_bytes(0), 0o600);
            w.served.insert(cert.clone(), cert_bytes(0));
            w.targets.push((cert, key));
        }
        let world = Arc::new(Mutex::new(w));
        let workers = (0..cfg.workers)
            .map(|i| WorkerSlot {
                name: format!("w{i}"),
                journal: Arc::default(),
                // Two workers with the same host name and journal path get
                // different random ids; here simply distinct ones.
                journal_id: format!("journal-{i:02}-{:08x}", 0x9e37_79b9u32.wrapping_mul(i as u32 + 1)),
                live: Arc::default(),
                alive: true,
                paused_until: 0,
                mono_offset: 1_000_000 * (i as u64 + 1) + 333 * i as u64,
                recovering: false,
                task: None,
                unacked: None,
            })
            .collect();
        Fleet { cfg, world, workers, broker: Broker::default(), entropy: 0, generation: 0 }
    }

    pub fn world(&self) -> MutexGuard<'_, HostWorld> {
        world(&self.world)
    }

    /// Publish a request for `target` with the next generation; `bad`: the
    /// daemon refuses its certificate (the deployment rolls back).
    pub fn submit(&mut self, target: usize, bad: bool) -> String {
        self.generation += 1;
        let g = self.generation;
        if bad {
            self.world().rejected.insert(g);
        }
        let msg = Msg { id: format!("r{g}"), target: target % self.cfg.targets, generation: g, deferrals: 0 };
        self.broker.requests.push(msg.clone());
        self.broker.ready.push_back(msg.clone());
        msg.id
    }

    pub fn tick(&mut self, ms: u64) {
        let t = {
            let mut w = self.world();
            w.t += ms;
            w.land();
            w.t
        };
        let (due, later): (Vec<_>, Vec<_>) = self.broker.delayed.drain(..).partition(|(at, _)| *at <= t);
        self.broker.delayed = later;
        self.broker.ready.extend(due.into_iter().map(|(_, m)| m));
    }

    /// The worker dies (`kill -9`): its future is dropped wherever it was,
    /// the unflushed tail of its journal is lost, its unacked message goes
    /// back to the broker.
    pub fn crash(&mut self, i: usize) {
        let slot = &mut self.workers[i];
        if !slot.alive {
            return;
        }
        slot.task = None;
        slot.alive = false;
        slot.journal.lock().unwrap_or_else(|e| e.into_inner()).records.retain(|(_, _, d)| *d);
        slot.live.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(m) = slot.unacked.take() {
            self.broker.ready.push_back(m);
        }
    }

    /// The worker starts again on the same journal: recovery first.
    pub fn restart(&mut self, i: usize) {
        let slot = &mut self.workers[i];
        if slot.alive {
            return;
        }
        slot.alive = true;
        slot.recovering = true;
        slot.paused_until = 0;
    }

    /// The worker is paused (or cut off) for `ms`, wherever it is.
    pub fn pause(&mut self, i: usize, ms: u64) {
        let t = self.world().t;
        self.workers[i].paused_until = t + ms;
    }

    /// The host's clock jumps forward.
    pub fn jump_host_clock(&mut self, ms: u64) {
        let mut w = self.world();
        w.host_skew += ms;
        let t = w.t;
        w.jumps.push((t, ms));
        let lease = w.lease_ms;
        let within: u64 = w.jumps.iter().filter(|(at, _)| at + lease >= t).map(|(_, d)| d).sum();
        let margin = margin_ms(lease);
        if within > margin {
            w.assumption
                .push(format!("t={t}: the host's clock jumped {within} ms within one lease (margin {margin} ms)"));
        }
    }

    /// Lock operations land `ms` after they are issued from now on.
    pub fn set_lock_delay(&mut self, ms: u64) {
        self.world().lock_delay_ms = ms;
    }

    fn parts(&self, i: usize) -> Parts {
        let s = &self.workers[i];
        Parts {
            cfg: self.cfg.clone(),
            world: self.world.clone(),
            journal: s.journal.clone(),
            journal_id: s.journal_id.clone(),
            live: s.live.clone(),
            name: s.name.clone(),
            index: i,
            mono_offset: s.mono_offset,
        }
    }

    /// Let worker `i` take one step (start recovery or the next delivery
    /// if it is idle). Nothing while it is dead or paused.
    pub fn poll(&mut self, i: usize) {
        let t = self.world().t;
        let slot = &self.workers[i];
        if !slot.alive || t < slot.paused_until {
            return;
        }
        if slot.task.is_none() {
            let parts = self.parts(i);
            if self.workers[i].recovering {
                self.workers[i].task = Some(Box::pin(parts.recover()));
            } else if let Some(msg) = self.broker.ready.pop_front() {
                self.entropy += 1;
                self.workers[i].unacked = Some(msg.clone());
                self.workers[i].task = Some(Box::pin(parts.deliver(msg, self.entropy)));
            } else {
                return;
            }
        }
        let Some(task) = self.workers[i].task.as_mut() else { return };
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(out) = task.as_mut().poll(&mut cx) else { return };
        self.workers[i].task = None;
        let msg = self.workers[i].unacked.take();
        match out {
            Ok(TaskOut::Recovered) => self.workers[i].recovering = false,
            Ok(TaskOut::Report(r)) => {
                self.broker.results.entry(r.deployment_id.clone()).or_default().push(r);
            }
            Ok(TaskOut::Deferred(holder)) => {
                let Some(mut m) = msg else { return };
                m.deferrals += 1;
                if m.deferrals > self.cfg.max_deferrals {
                    let r = Report::lock_failed(
                        &m.id,
                        "fleet-target",
                        "",
                        format!("target locked by {holder}; gave up"),
                        Timestamp(EPOCH_MS + t),
                    );
                    self.broker.results.entry(m.id.clone()).or_default().push(r);
                } else {
                    self.broker.delayed.push((t + self.cfg.defer_delay_ms, m));
                }
            }
            Err(e) => {
                self.world().violations.push(format!("worker {i}: driver error: {e}"));
                if let Some(m) = msg {
                    self.broker.ready.push_back(m);
                }
            }
        }
    }

    /// Is anything left to do?
    pub fn idle(&self) -> bool {
        self.broker.ready.is_empty()
            && self.broker.delayed.is_empty()
            && self.workers.iter().all(|w| w.alive && w.task.is_none() && !w.recovering && w.unacked.is_none())
    }

    /// End every fault (restart the dead, lock operations at full speed;
    /// a pause runs to its end while the others work on) and run the fleet
    /// until the queue is drained.
    pub fn drain(&mut self) -> Result<(), String> {
        for i in 0..self.workers.len() {
            self.restart(i);
        }
        self.set_lock_delay(0);
        for _ in 0..200_000 {
            if self.idle() {
                return Ok(());
            }
            for i in 0..self.workers.len() {
                self.poll(i);
            }
            self.tick(100);
        }
        Err(format!(
            "no progress: ready {:?}, delayed {:?}, tasks {:?}",
            self.broker.ready,
            self.broker.delayed,
            self.workers.iter().map(|w| (w.task.is_some(), w.recovering, w.unacked.clone())).collect::<Vec<_>>()
        ))
    }

    /// The guarantees that hold after every step.
    pub fn check(&self) -> Result<(), String> {
        let w = self.world();
        if w.violations.is_empty() {
            return Ok(());
        }
        if !w.assumption.is_empty() {
            return Err(format!(
                "the documented timing assumption was violated ({}), and then: {}",
                w.assumption.join("; "),
                w.violations.join("; ")
            ));
        }
        Err(format!("fleet guarantee violated: {}", w.violations.join("; ")))
    }

    /// Once drained: every request has one result (redeliveries repeat
    /// it), every target holds one deployment's cert and key, and no lock,
    /// claim, temp or staging file is left; no journal has anything
    /// unfinished.
    pub fn check_end(&self) -> Result<(), String> {
        self.check_end_with(false)
    }

    /// [`Self::check_end`], but lock temp and claim files may remain: a
    /// kill leaves them, and only a taker or releaser that comes more than
    /// a lease later removes them.
    pub fn check_end_except_lock_litter(&self) -> Result<(), String> {
        self.check_end_with(true)
    }

    fn check_end_with(&self, lock_temps_allowed: bool) -> Result<(), String> {
        self.check()?;
        let mut problems = Vec::new();
        for m in &self.broker.requests {
            match self.broker.results.get(&m.id) {
                None => problems.push(format!("{}: no result", m.id)),
                Some(rs) if rs.iter().any(|r| r.outcome != rs[0].outcome) => problems.push(format!(
                    "{}: different results {:?}",
                    m.id,
                    rs.iter().map(|r| r.outcome).collect::<Vec<_>>()
                )),
                Some(_) => {}
            }
        }
        let w = self.world();
        for (cert, key) in &w.targets {
            let g = |p: &str| w.files.get(p).and_then(|f| generation(&f.bytes));
            if g(cert).is_none() || g(cert) != g(key) {
                problems.push(format!("{cert}: cert of generation {:?}, key of {:?}", g(cert), g(key)));
            }
        }
        for p in w.files.keys() {
            let litter = w.targets.iter().any(|(c, _)| is_lock_litter(&lock_path(c), p));
            if litter && lock_temps_allowed {
                continue;
            }
            if p.contains(".certdeploy-lock") || p.contains(".certdeploy-tmp.") || p.contains(".certdeploy-stage") {
                problems.push(format!("left on the host: {p}"));
            }
        }
        for s in &self.workers {
            let st = s.journal.lock().unwrap_or_else(|e| e.into_inner());
            if !st.unfinished().is_empty() {
                problems.push(format!("{}: unfinished {:?}", s.name, st.unfinished()));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}
