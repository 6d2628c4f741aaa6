//! Test doubles shared by every crate's tests: an in-memory host (files
//! with bytes, modes, hard links and symlinks; a command runner), an
//! in-memory journal that loses unflushed records on a crash, a virtual
//! clock, and a verifier that reports what the host's daemon serves.
//!
//! Faults are scheduled per operation; a *crash* is a panic carrying
//! [`SimulatedCrash`], which unwinds the driver exactly where a `kill -9`
//! would stop the process. [`run_until_crash`] turns it back into a value.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

pub mod fleet;

use crate::driver::{
    Clock, Fence, Host, Journal, JournalError, LockWrite, PrunedLocked, Snapped, Verifier, WrittenLocked,
};
use crate::event::*;
use crate::lock::{Created, LockFile, LockRecord, Parsed};
use crate::machine::*;
use crate::model::*;
use crate::snapshot::*;
use crate::step::*;

/// The panic payload of a simulated process death.
#[derive(Debug, Clone, Copy)]
pub struct SimulatedCrash;

/// Run a future that never waits on real I/O (all testkit futures are
/// ready at once) to completion.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// Run `f`; `Err(SimulatedCrash)` if it "crashed". Other panics propagate.
pub fn run_until_crash<T>(f: impl FnOnce() -> T) -> Result<T, SimulatedCrash> {
    install_quiet_hook();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => {
            if payload.downcast_ref::<SimulatedCrash>().is_some() {
                Err(SimulatedCrash)
            } else {
                std::panic::resume_unwind(payload)
            }
        }
    }
}

fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<SimulatedCrash>().is_none() {
                prev(info);
            }
        }));
    });
}

/// A primitive operation, for fault schedules and the operation log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Snapshot(Role),
    Write(Role),
    Exec(String),
    Restore(Role),
    RemoveBackups,
    Prune,
    JournalSync,
}

/// What happens at a scheduled operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The operation fails with this error and changes nothing.
    Fail(StepError),
    /// The process dies before the operation has any effect.
    CrashBefore,
    /// The operation takes full effect, then the process dies before its
    /// result is seen.
    CrashAfter,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File(u64),
    Symlink(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Everything the doubles share: the host's file system and daemon, the
/// journal, the clock, the fault schedule, the operation log.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub paths: BTreeMap<String, Node>,
    pub inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    /// Command name -> exit code when run (absent: exit 0).
    pub commands: BTreeMap<String, i32>,
    /// (command, nth call) -> exit code, overriding `commands`.
    pub scripted: BTreeMap<(String, u32), i32>,
    /// command -> cert bytes: the command exits 1 while the served path
    /// holds exactly these bytes (a daemon that rejects that certificate).
    pub rejects: BTreeMap<String, Vec<u8>>,
    /// Which command strings count as a reload (serving what is on disk).
    pub reload_commands: BTreeSet<String>,
    /// Leaf fingerprint the daemon serves (after the last good reload).
    pub served: Option<Digest>,
    /// When true, reloads "succeed" without effect (exit 0, nothing changes).
    pub reload_is_noop: bool,
    /// Cert path whose content the daemon serves.
    pub served_path: Option<String>,
    /// Every exec, in order.
    pub exec_log: Vec<String>,
    /// Every primitive op performed (after faults), in order.
    pub op_log: Vec<OpKind>,
    /// Per-kind counters of attempted ops.
    op_counts: BTreeMap<OpKind, u32>,
    /// (op, nth call starting at 1) -> fault.
    pub faults: BTreeMap<(OpKind, u32), Fault>,
    /// Faults on every call of an op.
    pub always: BTreeMap<OpKind, StepError>,
    /// Crash at the nth primitive step overall (host ops and journal syncs).
    pub crash_at: Option<(u64, bool)>,
    pub steps: u64,
    // journal
    pub records: Vec<(String, Record, bool)>,
    pub flushes: u64,
    pub now: u64,
    /// Violations of the write-ahead rule seen by the host.
    pub violations: Vec<String>,
    /// Lock (and claim) files: content and mtime in host seconds (`now / 1000`).
    pub lock_files: BTreeMap<String, (Vec<u8>, u64)>,
    /// A daemon serving many sites (when not empty): SNI name -> (cert
    /// path, leaf served). Its validate and reload commands (those in
    /// `site_commands`) check every site's certificate file: one whose
    /// first line holds `BROKEN` makes them exit 1 (the reload then
    /// changes nothing); a reload that succeeds serves each site's file.
    /// The verifier answers per SNI name.
    pub sites: BTreeMap<String, (String, Option<Digest>)>,
    pub site_commands: BTreeSet<String>,
    /// Asked before every command runs: a breach of a rule the test
    /// states (recorded in `violations`).
    pub exec_check: Option<fn(&World, &str) -> Option<String>>,
}

