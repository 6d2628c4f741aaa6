//! `certdeploy.toml`: worker, ssh and targets, plus the include files
//! `[worker] include` names (more `[targets.NAME]` tables). Every error
//! names the file, the key (or the line) and the problem. `CERTDEPLOY_*`
//! environment variables override `[worker]` keys (e.g.
//! `CERTDEPLOY_AMQP_URL`, `CERTDEPLOY_CONCURRENCY`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use certdeploy_core::{PlanError, Policy, Secret, TargetSpec, check_paths, parse_mode, same_host};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub ssh: SshSection,
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    #[serde(default)]
    pub submit: SubmitSection,
    /// `[groups.NAME]`: named lists of targets a request may deploy to
    /// together, in waves.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupConfig>,
    /// The identities of `worker.key_identities`, once [`Config::load_keys`]
    /// read them (empty before).
    #[serde(skip)]
    pub keyring: std::sync::Arc<crate::sealed::Keyring>,
    /// The file each target is defined in (the main file or an include).
    #[serde(skip)]
    pub origins: BTreeMap<String, String>,
    /// The include files read, in the order they were read.
    #[serde(skip)]
    pub included: Vec<PathBuf>,
}

/// `[groups.NAME]`: a request naming `"group": "NAME"` deploys to every
/// target of the group, wave by wave.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Member targets (configured ones), in the order the waves take them.
    pub targets: Vec<String>,
    /// Cumulative size of each wave: a count of members (`1`) or a share
    /// (`"25%"`, rounded up); the last wave always reaches every member.
    /// Default: one wave.
    #[serde(default)]
    pub waves: Vec<WaveEntry>,
    /// Members whose outcome is not `deployed` or `unchanged` tolerated
    /// before no further wave starts.
    #[serde(default)]
    pub max_failed: usize,
    /// `"halt"` (default) or `"revert"` (also revert every deployed member).
    #[serde(default)]
    pub on_failure: certdeploy_core::group::OnFailure,
}

/// One entry of `waves`: an integer count or an `"N%"` share.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum WaveEntry {
    Count(i64),
    Share(String),
}

impl GroupConfig {
    /// The waves as the core counts them (checked at load).
    pub fn wave_sizes(&self) -> Vec<certdeploy_core::group::WaveSize> {
        use certdeploy_core::group::WaveSize;
        self.waves
            .iter()
            .filter_map(|w| match w {
                WaveEntry::Count(n) => usize::try_from(*n).ok().map(WaveSize::Count),
                WaveEntry::Share(s) => parse_share(s).map(WaveSize::Percent),
            })
            .collect()
    }
}

/// `"N%"` with N a whole number from 1 to 100.
fn parse_share(s: &str) -> Option<u32> {
    let n: u32 = s.strip_suffix('%')?.trim().parse().ok()?;
    (1..=100).contains(&n).then_some(n)
}

/// `[submit]`: settings of `certdeploy submit`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitSection {
    /// age recipients (`age1…`) the private key is sealed to before publishing.
    pub key_recipients: Vec<String>,
}

impl WorkerConfig {
    /// What the worker's own gc and `certdeploy journal gc` keep: records
    /// for `journal_retention_days`, each target's certificate in place for
    /// ever, and results 10× the retention but at least 30 days, so a late
    /// redelivery still re-publishes instead of redeploying.
    pub fn gc_policy(&self, retention_days: u64) -> certdeploy_journal::GcPolicy {
        let retention = std::time::Duration::from_secs(retention_days.saturating_mul(86_400));
        certdeploy_journal::GcPolicy {
            retention,
            dedupe_retention: retention.saturating_mul(10).max(std::time::Duration::from_secs(30 * 86_400)),
            keep_last_per_target: true,
        }
    }
}

/// `CERTDEPLOY_*` variables that are not `[worker]` overrides.
pub const NOT_WORKER_KEYS: &[&str] = &["CERTDEPLOY_CONFIG", "CERTDEPLOY_LOG_FORMAT"];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Files holding more `[targets.NAME]` tables: a glob or a list of
    /// globs (shell style; relative ones are resolved against the main
    /// file's directory). Read in sorted order; a pattern that matches
    /// nothing adds nothing, a path without wildcards must exist.
    #[serde(deserialize_with = "one_or_many")]
    pub include: Vec<String>,
    pub amqp_url: String,
    /// The nodes of one RabbitMQ cluster; when set, wins over `amqp_url`.
    pub amqp_urls: Vec<String>,
    /// A file whose content (trimmed) is `amqp_url`, e.g. a systemd
    /// credential: the broker password stays out of the config file and the
    /// environment. Wins over `amqp_url`.
    pub amqp_url_file: Option<PathBuf>,
    pub journal_path: PathBuf,
    pub concurrency: usize,
    pub per_host_concurrency: usize,
    pub metrics_listen: String,
    pub allow_inline_targets: bool,
    pub inline_host_allowlist: Vec<String>,
    pub inline_command_allowlist: Vec<String>,
    /// Globs every inline target path must match (case-sensitive); with
    /// none, inline targets are refused.
    pub inline_path_allowlist: Vec<String>,
    /// Name in result events; default `<hostname>-<pid>`.
    pub worker_name: Option<String>,
    /// Per-deployment deadline (default 10 min).
    pub deadline_s: u64,
    /// SIGTERM: how long in-flight deployments may take to finish.
    pub shutdown_grace_s: u64,
    /// Terminal journal records are garbage-collected after this many days
    /// (each target's last deployment that put a certificate in place is
    /// kept however old; results for redelivery stay 10× longer, at least
    /// 30 days).
    pub journal_retention_days: u64,
    /// The worker's admin socket (journal list/show and status while it
    /// runs; pause, resume, drain). Default: `<journal_path>.admin.sock`;
    /// `""` disables it.
    pub admin_socket: Option<String>,
    /// How often the worker collects its journal by itself (0: never; then
    /// only `certdeploy journal gc` does).
    pub journal_gc_interval_s: u64,
    /// After a gc, the worker compacts its journal (rewrites it into fresh
    /// files; sled never gives back the space gc frees) once its size on
    /// disk reaches this many MiB and twice its size after the last
    /// compaction; 0: never (then only `certdeploy journal compact`).
    pub journal_compact_min_mb: u64,
    /// `fsync` (default), `flush` (sled flush only) or `off` (benchmarks only).
    pub journal_durability: JournalDurability,
    pub requests_queue: String,
    pub events_exchange: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    pub delivery_limit: u32,
    /// Verify: total time to wait for the new certificate to be served.
    pub verify_budget_ms: u64,
    /// Verify passes only after this many handshakes in a row present the
    /// new leaf (a graceful reload keeps the old worker accepting for a
    /// moment); also decides `original_verified` after a rollback.
    pub verify_consecutive: u32,
    /// ... spread over at least this long (at most `verify_budget_ms`).
    pub verify_window_ms: u64,
    /// Target lock on the host: a holder that has not renewed
    /// it for this long is presumed dead and is taken over.
    pub lock_lease_s: u64,
    /// A request whose target is locked by a live lease waits this long in
    /// the retry queue before it comes back.
    pub defer_delay_ms: u64,
    /// After this many deferrals the request ends `failed`.
    pub max_deferrals: u32,
    /// The retry queue (per-message TTL, dead-letters back to the requests queue).
    pub retry_queue: String,
    /// age identity files that open sealed keys (`private_key_age`); the
    /// first one also seals the worker's own copies of a request.
    pub key_identities: Vec<PathBuf>,
    /// Refuse requests that carry the key in clear (`private_key_pem`).
    pub require_sealed_keys: bool,
    /// Durable queue keeping every result event (`""`: none).
    pub results_queue: String,
    /// Bound of `results_queue`; the oldest results are dropped first.
    pub results_queue_max_length: u64,
    /// Requests older than this (by `requested_at`) are rejected; 0 = off.
    pub max_request_age_s: u64,
    /// Deployments to one host account with the same validate and reload
    /// commands that reach their validate step within this many ms share
    /// one validate and one reload; 0: each reloads alone.
    pub reload_coalesce_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            include: vec![],
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_urls: vec![],
            amqp_url_file: None,
            journal_path: "/var/lib/certdeploy/journal".into(),
            concurrency: 64,
            per_host_concurrency: 4,
            metrics_listen: "127.0.0.1:9464".into(),
            allow_inline_targets: false,
            inline_host_allowlist: vec![],
            inline_command_allowlist: vec![],
            inline_path_allowlist: vec![],
            worker_name: None,
            deadline_s: 600,
            shutdown_grace_s: 30,
            journal_retention_days: 7,
            journal_gc_interval_s: 3600,
            journal_compact_min_mb: 256,
            admin_socket: None,
            journal_durability: JournalDurability::Fsync,
            requests_queue: "certdeploy.requests".into(),
            events_exchange: "certdeploy.events".into(),
            dead_exchange: "certdeploy.dead".into(),
            dead_queue: "certdeploy.dead".into(),
            delivery_limit: 20,
            verify_budget_ms: 10_000,
            verify_consecutive: 3,
            verify_window_ms: 1_000,
            lock_lease_s: 30,
            defer_delay_ms: 2_000,
            max_deferrals: 300,
            retry_queue: "certdeploy.retry".into(),
            key_identities: vec![],
            require_sealed_keys: false,
            results_queue: "certdeploy.results".into(),
            results_queue_max_length: 1_000_000,
            max_request_age_s: 0,
            reload_coalesce_ms: 200,
        }
    }
}

