//! The cross-worker target lock (issue 10): a file on the host next to the
//! certificate, `<cert_path>.certdeploy-lock`, holding a [`LockRecord`].
//!
//! - **Acquire**: create the file exclusively (content complete from the
//!   first instant). If it exists and its lease is live: the caller defers.
//! - **Lease**: judged by the host alone: a lock whose file has not been
//!   rewritten for `lease_ms` (its mtime, against the mtime of a file this
//!   worker just wrote, both by the host's clock) is expired. The holder
//!   rewrites it every quarter lease, and stops touching the host once a
//!   quarter lease of margin is all that is left since the start of its last
//!   successful rewrite, by its own monotonic clock. So the holder has
//!   stopped before anyone may take over, whatever the clocks of the
//!   workers say.
//! - **Takeover** of an expired lock is a compare-and-swap built from
//!   exclusive creates: the taker first creates `<lock>.claim.<hash of the
//!   expired token>`; exactly one taker can, and only it replaces the lock.
//!   A claimant that dies leaves a claim that expires like a lock, and is
//!   itself claimed by the next taker (a chain, followed to its end).
//! - **Content**: the lock records the deployment whose state the host may
//!   be in: its id, its phase (`locked` → nothing changed yet; `writing` →
//!   snapshots taken, writes and a reload may have happened; `committing`
//!   → deployed, pruning old backups) and its snapshots (paths, digests,
//!   modes, backup names: never key bytes). A taker rolls a `writing`
//!   deployment back from exactly that, with the core's restore and
//!   retry-reload, and finishes a `committing` one's prune: a deployment
//!   whose `deployed` may already be journaled is never rolled back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use certdeploy_core::driver::Host;
use certdeploy_core::driver::Snapped;
use certdeploy_core::{
    ExecResult, RestoreRequest, RestoreStatus, Role, Snapshot, SnapshotRequest, StepError, WriteRequest,
};
use certdeploy_ssh::{Created, LockFile, SshHost};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Suffix of the lock file next to the certificate.
pub const LOCK_SUFFIX: &str = ".certdeploy-lock";

pub fn lock_path(cert_path: &str) -> String {
    format!("{cert_path}{LOCK_SUFFIX}")
}

/// The first `bytes` bytes of the sha256 of `s`, in hex: short names for
/// tokens (claim files, journal keys).
pub fn short_hash(s: &str, bytes: usize) -> String {
    Sha256::digest(s.as_bytes())[..bytes].iter().map(|b| format!("{b:02x}")).collect()
}

fn claim_path(lock: &str, token: &str) -> String {
    format!("{lock}.claim.{}", short_hash(token, 8))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockPhase {
    /// Nothing on the host changed by this deployment yet (backup links at most).
    Locked,
    /// Snapshots taken; writes, a validate and a reload may have happened.
    Writing,
    /// Deployed; old backups being pruned. A taker finishes the prune
    /// (never rolls back: the result may already be journaled).
    Committing,
}

/// The content of the lock file (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub v: u32,
    /// Unique per acquisition.
    pub token: String,
    /// Worker name (results' `worker`).
    pub worker: String,
    /// The holder's journal (`hostname:path`): a worker recognizes its own
    /// locks after a restart.
    pub journal: String,
    /// The deployment whose state the host may be in.
    pub deployment_id: String,
    pub attempt: u32,
    pub phase: LockPhase,
    pub lease_ms: u64,
    /// Rewrites so far.
    pub seq: u64,
    /// Unix ms by the holder's clock, for people reading the file.
    pub acquired_at_ms: u64,
    #[serde(default)]
    pub snapshots: Vec<(Role, Snapshot)>,
}