/// Shared handle to a [`World`].
#[derive(Clone, Debug, Default)]
pub struct Sim(pub Arc<Mutex<World>>);

impl Sim {
    pub fn new() -> Sim {
        let s = Sim::default();
        s.world().now = 1_800_000_000_000;
        s
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Put a file on the host.
    pub fn put(&self, path: &str, bytes: &[u8], mode: u32) {
        let mut w = self.world();
        w.next_ino += 1;
        let ino = w.next_ino;
        w.inodes.insert(ino, Inode { bytes: bytes.to_vec(), mode, uid: 1000, gid: 1000 });
        w.paths.insert(path.to_string(), Node::File(ino));
    }

    pub fn symlink(&self, path: &str, target: &str) {
        self.world().paths.insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    /// Bytes and mode at a path (following one symlink).
    pub fn get(&self, path: &str) -> Option<(Vec<u8>, u32)> {
        let w = self.world();
        let p = w.resolve(path);
        match w.paths.get(&p) {
            Some(Node::File(ino)) => w.inodes.get(ino).map(|i| (i.bytes.clone(), i.mode)),
            _ => None,
        }
    }

    pub fn exists(&self, path: &str) -> bool {
        self.world().paths.contains_key(path)
    }

    pub fn list(&self) -> Vec<String> {
        self.world().paths.keys().cloned().collect()
    }

    pub fn fail(&self, op: OpKind, nth: u32, fault: Fault) {
        self.world().faults.insert((op, nth), fault);
    }

    pub fn fail_always(&self, op: OpKind, err: StepError) {
        self.world().always.insert(op, err);
    }

    /// Exit codes of the 1st, 2nd, ... call of `command`.
    pub fn exit_codes(&self, command: &str, codes: &[i32]) {
        let mut w = self.world();
        for (i, c) in codes.iter().enumerate() {
            w.scripted.insert((command.to_string(), i as u32 + 1), *c);
        }
    }

    pub fn crash_at(&self, step: u64, after: bool) {
        self.world().crash_at = Some((step, after));
    }

    /// Drop every journal record not yet flushed (the process died).
    pub fn crash_journal(&self) {
        self.world().records.retain(|(_, _, durable)| *durable);
    }

    pub fn durable_records(&self, id: &str) -> Vec<Record> {
        self.world().records.iter().filter(|(i, _, d)| i == id && *d).map(|(_, r, _)| r.clone()).collect()
    }

    /// Deployment ids whose latest attempt has no terminal record.
    pub fn unfinished(&self) -> Vec<String> {
        let w = self.world();
        let mut last: BTreeMap<&str, bool> = BTreeMap::new();
        for (id, r, _) in &w.records {
            match &r.event {
                Event::Started { .. } => {
                    last.insert(id, false);
                }
                e if e.is_terminal() => {
                    last.insert(id, true);
                }
                _ => {}
            }
        }
        last.into_iter().filter(|(_, t)| !t).map(|(i, _)| i.to_string()).collect()
    }

    /// Every journal record serialized, for secret scans.
    pub fn journal_bytes(&self) -> Vec<u8> {
        let w = self.world();
        let mut out = Vec::new();
        for (id, r, _) in &w.records {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&serde_json::to_vec(r).unwrap_or_default());
        }
        out
    }

    /// An independent copy of everything (host, journal, schedule).
    pub fn fork(&self) -> Sim {
        Sim(Arc::new(Mutex::new(self.world().clone())))
    }

    pub fn reset_faults(&self) {
        let mut w = self.world();
        w.faults.clear();
        w.always.clear();
        w.crash_at = None;
        w.op_counts.clear();
    }
}

impl World {
    fn resolve(&self, path: &str) -> String {
        match self.paths.get(path) {
            Some(Node::Symlink(t)) => t.clone(),
            _ => path.to_string(),
        }
    }