impl WorkerConfig {
    /// The broker URLs to try, in order: `amqp_urls`, or `amqp_url` alone.
    pub fn broker_urls(&self) -> Vec<String> {
        if self.amqp_urls.is_empty() { vec![self.amqp_url.clone()] } else { self.amqp_urls.clone() }
    }
}

/// How far the journal goes to make a write durable (`[worker]
/// journal_durability`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum JournalDurability {
    /// sled flush, then `fsync` of its files: survives power loss.
    #[default]
    Fsync,
    /// sled flush only: survives a process crash.
    Flush,
    /// No flush at all: for overhead benchmarks only.
    Off,
}

impl std::str::FromStr for JournalDurability {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fsync" => Ok(JournalDurability::Fsync),
            "flush" => Ok(JournalDurability::Flush),
            "off" => Ok(JournalDurability::Off),
            _ => Err("must be `fsync`, `flush` or `off`"),
        }
    }
}

impl TryFrom<String> for JournalDurability {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<JournalDurability> for &'static str {
    fn from(d: JournalDurability) -> &'static str {
        match d {
            JournalDurability::Fsync => "fsync",
            JournalDurability::Flush => "flush",
            JournalDurability::Off => "off",
        }
    }
}

impl From<JournalDurability> for certdeploy_journal::Durability {
    fn from(d: JournalDurability) -> Self {
        match d {
            JournalDurability::Fsync => certdeploy_journal::Durability::Fsync,
            JournalDurability::Flush => certdeploy_journal::Durability::Flush,
            JournalDurability::Off => certdeploy_journal::Durability::Off,
        }
    }
}

/// What the SSH client does with a host key it does not know
/// (`host_key_policy` of a target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Refuse it: the key must already be in `known_hosts`.
    #[default]
    Strict,
    /// Trust it once and record it (`accept-new`).
    AcceptNew,
}

impl std::str::FromStr for HostKeyPolicy {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(HostKeyPolicy::Strict),
            "accept-new" => Ok(HostKeyPolicy::AcceptNew),
            _ => Err("must be `strict` or `accept-new`"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshSection {
    pub known_hosts: PathBuf,
    pub identity_file: PathBuf,
    pub connect_timeout_s: u64,
    /// Where each process makes its own directory (random name, 0700) for
    /// ControlMaster sockets and certdeploy's ssh_config (default: TMPDIR).
    pub control_dir: Option<PathBuf>,
    /// Idle masters are closed after this many seconds.
    pub idle_timeout_s: u64,
    /// Open a master to every configured target before consuming (for
    /// fleets small enough to keep one ssh process per host; off by default).
    pub warm_masters: bool,
    /// Most ssh master processes open at once (default: from this
    /// process's limits and at most 96 for memory, see
    /// `certdeploy_ssh::default_max_masters`; a configured value may be
    /// larger).
    pub max_masters: Option<usize>,
    /// ssh's `KexAlgorithms` (default: OpenSSH's own).
    pub kex_algorithms: Option<String>,
}

impl Default for SshSection {
    fn default() -> Self {
        SshSection {
            known_hosts: "/etc/certdeploy/known_hosts".into(),
            identity_file: "/etc/certdeploy/id_ed25519".into(),
            connect_timeout_s: 10,
            control_dir: None,
            idle_timeout_s: 300,
            warm_masters: false,
            max_masters: None,
            kex_algorithms: None,
        }
    }
}

/// A `[targets.NAME]` table: the target fields plus per-target policy.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub host: String,
    #[serde(default = "certdeploy_core::model::default_port")]
    pub port: u16,
    pub user: String,
    pub cert_path: String,
    pub key_path: String,
    #[serde(default)]
    pub chain_path: Option<String>,
    #[serde(default = "certdeploy_core::model::default_cert_mode")]
    pub cert_mode: String,
    #[serde(default = "certdeploy_core::model::default_key_mode")]
    pub key_mode: String,
    #[serde(default)]
    pub validate_command: Option<String>,
    pub reload_command: String,
    #[serde(default)]
    pub verify_endpoint: Option<String>,
    #[serde(default)]
    pub verify_sni: Option<String>,
    /// Timeout of validate/reload commands (default 60 s).
    #[serde(default = "default_exec_timeout")]
    pub exec_timeout_s: u64,
    /// Allow deploying a certificate older than the one on the host.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// `strict` (default) or `accept-new` (trust an unknown host key once);
    /// set from the file's spelling when the target is validated.
    #[serde(skip)]
    pub host_key_policy: HostKeyPolicy,
    /// The `host_key_policy` key as written; [`validate_target`] parses it
    /// into [`TargetConfig::host_key_policy`] (so that a typo is reported
    /// under the key's name).
    #[serde(rename = "host_key_policy", default = "default_host_key_policy")]
    host_key_policy_spelled: String,
    /// Backups kept per path after a deployment (default 1).
    #[serde(default = "default_keep")]
    pub keep_backups: u32,
    /// Globs (absolute) a symlinked path may resolve to outside its own
    /// directory; links are followed only when root or the SSH user owns
    /// every one of them.
    #[serde(default)]
    pub link_targets: Vec<String>,
    /// Owner and group (names or numeric ids) of the certificate and chain;
    /// unset: an existing file's, when root or the SSH user owns it (any
    /// other owner fails the deployment), else the SSH user's.
    #[serde(default)]
    pub cert_owner: Option<String>,
    #[serde(default)]
    pub cert_group: Option<String>,
    /// Owner and group of the key (as `cert_owner`, `cert_group`).
    #[serde(default)]
    pub key_owner: Option<String>,
    #[serde(default)]
    pub key_group: Option<String>,
    /// Privilege without root login: the SFTP server runs as `sudo -n
    /// <sftp_server>` and the validate and reload commands as `sudo -n
    /// /bin/sh -c <command>`; the rules for links and owners then trust root
    /// and the user sudo runs as instead of `user`.
    #[serde(default)]
    pub sudo: bool,
    /// The SFTP server's path on the host, for `sudo = true`.
    #[serde(default = "default_sftp_server")]
    pub sftp_server: String,
    /// Host names this target serves: a request whose certificate does not
    /// cover every one of them (by its subject alternative names, as a TLS
    /// client matches them) is rejected before any host is contacted.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// One more file: certificate, chain and key concatenated (PEM, in
    /// that order), for HAProxy or Postfix. Owner and group as the key's.
    #[serde(default)]
    pub bundle_path: Option<String>,
    #[serde(default = "certdeploy_core::model::default_key_mode")]
    pub bundle_mode: String,
    /// One more file: a PKCS#12 keystore holding key, certificate and chain
    /// under `pkcs12_alias`, for Java services. Owner and group as the key's.
    #[serde(default)]
    pub pkcs12_path: Option<String>,
    #[serde(default = "certdeploy_core::model::default_key_mode")]
    pub pkcs12_mode: String,
    /// A file on the worker's machine holding the keystore's password (its
    /// content without the trailing newline); no group or other permission
    /// bits. Read when the configuration is loaded (and reloaded).
    #[serde(default)]
    pub pkcs12_password_file: Option<PathBuf>,
    #[serde(default = "default_pkcs12_alias")]
    pub pkcs12_alias: String,
    /// The password `pkcs12_password_file` held when it was read.
    #[serde(skip)]
    pub pkcs12_password: Option<Secret>,
}

fn default_pkcs12_alias() -> String {
    "certdeploy".into()
}

fn default_exec_timeout() -> u64 {
    60
}
fn default_sftp_server() -> String {
    "/usr/lib/openssh/sftp-server".into()
}
fn default_host_key_policy() -> String {
    "strict".into()
}
fn default_keep() -> u32 {
    1
}

impl TargetConfig {
    pub fn spec(&self) -> TargetSpec {
        TargetSpec {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            cert_path: self.cert_path.clone(),
            key_path: self.key_path.clone(),
            chain_path: self.chain_path.clone(),
            cert_mode: self.cert_mode.clone(),
            key_mode: self.key_mode.clone(),
            validate_command: self.validate_command.clone(),
            reload_command: self.reload_command.clone(),
            verify_endpoint: self.verify_endpoint.clone(),
            verify_sni: self.verify_sni.clone(),
        }
    }

    /// Every path this target writes, by field: certificate, key, chain,
    /// and the extra files.
    pub fn paths(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![("cert_path", self.cert_path.as_str()), ("key_path", self.key_path.as_str())];
        if let Some(c) = &self.chain_path {
            v.push(("chain_path", c.as_str()));
        }
        if let Some(b) = &self.bundle_path {
            v.push(("bundle_path", b.as_str()));
        }
        if let Some(p) = &self.pkcs12_path {
            v.push(("pkcs12_path", p.as_str()));
        }
        v
    }

    pub fn accept_new_host_key(&self) -> bool {
        self.host_key_policy == HostKeyPolicy::AcceptNew
    }

    /// The SSH account of this target.
    pub fn host_addr(&self) -> certdeploy_ssh::HostAddr {
        certdeploy_ssh::HostAddr {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            accept_new_host_key: self.accept_new_host_key(),
            sudo: self.sudo.then(|| self.sftp_server.clone()),
        }
    }

