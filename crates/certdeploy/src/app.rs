//! The runtime shared by `deploy` and `worker`: journal, SSH pool,
//! verifier, per-target ordering, recovery. Deployments go through the
//! core driver; this module only wires real adapters to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use certdeploy_core::driver::{self, Env, Host, Journal, JournalError, Snapped};
use certdeploy_core::{
    CertFacts, Deployment, Digest, Event, ExecResult, Outcome, Plan, Record, Report, RestoreRequest, RestoreStatus,
    SnapshotRequest, StepError, Terminal, WriteRequest,
};
use certdeploy_journal::{DeploymentStatus, Durability, JournalOptions, SledJournal};
use certdeploy_ssh::{HostAddr, SshHost, SshPool};
use tracing::Instrument;

use crate::config::Config;
use crate::hostlock::{self, Acquired, HeldLock, LockPhase, LockRecord, Locked};
use crate::intake::Validated;
use crate::metrics as m;
use crate::verify::{SystemClock, TlsVerifier};

/// Per-key async locks (FIFO), dropped when nobody holds or waits.
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        KeyGuard { locks: self, key: key.to_string(), guard: Some(guard) }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|a| Arc::strong_count(a) == 1) {
            map.remove(&self.key);
        }
    }
}

pub struct Runtime {
    pub cfg: Config,
    pub journal: Arc<SledJournal>,
    pub pool: Arc<SshPool>,
    pub verifier: TlsVerifier,
    pub worker_name: String,
    /// `hostname:journal path`: names this worker's journal in host locks,
    /// stable across restarts.
    pub journal_id: String,
    /// Tokens of the target locks this process holds right now.
    live_tokens: Mutex<std::collections::HashSet<String>>,
    targets: KeyedLocks,
    ids: KeyedLocks,
    /// The per-process control directory made when `[ssh] control_dir` is
    /// not set: removed by [`Runtime::close_ssh`].
    own_control_dir: Option<std::path::PathBuf>,
}

/// What [`Runtime::execute`] ended with.
#[derive(Debug)]
pub enum Executed {
    /// The result to publish.
    Report(Report),
    /// The target is locked by another live deployment: try again later.
    Deferred { holder: String },
}

/// The journal under one key: a takeover's rollback is journaled under its
/// own key (the deployment id it rolls back is someone else's and may also
/// be one of ours).
struct Keyed<'a> {
    journal: &'a SledJournal,
    key: &'a str,
}

impl Journal for Keyed<'_> {
    fn append(&self, _id: &str, record: &Record) -> Result<u64, JournalError> {
        self.journal.append(self.key, record)
    }
    async fn sync(&self, seq: u64) -> Result<(), JournalError> {
        self.journal.sync(seq).await
    }
}

/// Keeps a token in [`Runtime::live_tokens`] while a lock is held.
struct LiveToken<'a> {
    set: &'a Mutex<std::collections::HashSet<String>>,
    token: String,
}

impl<'a> LiveToken<'a> {
    fn new(set: &'a Mutex<std::collections::HashSet<String>>, token: &str) -> LiveToken<'a> {
        set.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_string());
        LiveToken { set, token: token.to_string() }
    }
}

impl Drop for LiveToken<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.token);
    }
}

/// Marks the journal key of a takeover's rollback (`<id>~takeover~<hash>`;
/// `~` is not allowed in deployment ids).
const TAKEOVER_KEY: &str = "~takeover~";

/// Bounded exponential backoff for taking a target lock over a flaky link.
fn lock_backoff(tries: u32) -> Duration {
    Duration::from_millis(1000u64.saturating_mul(1 << tries.min(6)).min(60_000))
}

/// What deployments are serialized on: one host account's certificate
/// path. The worker orders deliveries by the same key.
pub fn target_key(host: &str, port: u16, cert_path: &str) -> String {
    format!("{host}:{port}:{cert_path}")
}