    /// The bytes of the file at `path` (following one symlink).
    pub fn bytes(&self, path: &str) -> Option<&[u8]> {
        self.file(&self.resolve(path)).map(|i| i.bytes.as_slice())
    }

    fn file(&self, path: &str) -> Option<&Inode> {
        match self.paths.get(path) {
            Some(Node::File(ino)) => self.inodes.get(ino),
            _ => None,
        }
    }

    fn new_inode(&mut self, bytes: Vec<u8>, mode: u32) -> u64 {
        self.next_ino += 1;
        let ino = self.next_ino;
        self.inodes.insert(ino, Inode { bytes, mode, uid: 1000, gid: 1000 });
        ino
    }
}

fn crash() -> ! {
    std::panic::panic_any(SimulatedCrash)
}

/// Gate for one primitive op: counts it, applies the schedule. Returns
/// `Ok(crash_after)` to proceed, or the scheduled error.
fn gate(sim: &Sim, op: OpKind) -> Result<bool, StepError> {
    let mut w = sim.world();
    w.steps += 1;
    let step = w.steps;
    let n = {
        let c = w.op_counts.entry(op.clone()).or_insert(0);
        *c += 1;
        *c
    };
    w.now += 1;
    let mut crash_after = false;
    if let Some((s, after)) = w.crash_at
        && s == step
    {
        w.crash_at = None;
        if after {
            crash_after = true;
        } else {
            drop(w);
            crash();
        }
    }
    match w.faults.get(&(op.clone(), n)).cloned() {
        Some(Fault::Fail(e)) => return Err(e),
        Some(Fault::CrashBefore) => {
            w.faults.remove(&(op, n));
            drop(w);
            crash()
        }
        Some(Fault::CrashAfter) => crash_after = true,
        None => {}
    }
    if let Some(e) = w.always.get(&op) {
        return Err(e.clone());
    }
    w.op_log.push(op);
    Ok(crash_after)
}

fn finish(crash_after: bool) {
    if crash_after {
        crash();
    }
}

/// The in-memory host.
#[derive(Clone, Debug)]
pub struct MemHost(pub Sim);

impl MemHost {
    /// The write-ahead rule: before a live path changes, the journal must
    /// durably hold every snapshot of this attempt and `Begun{Write}`.
    fn check_write_ahead(&self, w: &mut World, deployment_id: &str) {
        let recs: Vec<&Record> =
            w.records.iter().filter(|(i, _, d)| i == deployment_id && *d).map(|(_, r, _)| r).collect();
        let start = recs.iter().rposition(|r| matches!(r.event, Event::Started { .. }));
        let Some(start) = start else {
            w.violations.push(format!("{deployment_id}: write with no durable Started"));
            return;
        };
        let Event::Started { plan } = &recs[start].event else { return };
        let after = &recs[start..];
        for f in &plan.files {
            let snapped = after.iter().any(|r| matches!(&r.event, Event::Snapshotted { role, .. } if *role == f.role));
            if !snapped {
                w.violations.push(format!("{deployment_id}: write before snapshot of {} was durable", f.role));
            }
        }
        if !after.iter().any(|r| matches!(r.event, Event::Begun { step: Step::Write })) {
            w.violations.push(format!("{deployment_id}: write before Begun(write) was durable"));
        }
    }
}

/// What the snapshot step (and a dry run's inspection, with no backup)
/// reports of an existing file.
fn existing(live_path: String, backup_path: String, i: &Inode, role: Role) -> Snapped {
    Snapped {
        snapshot: Snapshot {
            live_path,
            pre: PreState::Existing {
                backup_path,
                sha256: Digest::of(&i.bytes),
                size: i.bytes.len() as u64,
                mode: i.mode,
                uid: i.uid,
                gid: i.gid,
                cert: None,
                holds: None,
            },
        },
        content: role.reads_content().then(|| i.bytes.clone()),
    }
}

impl Host for MemHost {
    async fn snapshot(&self, deployment_id: &str, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        let mut out = Vec::new();
        for f in files {
            let crash_after = match gate(&self.0, OpKind::Snapshot(f.role)) {
                Ok(c) => c,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let mut w = self.0.world();
            let live = w.resolve(&f.path);
            let backup = backup_path(&live, deployment_id);
            let r = match w.paths.get(&live).cloned() {
                None => Ok(Snapped { snapshot: Snapshot { live_path: live, pre: PreState::Missing }, content: None }),
                Some(Node::Symlink(_)) => Err(StepError::permanent(format!("{live}: symlink loop"))),
                Some(Node::File(ino)) => {
                    w.paths.insert(backup.clone(), Node::File(ino));
                    Ok(existing(live, backup, &w.inodes[&ino], f.role))
                }
            };
            drop(w);
            out.push(r);
            finish(crash_after);
        }
        out
    }

    async fn inspect(&self, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        let w = self.0.world();
        files
            .iter()
            .map(|f| {
                let live = w.resolve(&f.path);
                match w.paths.get(&live) {
                    None => {
                        Ok(Snapped { snapshot: Snapshot { live_path: live, pre: PreState::Missing }, content: None })
                    }
                    Some(Node::Symlink(_)) => Err(StepError::permanent(format!("{live}: symlink loop"))),
                    Some(Node::File(ino)) => Ok(existing(live, String::new(), &w.inodes[ino], f.role)),
                }
            })
            .collect()
    }

    async fn write(&self, deployment_id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        let mut out = Vec::new();
        for (f, bytes) in files {
            let crash_after = match gate(&self.0, OpKind::Write(f.role)) {
                Ok(c) => c,
                Err(e) => {
                    out.push(Err(e));
                    break; // renames are in order: stop at the first failure
                }
            };
            let mut w = self.0.world();
            self.check_write_ahead(&mut w, deployment_id);
            let ino = w.new_inode(bytes.to_vec(), f.mode);
            w.paths.insert(f.live_path.clone(), Node::File(ino));
            drop(w);
            out.push(Ok(()));
            finish(crash_after);
        }
        out
    }

    async fn reinstate(&self, deployment_id: &str, files: &[RestoreRequest]) -> Vec<Result<(), StepError>> {
        let mut out = Vec::new();
        for f in files {
            // Faults as for a write: it is the revert's write.
            let crash_after = match gate(&self.0, OpKind::Write(f.role)) {
                Ok(c) => c,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            };
            let mut w = self.0.world();
            self.check_write_ahead(&mut w, deployment_id);
            let r = match &f.pre {
                PreState::Missing => {
                    w.paths.remove(&f.live_path);
                    Ok(())
                }
                // A hard link of the backup renamed over the live path:
                // the backup stays, the live path gets its inode.
                PreState::Existing { backup_path, sha256, .. } => match w.paths.get(backup_path).cloned() {
                    Some(Node::File(ino)) if w.inodes.get(&ino).is_some_and(|i| Digest::of(&i.bytes) == *sha256) => {
                        w.paths.insert(f.live_path.clone(), Node::File(ino));
                        Ok(())
                    }
                    _ => Err(StepError::permanent(format!("{backup_path} is missing or differs from the snapshot"))),
                },
            };
            drop(w);
            let failed = r.is_err();
            out.push(r);
            finish(crash_after);
            if failed {
                break;
            }
        }
        out
    }

    async fn exec(&self, command: &str, _timeout_ms: u64) -> Result<ExecResult, StepError> {
        let crash_after = gate(&self.0, OpKind::Exec(command.to_string()))?;
        let mut w = self.0.world();
        if let Some(v) = w.exec_check.and_then(|check| check(&w, command)) {
            w.violations.push(v);
        }
        w.exec_log.push(command.to_string());
        let n = w.op_counts.get(&OpKind::Exec(command.to_string())).copied().unwrap_or(0);
        let on_disk = w.served_path.clone().and_then(|p| {
            let p = w.resolve(&p);
            w.file(&p).map(|i| i.bytes.clone())
        });
        let broken_site = w.site_commands.contains(command)
            && w.sites.values().any(|(p, _)| {
                let p = w.resolve(p);
                w.file(&p).is_some_and(|i| {
                    i.bytes.split(|b| *b == b'\n').next().is_some_and(|l| l.windows(6).any(|x| x == b"BROKEN"))
                })
            });
        let rejected = broken_site || matches!((w.rejects.get(command), &on_disk), (Some(r), Some(d)) if r == d);
        let code = match w.scripted.get(&(command.to_string(), n)) {
            Some(c) => *c,
            None if rejected => 1,
            None => w.commands.get(command).copied().unwrap_or(0),
        };
        if code == 0 && w.reload_commands.contains(command) && !w.reload_is_noop {
            let served = w.served_path.clone().and_then(|p| {
                let p = w.resolve(&p);
                w.file(&p).map(|i| leaf_of(&i.bytes))
            });
            w.served = served;
            let sites: Vec<(String, Option<Digest>)> = w
                .sites
                .iter()
                .map(|(sni, (p, _))| {
                    let p = w.resolve(p);
                    (sni.clone(), w.file(&p).map(|i| leaf_of(&i.bytes)))
                })
                .collect();
            for (sni, leaf) in sites {
                if let Some(site) = w.sites.get_mut(&sni) {
                    site.1 = leaf;
                }
            }
        }
        drop(w);
        finish(crash_after);
        Ok(ExecResult {
            exit_code: Some(code),
            output: if code == 0 { String::new() } else { format!("{command}: failed") },
        })
    }

    async fn restore(&self, deployment_id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        let mut out = Vec::new();
        for f in files {
            let crash_after = match gate(&self.0, OpKind::Restore(f.role)) {
                Ok(c) => c,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let mut w = self.0.world();
            w.paths.remove(&temp_path(&f.live_path, deployment_id));
            let r = match &f.pre {
                PreState::Missing => {
                    w.paths.remove(&f.live_path);
                    Ok(RestoreStatus::Removed)
                }
                PreState::Existing { backup_path, sha256, .. } => match w.paths.remove(backup_path) {
                    Some(node) => {
                        w.paths.insert(f.live_path.clone(), node);
                        Ok(RestoreStatus::Restored)
                    }
                    None => match w.file(&f.live_path) {
                        Some(i) if Digest::of(&i.bytes) == *sha256 => Ok(RestoreStatus::Restored),
                        _ => Err(StepError::permanent(format!(
                            "{backup_path} is missing and {} differs from the snapshot",
                            f.live_path
                        ))),
                    },
                },
            };
            drop(w);
            out.push(r);
            finish(crash_after);
        }
        out
    }

    async fn remove_backups(&self, deployment_id: &str, paths: &[String]) -> Result<(), StepError> {
        let crash_after = gate(&self.0, OpKind::RemoveBackups)?;
        let mut w = self.0.world();
        for p in paths {
            let live = w.resolve(p);
            w.paths.remove(&backup_path(&live, deployment_id));
            w.paths.remove(&temp_path(&live, deployment_id));
        }
        drop(w);
        finish(crash_after);
        Ok(())
    }

    async fn exec_guarded(&self, command: &str, timeout_ms: u64, guard: &ExecGuard) -> Result<ExecResult, StepError> {
        let holds = {
            let w = self.0.world();
            w.lock_files.get(&guard.lock_path).is_some_and(|(b, _)| {
                matches!(LockRecord::parse(&guard.lock_path, b), Ok(Parsed::Lock(r)) if r.token == guard.token)
            })
        };
        if !holds {
            return Err(StepError::lock_lost(format!("target lock {} no longer holds this token", guard.lock_path)));
        }
        self.exec(command, timeout_ms).await
    }

    async fn lock_create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
        let mut w = self.0.world();
        let host_now = w.now / 1000;
        let created = !w.lock_files.contains_key(path);
        if created {
            w.lock_files.insert(path.to_string(), (bytes.to_vec(), host_now));
        }
        Ok(Created { created, host_now })
    }

    async fn lock_replace(
        &self,
        path: &str,
        bytes: &[u8],
        _durable: bool,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        // Atomic here: the fence is asked where the rename would be sent.
        if !fence() {
            return Ok(None);
        }
        let mut w = self.0.world();
        let host_now = w.now / 1000;
        w.lock_files.insert(path.to_string(), (bytes.to_vec(), host_now));
        Ok(Some(host_now))
    }

    async fn lock_read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
        Ok(self.0.world().lock_files.get(path).map(|(b, m)| LockFile { bytes: b.clone(), mtime: *m }))
    }