    /// This target's rules for links and owners on its host.
    pub fn host_policy(&self) -> certdeploy_ssh::TargetPolicy {
        certdeploy_ssh::TargetPolicy {
            link_targets: self.link_targets.clone(),
            cert_owner: self.cert_owner.clone(),
            cert_group: self.cert_group.clone(),
            key_owner: self.key_owner.clone(),
            key_group: self.key_group.clone(),
        }
    }
}

impl Config {
    /// The deployment policy for a target.
    pub fn policy(&self, t: Option<&TargetConfig>) -> Policy {
        Policy {
            exec_timeout_ms: t.map_or(60, |t| t.exec_timeout_s).saturating_mul(1000),
            deadline_ms: self.worker.deadline_s.saturating_mul(1000),
            rollback_budget_ms: self.worker.deadline_s.saturating_mul(1000),
            verify_budget_ms: self.worker.verify_budget_ms,
            verify_consecutive: self.worker.verify_consecutive,
            verify_window_ms: self.worker.verify_window_ms,
            keep_backups: t.map_or(1, |t| t.keep_backups.max(1)),
            allow_downgrade: t.is_some_and(|t| t.allow_downgrade),
            ..Policy::default()
        }
    }

    /// SSH pool settings from `[ssh]` and `[worker]`.
    pub fn ssh_config(&self, control_dir: PathBuf, idle_timeout: Duration) -> certdeploy_ssh::SshConfig {
        certdeploy_ssh::SshConfig {
            known_hosts: self.ssh.known_hosts.clone(),
            identity_file: self.ssh.identity_file.clone(),
            connect_timeout: Duration::from_secs(self.ssh.connect_timeout_s.max(1)),
            control_dir,
            idle_timeout,
            per_host_concurrency: self.worker.per_host_concurrency,
            max_masters: self.ssh.max_masters.unwrap_or_else(certdeploy_ssh::default_max_masters),
            kex_algorithms: self.ssh.kex_algorithms.clone(),
        }
    }

