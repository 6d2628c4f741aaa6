//! Shared harness of the end-to-end tests: a fleet of loopback hosts behind
//! one real sshd, a RabbitMQ vhost, a config file, and the real
//! `certdeploy` binary as a child process.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
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

/// The `certdeploy` binary of this build: `target/<profile>/certdeploy`,
/// beside the `deps` directory that holds the test executables. A cargo
/// build of the workspace's tests builds it too (the certdeploy package has
/// tests of its own), with the same features.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
        let bin = dir.join("certdeploy");
        assert!(
            bin.is_file(),
            "{} is missing: build it first (cargo build -p certdeploy --features failpoints), or run the \
             workspace's tests (cargo nextest run --workspace --features certdeploy-e2e/failpoints)",
            bin.display()
        );
        bin.to_str().expect("a UTF-8 path").to_string()
    })
}

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
    /// Per-target reload command, by target name (wins over `reload_command`).
    pub reload_overrides: Vec<(String, String)>,
}

impl Fleet {
    /// `hosts` loopback addresses 127.0.0.2.., each one target `t<i>`.
    pub fn new(hosts: usize, with_broker: bool) -> Fleet {
        Fleet::new_as(hosts, with_broker, TEST_USER)
    }

    /// [`Fleet::new`] whose sshd serves `user` (an account of the test's
    /// own, created if missing) instead of [`TEST_USER`].
    pub fn new_as(hosts: usize, with_broker: bool, user: &str) -> Fleet {
        let addrs: Vec<String> = (0..hosts).map(|i| format!("127.0.0.{}", i + 2)).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let sshd = SshdFixture::start_as(&refs, user);
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
            let reload = opts
                .reload_overrides
                .iter()
                .find(|(name, _)| *name == t.name)
                .map(|(_, cmd)| cmd.clone())
                .or_else(|| opts.reload_command.clone())
                .unwrap_or_else(|| format!("echo reload >> {}", t.reload_log.display()));
            c.push_str(&self.target_section(t, &reload, opts.validate_command.as_deref()));
            c.push_str(&opts.target_extra);
            c.push('\n');
        }
        let path = self.tmp.path().join("certdeploy.toml");
        fs::write(&path, c).expect("write config");
        path
    }

    /// The `[targets.<name>]` section for `t` (host, port, user, paths),
    /// with its reload and, if given, validate command.
    pub fn target_section(&self, t: &Target, reload: &str, validate: Option<&str>) -> String {
        let quote = |cmd: &str| cmd.replace('\\', "\\\\").replace('"', "\\\"");
        let mut c = format!(
            "[targets.{}]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n\
             chain_path = \"{}\"\nreload_command = \"{}\"\n",
            t.name,
            t.addr,
            self.sshd.port(),
            self.sshd.user(),
            t.cert.display(),
            t.key.display(),
            t.chain.display(),
            quote(reload)
        );
        if let Some(v) = validate {
            c.push_str(&format!("validate_command = \"{}\"\n", quote(v)));
        }
        c
    }

    /// Reloads recorded by the default reload command.
    pub fn reloads(&self, t: &Target) -> usize {
        fs::read_to_string(&t.reload_log).map(|s| s.lines().count()).unwrap_or(0)
    }

    /// The files a target holds now (cert, key, chain).
    pub fn files(&self, t: &Target) -> Files {
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

/// What a target holds: (cert, key, chain), `None` where missing.
pub type Files = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

/// The real binary as a child process, logs to a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(config: &Path, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin());
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
    run_env(config, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(config: &Path, args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run certdeploy");
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

/// A result event to mark a point in the result stream: a copy of one
/// already seen under an id of its own.
fn settle_marker(seen: &BTreeMap<String, Vec<ResultEvent>>) -> ResultEvent {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut marker =
        seen.values().flatten().next().cloned().expect("settle after at least one result (the marker copies one)");
    marker.deployment_id = format!("settle-marker-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    marker
}

impl Client {
    /// [`ResultTap::settle`] for a `Client`: every result already published
    /// is in `seen` when it returns (the marker is removed).
    pub async fn settle(&mut self, seen: &mut BTreeMap<String, Vec<ResultEvent>>) {
        let marker = settle_marker(seen);
        self.broker.publish_result(marker.outcome.as_str(), &marker.to_json()).await.expect("publish settle marker");
        let id = marker.deployment_id.clone();
        let more = self.collect(Duration::from_secs(60), |s| s.contains_key(&id)).await;
        assert!(more.contains_key(&id), "the settle marker never arrived");
        for (k, v) in more {
            if k != id {
                seen.entry(k).or_default().extend(v);
            }
        }
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

// ---------------------------------------------------------------------------
// Batches, host checks, queues: the helpers of the "must be true" tests
// ---------------------------------------------------------------------------

/// One request of a [`Batch`].
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    /// Index into `fleet.targets`.
    pub target: usize,
    pub bundle: Bundle,
    pub body: Vec<u8>,
}

/// A batch of valid requests spread round-robin over a fleet's targets.
/// Per target, notBefore strictly increases in publish order (one second
/// apart), so the last request for a target is also its newest certificate.
pub struct Batch {
    pub ca: TestCa,
    pub items: Vec<Item>,
}

impl Batch {
    pub fn new(fleet: &Fleet, prefix: &str, n: usize) -> Batch {
        let ca = TestCa::new();
        let base =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
                - 86_400;
        let items = (0..n)
            .map(|i| {
                let target = i % fleet.targets.len();
                let nb = base + i as i64;
                let bundle = ca.leaf_at(&format!("{prefix}-{i}.example"), nb, nb + 365 * 86_400);
                let id = format!("{prefix}-{i:04}");
                let body = request(&id, &fleet.targets[target].name, &bundle, true);
                Item { id, target, bundle, body }
            })
            .collect();
        Batch { ca, items }
    }

    pub fn ids(&self) -> Vec<String> {
        self.items.iter().map(|i| i.id.clone()).collect()
    }

    pub fn item(&self, id: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.id == id)
    }

    /// The last (and newest) request for target `t`.
    pub fn last_for(&self, t: usize) -> Option<&Item> {
        self.items.iter().rev().find(|i| i.target == t)
    }

    /// certificate PEM -> the request that carried it.
    pub fn by_cert(&self) -> HashMap<&str, &Item> {
        self.items.iter().map(|i| (i.bundle.cert_pem.as_str(), i)).collect()
    }
}

/// What a target holds, checked for consistency against a batch: no
/// temp files; either no files at all, or a certificate from the batch with
/// exactly its own key and chain. Returns the id whose files are on disk.
pub fn host_state(fleet: &Fleet, batch: &Batch, t: usize) -> Result<Option<String>, String> {
    let target = &fleet.targets[t];
    let leftovers = fleet.leftovers(target);
    if !leftovers.is_empty() {
        return Err(format!("{}: temp files left: {leftovers:?}", target.name));
    }
    let by_cert = batch.by_cert();
    match fleet.files(target) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(chain)) => {
            let cert = String::from_utf8(cert).map_err(|_| format!("{}: cert is not UTF-8", target.name))?;
            let Some(item) = by_cert.get(cert.as_str()) else {
                return Err(format!(
                    "{}: certificate on disk is torn or not from this batch ({} bytes)",
                    target.name,
                    cert.len()
                ));
            };
            if item.target != t {
                return Err(format!("{}: holds {} which was meant for t{}", target.name, item.id, item.target));
            }
            if key != item.bundle.key_pem.as_bytes() {
                return Err(format!("{}: key on disk does not belong to the certificate of {}", target.name, item.id));
            }
            if chain != item.bundle.chain_pem.as_bytes() {
                return Err(format!("{}: chain on disk does not match {}", target.name, item.id));
            }
            Ok(Some(item.id.clone()))
        }
        (c, k, ch) => Err(format!(
            "{}: partial set of files: cert {} key {} chain {}",
            target.name,
            c.is_some(),
            k.is_some(),
            ch.is_some()
        )),
    }
}

/// Name of the durable queue the [`ResultTap`] reads.
pub const RESULT_TAP_QUEUE: &str = "e2e.results";

/// Declare a durable classic queue bound to the events exchange with
/// `result.#`. The broker API only has exclusive result subscriptions,
/// which die with their connection; this one keeps collecting while a test
/// closes every connection of the vhost. (`rabbitmqctl eval`: the
/// management plugin is not enabled on the test broker.)
pub fn declare_result_queue(vhost: &Vhost, exchange: &str, queue: &str) {
    for s in [&vhost.name, exchange, queue] {
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "unsafe name {s:?}");
    }
    let expr = format!(
        "VH = <<\"{vh}\">>, X = rabbit_misc:r(VH, exchange, <<\"{x}\">>), Q = rabbit_misc:r(VH, queue, <<\"{q}\">>), \
         R = rabbit_amqqueue:declare(Q, true, false, [], none, <<\"guest\">>), \
         B = rabbit_binding:add({{binding, X, <<\"result.#\">>, Q, []}}, <<\"guest\">>), {{element(1, R), B}}.",
        vh = vhost.name,
        x = exchange,
        q = queue
    );
    let out = certdeploy_testbed::rabbit::rabbitmqctl(&["eval", &expr]);
    assert!(out.contains("ok"), "declaring {queue}: {out}");
}

/// Reads result events from a durable queue ([`declare_result_queue`]),
/// reconnecting when the broker drops the connection, so nothing published
/// during a test's connection loss is missed. Also publishes requests.
pub struct ResultTap {
    cfg: BrokerConfig,
    conn: Option<(Broker, certdeploy_amqp::Consumer)>,
    /// Every result received, per deployment id, in arrival order.
    pub seen: BTreeMap<String, Vec<ResultEvent>>,
    /// Result events received, in total.
    pub received: usize,
    /// Redelivered events dropped because an identical one was recorded.
    pub duplicates_dropped: usize,
    pub reconnects: usize,
}

impl ResultTap {
    pub async fn connect(fleet: &Fleet) -> ResultTap {
        let vhost = fleet.vhost.as_ref().expect("a fleet with a broker");
        let cfg = fleet.broker_config("e2e-tap");
        // Connecting declares the topology, so the events exchange exists.
        let broker = certdeploy_amqp::connect(&cfg).await.expect("connect");
        declare_result_queue(vhost, &cfg.topology.events_exchange, RESULT_TAP_QUEUE);
        let consumer = broker.consume_queue(RESULT_TAP_QUEUE, "e2e-tap").await.expect("consume results");
        ResultTap {
            cfg,
            conn: Some((broker, consumer)),
            seen: BTreeMap::new(),
            received: 0,
            duplicates_dropped: 0,
            reconnects: 0,
        }
    }

    async fn ensure(&mut self, deadline: tokio::time::Instant) -> bool {
        while self.conn.is_none() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            match certdeploy_amqp::connect(&self.cfg).await {
                Ok(b) => match b.consume_queue(RESULT_TAP_QUEUE, "e2e-tap").await {
                    Ok(c) => {
                        self.reconnects += 1;
                        self.conn = Some((b, c));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        true
    }

    /// Publish a request (confirmed), reconnecting if needed.
    pub async fn publish(&mut self, body: &[u8]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(self.ensure(deadline).await, "could not reach the broker to publish");
            let (broker, _) = self.conn.as_ref().expect("connected");
            match broker.publish_request(body).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "publish request: {e}");
                    self.conn = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Receive results into `seen` until `until` holds or `timeout` passes;
    /// returns whether `until` holds.
    pub async fn collect(
        &mut self,
        timeout: Duration,
        mut until: impl FnMut(&BTreeMap<String, Vec<ResultEvent>>) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !until(&self.seen) {
            if !self.ensure(deadline).await {
                break;
            }
            let (_, consumer) = self.conn.as_mut().expect("connected");
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Err(_) => break,
                Ok(Some(Ok(d))) => {
                    let r: ResultEvent = serde_json::from_slice(&d.body).expect("result event parses");
                    assert_eq!(format!("result.{}", r.outcome.as_str()), d.routing_key, "routing key of {r:?}");
                    // If the ack is lost with the connection the event comes
                    // again, flagged redelivered: count it once.
                    let _ = d.ack().await;
                    let list = self.seen.entry(r.deployment_id.clone()).or_default();
                    if d.redelivered && list.contains(&r) {
                        self.duplicates_dropped += 1;
                        continue;
                    }
                    self.received += 1;
                    list.push(r);
                }
                Ok(Some(Err(_))) | Ok(None) => self.conn = None,
            }
        }
        until(&self.seen)
    }

    /// Receive every result already published, duplicates included, with
    /// no fixed wait. Call it once nothing more will be published (the
    /// request queues drained, the workers idle or stopped): a marker
    /// result published now is queued behind every result the broker has
    /// already confirmed, so once it arrives, they all have.
    pub async fn settle(&mut self) {
        let marker = settle_marker(&self.seen);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(self.ensure(deadline).await, "could not reach the broker to settle");
            let (broker, _) = self.conn.as_ref().expect("connected");
            match broker.publish_result(marker.outcome.as_str(), &marker.to_json()).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "publish the settle marker: {e}");
                    self.conn = None;
                }
            }
        }
        let id = marker.deployment_id.clone();
        assert!(
            self.collect(Duration::from_secs(60), |s| s.contains_key(&id)).await,
            "the settle marker never arrived"
        );
        let n = self.seen.remove(&id).map_or(0, |v| v.len());
        self.received -= n;
    }

    /// [`ResultTap::settle`] once the requests and retry queues hold no
    /// message, ready or unacked (bounded): nothing is left to answer, so
    /// every result (and every duplicate) is in `seen` afterwards.
    pub async fn settle_after_drain(&mut self, fleet: &Fleet) {
        let vhost = fleet.vhost.as_ref().expect("a fleet with a broker");
        tokio::task::block_in_place(|| {
            for q in ["certdeploy.requests", "certdeploy.retry"] {
                if queue_state(vhost, q).is_some() {
                    let s = wait_queue_empty(vhost, q, Duration::from_secs(120));
                    assert_eq!(s, Some((0, 0)), "{q} (ready, unacked) before settling");
                }
            }
        });
        self.settle().await;
    }

    /// Drain a queue with `basic.get`: (body, `x-certdeploy-reason`) per message.
    pub async fn drain(&mut self, queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        assert!(self.ensure(deadline).await, "broker");
        let (broker, _) = self.conn.as_ref().expect("connected");
        let mut out = Vec::new();
        while let Some(d) = broker.get(queue).await.expect("basic.get") {
            d.ack().await.expect("ack");
            out.push((d.body.clone(), d.reason()));
        }
        out
    }

    pub async fn close(self) {
        if let Some((b, _)) = &self.conn {
            b.close().await;
        }
    }
}