    async fn lock_remove(&self, path: &str) -> Result<(), StepError> {
        self.0.world().lock_files.remove(path);
        Ok(())
    }

    async fn lock_sweep(&self, _lock: &str, _before: u64) -> Result<u32, StepError> {
        // Lock writes here are atomic: they leave no temp files.
        Ok(0)
    }

    async fn resolve_path(&self, path: &str) -> Result<String, StepError> {
        Ok(self.0.world().resolve(path))
    }

    async fn write_locked(
        &self,
        deployment_id: &str,
        files: &[(WriteRequest, &[u8])],
        lock: LockWrite<'_>,
    ) -> WrittenLocked {
        crate::driver::write_locked_in_turn(self, deployment_id, files, lock).await
    }

    async fn prune_locked(
        &self,
        deployment_id: &str,
        live_paths: &[String],
        keep: u32,
        lock: LockWrite<'_>,
    ) -> PrunedLocked {
        crate::driver::prune_locked_in_turn(self, deployment_id, live_paths, keep, lock).await
    }

    // Writes here are atomic: they leave no temps.
    async fn discard_temps(&self, _deployment_id: &str, _paths: &[String]) -> Result<(), StepError> {
        Ok(())
    }

    async fn prune(&self, deployment_id: &str, live_paths: &[String], keep: u32) -> Result<(), StepError> {
        let crash_after = gate(&self.0, OpKind::Prune)?;
        let mut w = self.0.world();
        for live in live_paths {
            let own = backup_path(live, deployment_id);
            let prefix = format!("{live}.certdeploy-bak.");
            let mut others: Vec<(u64, String)> = w
                .paths
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix) && **p != own)
                .map(|(p, n)| (if let Node::File(i) = n { *i } else { 0 }, p.clone()))
                .collect();
            // Newest (highest inode number) first; keep `keep - 1` others.
            others.sort_by_key(|o| std::cmp::Reverse(o.0));
            for (_, p) in others.into_iter().skip(keep.saturating_sub(1) as usize) {
                w.paths.remove(&p);
            }
        }
        drop(w);
        finish(crash_after);
        Ok(())
    }
}