    pub fn worker_name(&self) -> String {
        self.worker.worker_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// Read `worker.key_identities` (checking their permissions) into
    /// [`Config::keyring`].
    pub fn load_keys(&mut self) -> Result<(), ConfigError> {
        let ring = crate::sealed::Keyring::load(&self.worker.key_identities).map_err(|e| ConfigError {
            file: "-".into(),
            key: "worker.key_identities".into(),
            problem: e.to_string(),
        })?;
        self.keyring = std::sync::Arc::new(ring);
        Ok(())
    }

    /// Load, apply `CERTDEPLOY_*` overrides, validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            problem: format!("cannot read: {e}"),
        })?;
        let vars: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("CERTDEPLOY_")).collect();
        Config::parse(&text, &file, &vars)
    }

    /// Parse the main file's text (`file` names it in errors, and its
    /// directory resolves relative include patterns), apply the `CERTDEPLOY_*`
    /// overrides, read the include files, validate the merged set.
    pub fn parse(text: &str, file: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let err = |key: &str, problem: String| ConfigError { file: file.to_string(), key: key.to_string(), problem };
        let mut cfg: Config = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        cfg.apply_env(env).map_err(|(k, p)| err(&k, p))?;
        cfg.read_secret_files().map_err(|(k, p)| err(&k, p))?;
        cfg.origins = cfg.targets.keys().map(|name| (name.clone(), file.to_string())).collect();
        cfg.read_includes(file)?;
        cfg.validate().map_err(|(k, p)| err(&k, p))?;
        cfg.validate_targets()?;
        cfg.validate_groups(file)?;
        Ok(cfg)
    }

    /// Merge the targets of every include file, in sorted order of their
    /// paths. A target name defined twice (in two files, or in the main
    /// file and an include) is an error naming both files.
    fn read_includes(&mut self, main: &str) -> Result<(), ConfigError> {
        let base = Path::new(main).parent().unwrap_or(Path::new(""));
        for path in include_files(&self.worker.include, base, main)? {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
                file: shown.clone(),
                key: "-".into(),
                problem: format!("cannot read: {e}"),
            })?;
            for (name, t) in parse_include(&text, &shown)? {
                if let Some(first) = self.origins.get(&name) {
                    let also = if *first == shown { "earlier in this file".to_string() } else { format!("in {first}") };
                    return Err(ConfigError {
                        file: shown,
                        key: format!("targets.{name}"),
                        problem: format!("target {name} is defined twice: also {also} (each target name once)"),
                    });
                }
                self.origins.insert(name.clone(), shown.clone());
                self.targets.insert(name, t);
            }
            self.included.push(path);
        }
        Ok(())
    }

    /// The file target `name` is defined in.
    fn origin(&self, name: &str) -> &str {
        self.origins.get(name).map_or("-", String::as_str)
    }

    /// Each target on its own, then the shared paths across targets; the
    /// error names the file the target is defined in.
    fn validate_targets(&mut self) -> Result<(), ConfigError> {
        for (name, t) in &mut self.targets {
            validate_target(name, t).map_err(|(key, problem)| ConfigError {
                file: self.origins.get(name).map_or("-", String::as_str).to_string(),
                key,
                problem,
            })?;
        }
        self.check_shared_paths()
    }

    /// Every group names configured targets, each once, and waves that
    /// are counts of at least 1 or shares from 1% to 100%.
    fn validate_groups(&self, file: &str) -> Result<(), ConfigError> {
        for (name, g) in &self.groups {
            let err = |key: &str, problem: String| ConfigError {
                file: file.to_string(),
                key: format!("groups.{name}{key}"),
                problem,
            };
            if !certdeploy_core::valid_deployment_id(name) {
                return Err(err("", "a group name is 1-128 characters of [A-Za-z0-9._:-]".into()));
            }
            if g.targets.is_empty() {
                return Err(err(".targets", "must name at least one target".into()));
            }
            let mut seen = std::collections::HashSet::new();
            for t in &g.targets {
                if !self.targets.contains_key(t) {
                    return Err(err(".targets", format!("`{t}` is not a configured target ([targets.{t}])")));
                }
                if !seen.insert(t) {
                    return Err(err(".targets", format!("`{t}` is named twice")));
                }
            }
            for w in &g.waves {
                match w {
                    WaveEntry::Count(n) if *n >= 1 => {}
                    WaveEntry::Count(n) => {
                        return Err(err(".waves", format!("{n}: a count of members must be at least 1")));
                    }
                    WaveEntry::Share(s) if parse_share(s).is_some() => {}
                    WaveEntry::Share(s) => {
                        return Err(err(
                            ".waves",
                            format!("`{s}`: a share is a whole number of percent from 1 to 100, like \"25%\""),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), (String, String)> {
        let w = &mut self.worker;
        for (k, v) in env {
            let Some(key) = k.strip_prefix("CERTDEPLOY_") else { continue };
            let key = key.to_ascii_lowercase();
            let bad = |what: &str| (k.clone(), format!("`{v}` is not {what}"));
            let list = || v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>();
            let boolean = || match v.as_str() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => Err(bad("a boolean")),
            };
            match key.as_str() {
                "include" => w.include = list(),
                "amqp_url" => w.amqp_url = v.clone(),
                "amqp_urls" => w.amqp_urls = list(),
                "amqp_url_file" => w.amqp_url_file = Some(v.into()),
                "journal_path" => w.journal_path = v.into(),
                "concurrency" => w.concurrency = v.parse().map_err(|_| bad("a number"))?,
                "per_host_concurrency" => w.per_host_concurrency = v.parse().map_err(|_| bad("a number"))?,
                "metrics_listen" => w.metrics_listen = v.clone(),
                "allow_inline_targets" => w.allow_inline_targets = boolean()?,
                "inline_host_allowlist" => w.inline_host_allowlist = list(),
                "inline_command_allowlist" => w.inline_command_allowlist = list(),
                "inline_path_allowlist" => w.inline_path_allowlist = list(),
                "worker_name" => w.worker_name = Some(v.clone()),
                "deadline_s" => w.deadline_s = v.parse().map_err(|_| bad("a number"))?,
                "shutdown_grace_s" => w.shutdown_grace_s = v.parse().map_err(|_| bad("a number"))?,
                "journal_retention_days" => w.journal_retention_days = v.parse().map_err(|_| bad("a number"))?,
                "journal_gc_interval_s" => w.journal_gc_interval_s = v.parse().map_err(|_| bad("a number"))?,
                "journal_compact_min_mb" => w.journal_compact_min_mb = v.parse().map_err(|_| bad("a number"))?,
                "admin_socket" => w.admin_socket = Some(v.clone()),
                "journal_durability" => {
                    w.journal_durability = v.parse().map_err(|p| (k.clone(), format!("`{v}`: {p}")))?
                }
                "requests_queue" => w.requests_queue = v.clone(),
                "events_exchange" => w.events_exchange = v.clone(),
                "dead_exchange" => w.dead_exchange = v.clone(),
                "dead_queue" => w.dead_queue = v.clone(),
                "delivery_limit" => w.delivery_limit = v.parse().map_err(|_| bad("a number"))?,
                "verify_budget_ms" => w.verify_budget_ms = v.parse().map_err(|_| bad("a number"))?,
                "verify_consecutive" => w.verify_consecutive = v.parse().map_err(|_| bad("a number"))?,
                "verify_window_ms" => w.verify_window_ms = v.parse().map_err(|_| bad("a number"))?,
                "lock_lease_s" => w.lock_lease_s = v.parse().map_err(|_| bad("a number"))?,
                "defer_delay_ms" => w.defer_delay_ms = v.parse().map_err(|_| bad("a number"))?,
                "max_deferrals" => w.max_deferrals = v.parse().map_err(|_| bad("a number"))?,
                "retry_queue" => w.retry_queue = v.clone(),
                "key_identities" => w.key_identities = list().into_iter().map(PathBuf::from).collect(),
                "require_sealed_keys" => w.require_sealed_keys = boolean()?,
                "results_queue" => w.results_queue = v.clone(),
                "results_queue_max_length" => w.results_queue_max_length = v.parse().map_err(|_| bad("a number"))?,
                "max_request_age_s" => w.max_request_age_s = v.parse().map_err(|_| bad("a number"))?,
                "reload_coalesce_ms" => w.reload_coalesce_ms = v.parse().map_err(|_| bad("a number"))?,
                // Read by the command line, not [worker] keys.
                _ if NOT_WORKER_KEYS.contains(&k.as_str()) => {}
                _ => {
                    return Err((
                        k.clone(),
                        "names no [worker] key: a typo would otherwise be ignored (CERTDEPLOY_* variables: \
                         the [worker] keys in capitals, and CERTDEPLOY_CONFIG, CERTDEPLOY_LOG_FORMAT)"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Secrets given as files (`*_file` keys) replace their inline key.
    fn read_secret_files(&mut self) -> Result<(), (String, String)> {
        if let Some(path) = &self.worker.amqp_url_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ("worker.amqp_url_file".to_string(), format!("cannot read {}: {e}", path.display())))?;
            self.worker.amqp_url = text.trim().to_string();
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let w = &self.worker;
        let e = |k: &str, p: &str| Err((k.to_string(), p.to_string()));
        let is_amqp = |u: &str| u.starts_with("amqp://") || u.starts_with("amqps://");
        if !is_amqp(&w.amqp_url) {
            return e("worker.amqp_url", "must start with amqp:// or amqps://");
        }
        if !w.amqp_urls.iter().all(|u| is_amqp(u)) {
            return e("worker.amqp_urls", "every URL must start with amqp:// or amqps://");
        }
        if w.require_sealed_keys && w.key_identities.is_empty() {
            return e("worker.require_sealed_keys", "needs key_identities to open the sealed keys with");
        }
        if w.key_identities.iter().any(|p| !p.is_absolute()) {
            return e("worker.key_identities", "paths must be absolute");
        }
        if !w.results_queue.is_empty() && [&w.requests_queue, &w.retry_queue, &w.dead_queue].contains(&&w.results_queue)
        {
            return e("worker.results_queue", "must differ from the requests, retry and dead-letter queues");
        }
        if w.results_queue_max_length == 0 {
            return e("worker.results_queue_max_length", "must be at least 1");
        }
        for r in &self.submit.key_recipients {
            if let Err(p) = crate::sealed::parse_recipient(r) {
                return Err(("submit.key_recipients".into(), p));
            }
        }
        if w.concurrency == 0 || w.concurrency > 65535 {
            return e("worker.concurrency", "must be between 1 and 65535");
        }
        if w.per_host_concurrency == 0 || w.per_host_concurrency > 10 {
            return e("worker.per_host_concurrency", "must be between 1 and 10 (sshd MaxSessions is 10)");
        }
        if w.verify_consecutive == 0 {
            return e("worker.verify_consecutive", "must be at least 1");
        }
        if w.verify_window_ms > w.verify_budget_ms {
            return e(
                "worker.verify_window_ms",
                "must not exceed verify_budget_ms: verify could never see enough handshakes within its budget",
            );
        }
        if self.ssh.max_masters == Some(0) {
            return e("ssh.max_masters", "must be at least 1");
        }
        if let Some(k) = &self.ssh.kex_algorithms {
            certdeploy_ssh::check_kex_syntax(k).map_err(|p| ("ssh.kex_algorithms".to_string(), p))?;
        }
        if w.deadline_s == 0 {
            return e("worker.deadline_s", "must be at least 1");
        }
        if w.delivery_limit == 0 {
            return e("worker.delivery_limit", "must be at least 1");
        }
        if w.lock_lease_s < 2 {
            return e("worker.lock_lease_s", "must be at least 2 (the host clock counts whole seconds)");
        }
        if w.defer_delay_ms == 0 {
            return e("worker.defer_delay_ms", "must be at least 1");
        }
        if w.retry_queue.is_empty() || w.retry_queue == w.requests_queue {
            return e("worker.retry_queue", "must be set and differ from requests_queue");
        }
        if w.metrics_listen.parse::<std::net::SocketAddr>().is_err() && !w.metrics_listen.is_empty() {
            return e("worker.metrics_listen", "must be host:port (an IP address), or empty to disable");
        }
        Ok(())
    }

    /// Two targets on one host and port never share a path: each would
    /// take the other's file (and prune its backups). One pass over the
    /// targets in name order (a later target's path is reported against the
    /// earlier one's), so thousands of targets cost thousands of lookups.
    fn check_shared_paths(&self) -> Result<(), ConfigError> {
        let mut seen: HashMap<(String, u16, &str), (&str, &'static str)> = HashMap::new();
        for (b, tb) in &self.targets {
            let host = tb.host.to_ascii_lowercase();
            for (fb, pb) in tb.paths() {
                if let Some((a, fa)) = seen.get(&(host.clone(), tb.port, pb)) {
                    let (file_a, file_b) = (self.origin(a), self.origin(b));
                    let where_a = if file_a == file_b { String::new() } else { format!(" (in {file_a})") };
                    return Err(ConfigError {
                        file: file_b.to_string(),
                        key: format!("targets.{b}.{fb}"),
                        problem: format!(
                            "`{pb}` is also targets.{a}.{fa}{where_a} on the same host ({}:{}): targets {a} and {b} \
                             would overwrite each other's file (targets on one host and port must not share a path)",
                            tb.host, tb.port
                        ),
                    });
                }
                seen.insert((host.clone(), tb.port, pb), (b.as_str(), fb));
            }
        }
        Ok(())
    }

    /// The configured target on `host`:`port` with a path `path` among its
    /// files, if any: `(target name, field)`.
    pub fn target_using_path(&self, host: &str, port: u16, path: &str) -> Option<(&str, &'static str)> {
        self.targets
            .iter()
            .filter(|(_, t)| t.port == port && same_host(&t.host, host))
            .find_map(|(name, t)| t.paths().into_iter().find(|(_, p)| *p == path).map(|(f, _)| (name.as_str(), f)))
    }
}

/// The configuration a running worker uses, replaced whole by a reload.
/// A reader takes a snapshot ([`LiveConfig::get`]: an `Arc` cloned under a
/// read lock held for nothing else, never across an `.await`) and keeps it
/// for everything it does with one request, so a request never sees half
/// of one configuration and half of another.
pub struct LiveConfig(RwLock<Arc<Config>>);

/// What a reload changed.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub targets: usize,
    pub files: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl LiveConfig {
    pub fn new(cfg: Config) -> LiveConfig {
        LiveConfig(RwLock::new(Arc::new(cfg)))
    }

    /// The configuration now.
    pub fn get(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swap in `new` (read from `file`), unless a key outside the targets
    /// changed: `[worker]` and `[ssh]` take effect only at a restart (the
    /// broker connection, the journal, the pool and the listeners are set
    /// up once), so such a reload is refused naming every changed key, and
    /// the running configuration stays whole. `[worker] include` may change
    /// (it only says where targets come from); `[submit]` is not the
    /// worker's. One caller at a time (the worker's reload task).
    pub fn reload(&self, mut new: Config, file: &str) -> Result<Reloaded, ConfigError> {
        let old = self.get();
        let changed = restart_keys(&old, &new);
        if !changed.is_empty() {
            return Err(ConfigError {
                file: file.to_string(),
                key: changed.join(", "),
                problem: "changed, and only targets are reloaded: [worker] and [ssh] keys take effect at a \
                          restart (revert them to reload the targets, or restart the worker)"
                    .into(),
            });
        }
        // The identities are the same files (key_identities unchanged).
        new.keyring = old.keyring.clone();
        let mut r = Reloaded { targets: new.targets.len(), files: 1 + new.included.len(), ..Reloaded::default() };
        for (name, t) in &new.targets {
            match old.targets.get(name) {
                None => r.added.push(name.clone()),
                Some(o) if o != t => r.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        r.removed = old.targets.keys().filter(|n| !new.targets.contains_key(*n)).cloned().collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(r)
    }
}

/// The `[worker]` (but `include`) and `[ssh]` keys whose values differ.
fn restart_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let sections = [
        ("worker", serde_json::to_value(&old.worker), serde_json::to_value(&new.worker)),
        ("ssh", serde_json::to_value(&old.ssh), serde_json::to_value(&new.ssh)),
    ];
    for (section, a, b) in sections {
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
            out.push(section.to_string());
            continue;
        };
        for (k, va) in &a {
            if k != "include" && b.get(k) != Some(va) {
                out.push(format!("{section}.{k}"));
            }
        }
    }
    out
}

fn validate_target(name: &str, t: &mut TargetConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("targets.{name}.{k}");
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c)) {
        return Err((format!("targets.{name}"), "target names are 1-128 characters of [A-Za-z0-9._:-]".into()));
    }
    // Inline requests run under this name (results and per-target
    // settings such as accept-new must never mistake one for the other).
    if name == "inline" {
        return Err((format!("targets.{name}"), "`inline` is reserved for inline targets (target_spec)".into()));
    }
    check_host(&t.host).map_err(|p| (key("host"), p))?;
    if t.user.is_empty() || t.user.starts_with('-') || t.user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err((key("user"), "must be a plain user name".into()));
    }
    check_paths(&t.paths()).map_err(|PlanError::Target { field, problem }| (key(field), problem))?;
    for (k, m) in [
        ("cert_mode", &t.cert_mode),
        ("key_mode", &t.key_mode),
        ("bundle_mode", &t.bundle_mode),
        ("pkcs12_mode", &t.pkcs12_mode),
    ] {
        if parse_mode(m).is_none() {
            return Err((key(k), format!("`{m}` is not an octal mode like 0644")));
        }
    }
    check_pkcs12(t).map_err(|(k, p)| (key(k), p))?;
    for (k, c) in [("reload_command", Some(&t.reload_command)), ("validate_command", t.validate_command.as_ref())] {
        if let Some(c) = c
            && (c.trim().is_empty() || c.chars().any(|ch| ch == '\0' || ch == '\n' || ch == '\r'))
        {
            return Err((key(k), "must be a non-empty single-line command".into()));
        }
    }
    if let Some(ep) = &t.verify_endpoint {
        check_endpoint(ep).map_err(|p| (key("verify_endpoint"), p))?;
    }
    t.host_key_policy = t.host_key_policy_spelled.parse().map_err(|p: &str| (key("host_key_policy"), p.to_string()))?;
    if t.exec_timeout_s == 0 {
        return Err((key("exec_timeout_s"), "must be at least 1".into()));
    }
    certdeploy_core::check_remote_path(&t.sftp_server)
        .and_then(|()| match t.sftp_server.chars().any(char::is_whitespace) {
            true => Err("contains whitespace".into()),
            false => Ok(()),
        })
        .map_err(|p| (key("sftp_server"), format!("`{}` {p}", t.sftp_server)))?;
    for n in &t.server_names {
        check_server_name(n).map_err(|p| (key("server_names"), p))?;
    }
    if t.sudo {
        // The sudoers rule names each command exactly (see README, sudo).
        for (k, c) in [("reload_command", Some(&t.reload_command)), ("validate_command", t.validate_command.as_ref())] {
            if let Some(c) = c {
                certdeploy_ssh::sudo_expressible(c).map_err(|p| (key(k), format!("with sudo = true, `{c}` {p}")))?;
            }
        }
    }
    Ok(())
}

/// The keystore's settings: a password file (read here, with the
/// permission rule of the age identities) exactly when there is a
/// keystore, and an alias keytool can name. The error is `(key, problem)`.
fn check_pkcs12(t: &mut TargetConfig) -> Result<(), (&'static str, String)> {
    t.pkcs12_password = None;
    let alias = &t.pkcs12_alias;
    if alias.is_empty() || alias.len() > 128 || alias.chars().any(|c| c.is_control()) {
        return Err(("pkcs12_alias", "must be 1-128 characters, none of them a control character".into()));
    }
    let file = match (&t.pkcs12_path, &t.pkcs12_password_file) {
        (None, None) => return Ok(()),
        (Some(_), None) => {
            return Err(("pkcs12_password_file", "missing: a PKCS#12 keystore (pkcs12_path) needs a password".into()));
        }
        (None, Some(_)) => return Err(("pkcs12_password_file", "set without pkcs12_path".into())),
        (Some(_), Some(file)) => file,
    };
    if !file.is_absolute() {
        return Err(("pkcs12_password_file", format!("{}: must be an absolute path", file.display())));
    }
    let secret = read_secret_file(file).map_err(|p| ("pkcs12_password_file", format!("{}: {p}", file.display())))?;
    t.pkcs12_password = Some(secret);
    Ok(())
}

/// The content of a file holding a password, without its trailing newline:
/// a regular file with no group or other permission bits (as the age
/// identities), UTF-8, not empty. Messages never hold its content.
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {mode:04o} gives group or others access; a password file must have no group or other permission \
             bits (chmod 0600 or 0400)"
        ));
    }
    let bytes = Secret::new(std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?);
    let text = std::str::from_utf8(bytes.expose()).map_err(|_| "is not UTF-8 text".to_string())?;
    let password = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
    if password.is_empty() {
        return Err("is empty (a keystore needs a password)".into());
    }
    Ok(Secret::new(password.as_bytes().to_vec()))
}

/// A host name or IP address: no spaces, no option-looking values.
pub fn check_host(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err("must be 1-253 characters".into());
    }
    if h.starts_with('-') {
        return Err("must not start with `-`".into());
    }
    if !h.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:[]".contains(c)) {
        return Err(format!("`{}` is not a host name or IP address", certdeploy_core::wire::printable(h)));
    }
    Ok(())
}

/// A DNS name a target serves, as a certificate would name it: labels of
/// letters, digits, `-` and `_`, optionally a wildcard as the whole first
/// label (`*.example.com`).
fn check_server_name(n: &str) -> Result<(), String> {
    let shown = certdeploy_core::wire::printable(n);
    let rest = n.strip_prefix("*.").unwrap_or(n);
    let labels: Vec<&str> = rest.trim_end_matches('.').split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if n.len() > 253 || !labels.iter().all(label_ok) || (n.starts_with("*.") && labels.len() < 2) {
        return Err(format!("`{shown}` is not a DNS name (a wildcard only as the whole first label, `*.example.com`)"));
    }
    Ok(())
}

pub fn check_endpoint(ep: &str) -> Result<(), String> {
    let Some((h, p)) = ep.rsplit_once(':') else { return Err("must be host:port".into()) };
    check_host(h.trim_start_matches('[').trim_end_matches(']'))?;
    p.parse::<u16>().map_err(|_| format!("port `{p}` is not a number"))?;
    Ok(())
}

/// A TOML error as a [`ConfigError`]: the line, when the parser gives a place.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let key = e
        .span()
        .map(|s| format!("line {}", text[..s.start.min(text.len())].matches('\n').count() + 1))
        .unwrap_or_else(|| "-".into());
    ConfigError { file: file.to_string(), key, problem: e.message().to_string() }
}

/// `[worker] include = "glob"` or `include = ["glob", ...]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct OneOrMany;
    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a glob (a string) or a list of globs")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut v = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                v.push(s);
            }
            Ok(v)
        }
    }
    d.deserialize_any(OneOrMany)
}