impl LockRecord {
    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("lock record serializes")
    }

    fn parse(path: &str, f: &LockFile) -> Result<LockRecord, StepError> {
        serde_json::from_slice(&f.bytes).map_err(|e| {
            StepError::permanent(format!(
                "{path} is not a certdeploy lock ({e}); remove it by hand once no deployment runs on this target"
            ))
        })
    }

    /// Expired by the host's clock (`host_now`, whole seconds): not
    /// rewritten for a whole lease, with a second for the granularity.
    fn expired(&self, mtime: u64, host_now: u64) -> bool {
        host_now > mtime + self.lease_ms.div_ceil(1000) + 1
    }

    pub fn describe(&self) -> String {
        format!(
            "worker {} (deployment {} attempt {}, phase {:?})",
            self.worker, self.deployment_id, self.attempt, self.phase
        )
    }
}

/// A new token: unique per acquisition.
pub fn new_token(journal: &str, deployment_id: &str, attempt: u32) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let hex = short_hash(&format!("{journal}\0{deployment_id}\0{attempt}\0{nanos}\0{}", std::process::id()), 12);
    format!("{deployment_id}/{attempt}/{hex}")
}
/// The lock file operations (implemented over SSH; in memory in tests).
pub trait LockHost: Send + Sync {
    fn create(&self, path: &str, bytes: &[u8]) -> impl Future<Output = Result<Created, StepError>> + Send;
    /// `durable`: fsync the content before it replaces the old (the lock
    /// carries rollback instructions).
    fn replace(&self, path: &str, bytes: &[u8], durable: bool) -> impl Future<Output = Result<(), StepError>> + Send;
    fn read(&self, path: &str) -> impl Future<Output = Result<Option<LockFile>, StepError>> + Send;
    fn remove(&self, path: &str) -> impl Future<Output = Result<(), StepError>> + Send;
}

impl LockHost for SshHost<'_> {
    async fn create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
        self.lock_create(path, bytes).await
    }
    async fn replace(&self, path: &str, bytes: &[u8], durable: bool) -> Result<(), StepError> {
        self.lock_replace(path, bytes, durable).await
    }
    async fn read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
        self.lock_read(path).await
    }
    async fn remove(&self, path: &str) -> Result<(), StepError> {
        self.lock_remove(path).await
    }
}

/// What [`acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// The lock is ours. `took_over`: the expired lock it replaced (its
    /// holder is dead); our lock now carries that deployment's state
    /// (`inherited`) until the caller has dealt with it.
    Ours { took_over: Option<Box<LockRecord>>, written: Box<LockRecord> },
    /// Held by a live lease (or being taken over right now by another worker).
    Held { holder: String },
}

/// How many times contention (a lock released or replaced between our
/// steps) is retried before deferring.
const ROUNDS: usize = 4;
/// Longest claim chain followed.
const CHAIN: usize = 8;

/// Take the lock at `path` for `mine`. `dead_own(record)`: the record is
/// one of this worker's own journal's that no live deployment holds (a
/// previous process of this worker died holding it): it is taken over
/// without waiting for its lease.
pub async fn acquire<H: LockHost>(
    host: &H,
    path: &str,
    mine: &LockRecord,
    dead_own: impl Fn(&LockRecord) -> bool,
) -> Result<Acquired, StepError> {
    let bytes = mine.bytes();
    for _ in 0..ROUNDS {
        let c = host.create(path, &bytes).await?;
        if c.created {
            return Ok(Acquired::Ours { took_over: None, written: Box::new(mine.clone()) });
        }
        let Some(file) = host.read(path).await? else { continue };
        let cur = LockRecord::parse(path, &file)?;
        if !dead_own(&cur) && !cur.expired(file.mtime, c.host_now) {
            return Ok(Acquired::Held { holder: cur.describe() });
        }
        // Expired: claim it (CAS), following the chain of dead claimants.
        let mut token = cur.token.clone();
        let mut claims = Vec::new();
        let mut won = false;
        for _ in 0..CHAIN {
            let claim = claim_path(path, &token);
            let cc = host.create(&claim, &bytes).await?;
            claims.push(claim.clone());
            if cc.created {
                won = true;
                break;
            }
            let Some(cf) = host.read(&claim).await? else {
                claims.pop();
                continue;
            };
            let holder = LockRecord::parse(&claim, &cf)?;
            if holder.token == mine.token {
                // Our own leftover (same acquisition): ours.
                won = true;
                break;
            }
            if !dead_own(&holder) && !holder.expired(cf.mtime, cc.host_now) {
                return Ok(Acquired::Held { holder: format!("being taken over by {}", holder.describe()) });
            }
            token = holder.token;
        }
        if !won {
            return Ok(Acquired::Held { holder: format!("a chain of {CHAIN} dead claims on {path}") });
        }
        // Only the winner of this claim may replace the lock, and only if it
        // still is the expired one.
        let still = match host.read(path).await? {
            Some(f) => LockRecord::parse(path, &f)?.token == cur.token,
            None => false,
        };
        if !still {
            if let Some(mine_claim) = claims.last() {
                let _ = host.remove(mine_claim).await;
            }
            continue;
        }
        let written = inherit(mine, &cur);
        host.replace(path, &written.bytes(), written.phase == LockPhase::Writing).await?;
        for claim in claims.iter().rev() {
            let _ = host.remove(claim).await;
        }
        return Ok(Acquired::Ours { took_over: Some(Box::new(cur)), written: Box::new(written) });
    }
    Ok(Acquired::Held { holder: format!("{path} changed hands {ROUNDS} times while this worker tried to take it") })
}

