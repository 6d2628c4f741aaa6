//! The runtime shared by `deploy` and `worker`: journal, SSH pool,
//! verifier, per-target ordering, recovery. Deployments go through the
//! core driver; this module only wires real adapters to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use certdeploy_core::driver::{self, Env, Host, Snapped};
use certdeploy_core::{
    CertFacts, Digest, ExecResult, Plan, Record, Report, RestoreRequest, RestoreStatus, SnapshotRequest, StepError,
    Terminal, WriteRequest,
};
use certdeploy_journal::{DeploymentStatus, Durability, JournalOptions, SledJournal};
use certdeploy_ssh::{HostAddr, SshHost, SshPool};
use tracing::Instrument;

use crate::config::Config;
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
    targets: KeyedLocks,
    ids: KeyedLocks,
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
        let control_dir = cfg.ssh.control_dir.clone().unwrap_or_else(|| {
            // Unix socket paths are short: keep the default under /tmp.
            std::env::temp_dir().join(format!("certdeploy-ssh-{}", std::process::id()))
        });
        let idle = Duration::from_secs(cfg.ssh.idle_timeout_s.max(1));
        let pool = SshPool::new(cfg.ssh_config(control_dir, idle)).context("ssh pool")?;
        Ok(Runtime {
            worker_name: cfg.worker_name(),
            cfg,
            journal: Arc::new(journal),
            pool: Arc::new(pool),
            verifier: TlsVerifier::new(Duration::from_secs(5)),
            targets: KeyedLocks::default(),
            ids: KeyedLocks::default(),
        })
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

    /// Run one validated request to a result: re-publishable report for a
    /// terminal id, else a new attempt (after resuming an unfinished one).
    pub async fn execute(&self, v: &Validated) -> anyhow::Result<Report> {
        let _id_guard = self.ids.lock(&v.deployment_id).await;
        loop {
            let attempt = match self.journal.status(&v.deployment_id)? {
                Some(DeploymentStatus::Finished { report, .. }) => return Ok(report),
                Some(DeploymentStatus::InFlight { .. }) => {
                    // Left by a crash (or a failed journal write): finish it
                    // per the recovery table, then look again.
                    self.resume(&v.deployment_id).await?;
                    continue;
                }
                Some(DeploymentStatus::Abandoned { attempts, .. }) => attempts + 1,
                None => 1,
            };
            let (plan, payload) = v.plan(&self.cfg, attempt).map_err(|e| anyhow::anyhow!("{e}"))?;
            let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
            let span =
                tracing::info_span!("deployment", deployment_id = %plan.deployment_id, target = %plan.target, attempt);
            let host = Metered(SshHost::new(&self.pool, self.addr(&plan)));
            let env = self.env(&host);
            let started = Instant::now();
            metrics::gauge!(m::IN_FLIGHT).increment(1.0);
            let r = driver::start(&env, plan, &payload).instrument(span).await;
            metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
            match r? {
                Terminal::Finished(report) => {
                    metrics::counter!(m::DEPLOYMENTS, "outcome" => report.outcome.as_str()).increment(1);
                    metrics::histogram!(m::DEPLOY_SECONDS).record(started.elapsed().as_secs_f64());
                    tracing::info!(deployment_id = %report.deployment_id, target = %report.target, outcome = %report.outcome, "{}", report.message);
                    return Ok(report);
                }
                Terminal::Abandoned(why) => {
                    tracing::warn!(deployment_id = %v.deployment_id, "attempt abandoned: {why}");
                    continue;
                }
            }
        }
    }

    fn env<'a, H: Host>(&'a self, host: &'a H) -> Env<'a, H, TlsVerifier, SledJournal, SystemClock> {
        Env { host, verifier: &self.verifier, journal: &self.journal, clock: &SystemClock, cert_facts }
    }

    /// Finish an interrupted deployment per the recovery table.
    pub async fn resume(&self, id: &str) -> anyhow::Result<Terminal> {
        let records: Vec<Record> = self.journal.records(id)?;
        let dep = certdeploy_core::Deployment::replay(&records)?;
        let plan = dep.plan().clone();
        let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
        let span =
            tracing::info_span!("recovery", deployment_id = %id, target = %plan.target, phase = dep.phase_name());
        let host = Metered(SshHost::new(&self.pool, self.addr(&plan)));
        let env = self.env(&host);
        let t = driver::run(&env, dep, None).instrument(span).await?;
        match &t {
            Terminal::Finished(r) => {
                tracing::info!(deployment_id = %id, outcome = %r.outcome, "recovered: {}", r.message)
            }
            Terminal::Abandoned(why) => tracing::info!(deployment_id = %id, "recovered: {why}"),
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