/// The files `[worker] include` names, sorted, each once. Patterns are
/// shell globs (`*` and `?` within one path component, `[...]`, `**` for
/// any depth; names starting with `.` only when the pattern spells the
/// dot, so editors' hidden files are skipped); relative ones are resolved
/// against `base`, the main file's directory. A glob that matches nothing
/// adds nothing (an empty `targets.d` is fine); a path without wildcards
/// must exist. Only regular files (or links to them) are read.
fn include_files(patterns: &[String], base: &Path, main: &str) -> Result<Vec<PathBuf>, ConfigError> {
    let err = |problem: String| ConfigError { file: main.to_string(), key: "worker.include".into(), problem };
    let mut files = Vec::new();
    for p in patterns {
        if p.trim().is_empty() {
            return Err(err("an empty pattern".into()));
        }
        if !p.contains(['*', '?', '[']) {
            let path = base.join(p);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => files.push(path),
                Ok(_) => return Err(err(format!("{} is not a regular file", path.display()))),
                Err(e) => return Err(err(format!("{}: {e}", path.display()))),
            }
            continue;
        }
        let full = if Path::new(p).is_absolute() || base.as_os_str().is_empty() {
            p.clone()
        } else {
            let dir = base.to_str().ok_or_else(|| err(format!("{} is not UTF-8", base.display())))?;
            format!("{}/{p}", glob::Pattern::escape(dir).trim_end_matches('/'))
        };
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let paths = glob::glob_with(&full, options).map_err(|e| err(format!("`{p}` is not a valid glob: {e}")))?;
        for entry in paths {
            let path = entry.map_err(|e| err(format!("{}: {}", e.path().display(), e.error())))?;
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => files.push(path),
                Ok(_) => return Err(err(format!("{} (matched by `{p}`) is not a regular file", path.display()))),
                Err(e) => return Err(err(format!("{}: {e}", path.display()))),
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The `[targets.NAME]` tables of an include file; anything else in it is
/// an error naming its line.
fn parse_include(text: &str, file: &str) -> Result<BTreeMap<String, TargetConfig>, ConfigError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct IncludeFile {
        #[serde(default)]
        targets: BTreeMap<String, TargetConfig>,
    }
    let doc = toml::de::DeTable::parse(text).map_err(|e| toml_error(file, text, &e))?;
    for (key, _) in doc.get_ref().iter() {
        if key.get_ref() != "targets" {
            let line = text[..key.span().start.min(text.len())].matches('\n').count() + 1;
            let what = key.get_ref();
            return Err(ConfigError {
                file: file.to_string(),
                key: format!("line {line}"),
                problem: format!(
                    "`{what}` is not allowed in an include file: it holds only [targets.NAME] tables \
                     ([worker], [ssh] and [submit] belong in the main configuration file)"
                ),
            });
        }
    }
    let inc: IncludeFile = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
    Ok(inc.targets)
}

/// Glob match of host names with `*` (any run, including dots) and `?`
/// (one char), ignoring ASCII case.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob(pattern, text, true)
}

/// Glob match of paths: like [`glob_match`] but case-sensitive (`*` also
/// crosses `/`: `/etc/ssl/*` allows everything below `/etc/ssl/`).
pub fn path_glob_match(pattern: &str, text: &str) -> bool {
    glob(pattern, text, false)
}

