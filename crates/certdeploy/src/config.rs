//! `certdeploy.toml`: worker, ssh and targets. Every error names the file,
//! the key and the problem. `CERTDEPLOY_*` environment variables override
//! `[worker]` keys (e.g. `CERTDEPLOY_AMQP_URL`, `CERTDEPLOY_CONCURRENCY`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certdeploy_core::{PlanError, Policy, TargetSpec, check_target_paths, parse_mode, same_host, target_paths};
use serde::Deserialize;

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
    /// The identities of `worker.key_identities`, once [`Config::load_keys`]
    /// read them (empty before).
    #[serde(skip)]
    pub keyring: std::sync::Arc<crate::sealed::Keyring>,
}

/// `[submit]`: settings of `certdeploy submit`.
#[derive(Clone, Debug, Default, Deserialize)]
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

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
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
    pub journal_durability: String,
    pub requests_queue: String,
    pub events_exchange: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    pub delivery_limit: u32,
    /// Verify: total time to wait for the new certificate to be served.
    pub verify_budget_ms: u64,
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
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
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
            journal_durability: "fsync".into(),
            requests_queue: "certdeploy.requests".into(),
            events_exchange: "certdeploy.events".into(),
            dead_exchange: "certdeploy.dead".into(),
            dead_queue: "certdeploy.dead".into(),
            delivery_limit: 20,
            verify_budget_ms: 10_000,
            lock_lease_s: 30,
            defer_delay_ms: 2_000,
            max_deferrals: 300,
            retry_queue: "certdeploy.retry".into(),
            key_identities: vec![],
            require_sealed_keys: false,
            results_queue: "certdeploy.results".into(),
            results_queue_max_length: 1_000_000,
            max_request_age_s: 0,
        }
    }
}

impl WorkerConfig {
    /// The broker URLs to try, in order: `amqp_urls`, or `amqp_url` alone.
    pub fn broker_urls(&self) -> Vec<String> {
        if self.amqp_urls.is_empty() { vec![self.amqp_url.clone()] } else { self.amqp_urls.clone() }
    }
}

#[derive(Clone, Debug, Deserialize)]
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
        }
    }
}

/// A `[targets.NAME]` table: the target fields plus per-target policy.
#[derive(Clone, Debug, Deserialize)]
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
    /// `strict` (default) or `accept-new` (trust an unknown host key once).
    #[serde(default = "default_host_key_policy")]
    pub host_key_policy: String,
    /// Backups kept per path after a deployment (default 1).
    #[serde(default = "default_keep")]
    pub keep_backups: u32,
    /// Globs (absolute) a symlinked path may resolve to outside its own
    /// directory; links are followed only when root or the SSH user owns
    /// every one of them (SPEC 8.1).
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
}