/// The fake certificate format of the testkit: the first line identifies
/// the leaf; `nb=<n>` in it is its notBefore.
pub fn leaf_of(bytes: &[u8]) -> Digest {
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    Digest::of(first)
}

/// `cert_facts` for the fake format: first line `CERT <name> nb=<n>`.
pub fn fake_cert_facts(bytes: &[u8]) -> Option<CertFacts> {
    let first = std::str::from_utf8(bytes.split(|b| *b == b'\n').next()?).ok()?;
    if !first.starts_with("CERT ") {
        return None;
    }
    let nb = first.split_whitespace().find_map(|w| w.strip_prefix("nb="))?.parse().ok()?;
    Some(CertFacts { not_before: nb, leaf_sha256: leaf_of(bytes) })
}

/// Reports what the simulated daemon serves.
#[derive(Clone, Debug)]
pub struct MemVerifier(pub Sim);

impl Verifier for MemVerifier {
    async fn served_leaf(&self, endpoint: &str, sni: Option<&str>) -> Result<Digest, String> {
        let mut w = self.0.world();
        w.now += 1;
        if let Some((_, served)) = sni.and_then(|s| w.sites.get(s)) {
            return served.ok_or_else(|| format!("{endpoint}: nothing served for {sni:?}"));
        }
        w.served.ok_or_else(|| format!("{endpoint}: connection refused"))
    }
}

