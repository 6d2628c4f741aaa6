//! The runtime shared by `deploy` and `worker`: the journal, the SSH pool,
//! the verifier and the clock, wired to the core driver. Deployments go
//! through the driver; this module holds no policy of its own.
//!
//! - `execute.rs`: one validated request run to a result.
//! - `group.rs`: a target group's fan-out, driven from its journal.
//! - `revert.rs`: putting back what a deployment replaced.
//! - `recovery.rs`: finishing what an earlier process left unfinished.
//! - `revert.rs`: reverting a deployed deployment (`certdeploy revert`).
//! - `ordering.rs`: the in-process order of deliveries and deployments per
//!   target.
//! - `locks.rs`: this process's side of the target locks on the hosts.
//! - `hosts.rs`: how a plan's host is reached (account, rules, masters).
//! - `metered.rs`: every host operation timed into the step histogram.
//! - `error.rs`: the runtime's one error type.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use certdeploy_core::CertFacts;
use certdeploy_core::Digest;
use certdeploy_core::coalesce::Reloads;
use certdeploy_core::driver::{Env, Host};
use certdeploy_journal::{JournalOptions, SledJournal};
use certdeploy_ssh::SshPool;

use crate::clock::SystemClock;
use crate::config::{Config, LiveConfig};
use crate::verify::TlsVerifier;

mod error;
mod execute;
mod group;
mod hosts;
mod locks;
mod metered;
mod ordering;
mod recovery;
mod revert;

pub use error::{Error, Failed};
pub use execute::Executed;
pub use group::{ActiveGroups, GroupSink};
pub use metered::{Metered, timed};
pub use ordering::{KeyGuard, KeyedLocks, TargetOrder, Turn, order_key, target_key};

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
    /// One deployment at a time per target (see [`target_key`]).
    targets: KeyedLocks,
    /// One run at a time per deployment id (a request and its recovery).
    ids: KeyedLocks,
    /// Target groups this process drives.
    groups: ActiveGroups,
    /// Deployments sharing one validate and one reload per host account
    /// (`reload_coalesce_ms`).
    reloads: Arc<Reloads>,
}

/// Public facts of a certificate file's bytes, for the driver.
pub fn cert_facts(pem: &[u8]) -> Option<CertFacts> {
    certdeploy_pki::cert_facts(pem).map(|f| CertFacts { not_before: f.not_before, leaf_sha256: Digest(f.leaf_sha256) })
}

impl Runtime {
    pub fn open(cfg: Config) -> Result<Runtime, Error> {
        let journal = SledJournal::open(
            &cfg.worker.journal_path,
            JournalOptions { durability: cfg.worker.journal_durability.into(), ..JournalOptions::default() },
        )?;
        // The pool makes a directory of its own, of a random name, in the
        // configured one (default: TMPDIR; Unix socket paths are short).
        let control_dir = cfg.ssh.control_dir.clone().unwrap_or_else(std::env::temp_dir);
        let idle = Duration::from_secs(cfg.ssh.idle_timeout_s.max(1));
        let pool = SshPool::new(cfg.ssh_config(control_dir, idle))?;
        let reloads = Reloads::new(cfg.worker.reload_coalesce_ms, |n| {
            metrics::counter!(crate::metrics::RELOADS_SAVED).increment(n)
        });
        Ok(Runtime {
            reloads,
            journal_id: journal.id().to_string(),
            live_tokens: Mutex::default(),
            worker_name: cfg.worker_name(),
            config: Arc::new(LiveConfig::new(cfg)),
            journal: Arc::new(journal),
            pool: Arc::new(pool),
            verifier: TlsVerifier::new(Duration::from_secs(5)),
            targets: KeyedLocks::default(),
            ids: KeyedLocks::default(),
            groups: ActiveGroups::default(),
        })
    }

    /// The configuration now. `[worker]` and `[ssh]` never change while the
    /// process runs (a reload that changes them is refused); targets do.
    pub fn cfg(&self) -> Arc<Config> {
        self.config.get()
    }

    /// What a deployment runs against, with `host` as its host.
    fn env<'a, H: Host>(&'a self, host: &'a H) -> Env<'a, H, TlsVerifier, SledJournal, SystemClock> {
        Env { host, verifier: &self.verifier, journal: &*self.journal, clock: &SystemClock, cert_facts }
    }
}