/// Our lock content after taking over `dead`: while its deployment may have
/// changed the host, the lock keeps describing it, so that a worker dying
/// in the middle of the rollback leaves the same instructions behind.
fn inherit(mine: &LockRecord, dead: &LockRecord) -> LockRecord {
    let mut r = mine.clone();
    if dead.phase != LockPhase::Locked {
        r.deployment_id = dead.deployment_id.clone();
        r.attempt = dead.attempt;
        r.phase = dead.phase;
        r.snapshots = dead.snapshots.clone();
    }
    r
}

/// After a restart: is the lock with `token` (from our journal) still ours?
/// If so it is rewritten (a fresh lease) and `Some(record)` returned. Goes
/// through the claim like a taker: the lease may have expired while this
/// worker was down, and another worker may be taking over right now.
pub async fn reacquire<H: LockHost>(host: &H, path: &str, token: &str) -> Result<Option<LockRecord>, StepError> {
    let Some(file) = host.read(path).await? else { return Ok(None) };
    let cur = LockRecord::parse(path, &file)?;
    if cur.token != token {
        return Ok(None);
    }
    let claim = claim_path(path, token);
    let mut next = cur.clone();
    next.seq += 1;
    let mut created = host.create(&claim, &next.bytes()).await?;
    if !created.created {
        // Ours from before the restart, or another worker's claim.
        let theirs = match host.read(&claim).await? {
            Some(cf) => LockRecord::parse(&claim, &cf)?.token != token,
            None => false,
        };
        if theirs {
            return Ok(None);
        }
        host.remove(&claim).await?;
        created = host.create(&claim, &next.bytes()).await?;
        if !created.created {
            return Ok(None);
        }
    }
    let still = match host.read(path).await? {
        Some(f) => LockRecord::parse(path, &f)?.token == token,
        None => false,
    };
    if still {
        host.replace(path, &next.bytes(), false).await?;
    }
    let _ = host.remove(&claim).await;
    Ok(still.then_some(next))
}

/// A lock this worker holds: renewed in the background, rewritten at phase
/// changes, and the fence every host operation passes.
pub struct HeldLock {
    path: String,
    lease: Duration,
    margin: Duration,
    record: tokio::sync::Mutex<LockRecord>,
    valid_until: std::sync::Mutex<Instant>,
    lost: AtomicBool,
    released: AtomicBool,
    changed: tokio::sync::Notify,
}