/// The in-memory journal. `sync` makes everything appended so far durable.
#[derive(Clone, Debug)]
pub struct MemJournal(pub Sim);

impl Journal for MemJournal {
    fn append(&self, deployment_id: &str, record: &Record) -> Result<u64, JournalError> {
        let mut w = self.0.world();
        w.records.push((deployment_id.to_string(), record.clone(), false));
        Ok(w.records.len() as u64)
    }

    async fn sync(&self, _seq: u64) -> Result<(), JournalError> {
        // A crash "before" a sync loses the unflushed records.
        match gate_journal(&self.0) {
            Some(true) => {
                self.0.crash_journal();
                crash()
            }
            Some(false) => {
                mark_durable(&self.0);
                crash()
            }
            None => {
                mark_durable(&self.0);
                Ok(())
            }
        }
    }
}

fn mark_durable(sim: &Sim) {
    let mut w = sim.world();
    for r in w.records.iter_mut() {
        r.2 = true;
    }
    w.flushes += 1;
}

/// Some(before) if the process dies at this sync.
fn gate_journal(sim: &Sim) -> Option<bool> {
    let mut w = sim.world();
    w.steps += 1;
    let step = w.steps;
    w.op_log.push(OpKind::JournalSync);
    match w.crash_at {
        Some((s, after)) if s == step => {
            w.crash_at = None;
            Some(!after)
        }
        _ => None,
    }
}