pub fn cert_facts(pem: &[u8]) -> Option<CertFacts> {
    certdeploy_pki::cert_facts(pem).map(|f| CertFacts { not_before: f.not_before, leaf_sha256: Digest(f.leaf_sha256) })
}

fn durability(s: &str) -> Durability {
    match s {
        "off" => Durability::Off,
        "flush" => Durability::Flush,
        _ => Durability::Fsync,
    }
}

impl Runtime {
    pub fn open(cfg: Config) -> anyhow::Result<Runtime> {
        let journal = SledJournal::open(
            &cfg.worker.journal_path,
            JournalOptions { durability: durability(&cfg.worker.journal_durability), ..JournalOptions::default() },
        )?;
        let (control_dir, own_control_dir) = match &cfg.ssh.control_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                // Unix socket paths are short: keep the default under /tmp.
                let dir = std::env::temp_dir().join(format!("certdeploy-ssh-{}", std::process::id()));
                (dir.clone(), Some(dir))
            }
        };
        let idle = Duration::from_secs(cfg.ssh.idle_timeout_s.max(1));
        let pool = SshPool::new(cfg.ssh_config(control_dir, idle)).context("ssh pool")?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = std::fs::canonicalize(&cfg.worker.journal_path).unwrap_or_else(|_| cfg.worker.journal_path.clone());
        Ok(Runtime {
            journal_id: format!("{host}:{}", path.display()),
            live_tokens: Mutex::default(),
            worker_name: cfg.worker_name(),
            cfg,
            journal: Arc::new(journal),
            pool: Arc::new(pool),
            verifier: TlsVerifier::new(Duration::from_secs(5)),
            targets: KeyedLocks::default(),
            ids: KeyedLocks::default(),
            own_control_dir,
        })
    }

    /// Close every ssh master; a per-process control directory goes too.
    pub async fn close_ssh(&self) {
        self.pool.close_all().await;
        if let Some(dir) = &self.own_control_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn addr(&self, plan: &Plan) -> HostAddr {
        let accept_new =
            self.cfg.targets.get(&plan.target).is_some_and(|t| t.accept_new_host_key() && t.host == plan.remote.host);
        HostAddr {
            host: plan.remote.host.clone(),
            port: plan.remote.port,
            user: plan.remote.user.clone(),
            accept_new_host_key: accept_new,
        }
    }

    fn target_key(plan: &Plan) -> String {
        let cert = plan.files.first().map(|f| f.path.as_str()).unwrap_or("");
        target_key(&plan.remote.host, plan.remote.port, cert)
    }

    fn cert_path(plan: &Plan) -> &str {
        plan.files.first().map(|f| f.path.as_str()).unwrap_or("")
    }

    /// Run one validated request to a result: re-publishable report for a
    /// terminal id, else a new attempt (after resuming an unfinished one),
    /// or `Deferred` while another worker's live lease holds the target.
    pub async fn execute(&self, v: &Validated) -> anyhow::Result<Executed> {
        let _id_guard = self.ids.lock(&v.deployment_id).await;
        loop {
            let attempt = match self.journal.status(&v.deployment_id)? {
                Some(DeploymentStatus::Finished { report, .. }) => return Ok(Executed::Report(report)),
                Some(DeploymentStatus::InFlight { .. }) => {
                    // Left by a crash (or a failed journal write): finish it
                    // per the recovery table, then look again.
                    self.resume(&v.deployment_id).await?;
                    continue;
                }
                Some(DeploymentStatus::Abandoned { attempts, .. }) => attempts + 1,
                None => 1,
            };
            let (mut plan, payload) = v.plan(&self.cfg, attempt).map_err(|e| anyhow::anyhow!("{e}"))?;
            let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
            let span =
                tracing::info_span!("deployment", deployment_id = %plan.deployment_id, target = %plan.target, attempt);
            let ssh = SshHost::new(&self.pool, self.addr(&plan));
            let token = hostlock::new_token(&self.journal_id, &plan.deployment_id, plan.attempt);
            let _live = LiveToken::new(&self.live_tokens, &token);
            let lock = match self.take_lock(&ssh, &plan, token.clone()).instrument(span.clone()).await? {
                Ok(lock) => lock,
                Err(done) => return Ok(done),
            };
            plan.lock = Some(token);
            let renewal = self.spawn_renewal(&lock, &plan);
            let host =
                Locked { inner: Metered(SshHost::new(&self.pool, self.addr(&plan))), lock: &lock, lock_host: &ssh };
            let keyed = Keyed { journal: &self.journal, key: &v.deployment_id };
            let env = self.env(&host, &keyed);
            let started = Instant::now();
            metrics::gauge!(m::IN_FLIGHT).increment(1.0);
            let r = tokio::select! {
                r = driver::start(&env, plan, &payload).instrument(span.clone()) => Some(r),
                _ = lock.invalid() => None,
            };
            metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
            let r = match r {
                Some(r) => r,
                None => {
                    renewal.abort();
                    self.lost_lock(&v.deployment_id, &lock).await?;
                    continue;
                }
            };
            self.release(&ssh, &lock).await;
            renewal.abort();
            match r? {
                Terminal::Finished(report) => {
                    metrics::counter!(m::DEPLOYMENTS, "outcome" => report.outcome.as_str()).increment(1);
                    metrics::histogram!(m::DEPLOY_SECONDS).record(started.elapsed().as_secs_f64());
                    tracing::info!(deployment_id = %report.deployment_id, target = %report.target, outcome = %report.outcome, "{}", report.message);
                    return Ok(Executed::Report(report));
                }
                Terminal::Abandoned(why) => {
                    tracing::warn!(deployment_id = %v.deployment_id, "attempt abandoned: {why}");
                    continue;
                }
            }
        }
    }

    /// [`Self::execute`] for the command line and the benchmark: a locked
    /// target is waited for here (`defer_delay_ms` between tries, at most
    /// `max_deferrals` tries) instead of in the retry queue.
    pub async fn execute_waiting(&self, v: &Validated) -> anyhow::Result<Report> {
        let mut n = 0;
        loop {
            match self.execute(v).await? {
                Executed::Report(r) => return Ok(r),
                Executed::Deferred { holder } if n >= self.cfg.worker.max_deferrals => {
                    let msg = format!(
                        "target locked by {holder}; gave up after {n} tries; the host was not changed by this request"
                    );
                    return Ok(Report::lock_failed(&v.deployment_id, &v.target_name, "", msg, crate::verify::now()));
                }
                Executed::Deferred { .. } => {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(self.cfg.worker.defer_delay_ms)).await;
                }
            }
        }
    }

    /// Take the target lock for `plan` (retrying transient errors within
    /// the deadline), dealing first with whatever a dead holder left:
    /// `Ok(Ok(lock))` to go on, `Ok(Err(done))` when this request ends here
    /// (deferred, or failed before touching the host).
    async fn take_lock(
        &self,
        ssh: &SshHost<'_>,
        plan: &Plan,
        token: String,
    ) -> anyhow::Result<Result<Arc<HeldLock>, Executed>> {
        let path = hostlock::lock_path(Self::cert_path(plan));
        let mine = LockRecord {
            v: 1,
            token,
            worker: self.worker_name.clone(),
            journal: self.journal_id.clone(),
            deployment_id: plan.deployment_id.clone(),
            attempt: plan.attempt,
            phase: LockPhase::Locked,
            lease_ms: self.cfg.worker.lock_lease_s * 1000,
            seq: 0,
            acquired_at_ms: crate::verify::now().0,
            snapshots: vec![],
        };
        let deadline = Instant::now() + Duration::from_secs(self.cfg.worker.deadline_s);
        let mut tries = 0;
        let (since, took_over, written) = loop {
            let since = Instant::now();
            match hostlock::acquire(ssh, &path, &mine, |r| self.dead_own(r)).await {
                Ok(Acquired::Ours { took_over, written }) => break (since, took_over, written),
                Ok(Acquired::Held { holder }) => {
                    tracing::info!(lock = %path, "target locked by {holder}: deferring");
                    return Ok(Err(Executed::Deferred { holder }));
                }
                Err(e) if e.is_transient() && Instant::now() + lock_backoff(tries) < deadline => {
                    tracing::warn!(lock = %path, "taking the target lock failed (will retry): {}", e.message);
                    tokio::time::sleep(lock_backoff(tries)).await;
                    tries += 1;
                }
                Err(e) => {
                    let msg = format!("could not take the target lock {path}; the host was not changed: {}", e.message);
                    tracing::warn!("{msg}");
                    let report =
                        Report::lock_failed(&plan.deployment_id, &plan.target, &plan.host, msg, crate::verify::now());
                    return Ok(Err(Executed::Report(report)));
                }
            }
        };
        let lock = HeldLock::new(path.clone(), *written, since);
        let Some(dead) = took_over else { return Ok(Ok(lock)) };
        tracing::warn!(lock = %path, "took over the target lock of {}", dead.describe());
        metrics::counter!(m::TAKEOVERS).increment(1);
        let renewal = self.spawn_renewal(&lock, plan);
        let r = self.settle_takeover(ssh, plan, &lock, &dead).await;
        renewal.abort();
        match r {
            Ok(()) => {}
            Err(msg) => {
                let report =
                    Report::lock_failed(&plan.deployment_id, &plan.target, &plan.host, msg, crate::verify::now());
                return Ok(Err(Executed::Report(report)));
            }
        }
        let (id, attempt) = (plan.deployment_id.clone(), plan.attempt);
        if let Err(e) = lock
            .rewrite(ssh, |r| {
                r.deployment_id = id;
                r.attempt = attempt;
                r.phase = LockPhase::Locked;
                r.snapshots.clear();
            })
            .await
        {
            let msg = format!("target lock {path} lost after a takeover: {}", e.message);
            let report = Report::lock_failed(&plan.deployment_id, &plan.target, &plan.host, msg, crate::verify::now());
            return Ok(Err(Executed::Report(report)));
        }
        Ok(Ok(lock))
    }

    /// Put the host back in order after taking over `dead`'s lock: roll a
    /// `writing` deployment back (journaled under its own key), finish a
    /// `committing` one's prune. `Err` (a message) when the host is not in
    /// order and this request must not deploy (the lock stays, with the
    /// instructions, for the next taker or a person).
    async fn settle_takeover(
        &self,
        ssh: &SshHost<'_>,
        plan: &Plan,
        lock: &Arc<HeldLock>,
        dead: &LockRecord,
    ) -> Result<(), String> {
        if dead.phase != LockPhase::Locked {
            self.check_instructions(ssh, plan, dead).await?;
        }
        match dead.phase {
            LockPhase::Locked => Ok(()),
            LockPhase::Committing => {
                let paths: Vec<String> = dead.snapshots.iter().map(|(_, s)| s.live_path.clone()).collect();
                // Straight to the host: the lock already says `committing`
                // (inherited), there is nothing to rewrite first.
                if !lock.is_valid() {
                    return Err(format!("target lock {} lost during a takeover", lock.path()));
                }
                let host = Metered(SshHost::new(&self.pool, self.addr(plan)));
                if let Err(e) = host.prune(&dead.deployment_id, &paths, 1).await {
                    tracing::warn!("pruning the backups of taken-over {}: {}", dead.deployment_id, e.message);
                }
                Ok(())
            }
            LockPhase::Writing => {
                let key = format!("{}{TAKEOVER_KEY}{}", dead.deployment_id, hostlock::short_hash(&dead.token, 6));
                let mut rb = plan.clone();
                rb.deployment_id = dead.deployment_id.clone();
                rb.attempt = dead.attempt;
                rb.lock = Some(lock.token().await);
                rb.files.retain(|f| dead.snapshots.iter().any(|(r, _)| *r == f.role));
                if rb.files.len() != dead.snapshots.len() {
                    return Err(format!(
                        "the interrupted deployment {} on this target wrote files this worker's target config does not have; roll it back by hand from {} (lock {})",
                        dead.deployment_id,
                        dead.snapshots.iter().map(|(_, s)| s.live_path.as_str()).collect::<Vec<_>>().join(", "),
                        lock.path()
                    ));
                }
                let at = crate::verify::now();
                let records = vec![
                    Record { at, event: Event::Started { plan: rb } },
                    Record { at, event: Event::TakenOver { from: dead.describe(), snapshots: dead.snapshots.clone() } },
                ];
                let mut seq = 0;
                for r in &records {
                    seq = self.journal.append(&key, r).map_err(|e| e.to_string())?;
                }
                self.journal.sync_seq(seq).await.map_err(|e| e.to_string())?;
                let t = self.run_recovery(&key, lock, ssh).await.map_err(|e| format!("{e:#}"))?;
                match t {
                    Terminal::Abandoned(_) => Ok(()),
                    Terminal::Finished(r) if r.outcome == Outcome::RolledBackDaemonUnknown => Ok(()),
                    Terminal::Finished(r) => Err(format!(
                        "rolling back the interrupted deployment {} of another worker failed ({}): {}",
                        dead.deployment_id, r.outcome, r.message
                    )),
                }
            }
        }
    }

    /// The lock file is only as trustworthy as the directory it lives in:
    /// before acting on a dead holder's instructions, check that they name
    /// exactly this target's files (as configured, or where their symlinks
    /// lead) and backups under the only name a deployment gives them.
    /// Otherwise a crafted lock could make a rollback rename or remove files
    /// elsewhere.
    async fn check_instructions(&self, ssh: &SshHost<'_>, plan: &Plan, dead: &LockRecord) -> Result<(), String> {
        let refuse = |why: String| {
            Err(format!(
                "the target lock {} holds rollback instructions this worker will not follow ({why}); check the host and remove the lock by hand",
                hostlock::lock_path(Self::cert_path(plan))
            ))
        };
        if !certdeploy_core::valid_deployment_id(&dead.deployment_id) {
            return refuse(format!("deployment id {:?} is not a valid id", dead.deployment_id));
        }
        for (role, snap) in &dead.snapshots {
            let Some(file) = plan.file(*role) else { return refuse(format!("no {role} file in this target")) };
            if snap.live_path != file.path {
                match ssh.resolve_path(&file.path).await {
                    Ok(real) if real == snap.live_path => {}
                    Ok(_) => {
                        return refuse(format!("{role} path {} is not this target's {}", snap.live_path, file.path));
                    }
                    Err(e) => return Err(format!("resolving {}: {}", file.path, e.message)),
                }
            }
            if let certdeploy_core::PreState::Existing { backup_path, .. } = &snap.pre
                && *backup_path != certdeploy_core::backup_path(&snap.live_path, &dead.deployment_id)
            {
                return refuse(format!("backup {backup_path} is not named after {}", snap.live_path));
            }
        }
        Ok(())
    }

    /// A previous process of this worker held this lock and no deployment
    /// in this journal still holds it: nothing will renew it.
    fn dead_own(&self, r: &LockRecord) -> bool {
        if r.journal != self.journal_id || self.live_tokens.lock().unwrap_or_else(|e| e.into_inner()).contains(&r.token)
        {
            return false;
        }
        let Ok(ids) = self.journal.unfinished() else { return false };
        !ids.iter().any(|id| {
            self.journal
                .records(id)
                .ok()
                .and_then(|recs| Deployment::replay(&recs).ok())
                .is_some_and(|d| d.plan().lock.as_deref() == Some(r.token.as_str()))
        })
    }

    fn spawn_renewal(&self, lock: &Arc<HeldLock>, plan: &Plan) -> tokio::task::JoinHandle<()> {
        let pool = self.pool.clone();
        let addr = self.addr(plan);
        let lock = lock.clone();
        tokio::spawn(async move {
            let host = SshHost::new(&pool, addr);
            hostlock::renew_loop(lock, host).await
        })
    }

    async fn release(&self, ssh: &SshHost<'_>, lock: &HeldLock) {
        if let Err(e) = lock.release(ssh).await {
            tracing::warn!(lock = %lock.path(), "releasing the target lock failed (it expires): {}", e.message);
        }
    }

    /// The lock went away under a running attempt: journal it abandoned;
    /// this worker does not touch the host for it again.
    async fn lost_lock(&self, key: &str, lock: &HeldLock) -> anyhow::Result<()> {
        let why = format!(
            "the target lock {} was lost (not renewed in time, or taken over by another worker); this worker stopped touching the host for this attempt",
            lock.path()
        );
        tracing::warn!(key, "{why}");
        metrics::counter!(m::LOCKS_LOST).increment(1);
        let seq =
            self.journal.append(key, &Record { at: crate::verify::now(), event: Event::Abandoned { reason: why } })?;
        self.journal.sync_seq(seq).await?;
        Ok(())
    }

    fn env<'a, H: Host, J: Journal>(&'a self, host: &'a H, journal: &'a J) -> Env<'a, H, TlsVerifier, J, SystemClock> {
        Env { host, verifier: &self.verifier, journal, clock: &SystemClock, cert_facts }
    }

    /// Finish an interrupted deployment (journal key `key`) per the
    /// recovery table, first making sure its target lock is still ours.
    pub async fn resume(&self, key: &str) -> anyhow::Result<Terminal> {
        let records: Vec<Record> = self.journal.records(key)?;
        let dep = Deployment::replay(&records)?;
        let plan = dep.plan().clone();
        let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
        let ssh = SshHost::new(&self.pool, self.addr(&plan));
        let Some(token) = plan.lock.clone() else {
            // Journaled before host locks existed.
            let host = Metered(SshHost::new(&self.pool, self.addr(&plan)));
            return self.drive_recovery(key, dep, &host).await;
        };
        let path = hostlock::lock_path(Self::cert_path(&plan));
        let _live = LiveToken::new(&self.live_tokens, &token);
        let mut tries = 0;
        let held = loop {
            let since = Instant::now();
            match hostlock::reacquire(&ssh, &path, &token).await {
                Ok(Some(rec)) => break HeldLock::new(path.clone(), rec, since),
                Ok(None) => {
                    let why = format!(
                        "the target lock {path} was taken over by another worker while this one was down; this worker did not touch the host again for this attempt"
                    );
                    tracing::warn!(key, "{why}");
                    let seq = self.journal.append(
                        key,
                        &Record { at: crate::verify::now(), event: Event::Abandoned { reason: why.clone() } },
                    )?;
                    self.journal.sync_seq(seq).await?;
                    return Ok(Terminal::Abandoned(why));
                }
                Err(e) if e.is_transient() && tries < 5 => {
                    tracing::warn!(key, lock = %path, "re-taking the target lock failed (will retry): {}", e.message);
                    tokio::time::sleep(lock_backoff(tries)).await;
                    tries += 1;
                }
                Err(e) => anyhow::bail!("re-taking the target lock {path}: {}", e.message),
            }
        };
        let renewal = self.spawn_renewal(&held, &plan);
        let t = self.run_recovery_with(key, dep, &held, &ssh).await;
        self.release(&ssh, &held).await;
        renewal.abort();
        t
    }

    /// Replay `key` and drive it under the held `lock` (renewed and, after,
    /// kept or released by the caller).
    async fn run_recovery(&self, key: &str, lock: &Arc<HeldLock>, ssh: &SshHost<'_>) -> anyhow::Result<Terminal> {
        let records: Vec<Record> = self.journal.records(key)?;
        let dep = Deployment::replay(&records)?;
        self.run_recovery_with(key, dep, lock, ssh).await
    }

    async fn run_recovery_with(
        &self,
        key: &str,
        dep: Deployment,
        lock: &Arc<HeldLock>,
        ssh: &SshHost<'_>,
    ) -> anyhow::Result<Terminal> {
        let plan = dep.plan().clone();
        let host = Locked { inner: Metered(SshHost::new(&self.pool, self.addr(&plan))), lock, lock_host: ssh };
        tokio::select! {
            r = self.drive_recovery(key, dep, &host) => r,
            _ = lock.invalid() => {
                self.lost_lock(key, lock).await?;
                Ok(Terminal::Abandoned(format!("target lock {} lost during recovery", lock.path())))
            }
        }
    }

    async fn drive_recovery<H: Host>(&self, key: &str, dep: Deployment, host: &H) -> anyhow::Result<Terminal> {
        let plan = dep.plan().clone();
        let span = tracing::info_span!("recovery", deployment_id = %plan.deployment_id, key, target = %plan.target, phase = dep.phase_name());
        let keyed = Keyed { journal: &self.journal, key };
        let env = self.env(host, &keyed);
        let t = driver::run(&env, dep, None).instrument(span).await?;
        match &t {
            Terminal::Finished(r) => {
                tracing::info!(key, outcome = %r.outcome, "recovered: {}", r.message)
            }
            Terminal::Abandoned(why) => tracing::info!(key, "recovered: {why}"),
        }
        Ok(t)
    }

    /// Open an SSH master to every configured target, in parallel, bounded
    /// by the connect timeout. Failures are only logged: the deployment
    /// itself reports them.
    pub async fn warm_masters(&self) {
        let limit = Duration::from_secs(self.cfg.ssh.connect_timeout_s.max(1) + 2);
        let mut set = tokio::task::JoinSet::new();
        for (name, t) in &self.cfg.targets {
            let pool = self.pool.clone();
            let addr = t.host_addr();
            let name = name.clone();
            set.spawn(async move {
                match tokio::time::timeout(limit, pool.warm(&addr)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(target = %name, "ssh master not opened at start: {e}"),
                    Err(_) => tracing::warn!(target = %name, "ssh master not opened at start: timed out"),
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// Resume every unfinished deployment (targets in parallel, each
    /// target in order). Returns how many were resumed.
    pub async fn recover_all(self: &Arc<Self>) -> anyhow::Result<usize> {
        let ids = self.journal.unfinished()?;
        let n = ids.len();
        if n > 0 {
            tracing::info!("recovering {n} unfinished deployment(s)");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let rt = self.clone();
            tasks.spawn(async move {
                let _g = rt.ids.lock(&id).await;
                let r = rt.resume(&id).await;
                (id, r)
            });
        }
        let mut failed = Vec::new();
        while let Some(j) = tasks.join_next().await {
            match j {
                Ok((_, Ok(_))) => {}
                Ok((id, Err(e))) => failed.push(format!("{id}: {e:#}")),
                Err(e) => failed.push(format!("recovery task: {e}")),
            }
        }
        if !failed.is_empty() {
            anyhow::bail!("recovery failed for {} deployment(s): {}", failed.len(), failed.join("; "));
        }
        Ok(n)
    }
}

/// Times every host operation into the step histogram.
pub struct Metered<H>(pub H);

pub async fn timed<T>(step: &'static str, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = f.await;
    metrics::histogram!(m::STEP_SECONDS, "step" => step).record(t.elapsed().as_secs_f64());
    r
}

impl<H: Host> Host for Metered<H> {
    async fn snapshot(&self, id: &str, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        timed("snapshot", self.0.snapshot(id, files)).await
    }
    async fn write(&self, id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        timed("write", self.0.write(id, files)).await
    }
    async fn exec(&self, command: &str, timeout_ms: u64) -> Result<ExecResult, StepError> {
        timed("exec", self.0.exec(command, timeout_ms)).await
    }
    async fn restore(&self, id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        timed("restore", self.0.restore(id, files)).await
    }
    async fn remove_backups(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        timed("cleanup", self.0.remove_backups(id, paths)).await
    }
    async fn prune(&self, id: &str, live_paths: &[String], keep: u32) -> Result<(), StepError> {
        timed("prune", self.0.prune(id, live_paths, keep)).await
    }
}
