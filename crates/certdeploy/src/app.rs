//! The runtime shared by `deploy` and `worker`: journal, SSH pool,
//! verifier, per-target ordering, recovery. Deployments go through the
//! core driver; this module only wires real adapters to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use certdeploy_core::attempt::{self, Notice, Worker};
use certdeploy_core::driver::{Env, Fence, Host, Snapped};
use certdeploy_core::lock::{Created, LockFile, LockRecord, Planted};
use certdeploy_core::{
    CertFacts, Deployment, Digest, ExecGuard, ExecResult, Plan, Report, RestoreRequest, RestoreStatus, SnapshotRequest,
    StepError, Terminal, WriteRequest,
};
use certdeploy_journal::{DeploymentStatus, JournalOptions, SledJournal};
use certdeploy_ssh::{HostAddr, SshHost, SshPool};
use tracing::Instrument;

use crate::config::{Config, LiveConfig, TargetConfig};
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
    /// The configuration, swapped whole by a reload: take a snapshot
    /// ([`Runtime::cfg`]) and keep it for one request.
    pub config: Arc<LiveConfig>,
    pub journal: Arc<SledJournal>,
    pub pool: Arc<SshPool>,
    pub verifier: TlsVerifier,
    pub worker_name: String,
    /// The journal's random id: names this worker's journal in host locks,
    /// stable across restarts, unique across workers.
    pub journal_id: String,
    /// Tokens of the target locks this process holds right now.
    live_tokens: Mutex<std::collections::HashSet<String>>,
    targets: KeyedLocks,
    ids: KeyedLocks,
}

/// What [`Runtime::execute`] ended with.
#[derive(Debug)]
pub enum Executed {
    /// The result to publish.
    Report(Report),
    /// The target is locked by another live deployment: try again later.
    Deferred { holder: String },
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

/// Entropy for lock tokens: unique per acquisition within this process
/// (the journal id in the token's hash makes it unique across workers).
fn token_entropy() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64)
        ^ SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rotate_left(48)
        ^ u64::from(std::process::id())
}

/// What deployments are serialized on: one host account's certificate
/// path. The worker orders deliveries by the same key.
pub fn target_key(host: &str, port: u16, cert_path: &str) -> String {
    format!("{host}:{port}:{cert_path}")
}

pub fn cert_facts(pem: &[u8]) -> Option<CertFacts> {
    certdeploy_pki::cert_facts(pem).map(|f| CertFacts { not_before: f.not_before, leaf_sha256: Digest(f.leaf_sha256) })
}

impl Runtime {
    pub fn open(cfg: Config) -> anyhow::Result<Runtime> {
        let journal = SledJournal::open(
            &cfg.worker.journal_path,
            JournalOptions { durability: cfg.worker.journal_durability.into(), ..JournalOptions::default() },
        )?;
        // The pool makes a directory of its own, of a random name, in the
        // configured one (default: TMPDIR; Unix socket paths are short).
        let control_dir = cfg.ssh.control_dir.clone().unwrap_or_else(std::env::temp_dir);
        let idle = Duration::from_secs(cfg.ssh.idle_timeout_s.max(1));
        let pool = SshPool::new(cfg.ssh_config(control_dir, idle)).context("ssh pool")?;
        Ok(Runtime {
            journal_id: journal.id().to_string(),
            live_tokens: Mutex::default(),
            worker_name: cfg.worker_name(),
            config: Arc::new(LiveConfig::new(cfg)),
            journal: Arc::new(journal),
            pool: Arc::new(pool),
            verifier: TlsVerifier::new(Duration::from_secs(5)),
            targets: KeyedLocks::default(),
            ids: KeyedLocks::default(),
        })
    }

    /// The configuration now. `[worker]` and `[ssh]` never change while the
    /// process runs (a reload that changes them is refused); targets do.
    pub fn cfg(&self) -> Arc<Config> {
        self.config.get()
    }

    /// Close every ssh master; the pool's own control directory goes too.
    pub async fn close_ssh(&self) {
        self.pool.close_all().await;
        self.pool.remove_control_dir();
    }

