//! A RabbitMQ cluster as the engine: three nodes of our own on this
//! machine (own node names, ports, data directories and Erlang cookie,
//! joined with `rabbitmqctl join_cluster`; the machine's RabbitMQ on 5672
//! is never used), a worker given all three as `amqp_urls`, and the node
//! leading the requests queue SIGKILLed in the middle of a batch.
//!
//! Starting three nodes takes a minute and a few hundred MB, too heavy for
//! every CI run: the test is `#[ignore]`d; run it with
//! `cargo nextest run -p certdeploy --test cluster --run-ignored only`.
//! It prints the batch size, the failover time and the redeliveries.

mod common;

use std::collections::BTreeMap;
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
    dir: PathBuf,
    server: Child,
}

struct Cluster {
    base: PathBuf,
    nodes: Vec<Node>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

impl Cluster {
    fn env(&self, cmd: &mut Command, node: Option<&Node>) {
        // Nothing of the machine's node: its env file, config, cookie.
        cmd.env("HOME", &self.base)
            .env("RABBITMQ_CONF_ENV_FILE", self.base.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}");
        if let Some(n) = node {
            cmd.env("RABBITMQ_NODENAME", &n.name)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", n.port.to_string())
                .env("RABBITMQ_DIST_PORT", (n.port + 10000).to_string())
                .env("RABBITMQ_MNESIA_BASE", n.dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", n.dir.join("log"))
                .env("RABBITMQ_PID_FILE", n.dir.join("pid"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.base.join("enabled_plugins"))
                .env("RABBITMQ_CONFIG_FILE", n.dir.join("rabbitmq.conf"))
                .env("RABBITMQ_ADVANCED_CONFIG_FILE", n.dir.join("advanced.config"));
        }
    }

    fn ctl(&self, node: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(format!("{SBIN}/rabbitmqctl"));
        self.env(&mut cmd, None);
        let out = cmd.arg("-n").arg(node).args(args).output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() { Ok(text) } else { Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))) }
    }

