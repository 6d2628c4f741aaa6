//! A RabbitMQ cluster as the engine: three nodes of our own on this
//! machine (own node names, AMQP and distribution ports, data and log
//! directories, enabled-plugins file, config and env files and Erlang
//! cookie, joined with `rabbitmqctl join_cluster`; the machine's RabbitMQ on
//! 5672 is never used), a worker given all three as `amqp_urls`, and the
//! node leading the requests queue SIGKILLed in the middle of a batch.
//!
//! Starting three nodes takes about a minute and ~150 MB each, too heavy
//! for every CI run: the test is `#[ignore]`d; run it with
//! `cargo nextest run -p certdeploy-e2e --test cluster --run-ignored only --no-capture`.
//! It prints the batch size, the failover time and the redeliveries.
//!
//! Every wait is bounded and names what it waited for when it gives up;
//! every node runs in its own process group, which is SIGKILLed when the
//! test ends (also on panic).

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use certdeploy_amqp::{Broker, BrokerConfig};
use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;

const SBIN: &str = "/usr/lib/rabbitmq/bin";

struct Node {
    name: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// `rabbitmq-server` (a shell forking the Erlang VM), leader of its own
    /// process group: killing the group kills the VM.
    server: Option<Child>,
}

struct Cluster {
    base: PathBuf,
    nodes: Vec<Node>,
}

fn free_port(taken: &[u16]) -> u16 {
    for _ in 0..1000 {
        let p =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        // The distribution port is p + 1; stay clear of the machine's node.
        if p < 60000
            && ![5672, 5671, 25672, 15672, 4369].contains(&p)
            && !taken.contains(&p)
            && !taken.contains(&(p + 1))
        {
            return p;
        }
    }
    panic!("no free port pair found");
}

fn kill_group(child: &mut Child) {
    let pgid = child.id().to_string();
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
    // The group leader is our child: reap it (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("process group {pgid} did not exit within 10 s of SIGKILL");
}