impl HeldLock {
    /// `since`: when the write that made the lock ours started.
    pub fn new(path: String, record: LockRecord, since: Instant) -> Arc<HeldLock> {
        let lease = Duration::from_millis(record.lease_ms);
        let margin = (lease / 4).max(Duration::from_millis(500));
        Arc::new(HeldLock {
            path,
            lease,
            margin,
            record: tokio::sync::Mutex::new(record),
            valid_until: std::sync::Mutex::new(since + lease.saturating_sub(margin)),
            lost: AtomicBool::new(false),
            released: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub async fn token(&self) -> String {
        self.record.lock().await.token.clone()
    }

    fn until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May this worker still touch the host?
    pub fn is_valid(&self) -> bool {
        !self.lost.load(Ordering::SeqCst) && Instant::now() < self.until()
    }

    /// Resolves once the lock is no longer valid (lost or not renewed in
    /// time); never after it was released on purpose.
    pub async fn invalid(&self) {
        loop {
            if self.is_released() {
                std::future::pending::<()>().await;
            }
            let notified = self.changed.notified();
            if !self.is_valid() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(self.until().into()) => {}
                _ = notified => {}
            }
        }
    }

    /// Passes only while the lock is valid; never returns otherwise (the
    /// caller races [`Self::invalid`] and stops).
    pub async fn fence(&self) {
        if !self.is_valid() {
            std::future::pending::<()>().await;
        }
    }

    /// Rewrite the lock (after `edit`), extending the lease from the moment
    /// the write started. Refused once the lock is invalid.
    pub async fn rewrite<H: LockHost>(&self, host: &H, edit: impl FnOnce(&mut LockRecord)) -> Result<(), StepError> {
        let mut rec = self.record.lock().await;
        if !self.is_valid() || self.is_released() {
            return Err(StepError::permanent(format!("target lock {} is no longer ours", self.path)));
        }
        let mut next = rec.clone();
        edit(&mut next);
        next.seq += 1;
        let started = Instant::now();
        host.replace(&self.path, &next.bytes(), next.phase == LockPhase::Writing && rec.phase != LockPhase::Writing)
            .await?;
        *rec = next;
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = started + self.lease.saturating_sub(self.margin);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Check the lock is still ours, then extend the lease.
    pub async fn renew<H: LockHost>(&self, host: &H) -> Result<(), StepError> {
        let token = self.token().await;
        if let Some(f) = host.read(&self.path).await?
            && LockRecord::parse(&self.path, &f)?.token == token
        {
            return self.rewrite(host, |_| {}).await;
        }
        self.lost.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
        Err(StepError::permanent(format!("target lock {} was taken over by another worker", self.path)))
    }

    /// How often the renewal runs.
    pub fn renew_every(&self) -> Duration {
        self.lease / 4
    }

    /// Remove the lock if it is still ours. Stops renewals. While the lease
    /// is valid nobody else can have replaced it, so no read first; once it
    /// is not, the file is left alone (it is someone else's, or expires).
    pub async fn release<H: LockHost>(&self, host: &H) -> Result<(), StepError> {
        let _rec = self.record.lock().await;
        if self.released.swap(true, Ordering::SeqCst) {
            // Once only: the name may be another worker's lock by now.
            return Ok(());
        }
        if !self.is_valid() {
            return Ok(());
        }
        host.remove(&self.path).await
    }

    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

/// Renew `lock` until it is released or lost. Errors are logged; a lock
/// that cannot be renewed in time simply becomes invalid.
pub async fn renew_loop<H: LockHost>(lock: Arc<HeldLock>, host: H) {
    loop {
        tokio::time::sleep(lock.renew_every()).await;
        if lock.is_released() || lock.is_lost() {
            return;
        }
        if let Err(e) = lock.renew(&host).await {
            if lock.is_lost() {
                tracing::warn!(lock = %lock.path(), "{}", e.message);
                return;
            }
            tracing::warn!(lock = %lock.path(), "lock renewal failed: {}", e.message);
        }
    }
}

/// A [`Host`] behind a held lock: every operation passes the fence first;
/// the first write rewrites the lock to `writing` with the snapshots, and
/// the commit's prune to `committing`, before they act.
pub struct Locked<'a, H, L> {
    pub inner: H,
    pub lock: &'a HeldLock,
    pub lock_host: &'a L,
}

impl<H: Host, L: LockHost> Locked<'_, H, L> {
    async fn set_phase(&self, phase: LockPhase, snapshots: Option<Vec<(Role, Snapshot)>>) -> Result<(), StepError> {
        let current = self.lock.record.lock().await.phase;
        if current == phase {
            return Ok(());
        }
        self.lock
            .rewrite(self.lock_host, |r| {
                r.phase = phase;
                if let Some(s) = snapshots {
                    r.snapshots = s;
                }
            })
            .await
    }
}

impl<H: Host, L: LockHost> Host for Locked<'_, H, L> {
    async fn snapshot(&self, id: &str, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        self.lock.fence().await;
        let out = self.inner.snapshot(id, files).await;
        // Remember them for the `writing` rewrite.
        let mut rec = self.lock.record.lock().await;
        for (req, r) in files.iter().zip(&out) {
            if let Ok(s) = r {
                rec.snapshots.retain(|(role, _)| *role != req.role);
                rec.snapshots.push((req.role, s.snapshot.clone()));
            }
        }
        drop(rec);
        out
    }
    async fn write(&self, id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        self.lock.fence().await;
        let snaps = self.lock.record.lock().await.snapshots.clone();
        if let Err(e) = self.set_phase(LockPhase::Writing, Some(snaps)).await {
            let e = StepError {
                kind: e.kind,
                message: format!("recording the deployment in the target lock: {}", e.message),
            };
            return vec![Err(e)];
        }
        self.lock.fence().await;
        self.inner.write(id, files).await
    }
    async fn exec(&self, command: &str, timeout_ms: u64) -> Result<ExecResult, StepError> {
        self.lock.fence().await;
        self.inner.exec(command, timeout_ms).await
    }
    async fn restore(&self, id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        self.lock.fence().await;
        self.inner.restore(id, files).await
    }
    async fn remove_backups(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        self.lock.fence().await;
        self.inner.remove_backups(id, paths).await
    }
    async fn prune(&self, id: &str, live_paths: &[String], keep: u32) -> Result<(), StepError> {
        self.lock.fence().await;
        self.set_phase(LockPhase::Committing, None).await?;
        self.lock.fence().await;
        self.inner.prune(id, live_paths, keep).await
    }
}

#[cfg(test)]
mod tests {
    //! The protocol against an in-memory file system with a host clock and
    //! a yield before every operation, so that concurrent takers interleave.
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU64;