fn glob(pattern: &str, text: &str, fold_case: bool) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let same = |a: char, b: char| if fold_case { a.eq_ignore_ascii_case(&b) } else { a == b };
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || same(p[pi], t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[worker]
journal_path = "/tmp/j"
[targets.web1]
host = "web1.internal"
user = "deploy"
cert_path = "/etc/ssl/site.pem"
key_path = "/etc/ssl/site.key"
reload_command = "systemctl reload nginx"
"#;

    #[test]
    fn a_keystore_needs_a_private_password_file_read_at_load() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("p12.pass");
        std::fs::write(&pw, "s3cret-pw\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |extra: &str| MIN.replace("reload_command", &format!("{extra}reload_command"));
        let p12 = format!("pkcs12_path = \"/etc/java/site.p12\"\npkcs12_password_file = \"{}\"\n", pw.display());
        let c = Config::parse(&with(&p12), "c.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
        let t = &c.targets["web1"];
        assert_eq!(t.pkcs12_password.as_ref().map(|p| p.expose().to_vec()), Some(b"s3cret-pw".to_vec()));
        assert_eq!(
            (t.pkcs12_mode.as_str(), t.pkcs12_alias.as_str(), t.bundle_mode.as_str()),
            ("0600", "certdeploy", "0600")
        );
        assert!(!format!("{c:?}").contains("s3cret-pw"), "Debug of the configuration shows no password");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Config::parse(&with(&p12), "c.toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: targets.web1.pkcs12_password_file: ") && e.contains("mode 0640"), "{e}");
        assert!(!e.contains("s3cret-pw"), "{e}");
        let cases = [
            ("pkcs12_path = \"/etc/java/site.p12\"\n".to_string(), "targets.web1.pkcs12_password_file: missing"),
            (
                format!("pkcs12_password_file = \"{}\"\n", pw.display()),
                "targets.web1.pkcs12_password_file: set without",
            ),
            ("bundle_path = \"/etc/ssl/site.key\"\n".into(), "targets.web1.bundle_path: `/etc/ssl/site.key` is also"),
            ("bundle_path = \"/h/b.pem\"\nbundle_mode = \"600\"\n".into(), "targets.web1.bundle_mode: `600` is not"),
        ];
        for (extra, want) in cases {
            let e = Config::parse(&with(&extra), "c.toml", &[]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("c.toml: {want}")), "{e}");
        }
    }

    #[test]
    fn extra_files_share_no_path_with_another_target_on_the_host() {
        let text = format!(
            "{MIN}bundle_path = \"/etc/ssl/shared.pem\"\n[targets.web2]\nhost = \"web1.internal\"\nuser = \"d\"\n\
             cert_path = \"/etc/ssl/shared.pem\"\nkey_path = \"/etc/ssl/w2.key\"\nreload_command = \"true\"\n"
        );
        let e = Config::parse(&text, "c.toml", &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml: targets.web2.cert_path: `/etc/ssl/shared.pem` is also targets.web1.bundle_path"),
            "{e}"
        );
    }

    #[test]
    fn parses_minimal_with_defaults() {
        let c = Config::parse(MIN, "c.toml", &[]).unwrap();
        assert_eq!(c.worker.concurrency, 64);
        assert_eq!(c.worker.per_host_concurrency, 4);
        let t = &c.targets["web1"];
        assert_eq!((t.port, t.cert_mode.as_str(), t.key_mode.as_str()), (22, "0644", "0600"));
        assert!(!t.accept_new_host_key());
    }

    #[test]
    fn env_overrides_worker_keys() {
        let env = vec![
            ("CERTDEPLOY_AMQP_URL".to_string(), "amqps://u:p@broker:5671/v".to_string()),
            ("CERTDEPLOY_CONCURRENCY".to_string(), "8".to_string()),
            ("CERTDEPLOY_INLINE_HOST_ALLOWLIST".to_string(), "*.internal, web?.lab".to_string()),
        ];
        let c = Config::parse(MIN, "c.toml", &env).unwrap();
        assert_eq!(c.worker.amqp_url, "amqps://u:p@broker:5671/v");
        assert_eq!(c.worker.concurrency, 8);
        assert_eq!(c.worker.inline_host_allowlist, vec!["*.internal", "web?.lab"]);
        let bad = vec![("CERTDEPLOY_CONCURRENCY".to_string(), "many".to_string())];
        let e = Config::parse(MIN, "c.toml", &bad).unwrap_err().to_string();
        assert_eq!(e, "c.toml: CERTDEPLOY_CONCURRENCY: `many` is not a number");
    }

    #[test]
    fn a_verify_window_longer_than_the_verify_budget_is_rejected() {
        let c = Config::parse(MIN, "c.toml", &[]).unwrap();
        let p = c.policy(c.targets.get("web1"));
        assert_eq!((p.verify_consecutive, p.verify_window_ms, p.verify_budget_ms), (3, 1_000, 10_000));
        let text = MIN.replace("[worker]\n", "[worker]\nverify_budget_ms = 500\nverify_window_ms = 501\n");
        let e = Config::parse(&text, "c.toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: worker.verify_window_ms: must not exceed verify_budget_ms"), "{e}");
        let text = MIN.replace("[worker]\n", "[worker]\nverify_budget_ms = 500\nverify_window_ms = 500\n");
        assert!(Config::parse(&text, "c.toml", &[]).is_ok());
        let text = MIN.replace("[worker]\n", "[worker]\nverify_consecutive = 0\n");
        let e = Config::parse(&text, "c.toml", &[]).unwrap_err().to_string();
        assert_eq!(e, "c.toml: worker.verify_consecutive: must be at least 1");
    }

    #[test]
    fn a_mistyped_variable_is_an_error_naming_it_and_the_cli_ones_pass() {
        let typo = vec![("CERTDEPLOY_CONCURENCY".to_string(), "8".to_string())];
        let e = Config::parse(MIN, "c.toml", &typo).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: CERTDEPLOY_CONCURENCY: names no [worker] key"), "{e}");
        let cli = vec![
            ("CERTDEPLOY_CONFIG".to_string(), "/etc/x.toml".to_string()),
            ("CERTDEPLOY_LOG_FORMAT".to_string(), "json".to_string()),
        ];
        assert!(Config::parse(MIN, "c.toml", &cli).is_ok());
    }

    #[test]
    fn the_broker_url_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("amqp_url");
        std::fs::write(&f, "amqps://u:secret@broker:5671/v\n").unwrap();
        let env = vec![("CERTDEPLOY_AMQP_URL_FILE".to_string(), f.display().to_string())];
        let c = Config::parse(MIN, "c.toml", &env).unwrap();
        assert_eq!(c.worker.amqp_url, "amqps://u:secret@broker:5671/v");
        let missing = vec![("CERTDEPLOY_AMQP_URL_FILE".to_string(), "/nonexistent/amqp".to_string())];
        let e = Config::parse(MIN, "c.toml", &missing).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: worker.amqp_url_file: cannot read /nonexistent/amqp"), "{e}");
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases = [
            (
                MIN.replace("/etc/ssl/site.key", "etc/ssl/site.key"),
                "c.toml: targets.web1.key_path: `etc/ssl/site.key` must be an absolute path",
            ),
            (
                MIN.replace("[targets.web1]", "[targets.web1]\nkey_mode = \"600\""),
                "c.toml: targets.web1.key_mode: `600` is not an octal mode like 0644",
            ),
            (MIN.replace("concurrency", "x") + "\n", ""),
            (
                MIN.replace("journal_path", "concurrency = 0\njournal_path"),
                "c.toml: worker.concurrency: must be between 1 and 65535",
            ),
            (MIN.replace("web1.internal", "-oProxyCommand=x"), "c.toml: targets.web1.host: must not start with `-`"),
            (
                MIN.replace("[targets.web1]", "[targets.web1]\nhost_key_policy = \"yolo\""),
                "c.toml: targets.web1.host_key_policy: must be `strict` or `accept-new`",
            ),
            (
                MIN.replace("journal_path", "lock_lease_s = 1\njournal_path"),
                "c.toml: worker.lock_lease_s: must be at least 2 (the host clock counts whole seconds)",
            ),
            (
                MIN.replace("journal_path", "retry_queue = \"certdeploy.requests\"\njournal_path"),
                "c.toml: worker.retry_queue: must be set and differ from requests_queue",
            ),
            (
                MIN.replace(
                    "[targets.web1]",
                    "[targets.web1]\nserver_names = [\"www.example.com\", \"*.example.com\"]",
                ),
                "",
            ),
            (
                MIN.replace("[targets.web1]", "[targets.web1]\nserver_names = [\"www.*.example.com\"]"),
                "c.toml: targets.web1.server_names: `www.*.example.com` is not a DNS name (a wildcard only as the \
                 whole first label, `*.example.com`)",
            ),
        ];
        for (text, want) in cases {
            match Config::parse(&text, "c.toml", &[]) {
                Ok(_) if want.is_empty() => {}
                Ok(_) => panic!("accepted: {want}"),
                Err(e) => assert_eq!(e.to_string(), want),
            }
        }
        let e = Config::parse("[worker]\nbogus = 1\n", "c.toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: line 2: unknown field `bogus`"), "{e}");
    }

    #[test]
    fn max_masters_and_kex_algorithms_reach_the_pool_and_are_checked() {
        let c = Config::parse(MIN, "c.toml", &[]).unwrap();
        let s = c.ssh_config("/tmp".into(), Duration::from_secs(1));
        assert_eq!(s.max_masters, certdeploy_ssh::default_max_masters());
        assert!((1..=certdeploy_ssh::DEFAULT_MAX_MASTERS_CAP).contains(&s.max_masters));
        assert!(
            s.max_masters <= 96,
            "~1.4 MiB of PSS per master: the default keeps the worker and its masters under 300 MiB"
        );
        assert_eq!(s.kex_algorithms, None, "OpenSSH's own default unless configured");
        let set = format!("[ssh]\nmax_masters = 3\nkex_algorithms = \"curve25519-sha256\"\n{MIN}");
        let s = Config::parse(&set, "c.toml", &[]).unwrap().ssh_config("/tmp".into(), Duration::from_secs(1));
        assert_eq!((s.max_masters, s.kex_algorithms.as_deref()), (3, Some("curve25519-sha256")));
        let above = format!("[ssh]\nmax_masters = 300\n{MIN}");
        let s = Config::parse(&above, "c.toml", &[]).unwrap().ssh_config("/tmp".into(), Duration::from_secs(1));
        assert_eq!(s.max_masters, 300, "an operator may configure more than the default's cap");
        for (text, want) in [
            ("[ssh]\nmax_masters = 0\n", "c.toml: ssh.max_masters: must be at least 1"),
            ("[ssh]\nkex_algorithms = \"curve25519-sha256 x\"\n", "expected algorithm names separated by commas"),
            ("[ssh]\nkex_algorithms = \"\"\n", "expected algorithm names separated by commas"),
        ] {
            let e = Config::parse(&format!("{text}{MIN}"), "c.toml", &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let ok = format!("[ssh]\nkex_algorithms = \"^curve25519-sha256,sntrup761x25519-sha512@openssh.com\"\n{MIN}");
        assert!(Config::parse(&ok, "c.toml", &[]).is_ok());
    }

    #[test]
    fn sudo_keys_default_off_and_are_checked() {
        let c = Config::parse(MIN, "c.toml", &[]).unwrap();
        let t = &c.targets["web1"];
        assert!(!t.sudo);
        assert_eq!(t.sftp_server, "/usr/lib/openssh/sftp-server");
        assert_eq!(t.host_addr().sudo, None);
        let on = MIN.replace("[targets.web1]", "[targets.web1]\nsudo = true");
        let c = Config::parse(&on, "c.toml", &[]).unwrap();
        assert_eq!(c.targets["web1"].host_addr().sudo.as_deref(), Some("/usr/lib/openssh/sftp-server"));
        let other = on.replace("sudo = true", "sudo = true\nsftp_server = \"/usr/libexec/sftp-server\"");
        let c = Config::parse(&other, "c.toml", &[]).unwrap();
        assert_eq!(c.targets["web1"].host_addr().sudo.as_deref(), Some("/usr/libexec/sftp-server"));
        let cases = [
            (
                on.replace("sudo = true", "sudo = true\nsftp_server = \"sftp-server\""),
                "c.toml: targets.web1.sftp_server: `sftp-server` must be an absolute path",
            ),
            (
                on.replace("sudo = true", "sudo = true\nsftp_server = \"/usr/lib/../sftp-server\""),
                "c.toml: targets.web1.sftp_server: `/usr/lib/../sftp-server` is not normalized (contains `..`)",
            ),
            (
                on.replace("sudo = true", "sudo = true\nsftp_server = \"/usr/lib/sftp server\""),
                "c.toml: targets.web1.sftp_server: `/usr/lib/sftp server` contains whitespace",
            ),
            (
                on.replace("systemctl reload nginx", "systemctl reload nginx "),
                "c.toml: targets.web1.reload_command: with sudo = true, `systemctl reload nginx ` starts or ends \
                 with whitespace, which a sudoers rule cannot name exactly",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Config::parse(&text, "c.toml", &[]).unwrap_err().to_string(), want);
        }
        // Without sudo the command runs as given.
        assert!(
            Config::parse(&MIN.replace("systemctl reload nginx", "systemctl reload nginx "), "c.toml", &[]).is_ok()
        );
    }

    fn two_targets(host_b: &str, port_b: u16, cert_b: &str, chain_b: &str) -> String {
        format!(
            "{MIN}chain_path = \"/etc/ssl/chain.pem\"\n\
             [targets.web2]\nhost = \"{host_b}\"\nport = {port_b}\nuser = \"deploy\"\ncert_path = \"{cert_b}\"\n\
             key_path = \"/etc/ssl/other.key\"\nchain_path = \"{chain_b}\"\nreload_command = \"true\"\n"
        )
    }

    #[test]
    fn targets_on_one_host_and_port_never_share_a_path() {
        // A shared chain (they would prune each other's backups), named by both targets.
        let e =
            Config::parse(&two_targets("web1.internal", 22, "/etc/ssl/other.pem", "/etc/ssl/chain.pem"), "c.toml", &[])
                .unwrap_err()
                .to_string();
        assert!(
            e.starts_with("c.toml: targets.web2.chain_path: `/etc/ssl/chain.pem` is also targets.web1.chain_path"),
            "{e}"
        );
        assert!(e.contains("targets web1 and web2"), "{e}");
        // Across fields, and host names compared without case.
        let e = Config::parse(&two_targets("WEB1.internal", 22, "/etc/ssl/site.key", "/etc/ssl/c2.pem"), "c.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml: targets.web2.cert_path: `/etc/ssl/site.key` is also targets.web1.key_path"),
            "{e}"
        );
        // Another host, or another port of the same host: shared freely.
        for (host, port) in [("web2.internal", 22), ("web1.internal", 2222)] {
            let text = two_targets(host, port, "/etc/ssl/site.pem", "/etc/ssl/chain.pem");
            assert!(Config::parse(&text, "c.toml", &[]).is_ok(), "{host}:{port}");
        }
    }

    #[test]
    fn a_target_uses_each_path_once_and_none_of_certdeploys_own_names() {
        let cases = [
            (
                MIN.replace("/etc/ssl/site.key", "/etc/ssl/site.pem"),
                "c.toml: targets.web1.key_path: `/etc/ssl/site.pem` is also this target's cert_path",
            ),
            (
                MIN.replace("reload_command", "chain_path = \"/etc/ssl/site.key\"\nreload_command"),
                "c.toml: targets.web1.chain_path: `/etc/ssl/site.key` is also this target's key_path",
            ),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text, "c.toml", &[]).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        for (field, path) in [
            ("cert_path", "/etc/ssl/site.pem.certdeploy-lock"),
            ("key_path", "/etc/ssl/site.key.certdeploy-bak.d-1"),
            ("key_path", "/etc/ssl/site.key.certdeploy-tmp.d-1"),
            ("cert_path", "/etc/ssl/.certdeploy-stage.x/site.pem"),
            ("cert_path", "/etc/ssl/site.pem.certdeploy-lock.claim.00"),
        ] {
            let from = if field == "cert_path" { "/etc/ssl/site.pem" } else { "/etc/ssl/site.key" };
            let e = Config::parse(&MIN.replace(from, path), "c.toml", &[]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("c.toml: targets.web1.{field}: `{path}` uses certdeploy's own names")),
                "{e}"
            );
        }
    }

    /// A target table named `name` on `host` with its files under `dir`.
    fn target(name: &str, host: &str, dir: &str) -> String {
        format!(
            "[targets.{name}]\nhost = \"{host}\"\nuser = \"deploy\"\ncert_path = \"{dir}/site.pem\"\n\
             key_path = \"{dir}/site.key\"\nreload_command = \"true\"\n"
        )
    }

    /// A main file `certdeploy.toml` in a fresh directory with `extra`
    /// after `[worker]` (e.g. an include line) and the given include files
    /// (relative path, text).
    fn tree(extra: &str, files: &[(&str, String)]) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let main = dir.path().join("certdeploy.toml");
        std::fs::write(
            &main,
            format!("[worker]\njournal_path = \"/tmp/j\"\n{extra}\n{}", target("m", "m.internal", "/m")),
        )
        .unwrap();
        (dir, main.display().to_string())
    }

    fn load(main: &str) -> Result<Config, ConfigError> {
        Config::parse(&std::fs::read_to_string(main).unwrap(), main, &[])
    }

    #[test]
    fn includes_are_merged_in_sorted_order_with_the_main_files_targets() {
        let (dir, main) = tree(
            "include = \"targets.d/*.toml\"",
            &[
                ("targets.d/b.toml", target("b", "b.internal", "/b")),
                ("targets.d/a.toml", target("a1", "a.internal", "/a1") + &target("a2", "a.internal", "/a2")),
                ("targets.d/notes.txt", "not toml at all [".into()),
                ("targets.d/.hidden.toml", "[worker]\n".into()),
            ],
        );
        let c = load(&main).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.targets.keys().collect::<Vec<_>>(), ["a1", "a2", "b", "m"]);
        let d = dir.path().join("targets.d");
        assert_eq!(c.included, vec![d.join("a.toml"), d.join("b.toml")], "sorted, .toml only, hidden files skipped");
        assert_eq!(c.origins["a2"], d.join("a.toml").display().to_string());
        assert_eq!(c.origins["m"], main);
        assert_eq!(c.targets["b"].host, "b.internal");
        // A list of globs, one of them absolute; a file matched twice is read once.
        let abs = format!("{}/targets.d/b*.toml", dir.path().display());
        std::fs::write(&main, format!("[worker]\ninclude = [\"targets.d/a.toml\", \"{abs}\", \"targets.d/*.toml\"]\n"))
            .unwrap();
        let c = load(&main).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.targets.keys().collect::<Vec<_>>(), ["a1", "a2", "b"]);
        assert_eq!(c.included.len(), 2);
    }

    #[test]
    fn relative_includes_are_resolved_against_the_main_files_directory() {
        let (dir, main) = tree("include = \"conf/*.toml\"", &[("conf/x.toml", target("x", "x.internal", "/x"))]);
        // The tests run in the crate's directory, which has no conf/: only
        // the main file's directory can give x.
        assert!(!Path::new("conf").exists());
        let c = load(&main);
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.targets.keys().collect::<Vec<_>>(), ["m", "x"]);
        assert_eq!(c.included, vec![dir.path().join("conf/x.toml")]);
        // A path without wildcards is relative to the same directory, and must exist.
        std::fs::write(&main, "[worker]\ninclude = \"conf/x.toml\"\n").unwrap();
        assert!(load(&main).unwrap().targets.contains_key("x"));
        std::fs::write(&main, "[worker]\ninclude = \"conf/missing.toml\"\n").unwrap();
        let e = load(&main).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{main}: worker.include: {}/conf/missing.toml: ", dir.path().display())), "{e}");
    }

    #[test]
    fn a_glob_that_matches_nothing_adds_nothing() {
        for pattern in ["targets.d/*.toml", "no-such-dir/*.toml"] {
            let (dir, main) = tree(&format!("include = \"{pattern}\""), &[]);
            std::fs::create_dir(dir.path().join("targets.d")).unwrap();
            let c = load(&main).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(c.targets.keys().collect::<Vec<_>>(), ["m"], "{pattern}");
            assert!(c.included.is_empty());
        }
        // The same from the environment.
        let (_dir, main) = tree("", &[]);
        let env = vec![("CERTDEPLOY_INCLUDE".to_string(), "none/*.toml, other/*.toml".to_string())];
        let c = Config::parse(&std::fs::read_to_string(&main).unwrap(), &main, &env).unwrap();
        assert_eq!(c.worker.include, vec!["none/*.toml", "other/*.toml"]);
    }

    #[test]
    fn a_target_defined_twice_is_an_error_naming_both_files() {
        let (dir, main) = tree(
            "include = \"targets.d/*.toml\"",
            &[
                ("targets.d/a.toml", target("web", "a.internal", "/a")),
                ("targets.d/b.toml", target("web", "b.internal", "/b")),
            ],
        );
        let d = dir.path().join("targets.d");
        let e = load(&main).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: targets.web: target web is defined twice: also in {} (each target name once)",
                d.join("b.toml").display(),
                d.join("a.toml").display()
            )
        );
        // The main file and an include.
        std::fs::write(d.join("b.toml"), target("m", "b.internal", "/b")).unwrap();
        std::fs::remove_file(d.join("a.toml")).unwrap();
        let e = load(&main).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: targets.m: target m is defined twice: also in {main} (each target name once)",
                d.join("b.toml").display()
            )
        );
    }

    #[test]
    fn an_include_holds_only_targets() {
        for (text, what, line) in [
            (format!("{}\n[worker]\nconcurrency = 1\n", target("a", "a.internal", "/a")), "worker", 8),
            ("[ssh]\nconnect_timeout_s = 1\n".to_string(), "ssh", 1),
            ("x = 1\n".to_string(), "x", 1),
        ] {
            let (dir, main) = tree("include = \"t/*.toml\"", &[("t/a.toml", text)]);
            let file = dir.path().join("t/a.toml").display().to_string();
            let e = load(&main).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{file}: line {line}: `{what}` is not allowed in an include file")), "{e}");
        }
        // The parser's own errors name the include file and the line.
        let bad = target("a", "a.internal", "/a").replace("user = \"deploy\"", "user = deploy");
        let (dir, main) = tree("include = \"t/*.toml\"", &[("t/a.toml", bad)]);
        let e = load(&main).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: line 3: ", dir.path().join("t/a.toml").display())), "{e}");
        let unknown = target("a", "a.internal", "/a") + "colour = \"red\"\n";
        let (dir, main) = tree("include = \"t/*.toml\"", &[("t/a.toml", unknown)]);
        let e = load(&main).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: line 7: unknown field `colour`", dir.path().join("t/a.toml").display())),
            "{e}"
        );
    }

    #[test]
    fn the_merged_set_is_validated_naming_each_targets_own_file() {
        // One target's own problem: named in its file.
        let bad = target("a", "a.internal", "/a").replace("/a/site.key", "a/site.key");
        let (dir, main) = tree("include = \"t/*.toml\"", &[("t/a.toml", bad)]);
        let e = load(&main).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: targets.a.key_path: `a/site.key` must be an absolute path",
                dir.path().join("t/a.toml").display()
            )
        );
        // A path shared across files on one host: both targets and both files named.
        let (dir, main) = tree("include = \"t/*.toml\"", &[("t/z.toml", target("z", "M.internal", "/m"))]);
        let e = load(&main).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: targets.z.cert_path: `/m/site.pem` is also targets.m.cert_path (in {main}) on the same host \
                 (M.internal:22): targets m and z would overwrite each other's file (targets on one host and port \
                 must not share a path)",
                dir.path().join("t/z.toml").display()
            )
        );
    }

    #[test]
    fn a_reload_swaps_targets_and_refuses_worker_and_ssh_changes() {
        let (dir, main) = tree("include = \"t/*.toml\"", &[("t/a.toml", target("a", "a.internal", "/a"))]);
        let live = LiveConfig::new(load(&main).unwrap());
        let before = live.get();
        std::fs::write(dir.path().join("t/a.toml"), target("a", "a2.internal", "/a")).unwrap();
        std::fs::write(dir.path().join("t/b.toml"), target("b", "b.internal", "/b")).unwrap();
        let r = live.reload(load(&main).unwrap(), &main).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (r.added, r.changed, r.removed, r.targets, r.files),
            (vec!["b".into()], vec!["a".into()], vec![], 3, 3)
        );
        assert_eq!(live.get().targets["a"].host, "a2.internal");
        assert_eq!(before.targets["a"].host, "a.internal", "a snapshot taken before stays as it was");
        // A [worker] or [ssh] key changed: refused, naming the keys; nothing swapped.
        let text = std::fs::read_to_string(&main).unwrap();
        std::fs::write(&main, text.replace("[worker]\n", "[ssh]\nidle_timeout_s = 5\n[worker]\nconcurrency = 8\n"))
            .unwrap();
        std::fs::remove_file(dir.path().join("t/b.toml")).unwrap();
        let e = live.reload(load(&main).unwrap_or_else(|e| panic!("{e}")), &main).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{main}: worker.concurrency, ssh.idle_timeout_s: changed, and only targets")),
            "{e}"
        );
        assert!(live.get().targets.contains_key("b"), "the running configuration stays whole");
        // The include patterns themselves may change.
        std::fs::write(&main, text.replace("t/*.toml", "t/a.toml")).unwrap();
        let r = live.reload(load(&main).unwrap(), &main).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.removed, r.targets), (vec!["b".into()], 2));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.internal", "web1.internal"));
        assert!(glob_match("*.internal", "a.b.internal"));
        assert!(!glob_match("*.internal", "web1.internal.evil.com"));
        assert!(glob_match("web?.lab", "web7.lab"));
        assert!(!glob_match("web?.lab", "web10.lab"));
        assert!(glob_match("127.0.0.*", "127.0.0.9"));
        assert!(path_glob_match("/etc/ssl/*", "/etc/ssl/private/site.key"));
        assert!(!path_glob_match("/etc/ssl/*", "/ETC/ssl/site.key"), "paths are case-sensitive");
        assert!(!path_glob_match("/etc/ssl/*", "/root/.ssh/authorized_keys"));
    }

    /// `[groups.NAME]`: defaults, and each key's refusals named.
    #[test]
    fn groups_load_with_defaults_and_bad_ones_are_refused() {
        let with = |g: &str| format!("{MIN}\n[groups.web]\n{g}");
        let c = Config::parse(&with("targets = [\"web1\"]\n"), "c.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
        let g = &c.groups["web"];
        assert_eq!((g.waves.len(), g.max_failed, g.on_failure), (0, 0, certdeploy_core::group::OnFailure::Halt));
        let c = Config::parse(
            &with("targets = [\"web1\"]\nwaves = [1, \"25%\", \"100%\"]\nmax_failed = 2\non_failure = \"revert\"\n"),
            "c.toml",
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use certdeploy_core::group::{OnFailure, WaveSize};
        let g = &c.groups["web"];
        assert_eq!(g.wave_sizes(), vec![WaveSize::Count(1), WaveSize::Percent(25), WaveSize::Percent(100)]);
        assert_eq!((g.max_failed, g.on_failure), (2, OnFailure::Revert), "max_failed and on_failure are read");
        let cases = [
            ("targets = []\n", "groups.web.targets: must name"),
            ("targets = [\"web2\"]\n", "groups.web.targets: `web2` is not a configured target"),
            ("targets = [\"web1\", \"web1\"]\n", "groups.web.targets: `web1` is named twice"),
            ("targets = [\"web1\"]\nwaves = [0]\n", "groups.web.waves: 0:"),
            ("targets = [\"web1\"]\nwaves = [\"150%\"]\n", "groups.web.waves: `150%`"),
            ("targets = [\"web1\"]\nwaves = [\"half\"]\n", "groups.web.waves: `half`"),
            ("targets = [\"web1\"]\nwaves = [\"0%\"]\n", "groups.web.waves: `0%`"),
            ("targets = [\"web1\"]\nwaves = [1, -1]\n", "groups.web.waves: -1:"),
        ];
        for (g, want) in cases {
            let e = Config::parse(&with(g), "c.toml", &[]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("c.toml: {want}")), "{g}: {e}");
        }
        let e = Config::parse(&with("targets = [\"web1\"]\non_failure = \"panic\"\n"), "c.toml", &[]).unwrap_err();
        assert!(e.to_string().contains("expected `halt` or `revert`"), "{e}");
        // A misspelt key is refused, not ignored.
        let e = Config::parse(&with("targets = [\"web1\"]\nmax_fail = 1\n"), "c.toml", &[]).unwrap_err();
        assert!(e.to_string().contains("unknown field `max_fail`"), "{e}");
        // A group's name becomes part of ids: the characters of a deployment id only.
        let bad = format!("{MIN}\n[groups.\"web 1\"]\ntargets = [\"web1\"]\n");
        let e = Config::parse(&bad, "c.toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: groups.web 1: a group name is"), "{e}");
    }
}