impl Cluster {
    /// Environment shared by the servers and `rabbitmqctl`: nothing of the
    /// machine's node (its env file fixes the node name; its cookie).
    fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", &self.base)
            .env("RABBITMQ_CONF_ENV_FILE", self.base.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}");
    }

    /// `rabbitmqctl -n NODE ARGS`, killed after `limit`.
    fn ctl(&self, node: &str, args: &[&str], limit: Duration) -> Result<String, String> {
        let mut cmd = Command::new("timeout");
        cmd.arg("-s").arg("KILL").arg(limit.as_secs().to_string()).arg(format!("{SBIN}/rabbitmqctl"));
        self.env(&mut cmd);
        let out = cmd
            .arg("-n")
            .arg(node)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("rabbitmqctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "rabbitmqctl -n {node} {args:?} ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn start() -> Cluster {
        let base = std::env::temp_dir().join(format!("certdeploy-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("base");
        std::fs::write(base.join("rabbitmq-env.conf"), "").expect("env file");
        std::fs::write(base.join("enabled_plugins"), "[].\n").expect("plugins file");
        let cookie = base.join(".erlang.cookie");
        std::fs::write(&cookie, format!("CERTDEPLOYCLUSTERTEST{}", std::process::id())).expect("cookie");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).expect("cookie mode");
        let mut c = Cluster { base: base.clone(), nodes: Vec::new() };
        let mut taken = Vec::new();
        for i in 1..=3 {
            let port = free_port(&taken);
            taken.extend([port, port + 1]);
            let dir = base.join(format!("n{i}"));
            std::fs::create_dir_all(dir.join("log")).expect("node dir");
            std::fs::write(
                dir.join("rabbitmq.conf"),
                format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"),
            )
            .expect("node config");
            let name = format!("cdcluster{i}x{}@localhost", std::process::id());
            c.nodes.push(Node { name, port, dist_port: port + 1, dir, server: None });
        }
        for i in 0..3 {
            c.spawn(i);
        }
        for i in 0..3 {
            c.await_startup(i);
        }
        let first = c.nodes[0].name.clone();
        for i in 1..3 {
            let name = c.nodes[i].name.clone();
            for args in [&["stop_app"][..], &["join_cluster", &first], &["start_app"]] {
                c.ctl(&name, args, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}\n{}", c.server_tail(i)));
            }
        }
        let status = c.ctl(&first, &["cluster_status"], Duration::from_secs(30)).expect("cluster_status");
        let running = status.split("Running Nodes").nth(1).unwrap_or("");
        for n in &c.nodes {
            assert!(running.contains(&n.name), "{} not running in the cluster: {status}", n.name);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let n = &self.nodes[i];
        let log = std::fs::File::create(n.dir.join("server.out")).expect("server log");
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19"]).arg(format!("{SBIN}/rabbitmq-server"));
        self.env(&mut cmd);
        cmd.env("RABBITMQ_NODENAME", &n.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", n.port.to_string())
            .env("RABBITMQ_DIST_PORT", n.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", n.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", n.dir.join("log"))
            .env("RABBITMQ_PID_FILE", n.dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.base.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", n.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", n.dir.join("advanced.config"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        let child = cmd.spawn().expect("rabbitmq-server");
        self.nodes[i].server = Some(child);
    }

    fn server_tail(&self, i: usize) -> String {
        let out = std::fs::read_to_string(self.nodes[i].dir.join("server.out")).unwrap_or_default();
        format!("--- {} server output ---\n{}", self.nodes[i].name, tail(&out, 30))
    }

    /// `await_startup` fails at once while the node has not registered with
    /// epmd yet: retried, within 120 s in all.
    fn await_startup(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.ctl(&name, &["await_startup", "--timeout", "60"], Duration::from_secs(70)) {
                Ok(_) => return,
                Err(e) => {
                    if let Some(Ok(Some(st))) = self.nodes[i].server.as_mut().map(Child::try_wait) {
                        panic!("{name} exited ({st}) while starting: {e}\n{}", self.server_tail(i));
                    }
                    if Instant::now() > deadline {
                        panic!("{name} not started after 120 s: {e}\n{}", self.server_tail(i));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// The node leading a quorum queue, asked of node `ask`.
    fn leader_of(&self, ask: usize, queue: &str) -> String {
        let out = self
            .ctl(
                &self.nodes[ask].name,
                &["list_queues", "-q", "--no-table-headers", "name", "leader"],
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("leader of {queue}: {e}"));
        out.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(queue)).then(|| f.next().unwrap_or("").to_string())
            })
            .next()
            .unwrap_or_else(|| panic!("{queue} not listed: {out}"))
    }

    /// SIGKILL node `i` (its whole process group: the Erlang VM and its
    /// helpers).
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].server.take() {
            kill_group(&mut child);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.server.take() {
                kill_group(&mut child);
            }
        }
        if std::env::var_os("CERTDEPLOY_KEEP_CLUSTER_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// Reads `certdeploy.results` from whichever node answers.
struct Reader {
    urls: Vec<String>,
    next: usize,
    broker: Option<Broker>,
    seen: BTreeMap<String, Vec<ResultEvent>>,
    reconnects: usize,
    last_error: String,
}

impl Reader {
    /// One connection attempt per node at most.
    async fn connect(&mut self) -> bool {
        for _ in 0..self.urls.len() {
            if self.broker.is_some() {
                return true;
            }
            let url = self.urls[self.next % self.urls.len()].clone();
            self.next += 1;
            let mut c = BrokerConfig::new(url.clone(), "cluster-test");
            c.rpc_timeout = Duration::from_secs(5);
            match certdeploy_amqp::connect(&c).await {
                Ok(b) => {
                    self.broker = Some(b);
                    self.last_error.clear();
                }
                Err(e) => self.last_error = format!("{}: {e}", certdeploy_amqp::redact_url(&url)),
            }
        }
        self.broker.is_some()
    }

    /// Read what is there (each `basic.get` bounded by the rpc timeout).
    async fn poll(&mut self) {
        if !self.connect().await {
            return;
        }
        let Some(b) = self.broker.as_ref() else { return };
        loop {
            match b.get("certdeploy.results").await {
                Ok(Some(d)) => {
                    let _ = d.ack().await;
                    if let Ok(r) = serde_json::from_slice::<ResultEvent>(&d.body) {
                        self.seen.entry(r.deployment_id.clone()).or_default().push(r);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.last_error = format!("basic.get: {e}");
                    if let Some(b) = self.broker.take() {
                        b.close().await;
                    }
                    self.reconnects += 1;
                    return;
                }
            }
        }
    }
}

#[ignore = "starts a three-node RabbitMQ cluster (a minute, ~450 MB); run with --run-ignored only"]
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_requests_queue_leader_mid_batch_loses_nothing() {
    let t0 = Instant::now();
    let mut cluster = tokio::task::block_in_place(Cluster::start);
    eprintln!("cluster of 3 nodes up in {:?}", t0.elapsed());
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let fleet = Fleet::new(5, false);
    let list = urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    // A reload of 0.2 s: the batch takes long enough that the kill lands
    // with deployments running and deliveries unacked.
    let reload_overrides = fleet
        .targets
        .iter()
        .map(|t| (t.name.clone(), format!("sleep 0.2; echo reload >> {}", t.reload_log.display())))
        .collect();
    let cfg = fleet.write_config(&Opts {
        worker_extra: format!("amqp_urls = [{list}]\n"),
        reload_overrides,
        ..Opts::default()
    });
    // Never the machine's broker: the generated amqp_url goes.
    let text = std::fs::read_to_string(&cfg).expect("config");
    let text: String = text.lines().filter(|l| !l.starts_with("amqp_url =")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cfg, text).expect("config");

    // The worker connects first and declares the topology: the queues'
    // leaders are then on the node it is connected to, the node killed below.
    let w = Proc::worker(&fleet, &cfg, &[], "worker");
    let deadline = Instant::now() + Duration::from_secs(60);
    let worker_port = loop {
        let log = strip_ansi(&w.log_text());
        if let Some(line) = log.lines().find(|l| l.contains("connected to AMQP broker")) {
            break cluster.nodes.iter().position(|x| line.contains(&format!(":{}/", x.port)));
        }
        assert!(Instant::now() < deadline, "worker not connected after 60 s:\n{}", tail(&log, 40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wi = worker_port.expect("the worker's node is one of the three");

    let mut reader = Reader {
        urls: urls.clone(),
        next: 0,
        broker: None,
        seen: BTreeMap::new(),
        reconnects: 0,
        last_error: String::new(),
    };
    assert!(reader.connect().await, "no node of the cluster accepts a connection: {}", reader.last_error);
    let n = 300;
    let batch = Batch::new(&fleet, "cl", n);
    let ids = batch.ids();
    {
        let b = reader.broker.as_ref().expect("connected");
        for item in &batch.items {
            b.publish_request(&item.body).await.expect("publish");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while count_done(&reader.seen, &ids) < n / 3 {
        assert!(
            Instant::now() < deadline,
            "{}/{n} results before the kill after 300 s (reader: {})\n{}",
            count_done(&reader.seen, &ids),
            reader.last_error,
            tail(&strip_ansi(&w.log_text()), 40)
        );
        reader.poll().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = tokio::task::block_in_place(|| cluster.leader_of(0, "certdeploy.requests"));
    let li = cluster.nodes.iter().position(|x| x.name == leader).unwrap_or_else(|| panic!("leader {leader:?}"));
    assert_eq!(li, wi, "the worker declared the queue on its node, so that node leads it");
    let before = count_done(&reader.seen, &ids);
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(li));
    eprintln!("SIGKILLed {leader} (leader of certdeploy.requests) after {before}/{n} results");
    let mut first_after: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while count_done(&reader.seen, &ids) < n {
        assert!(
            Instant::now() < deadline,
            "{}/{n} results 300 s after killing {leader} (reader: {})\n{}",
            count_done(&reader.seen, &ids),
            reader.last_error,
            tail(&strip_ansi(&w.log_text()), 60)
        );
        reader.poll().await;
        if first_after.is_none() && count_done(&reader.seen, &ids) > before {
            first_after = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = killed_at.elapsed();
    // A redelivered, already finished request re-publishes its result: wait
    // for the queues to settle, then read what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.poll().await;

    let log = strip_ansi(&w.log_text());
    assert!(log.contains("failing over to the next node of the cluster"), "{}", tail(&log, 60));
    for l in log
        .lines()
        .filter(|l| ["failing over", "reconnect", "connected to AMQP", "keep failing"].iter().any(|k| l.contains(k)))
    {
        eprintln!("worker: {l}");
    }
    let mut deployed_per_target = vec![0usize; fleet.targets.len()];
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for item in &batch.items {
        let r = &reader.seen[&item.id];
        for other in &r[1..] {
            assert_eq!((other.outcome, &other.started_at), (r[0].outcome, &r[0].started_at), "{}", item.id);
        }
        assert!(matches!(r[0].outcome, Outcome::Deployed | Outcome::Superseded), "{}: {}", item.id, r[0].message);
        *outcomes.entry(r[0].outcome.as_str()).or_default() += 1;
        if r[0].outcome == Outcome::Deployed {
            deployed_per_target[item.target] += 1;
        }
    }
    for (i, t) in fleet.targets.iter().enumerate() {
        assert_eq!(fleet.reloads(t), deployed_per_target[i], "{}: one reload per deployed id", t.name);
    }
    let duplicates: usize = reader.seen.values().map(|v| v.len() - 1).sum();
    let redelivered = log.matches("redelivered message").count();
    let from_journal = log.matches("already finished: re-publishing").count();
    eprintln!(
        "cluster: {n} requests over {} targets; SIGKILLed {leader} (requests queue leader) after {before} results; \
         first result after the kill in {first_after:?}, all {n} after {total:?}; outcomes {outcomes:?}; \
         {redelivered} redelivered message(s), {from_journal} of them answered from the journal, \
         {duplicates} duplicate result(s); \
         reloads {:?}; the test's reader reconnected {} time(s)",
        fleet.targets.len(),
        fleet.targets.iter().map(|t| fleet.reloads(t)).collect::<Vec<_>>(),
        reader.reconnects
    );
    drop(w);
    drop(cluster);
}