fn default_exec_timeout() -> u64 {
    60
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

    pub fn accept_new_host_key(&self) -> bool {
        self.host_key_policy == "accept-new"
    }

    /// The SSH account of this target.
    pub fn host_addr(&self) -> certdeploy_ssh::HostAddr {
        certdeploy_ssh::HostAddr {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            accept_new_host_key: self.accept_new_host_key(),
        }
    }

    /// This target's rules for links and owners on its host (SPEC 8.1).
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

    pub fn parse(text: &str, file: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let err = |key: &str, problem: String| ConfigError { file: file.to_string(), key: key.to_string(), problem };
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let key = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "-".into());
            err(&key, msg)
        })?;
        cfg.apply_env(env).map_err(|(k, p)| err(&k, p))?;
        cfg.read_secret_files().map_err(|(k, p)| err(&k, p))?;
        cfg.validate().map_err(|(k, p)| err(&k, p))?;
        Ok(cfg)
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
                "journal_durability" => w.journal_durability = v.clone(),
                "requests_queue" => w.requests_queue = v.clone(),
                "events_exchange" => w.events_exchange = v.clone(),
                "dead_exchange" => w.dead_exchange = v.clone(),
                "dead_queue" => w.dead_queue = v.clone(),
                "delivery_limit" => w.delivery_limit = v.parse().map_err(|_| bad("a number"))?,
                "verify_budget_ms" => w.verify_budget_ms = v.parse().map_err(|_| bad("a number"))?,
                "lock_lease_s" => w.lock_lease_s = v.parse().map_err(|_| bad("a number"))?,
                "defer_delay_ms" => w.defer_delay_ms = v.parse().map_err(|_| bad("a number"))?,
                "max_deferrals" => w.max_deferrals = v.parse().map_err(|_| bad("a number"))?,
                "retry_queue" => w.retry_queue = v.clone(),
                "key_identities" => w.key_identities = list().into_iter().map(PathBuf::from).collect(),
                "require_sealed_keys" => w.require_sealed_keys = boolean()?,
                "results_queue" => w.results_queue = v.clone(),
                "results_queue_max_length" => w.results_queue_max_length = v.parse().map_err(|_| bad("a number"))?,
                "max_request_age_s" => w.max_request_age_s = v.parse().map_err(|_| bad("a number"))?,
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
        if !["fsync", "flush", "off"].contains(&w.journal_durability.as_str()) {
            return e("worker.journal_durability", "must be `fsync`, `flush` or `off`");
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
        for (name, t) in &self.targets {
            validate_target(name, t)?;
        }
        self.check_shared_paths()
    }

    /// Two targets on one host and port never share a path: each would
    /// take the other's file (and prune its backups).
    fn check_shared_paths(&self) -> Result<(), (String, String)> {
        let all: Vec<(&String, &TargetConfig)> = self.targets.iter().collect();
        for (i, (a, ta)) in all.iter().enumerate() {
            for (b, tb) in &all[i + 1..] {
                if !(ta.port == tb.port && same_host(&ta.host, &tb.host)) {
                    continue;
                }
                let (sa, sb) = (ta.spec(), tb.spec());
                for (fb, pb) in target_paths(&sb) {
                    if let Some((fa, _)) = target_paths(&sa).into_iter().find(|(_, pa)| *pa == pb) {
                        return Err((
                            format!("targets.{b}.{fb}"),
                            format!(
                                "`{pb}` is also targets.{a}.{fa} on the same host ({}:{}): targets {a} and {b} \
                                 would overwrite each other's file (targets on one host and port must not share a path)",
                                tb.host, tb.port
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The configured target on `host`:`port` with a path `path` among its
    /// files, if any: `(target name, field)`.
    pub fn target_using_path(&self, host: &str, port: u16, path: &str) -> Option<(&str, &'static str)> {
        self.targets.iter().filter(|(_, t)| t.port == port && same_host(&t.host, host)).find_map(|(name, t)| {
            target_paths(&t.spec()).into_iter().find(|(_, p)| *p == path).map(|(f, _)| (name.as_str(), f))
        })
    }
}

fn validate_target(name: &str, t: &TargetConfig) -> Result<(), (String, String)> {
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
    check_target_paths(&t.spec()).map_err(|PlanError::Target { field, problem }| (key(field), problem))?;
    for (k, m) in [("cert_mode", &t.cert_mode), ("key_mode", &t.key_mode)] {
        if parse_mode(m).is_none() {
            return Err((key(k), format!("`{m}` is not an octal mode like 0644")));
        }
    }
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
    if !["strict", "accept-new"].contains(&t.host_key_policy.as_str()) {
        return Err((key("host_key_policy"), "must be `strict` or `accept-new`".into()));
    }
    if t.exec_timeout_s == 0 {
        return Err((key("exec_timeout_s"), "must be at least 1".into()));
    }
    Ok(())
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

pub fn check_endpoint(ep: &str) -> Result<(), String> {
    let Some((h, p)) = ep.rsplit_once(':') else { return Err("must be host:port".into()) };
    check_host(h.trim_start_matches('[').trim_end_matches(']'))?;
    p.parse::<u16>().map_err(|_| format!("port `{p}` is not a number"))?;
    Ok(())
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
}