    /// The SSH account of a plan; `target` is the configured target the plan
    /// was built from (none for an inline target).
    fn addr(plan: &Plan, target: Option<&TargetConfig>) -> HostAddr {
        let accept_new = target.is_some_and(|t| t.accept_new_host_key() && t.host == plan.remote.host);
        // sudo, like the link and owner rules, only on the target's own host.
        let sudo = target.filter(|t| t.sudo && t.host == plan.remote.host).map(|t| t.sftp_server.clone());
        HostAddr {
            host: plan.remote.host.clone(),
            port: plan.remote.port,
            user: plan.remote.user.clone(),
            accept_new_host_key: accept_new,
            sudo,
        }
    }

    /// The target's rules for links and owners on its host;
    /// an inline target has none of its own.
    fn host_policy(plan: &Plan, target: Option<&TargetConfig>) -> certdeploy_ssh::TargetPolicy {
        match target.filter(|t| t.host == plan.remote.host) {
            Some(t) => t.host_policy(),
            None => certdeploy_ssh::TargetPolicy::default(),
        }
    }

    fn target_key(plan: &Plan) -> String {
        target_key(&plan.remote.host, plan.remote.port, plan.cert_path())
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
            // Everything the plan holds comes from the request as it was
            // checked (the configuration then), whatever a reload did since.
            let (plan, payload) = v.plan(attempt).map_err(|e| anyhow::anyhow!("{e}"))?;
            let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
            let span =
                tracing::info_span!("deployment", deployment_id = %plan.deployment_id, target = %plan.target, attempt);
            let token =
                certdeploy_core::lock::new_token(&self.journal_id, &plan.deployment_id, plan.attempt, token_entropy());
            let _live = LiveToken::new(&self.live_tokens, &token);
            let target = v.target_config.as_ref();
            let host = Metered(
                SshHost::new(&self.pool, Self::addr(&plan, target)).with_policy(Self::host_policy(&plan, target)),
            );
            let env = self.env(&host);
            let dead_own = |r: &LockRecord| self.dead_own(r);
            let w = self.worker(&dead_own);
            let started = Instant::now();
            metrics::gauge!(m::IN_FLIGHT).increment(1.0);
            let r = attempt::execute(&env, &w, plan, &payload, token).instrument(span).await;
            metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
            match r? {
                attempt::Executed::Report(report) => {
                    metrics::counter!(m::DEPLOYMENTS, "outcome" => report.outcome.as_str()).increment(1);
                    metrics::histogram!(m::DEPLOY_SECONDS).record(started.elapsed().as_secs_f64());
                    tracing::info!(deployment_id = %report.deployment_id, target = %report.target, outcome = %report.outcome, "{}", report.message);
                    return Ok(Executed::Report(report));
                }
                attempt::Executed::Deferred { holder } => return Ok(Executed::Deferred { holder }),
                attempt::Executed::Abandoned(why) => {
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
        let w = self.cfg().worker.clone();
        loop {
            match self.execute(v).await? {
                Executed::Report(r) => return Ok(r),
                Executed::Deferred { holder } if n >= w.max_deferrals => {
                    let msg = format!(
                        "target locked by {holder}; gave up after {n} tries; the host was not changed by this request"
                    );
                    return Ok(Report::lock_failed(&v.deployment_id, &v.target_name, "", msg, crate::verify::now()));
                }
                Executed::Deferred { .. } => {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(w.defer_delay_ms)).await;
                }
            }
        }
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

    fn worker<'a>(&'a self, dead_own: &'a (dyn Fn(&LockRecord) -> bool + Sync)) -> Worker<'a> {
        fn notice(n: Notice) {
            match n {
                Notice::TookOver(_) => metrics::counter!(m::TAKEOVERS).increment(1),
                Notice::LockLost(_) => metrics::counter!(m::LOCKS_LOST).increment(1),
            }
        }
        Worker {
            name: &self.worker_name,
            journal_id: &self.journal_id,
            lease_ms: self.cfg().worker.lock_lease_s * 1000,
            dead_own,
            notice: &notice,
            planted: Planted::None,
        }
    }

    fn env<'a, H: Host>(&'a self, host: &'a H) -> Env<'a, H, TlsVerifier, SledJournal, SystemClock> {
        Env { host, verifier: &self.verifier, journal: &*self.journal, clock: &SystemClock, cert_facts }
    }

    /// Finish an interrupted deployment (journal key `key`) per the
    /// recovery table, first making sure its target lock is still ours.
    pub async fn resume(&self, key: &str) -> anyhow::Result<Terminal> {
        let records = self.journal.records(key)?;
        let plan = Deployment::replay(&records)?.plan().clone();
        let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
        let _live = plan.lock.as_deref().map(|t| LiveToken::new(&self.live_tokens, t));
        let span = tracing::info_span!("recovery", deployment_id = %plan.deployment_id, key, target = %plan.target);
        // The journal holds the plan, not the target's SSH settings: those of
        // the target as configured now (on the plan's host only).
        let cfg = self.cfg();
        let target = cfg.targets.get(&plan.target);
        let host =
            Metered(SshHost::new(&self.pool, Self::addr(&plan, target)).with_policy(Self::host_policy(&plan, target)));
        let env = self.env(&host);
        let dead_own = |r: &LockRecord| self.dead_own(r);
        let w = self.worker(&dead_own);
        let t = attempt::resume(&env, &w, key, &records).instrument(span).await?;
        match &t {
            Terminal::Finished(r) => tracing::info!(key, outcome = %r.outcome, "recovered: {}", r.message),
            Terminal::Abandoned(why) => tracing::info!(key, "recovered: {why}"),
        }
        Ok(t)
    }

    /// Open an SSH master to every configured target, in parallel, bounded
    /// by the connect timeout. Failures are only logged: the deployment
    /// itself reports them.
    pub async fn warm_masters(&self) {
        let cfg = self.cfg();
        self.warm(cfg.targets.iter().map(|(n, t)| (n.clone(), t.host_addr())).collect()).await;
    }

    /// [`Self::warm_masters`] for the given targets (name, account): at
    /// most `max_masters` accounts (the first ones), since warming more
    /// would only close masters just opened.
    pub async fn warm(&self, targets: Vec<(String, HostAddr)>) {
        let limit = Duration::from_secs(self.cfg().ssh.connect_timeout_s.max(1) + 2);
        let mut accounts = std::collections::HashSet::new();
        let max = self.pool.config().max_masters;
        let targets: Vec<(String, HostAddr)> = targets
            .into_iter()
            .filter(|(_, a)| accounts.contains(a) || accounts.len() < max && accounts.insert(a.clone()))
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for (name, addr) in targets {
            let pool = self.pool.clone();
            set.spawn(async move {
                match tokio::time::timeout(limit, pool.warm(&addr)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(target = %name, "ssh master not opened: {e}"),
                    Err(_) => tracing::warn!(target = %name, "ssh master not opened: timed out"),
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
    async fn exec_guarded(&self, command: &str, timeout_ms: u64, guard: &ExecGuard) -> Result<ExecResult, StepError> {
        timed("exec", self.0.exec_guarded(command, timeout_ms, guard)).await
    }
    async fn lock_create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
        timed("lock", self.0.lock_create(path, bytes)).await
    }
    async fn lock_replace(
        &self,
        path: &str,
        bytes: &[u8],
        durable: bool,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        timed("lock", self.0.lock_replace(path, bytes, durable, fence)).await
    }
    async fn lock_read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
        timed("lock", self.0.lock_read(path)).await
    }
    async fn lock_remove(&self, path: &str) -> Result<(), StepError> {
        timed("lock", self.0.lock_remove(path)).await
    }
    async fn lock_sweep(&self, lock: &str, before: u64) -> Result<u32, StepError> {
        timed("lock", self.0.lock_sweep(lock, before)).await
    }
    async fn resolve_path(&self, path: &str) -> Result<String, StepError> {
        self.0.resolve_path(path).await
    }
}