    fn start(tag: &str) -> Cluster {
        let base = std::env::temp_dir().join(format!("certdeploy-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("base");
        std::fs::write(base.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
        let cookie = base.join(".erlang.cookie");
        std::fs::write(&cookie, format!("CERTDEPLOYCLUSTERTEST{}", std::process::id())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        let mut c = Cluster { base: base.clone(), nodes: Vec::new() };
        for i in 1..=3 {
            let port = loop {
                let p = free_port();
                if p < 50000 && p != 5672 {
                    break p;
                }
            };
            let dir = base.join(format!("n{i}"));
            std::fs::create_dir_all(dir.join("log")).unwrap();
            std::fs::write(
                dir.join("rabbitmq.conf"),
                format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"),
            )
            .unwrap();
            let name = format!("cdcluster{i}x{}@localhost", std::process::id());
            let log = std::fs::File::create(dir.join("server.out")).unwrap();
            let mut cmd = Command::new("nice");
            cmd.arg(format!("{SBIN}/rabbitmq-server"));
            let mut node = Node { name, port, dir, server: Command::new("true").spawn().unwrap() };
            c.env(&mut cmd, Some(&node));
            node.server =
                cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("rabbitmq-server");
            c.nodes.push(node);
        }
        for n in &c.nodes {
            c.ctl(&n.name, &["await_startup", "--timeout", "180"])
                .unwrap_or_else(|e| panic!("{} did not start: {e}", n.name));
        }
        let first = c.nodes[0].name.clone();
        for n in &c.nodes[1..] {
            for args in [&["stop_app"][..], &["join_cluster", &first], &["start_app"]] {
                c.ctl(&n.name, args).unwrap_or_else(|e| panic!("{} {args:?}: {e}", n.name));
            }
        }
        let status = c.ctl(&first, &["cluster_status"]).expect("cluster_status");
        for n in &c.nodes {
            assert!(status.contains(&n.name), "{} not in the cluster: {status}", n.name);
        }
        c
    }

    fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// SIGKILL a node's Erlang VM.
    fn kill(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        let pid = self.ctl(&name, &["eval", "os:getpid()."]).expect("pid");
        let pid = pid.trim().trim_matches('"');
        assert!(pid.chars().all(|c| c.is_ascii_digit()) && !pid.is_empty(), "{pid}");
        let ok = Command::new("kill").args(["-9", pid]).status().expect("kill").success();
        assert!(ok);
        let _ = self.nodes[i].server.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for name in &names {
            if let Ok(pid) = self.ctl_quiet(name) {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
        for n in &mut self.nodes {
            let _ = n.server.kill();
            let _ = n.server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

impl Cluster {
    fn ctl_quiet(&self, node: &str) -> Result<String, String> {
        let mut cmd = Command::new(format!("{SBIN}/rabbitmqctl"));
        self.env(&mut cmd, None);
        let out = cmd.args(["-n", node, "-t", "10", "eval", "os:getpid()."]).output().map_err(|e| e.to_string())?;
        let pid = String::from_utf8_lossy(&out.stdout).trim().trim_matches('"').to_string();
        if out.status.success() && !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
            Ok(pid)
        } else {
            Err(pid)
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
}

impl Reader {
    async fn connect(&mut self) {
        while self.broker.is_none() {
            let url = self.urls[self.next % self.urls.len()].clone();
            self.next += 1;
            let mut c = BrokerConfig::new(url, "cluster-test");
            c.rpc_timeout = Duration::from_secs(10);
            match certdeploy_amqp::connect(&c).await {
                Ok(b) => self.broker = Some(b),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Read what is there; `false` when the connection broke.
    async fn poll(&mut self) -> bool {
        self.connect().await;
        let b = self.broker.as_ref().expect("connected");
        loop {
            match b.get("certdeploy.results").await {
                Ok(Some(d)) => {
                    let _ = d.ack().await;
                    if let Ok(r) = serde_json::from_slice::<ResultEvent>(&d.body) {
                        self.seen.entry(r.deployment_id.clone()).or_default().push(r);
                    }
                }
                Ok(None) => return true,
                Err(_) => {
                    self.broker = None;
                    self.reconnects += 1;
                    return false;
                }
            }
        }
    }
}

#[ignore = "starts a three-node RabbitMQ cluster (a minute, a few hundred MB); run with --run-ignored only"]
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_requests_queue_leader_mid_batch_loses_nothing() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start("failover"));
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let fleet = Fleet::new(5, false);
    let list = urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let cfg = fleet.write_config(&Opts { worker_extra: format!("amqp_urls = [{list}]\n"), ..Opts::default() });
    // Never the machine's broker: the generated amqp_url goes.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text: String = text.lines().filter(|l| !l.starts_with("amqp_url =")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cfg, text).unwrap();

    let mut reader = Reader { urls: urls.clone(), next: 0, broker: None, seen: BTreeMap::new(), reconnects: 0 };
    reader.connect().await;
    let n = 300;
    let batch = Batch::new(&fleet, "cl", n);
    let ids = batch.ids();
    {
        let b = reader.broker.as_ref().expect("connected");
        for item in &batch.items {
            b.publish_request(&item.body).await.expect("publish");
        }
    }
    let w = Proc::worker(&fleet, &cfg, &[], "worker");
    let deadline = Instant::now() + Duration::from_secs(300);
    while count_done(&reader.seen, &ids) < n / 3 {
        assert!(Instant::now() < deadline, "no progress: {}", tail(&w.log_text(), 40));
        reader.poll().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaders =
        cluster.ctl(&cluster.nodes[0].name.clone(), &["list_queues", "-q", "name", "leader"]).expect("leader");
    let leader = leaders
        .lines()
        .find_map(|l| l.strip_prefix("certdeploy.requests\t"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{leaders}"))
        .to_string();
    let li = cluster.nodes.iter().position(|x| x.name == leader).unwrap_or_else(|| panic!("{leader}"));
    let before = count_done(&reader.seen, &ids);
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(li));
    let mut first_after: Option<Duration> = None;
    while count_done(&reader.seen, &ids) < n {
        assert!(
            Instant::now() < deadline,
            "{}/{n} results after killing {leader}: {}",
            count_done(&reader.seen, &ids),
            tail(&w.log_text(), 60)
        );
        reader.poll().await;
        if first_after.is_none() && count_done(&reader.seen, &ids) > before {
            first_after = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = killed_at.elapsed();
    // Anything re-published still arrives.
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.poll().await;

    let log = strip_ansi(&w.log_text());
    assert!(log.contains("failing over") || log.contains("reconnected"), "{}", tail(&log, 60));
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
        assert_eq!(fleet.reloads(t), deployed_per_target[i], "{}: deployed once per deployed id", t.name);
    }
    let republished: usize = reader.seen.values().map(|v| v.len() - 1).sum();
    let redelivered = log.matches("already finished: re-publishing").count();
    eprintln!(
        "cluster: {n} requests over 5 targets; killed {leader} (requests queue leader) after {before} results; \
         first result after the kill in {first_after:?}, all {n} after {total:?}; outcomes {outcomes:?}; \
         {redelivered} redelivered message(s) answered from the journal, {republished} duplicate result(s); \
         the test's reader reconnected {} time(s)",
        reader.reconnects
    );
    drop(w);
    drop(cluster);
}
