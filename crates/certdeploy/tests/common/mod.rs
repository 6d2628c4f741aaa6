//! Shared harness of the end-to-end tests: a fleet of loopback hosts behind
//! one real sshd, a RabbitMQ vhost, a config file, and the real
//! `certdeploy` binary as a child process.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use certdeploy_amqp::{Broker, BrokerConfig};
use certdeploy_core::wire::ResultEvent;
#[allow(unused_imports)]
pub use certdeploy_testbed::certs::{Bundle, TestCa, request};
pub use certdeploy_testbed::rabbit::Vhost;
pub use certdeploy_testbed::{SshdFixture, TEST_USER};

pub const BIN: &str = env!("CARGO_BIN_EXE_certdeploy");

/// One target per host address: files under the host's directory.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub addr: String,
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: PathBuf,
    /// A file the reload command appends a line to (counts reloads).
    pub reload_log: PathBuf,
}

pub struct Fleet {
    pub sshd: SshdFixture,
    pub targets: Vec<Target>,
    pub tmp: tempfile::TempDir,
    pub vhost: Option<Vhost>,
}

/// Extra settings for the generated config.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// Reload command (default: append to the target's reload log).
    pub reload_command: Option<String>,
    pub validate_command: Option<String>,
    /// Extra `[worker]` lines.
    pub worker_extra: String,
    /// Extra lines in every `[targets.*]` table.
    pub target_extra: String,
}

impl Fleet {
    /// `hosts` loopback addresses 127.0.0.2.., each one target `t<i>`.
    pub fn new(hosts: usize, with_broker: bool) -> Fleet {
        let addrs: Vec<String> = (0..hosts).map(|i| format!("127.0.0.{}", i + 2)).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let sshd = SshdFixture::start(&refs);
        let tmp = tempfile::Builder::new().prefix("certdeploy-e2e-").tempdir().expect("tmp");
        let targets = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let dir = sshd.root_dir_for(a);
                Target {
                    name: format!("t{i}"),
                    addr: a.clone(),
                    cert: dir.join("site.pem"),
                    key: dir.join("site.key"),
                    chain: dir.join("chain.pem"),
                    reload_log: dir.join("reloads.log"),
                    dir,
                }
            })
            .collect();
        let vhost = with_broker.then(Vhost::new);
        Fleet { sshd, targets, tmp, vhost }
    }

    pub fn journal_path(&self) -> PathBuf {
        self.tmp.path().join("journal")
    }

    pub fn amqp_url(&self) -> String {
        self.vhost.as_ref().map(Vhost::url).unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    /// Write `certdeploy.toml` for this fleet and return its path.
    pub fn write_config(&self, opts: &Opts) -> PathBuf {
        let mut c = String::new();
        c.push_str(&format!(
            "[worker]\namqp_url = \"{}\"\njournal_path = \"{}\"\nconcurrency = 64\nper_host_concurrency = 4\n\
             metrics_listen = \"\"\nshutdown_grace_s = 20\n{}\n",
            self.amqp_url(),
            self.journal_path().display(),
            opts.worker_extra
        ));
        c.push_str(&format!(
            "[ssh]\nknown_hosts = \"{}\"\nidentity_file = \"{}\"\nconnect_timeout_s = 5\ncontrol_dir = \"{}\"\n\n",
            self.sshd.known_hosts_path().display(),
            self.sshd.identity_path().display(),
            self.tmp.path().join("ssh").display()
        ));
        for t in &self.targets {
            let reload =
                opts.reload_command.clone().unwrap_or_else(|| format!("echo reload >> {}", t.reload_log.display()));
            c.push_str(&format!(
                "[targets.{}]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n\
                 chain_path = \"{}\"\nreload_command = \"{}\"\n",
                t.name,
                t.addr,
                self.sshd.port(),
                TEST_USER,
                t.cert.display(),
                t.key.display(),
                t.chain.display(),
                reload.replace('\\', "\\\\").replace('"', "\\\"")
            ));
            if let Some(v) = &opts.validate_command {
                c.push_str(&format!("validate_command = \"{}\"\n", v.replace('"', "\\\"")));
            }
            c.push_str(&opts.target_extra);
            c.push('\n');
        }
        let path = self.tmp.path().join("certdeploy.toml");
        fs::write(&path, c).expect("write config");
        path
    }

    /// Reloads recorded by the default reload command.
    pub fn reloads(&self, t: &Target) -> usize {
        fs::read_to_string(&t.reload_log).map(|s| s.lines().count()).unwrap_or(0)
    }

    /// The files a target holds now (cert, key, chain).
    pub fn files(&self, t: &Target) -> (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>) {
        (fs::read(&t.cert).ok(), fs::read(&t.key).ok(), fs::read(&t.chain).ok())
    }

    /// Any temp or backup names left in a target's directory.
    pub fn leftovers(&self, t: &Target) -> Vec<String> {
        fs::read_dir(&t.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".certdeploy-tmp."))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn broker_config(&self, name: &str) -> BrokerConfig {
        let mut c = BrokerConfig::new(self.amqp_url(), name);
        c.rpc_timeout = Duration::from_secs(20);
        c
    }
}

/// The real binary as a child process, logs to a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(config: &Path, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(config).args(args);
        cmd.env("RUST_LOG", "info,certdeploy=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn certdeploy");
        Proc { child, log }
    }

    pub fn worker(fleet: &Fleet, config: &Path, env: &[(&str, &str)], name: &str) -> Proc {
        Proc::spawn(config, &["worker"], env, fleet.tmp.path().join(format!("{name}.log")))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// Wait for exit; `None` on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), tail(&self.log_text(), 200));
        }
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Run the binary to completion: (exit code, stdout, stderr).
pub fn run(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("--config").arg(config).args(args).output().expect("run certdeploy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A broker client for publishing requests and following results.
pub struct Client {
    pub broker: Broker,
    pub results: certdeploy_amqp::ResultStream,
}

impl Client {
    /// Connects, declares the topology, subscribes to results (before any
    /// publish, so none is missed).
    pub async fn connect(fleet: &Fleet) -> Client {
        let broker = certdeploy_amqp::connect(&fleet.broker_config("e2e-client")).await.expect("connect");
        let results = broker.subscribe_results().await.expect("subscribe");
        Client { broker, results }
    }

    pub async fn publish(&self, body: &[u8]) {
        self.broker.publish_request(body).await.expect("publish request");
    }

    /// Collect result events until `until` says stop or the timeout passes.
    pub async fn collect(
        &mut self,
        timeout: Duration,
        mut until: impl FnMut(&BTreeMap<String, Vec<ResultEvent>>) -> bool,
    ) -> BTreeMap<String, Vec<ResultEvent>> {
        let mut seen: BTreeMap<String, Vec<ResultEvent>> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while !until(&seen) {
            match tokio::time::timeout_at(deadline, self.results.next()).await {
                Ok(Some(Ok(ev))) => {
                    let r: ResultEvent = serde_json::from_slice(&ev.body).expect("result event parses");
                    assert_eq!(format!("result.{}", r.outcome.as_str()), ev.routing_key);
                    seen.entry(r.deployment_id.clone()).or_default().push(r);
                }
                Ok(Some(Err(e))) => panic!("result stream: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        seen
    }
}

/// Every id present (at least one result each).
pub fn all_ids(ids: &[String]) -> impl FnMut(&BTreeMap<String, Vec<ResultEvent>>) -> bool + '_ {
    move |seen| ids.iter().all(|id| seen.contains_key(id))
}

pub fn write_file(path: &Path, text: &str) {
    let mut f = fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
}