    use certdeploy_core::{Digest, PreState};

    use super::*;

    #[derive(Default)]
    struct MemLocks {
        files: Mutex<BTreeMap<String, (Vec<u8>, u64)>>,
        now: AtomicU64,
        /// Pseudo-random yields (per-operation), seeded per test case.
        rng: AtomicU64,
    }

    impl MemLocks {
        fn at(now: u64, seed: u64) -> MemLocks {
            MemLocks { now: AtomicU64::new(now), rng: AtomicU64::new(seed | 1), ..Default::default() }
        }
        async fn jitter(&self) {
            let x = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            for _ in 0..(x >> 61) {
                tokio::task::yield_now().await;
            }
        }
        fn advance(&self, s: u64) {
            self.now.fetch_add(s, Ordering::SeqCst);
        }
        fn get(&self, path: &str) -> Option<LockRecord> {
            self.files.lock().unwrap().get(path).map(|(b, _)| serde_json::from_slice(b).unwrap())
        }
        fn names(&self) -> Vec<String> {
            self.files.lock().unwrap().keys().cloned().collect()
        }
    }

    impl LockHost for MemLocks {
        async fn create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
            self.jitter().await;
            let now = self.now.load(Ordering::SeqCst);
            let mut f = self.files.lock().unwrap();
            let created = !f.contains_key(path);
            if created {
                f.insert(path.to_string(), (bytes.to_vec(), now));
            }
            Ok(Created { created, host_now: now })
        }
        async fn replace(&self, path: &str, bytes: &[u8], _durable: bool) -> Result<(), StepError> {
            self.jitter().await;
            let now = self.now.load(Ordering::SeqCst);
            self.files.lock().unwrap().insert(path.to_string(), (bytes.to_vec(), now));
            Ok(())
        }
        async fn read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
            self.jitter().await;
            Ok(self.files.lock().unwrap().get(path).map(|(b, m)| LockFile { bytes: b.clone(), mtime: *m }))
        }
        async fn remove(&self, path: &str) -> Result<(), StepError> {
            self.jitter().await;
            self.files.lock().unwrap().remove(path);
            Ok(())
        }
    }

    const LOCK: &str = "/etc/ssl/site.pem.certdeploy-lock";

    fn rec(worker: &str, id: &str) -> LockRecord {
        LockRecord {
            v: 1,
            token: new_token(worker, id, 1),
            worker: worker.into(),
            journal: format!("{worker}:/j"),
            deployment_id: id.into(),
            attempt: 1,
            phase: LockPhase::Locked,
            lease_ms: 4000,
            seq: 0,
            acquired_at_ms: 0,
            snapshots: vec![],
        }
    }

    fn writing(mut r: LockRecord) -> LockRecord {
        r.phase = LockPhase::Writing;
        r.snapshots = vec![(
            Role::Cert,
            Snapshot {
                live_path: "/etc/ssl/site.pem".into(),
                pre: PreState::Existing {
                    backup_path: format!("/etc/ssl/site.pem.certdeploy-bak.{}", r.deployment_id),
                    sha256: Digest([7; 32]),
                    size: 10,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    cert: None,
                },
            },
        )];
        r
    }

    fn no_dead_own(_: &LockRecord) -> bool {
        false
    }

    #[tokio::test]
    async fn a_live_lock_is_exclusive_and_an_expired_one_is_inherited() {
        let h = MemLocks::at(1000, 1);
        let a = writing(rec("a", "d-a"));
        assert!(matches!(acquire(&h, LOCK, &a, no_dead_own).await.unwrap(), Acquired::Ours { took_over: None, .. }));
        let b = rec("b", "d-b");
        h.advance(4); // within lease + 1 s of granularity
        assert!(matches!(acquire(&h, LOCK, &b, no_dead_own).await.unwrap(), Acquired::Held { .. }));
        h.advance(2);
        let Acquired::Ours { took_over: Some(dead), written } = acquire(&h, LOCK, &b, no_dead_own).await.unwrap()
        else {
            panic!("expired lock not taken over")
        };
        assert_eq!(dead.token, a.token);
        // The new lock is b's, but describes a's deployment until b has rolled it back.
        assert_eq!(written.token, b.token);
        assert_eq!((written.deployment_id.as_str(), written.phase), ("d-a", LockPhase::Writing));
        assert_eq!(written.snapshots, a.snapshots);
        assert_eq!(h.get(LOCK).unwrap(), *written);
        assert_eq!(h.names(), vec![LOCK.to_string()], "claims are removed");
    }

    #[tokio::test]
    async fn concurrent_takers_of_an_expired_lock_have_exactly_one_winner() {
        for seed in 0..300u64 {
            let h = MemLocks::at(1000, seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let a = writing(rec("a", "d-a"));
            acquire(&h, LOCK, &a, no_dead_own).await.unwrap();
            h.advance(10);
            let takers: Vec<LockRecord> = (0..4).map(|i| rec(&format!("t{i}"), &format!("d-{i}"))).collect();
            let (r0, r1, r2, r3) = tokio::join!(
                acquire(&h, LOCK, &takers[0], no_dead_own),
                acquire(&h, LOCK, &takers[1], no_dead_own),
                acquire(&h, LOCK, &takers[2], no_dead_own),
                acquire(&h, LOCK, &takers[3], no_dead_own),
            );
            let results = [r0, r1, r2, r3];
            let winners: Vec<usize> = results
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r, Ok(Acquired::Ours { .. })))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(winners.len(), 1, "seed {seed}: winners {winners:?} of {results:?}");
            assert_eq!(h.get(LOCK).unwrap().token, takers[winners[0]].token, "seed {seed}");
        }
    }

    #[tokio::test]
    async fn a_dead_claimant_is_followed_and_its_claim_expires_like_a_lock() {
        let h = MemLocks::at(1000, 3);
        let a = writing(rec("a", "d-a"));
        acquire(&h, LOCK, &a, no_dead_own).await.unwrap();
        h.advance(10);
        // b claimed a's lock and died before replacing it.
        let b = rec("b", "d-b");
        h.create(&claim_path(LOCK, &a.token), &b.bytes()).await.unwrap();
        let c = rec("c", "d-c");
        assert!(
            matches!(acquire(&h, LOCK, &c, no_dead_own).await.unwrap(), Acquired::Held { holder } if holder.contains("being taken over"))
        );
        h.advance(10);
        let Acquired::Ours { took_over: Some(dead), written } = acquire(&h, LOCK, &c, no_dead_own).await.unwrap()
        else {
            panic!("dead claim not followed")
        };
        // What is rolled back is the lock holder's deployment, not the claimant's.
        assert_eq!((dead.token.as_str(), written.deployment_id.as_str()), (a.token.as_str(), "d-a"));
        assert_eq!(h.names(), vec![LOCK.to_string()]);
    }

    #[tokio::test]
    async fn a_restarted_owner_keeps_its_lock_unless_it_was_taken_over() {
        let h = MemLocks::at(1000, 5);
        let a = writing(rec("a", "d-a"));
        acquire(&h, LOCK, &a, no_dead_own).await.unwrap();
        h.advance(2);
        let back = reacquire(&h, LOCK, &a.token).await.unwrap().expect("still ours");
        assert_eq!((back.seq, back.phase), (1, LockPhase::Writing));
        assert_eq!(h.files.lock().unwrap()[LOCK].1, 1002, "rewritten: a fresh lease");
        h.advance(10);
        let b = rec("b", "d-b");
        assert!(matches!(acquire(&h, LOCK, &b, no_dead_own).await.unwrap(), Acquired::Ours { took_over: Some(_), .. }));
        assert_eq!(reacquire(&h, LOCK, &a.token).await.unwrap(), None, "taken over: not ours any more");
        assert_eq!(h.get(LOCK).unwrap().token, b.token, "and a did not touch it");
    }

    #[tokio::test]
    async fn a_dead_own_lock_is_taken_at_once_and_a_lost_lock_fences() {
        let h = MemLocks::at(1000, 7);
        let a = rec("a", "d-a");
        acquire(&h, LOCK, &a, no_dead_own).await.unwrap();
        let a2 = rec("a", "d-a2");
        let mine = |r: &LockRecord| r.journal == "a:/j";
        assert!(matches!(acquire(&h, LOCK, &a2, mine).await.unwrap(), Acquired::Ours { took_over: Some(_), .. }));

        // A lock whose renewal finds another token is lost: the fence closes.
        let held = HeldLock::new(LOCK.into(), a.clone(), Instant::now());
        assert!(held.is_valid());
        assert!(held.renew(&h).await.is_err());
        assert!(!held.is_valid());
        tokio::time::timeout(Duration::from_millis(100), held.invalid()).await.expect("invalid resolves");
        assert!(tokio::time::timeout(Duration::from_millis(50), held.fence()).await.is_err(), "fence holds");
        // And a release of a lost lock leaves the new holder's file alone.
        held.release(&h).await.unwrap();
        assert_eq!(h.get(LOCK).unwrap().token, a2.token);
    }

    #[tokio::test]
    async fn an_unrenewed_lease_runs_out_by_the_holders_own_clock() {
        let mut r = rec("a", "d-a");
        r.lease_ms = 2000;
        let held = HeldLock::new(LOCK.into(), r, Instant::now() - Duration::from_millis(1600));
        // 2 s lease, 0.5 s margin: valid for 1.5 s after the write started.
        assert!(!held.is_valid());
        let h = MemLocks::at(1000, 9);
        assert!(held.rewrite(&h, |_| {}).await.is_err(), "no rewrite once invalid");
        let held = HeldLock::new(LOCK.into(), rec("a", "d-a"), Instant::now());
        h.replace(LOCK, &held.record.lock().await.bytes(), false).await.unwrap();
        held.rewrite(&h, |r| r.phase = LockPhase::Committing).await.unwrap();
        assert_eq!((h.get(LOCK).unwrap().phase, h.get(LOCK).unwrap().seq), (LockPhase::Committing, 1));
    }
}