/// `(ready, unacked)` of a queue, or `None` if it does not exist.
pub fn queue_state(vhost: &Vhost, queue: &str) -> Option<(u64, u64)> {
    vhost.queue_counts().into_iter().find(|(n, _, _)| n == queue).map(|(_, r, u)| (r, u))
}

/// RabbitMQ refreshes quorum-queue counts on a tick (5 s by default), so
/// one reading can be stale (it can even read 0/0 while messages wait).
pub const QUEUE_STATS_TICK: Duration = Duration::from_millis(5500);

/// Poll until `pred` holds for the queue's `(ready, unacked)` and keeps
/// holding for a whole stats tick; returns the last reading.
pub fn wait_queue_state(
    vhost: &Vhost,
    queue: &str,
    timeout: Duration,
    pred: impl Fn((u64, u64)) -> bool,
) -> Option<(u64, u64)> {
    let start = Instant::now();
    let mut since: Option<Instant> = None;
    loop {
        let s = queue_state(vhost, queue);
        match s {
            Some(v) if pred(v) => {
                let t = *since.get_or_insert_with(Instant::now);
                if t.elapsed() >= QUEUE_STATS_TICK {
                    return s;
                }
            }
            _ => since = None,
        }
        if start.elapsed() > timeout {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// [`wait_queue_state`] for "nothing ready, nothing unacked".
pub fn wait_queue_empty(vhost: &Vhost, queue: &str, timeout: Duration) -> Option<(u64, u64)> {
    wait_queue_state(vhost, queue, timeout, |s| s == (0, 0))
}

/// All ids have at least `n` results.
pub fn each_at_least(ids: &[String], n: usize) -> impl FnMut(&BTreeMap<String, Vec<ResultEvent>>) -> bool + '_ {
    move |seen| ids.iter().all(|id| seen.get(id).is_some_and(|v| v.len() >= n))
}

/// Number of ids with at least one result.
pub fn count_done(seen: &BTreeMap<String, Vec<ResultEvent>>, ids: &[String]) -> usize {
    ids.iter().filter(|id| seen.contains_key(*id)).count()
}

/// A log line without its ANSI colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Names in `dir` containing `needle`, sorted.
pub fn names_with(dir: &Path, needle: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(needle))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Write `b`'s certificate and key (and its chain, with `chain`) under
/// `dir`, named after `id`, and return `certdeploy deploy` arguments for
/// them and target `target` (`--json` with `json`).
pub fn deploy_args(dir: &Path, target: &str, id: &str, b: &Bundle, chain: bool, json: bool) -> Vec<String> {
    let path = |ext: &str| dir.join(format!("{id}.{ext}"));
    let (c, k, ch) = (path("cert.pem"), path("key.pem"), path("chain.pem"));
    write_file(&c, &b.cert_pem);
    write_file(&k, &b.key_pem);
    let mut args: Vec<String> = ["deploy", "--target", target, "--id", id, "--cert"].map(str::to_string).into();
    args.extend([c.display().to_string(), "--key".into(), k.display().to_string()]);
    if chain {
        write_file(&ch, &b.chain_pem);
        args.extend(["--chain".into(), ch.display().to_string()]);
    }
    if json {
        args.push("--json".into());
    }
    args
}

/// `&str`s of owned arguments.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A free TCP port on 127.0.0.1 (for a metrics listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// (status code, body) of a GET; None if nothing listens yet.
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// Poll `f` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `f` holds within `timeout` (polled every 50 ms).
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A metric sample's value, e.g. `certdeploy_deployments_total{outcome="deployed"}`.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}