/// Virtual time: sleeping jumps the clock forward.
#[derive(Clone, Debug)]
pub struct MemClock(pub Sim);

impl Clock for MemClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.world().now)
    }
    async fn sleep_until(&self, t: Timestamp) {
        let mut w = self.0.world();
        w.now = w.now.max(t.0);
    }
}

/// A ready-made environment over one [`Sim`].
pub struct Rig {
    pub sim: Sim,
    pub host: MemHost,
    pub verifier: MemVerifier,
    pub journal: MemJournal,
    pub clock: MemClock,
}

impl Rig {
    pub fn new(sim: Sim) -> Rig {
        Rig {
            host: MemHost(sim.clone()),
            verifier: MemVerifier(sim.clone()),
            journal: MemJournal(sim.clone()),
            clock: MemClock(sim.clone()),
            sim,
        }
    }

    pub fn env(&self) -> crate::driver::Env<'_, MemHost, MemVerifier, MemJournal, MemClock> {
        crate::driver::Env {
            host: &self.host,
            verifier: &self.verifier,
            journal: &self.journal,
            clock: &self.clock,
            cert_facts: fake_cert_facts,
        }
    }

    /// Start a deployment; `Err` if the process "crashed".
    pub fn deploy(&self, plan: Plan, payload: &Payload) -> Result<Terminal, SimulatedCrash> {
        let r = run_until_crash(|| block_on(crate::driver::start(&self.env(), plan, payload)));
        if r.is_err() {
            self.sim.crash_journal();
        }
        r.map(|t| t.expect("driver error"))
    }

    /// Recover one deployment from the durable journal, like a restarted
    /// process. `Err` if it crashed again.
    pub fn recover(&self, id: &str) -> Result<Terminal, SimulatedCrash> {
        let records = self.sim.durable_records(id);
        let r = run_until_crash(|| block_on(crate::driver::resume(&self.env(), &records)));
        if r.is_err() {
            self.sim.crash_journal();
        }
        r.map(|t| t.expect("driver error"))
    }
}

/// A plan for tests: a target with cert, key and optional chain under /etc/ssl.
pub fn test_plan(
    id: &str,
    cert: &[u8],
    key: &[u8],
    chain: Option<&[u8]>,
    validate: bool,
    verify: bool,
) -> (Plan, Payload) {
    let target = TargetSpec {
        host: "web1.internal".into(),
        port: 22,
        user: "deploy".into(),
        cert_path: "/etc/ssl/site.pem".into(),
        key_path: "/etc/ssl/site.key".into(),
        chain_path: chain.map(|_| "/etc/ssl/chain.pem".into()),
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: validate.then(|| "nginx -t".into()),
        reload_command: "systemctl reload nginx".into(),
        verify_endpoint: verify.then(|| "web1.internal:443".into()),
        verify_sni: None,
    };
    let material = Material {
        certificate_pem: String::from_utf8_lossy(cert).into_owned(),
        private_key_pem: Secret::new(key.to_vec()),
        chain_pem: chain.map(|c| String::from_utf8_lossy(c).into_owned()),
    };
    let facts = fake_cert_facts(cert)
        .map(|f| MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) })
        .unwrap_or_default();
    let policy = Policy { verify_budget_ms: 2_000, ..Policy::default() };
    build_plan(id, "web1", &target, &material, &facts, policy, 1).expect("valid test plan")
}
