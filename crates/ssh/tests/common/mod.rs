//! Shared pieces of the sshd tests: a rig driving the core's driver with
//! an [`SshHost`] against the fixture's sshd, the core's in-memory
//! journal, and a real clock.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use certdeploy_core::driver::{self, Clock, Env, NoVerifier};
use certdeploy_core::testkit::{MemJournal, Sim, fake_cert_facts};
use certdeploy_core::*;
use certdeploy_ssh::{HostAddr, SshConfig, SshHost, SshPool};
use certdeploy_testbed::SshdFixture;

pub const ADDR: &str = "127.0.0.2";

/// Wall-clock time, real sleeps.
pub struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> Timestamp {
        Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
    }
    async fn sleep_until(&self, t: Timestamp) {
        let ms = t.since(self.now());
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

pub struct Rig {
    pub sshd: SshdFixture,
    pub pool: SshPool,
    pub sim: Sim,
    pub journal: MemJournal,
    _control: tempfile::TempDir,
}

pub fn config(sshd: &SshdFixture, control: &Path, known_hosts: &Path) -> SshConfig {
    SshConfig {
        known_hosts: known_hosts.to_path_buf(),
        identity_file: sshd.identity_path().to_path_buf(),
        connect_timeout: Duration::from_secs(5),
        control_dir: control.to_path_buf(),
        idle_timeout: Duration::from_secs(30),
        per_host_concurrency: 4,
        max_masters: 64,
        kex_algorithms: None,
    }
}

impl Rig {
    pub fn new() -> Rig {
        Rig::with(&[ADDR], None)
    }

    /// A rig whose pool trusts `known_hosts` (default: the fixture's).
    pub fn with(addrs: &[&str], known_hosts: Option<fn(&SshdFixture) -> PathBuf>) -> Rig {
        Rig::on(SshdFixture::start(addrs), known_hosts)
    }

    /// A rig whose sshd lets in `user` (an account of the test's own).
    pub fn as_user(user: &str) -> Rig {
        Rig::on(SshdFixture::start_as(&[ADDR], user), None)
    }

    fn on(sshd: SshdFixture, known_hosts: Option<fn(&SshdFixture) -> PathBuf>) -> Rig {
        let control = tempfile::Builder::new().prefix("cdc").tempdir_in("/tmp").expect("control dir");
        let kh = match known_hosts {
            Some(f) => f(&sshd),
            None => sshd.known_hosts_path().to_path_buf(),
        };
        let pool = SshPool::new(config(&sshd, control.path(), &kh)).expect("pool");
        let sim = Sim::new();
        Rig { journal: MemJournal(sim.clone()), sim, pool, sshd, _control: control }
    }

    pub fn addr(&self, ip: &str) -> HostAddr {
        HostAddr::new(ip, self.sshd.port(), self.sshd.user())
    }

    pub fn host(&self) -> SshHost<'_> {
        SshHost::new(&self.pool, self.addr(ADDR))
    }

    /// A directory on the "host", owned by the test user.
    pub fn dir(&self, rel: &str) -> PathBuf {
        let d = self.sshd.root_dir_for(ADDR).join(rel);
        self.sshd.mkdir(&d, 0o755);
        d
    }

    pub async fn deploy(&self, target: &TargetSpec, id: &str, cert: &[u8], key: &[u8]) -> Report {
        self.deploy_on(&self.host(), target, id, cert, key).await
    }

    pub async fn deploy_on(
        &self,
        host: &SshHost<'_>,
        target: &TargetSpec,
        id: &str,
        cert: &[u8],
        key: &[u8],
    ) -> Report {
        let (plan, payload) = plan(target, id, cert, key);
        let env =
            Env { host, verifier: &NoVerifier, journal: &self.journal, clock: &RealClock, cert_facts: fake_cert_facts };
        match driver::start(&env, plan, &payload).await.expect("driver") {
            Terminal::Finished(r) => r,
            Terminal::Abandoned(why) => panic!("abandoned: {why}"),
        }
    }

    /// The journal of one deployment, serialized (for secret scans).
    pub fn journal_text(&self, id: &str) -> String {
        self.sim.durable_records(id).iter().map(|r| serde_json::to_string(r).unwrap_or_default()).collect()
    }
}

pub fn target(dir: &Path, reload: &str) -> TargetSpec {
    TargetSpec {
        host: ADDR.into(),
        port: 22,
        user: "certdeploy-test".into(),
        cert_path: dir.join("site.pem").display().to_string(),
        key_path: dir.join("site.key").display().to_string(),
        chain_path: None,
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: None,
        reload_command: reload.into(),
        verify_endpoint: None,
        verify_sni: None,
    }
}

pub fn plan(target: &TargetSpec, id: &str, cert: &[u8], key: &[u8]) -> (Plan, Payload) {
    let material = Material {
        certificate_pem: String::from_utf8_lossy(cert).into_owned(),
        private_key_pem: Secret::new(key.to_vec()),
        chain_pem: None,
    };
    let facts = fake_cert_facts(cert)
        .map(|f| MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) })
        .unwrap_or_default();
    let policy = Policy {
        exec_timeout_ms: 10_000,
        deadline_ms: 30_000,
        rollback_budget_ms: 30_000,
        retry_initial_ms: 100,
        retry_max_ms: 1_000,
        ..Policy::default()
    };
    build_plan(id, "web1", target, &material, &facts, policy, 1).expect("plan")
}

pub fn cert(name: &str, nb: u32) -> Vec<u8> {
    format!("CERT {name} nb={nb}\n-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n").into_bytes()
}

pub fn key(name: &str) -> Vec<u8> {
    format!("-----BEGIN PRIVATE KEY-----\nSECRET-KEY-{name}\n-----END PRIVATE KEY-----\n").into_bytes()
}

pub fn meta(r: &Report, k: &str) -> String {
    r.metadata().get(k).cloned().unwrap_or_else(|| "<absent>".into())
}

/// Names in `dir` that are backups or temps of certdeploy.
pub fn leftovers(sshd: &SshdFixture, dir: &Path) -> Vec<String> {
    sshd.list(dir).into_iter().filter(|n| n.contains(".certdeploy-")).collect()
}

pub fn dump(r: &Report) -> String {
    format!("{} — {} — {:?}", r.outcome, r.message, r.metadata())
}
