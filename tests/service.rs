//! The worker as a service: what a service manager, a container runtime and
//! a Prometheus server see of it. Real binary, real sshd, real RabbitMQ.
//! - the notification protocol of systemd `Type=notify` (readiness after
//!   recovery, start-timeout extension while recovering, watchdog, stopping);
//! - every exported series present with HELP from the first scrape, and every
//!   metric named in the README, the alert rules and the dashboard exported;
//! - as PID 1 of a PID namespace (a container), closed ssh masters are
//!   reaped only when an init runs in front of the worker.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn config_with_metrics(fleet: &Fleet, opts: &Opts) -> (PathBuf, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = fleet.write_config(opts);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("metrics_listen = \"\"", &format!("metrics_listen = \"{metrics}\"")))
        .expect("config");
    (cfg, metrics)
}

/// Metric families of a scrape: name → (TYPE, has HELP).
fn families(scrape: &str) -> std::collections::BTreeMap<String, (String, bool)> {
    let mut out = std::collections::BTreeMap::new();
    for l in scrape.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (Some(name), Some(ty)) = (w.next(), w.next()) else { continue };
            out.entry(name.to_string()).or_insert((String::new(), false)).0 = ty.to_string();
        } else if let Some(name) = l.strip_prefix("# HELP ").and_then(|rest| rest.split_whitespace().next()) {
            out.entry(name.to_string()).or_insert((String::new(), false)).1 = true;
        }
    }
    out
}

/// Metric names (`certdeploy_…`) in a text, with histogram suffixes removed
/// where the base name is a histogram family of the scrape.
fn named_metrics(text: &str, fams: &std::collections::BTreeMap<String, (String, bool)>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("certdeploy_") {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s).filter(|b| fams.get(*b).is_some_and(|(t, _)| t == "histogram")))
            .unwrap_or(word);
        out.insert(base.to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_exports_every_series_with_help_and_everything_the_docs_name() {
    let fleet = Fleet::new(1, true);
    let (cfg, metrics) = config_with_metrics(&fleet, &Opts::default());
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    wait_for("/readyz 200", Duration::from_secs(60), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
    // Before any deployment: no expiry is known for any target.
    let scrape0 = get(&metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(!scrape0.contains("certdeploy_certificate_expiry_timestamp_seconds{"), "{scrape0}");
    // One deployment: the expiry gauge of t0 is its certificate's notAfter,
    // and a later certificate moves it.
    let ca = TestCa::new();
    let expiry = |scrape: &str| sample(scrape, "certdeploy_certificate_expiry_timestamp_seconds{target=\"t0\"}");
    let mut seen = Vec::new();
    for (id, days_ago) in [("exp-1", 30), ("exp-2", 2)] {
        let b = ca.leaf(&format!("{id}.example"), days_ago);
        client.publish(&request(id, "t0", &b, false)).await;
        let ids = vec![id.to_string()];
        let got = client.collect(Duration::from_secs(60), all_ids(&ids)).await;
        assert_eq!(got[id][0].outcome, certdeploy_core::Outcome::Deployed, "{}", got[id][0].message);
        let scrape = get(&metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
        let v = expiry(&scrape).unwrap_or_else(|| panic!("no expiry gauge for t0:\n{scrape}"));
        seen.push(v);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    // leaf(_, d) is valid for 365 days from d days ago.
    assert!((seen[0] - (now + 335.0 * 86_400.0)).abs() < 3_600.0, "{seen:?}");
    assert!((seen[1] - seen[0] - 28.0 * 86_400.0).abs() < 3_600.0, "the gauge follows the later certificate: {seen:?}");
    // The queue gauges are read from the broker right after the connect.
    let mut scrape = String::new();
    wait_for("the queue gauges", Duration::from_secs(30), || {
        scrape = get(&metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
        scrape.contains("certdeploy_queue_messages{queue=\"certdeploy.requests\"}")
    });
    let fams = families(&scrape);

    // Every series is there (also those of events that never happened),
    // each with HELP, and a name ending in _total is a counter.
    for (name, (ty, help)) in &fams {
        assert!(*help, "{name} has no HELP line:\n{scrape}");
        if name.ends_with("_total") {
            assert_eq!(ty, "counter", "{name} is named like a counter but is a {ty}");
        }
    }
    for outcome in ["rolled_back", "rollback_failed", "failed", "rejected"] {
        assert!(
            scrape.contains(&format!("certdeploy_deployments_total{{outcome=\"{outcome}\"}} 0")),
            "{outcome}:\n{scrape}"
        );
    }
    // Buckets reach the default deadline of a deployment (600 s).
    assert!(scrape.contains("certdeploy_deployment_duration_seconds_bucket{le=\"600\"}"), "{scrape}");
    assert!(
        scrape.contains(&format!("certdeploy_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
        "{scrape}"
    );
    assert_eq!(fams.get("certdeploy_journal_flush_duration_seconds").map(|f| f.0.as_str()), Some("histogram"));

    // Everything the README, the alert rules and the dashboard name is exported.
    for doc in ["README.md", "contrib/prometheus/alerts.yml", "contrib/grafana/certdeploy.json"] {
        let text = std::fs::read_to_string(repo().join(doc)).expect(doc);
        let named = named_metrics(&text, &fams);
        assert!(!named.is_empty(), "{doc} names no metric");
        let missing: Vec<_> = named.iter().filter(|n| !fams.contains_key(*n)).collect();
        assert!(missing.is_empty(), "{doc} names metrics the worker does not export: {missing:?}");
    }
}

/// Datagrams received on a notify socket, with the host's view at arrival.
struct Notifications {
    sock: UnixDatagram,
    got: Vec<String>,
}

impl Notifications {
    fn bind(dir: &Path) -> (Notifications, PathBuf) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        (Notifications { sock, got: Vec::new() }, path)
    }

    /// Receive until a message contains `what`; returns its index.
    fn until(&mut self, what: &str, timeout: Duration) -> usize {
        self.until_count(what, 0, 1, timeout);
        self.got.iter().position(|m| m.contains(what)).expect("counted")
    }

    /// Receive until `count` messages from index `from` on contain `what`.
    fn until_count(&mut self, what: &str, from: usize, count: usize, timeout: Duration) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while self.got[from.min(self.got.len())..].iter().filter(|m| m.contains(what)).count() < count {
            assert!(start.elapsed() < timeout, "not {count} × {what} within {timeout:?}; got {:?}", self.got);
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_notify_ready_only_after_recovery_with_watchdog_and_stopping() {
    if !cfg!(feature = "failpoints") {
        panic!("this test needs `--features certdeploy-e2e/failpoints` (it interrupts a deployment with a failpoint)");
    }
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let t0 = &fleet.targets[0];
    let ca = TestCa::new();
    // The host's files before the interrupted deployment.
    let before = ca.leaf("before.example", 3);
    fleet.sshd.write(&t0.cert, before.cert_pem.as_bytes(), 0o644);
    fleet.sshd.write(&t0.key, before.key_pem.as_bytes(), 0o600);
    let d = fleet.tmp.path();
    let b = ca.leaf("a.example", 2);
    write_file(&d.join("c.pem"), &b.cert_pem);
    write_file(&d.join("k.pem"), &b.key_pem);
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().expect("utf-8"), "deploy", "--target", "t0", "--id", "crashed-1", "--cert"])
        .arg(d.join("c.pem"))
        .arg("--key")
        .arg(d.join("k.pem"))
        .env("FAILPOINTS", "after_write=panic")
        .output()
        .expect("deploy");
    assert!(!out.status.success(), "the failpoint kills the process after the write");
    assert_ne!(fleet.sshd.read(&t0.cert), before.cert_pem.as_bytes(), "the new certificate is on the host");

    let (mut n, sock) = Notifications::bind(d);
    let sock_s = sock.to_str().expect("utf-8");
    // Recovery is slowed down by a sleeping failpoint before its restore.
    let mut w = Proc::worker(
        &fleet,
        &cfg,
        &[("NOTIFY_SOCKET", sock_s), ("WATCHDOG_USEC", "200000"), ("FAILPOINTS", "before_restore=sleep(2000)")],
        "worker",
    );
    let extend = n.until("EXTEND_TIMEOUT_USEC=", Duration::from_secs(60));
    let ready = n.until("READY=1", Duration::from_secs(60));
    // At the moment READY arrives, recovery has rolled the host back.
    assert_eq!(fleet.sshd.read(&t0.cert), before.cert_pem.as_bytes(), "READY=1 came before recovery finished");
    assert!(fleet.leftovers(t0).is_empty(), "{:?}", fleet.leftovers(t0));
    assert!(extend < ready, "the start timeout is extended while recovering: {:?}", n.got);
    // WATCHDOG_USEC=200000: pets every 100 ms.
    let start = n.got.len();
    n.until_count("WATCHDOG=1", start, 3, Duration::from_secs(30));
    w.signal("TERM");
    n.until("STOPPING=1", Duration::from_secs(30));
    let status = w.wait_timeout(Duration::from_secs(60)).expect("the worker exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// `unshare --pid --fork`: the worker (or tini in front of it) is PID 1 of
/// a new PID namespace, as in a container.
fn spawn_in_pid_namespace(cfg: &Path, with_init: bool, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"]);
    if with_init {
        cmd.args(["tini", "--"]);
    }
    cmd.arg(bin()).arg("--config").arg(cfg).arg("worker");
    cmd.env("RUST_LOG", "info,certdeploy=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn unshare")
}

fn proc_stat(pid: u32) -> Option<(String, char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let mut rest = s[close + 2..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// The PID namespace of a process (`pid:[inode]`).
fn pid_namespace(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).expect("pid namespace link")
}

/// Processes in PID namespace `ns` (seen from outside): (pid, comm, state).
fn namespace_processes(ns: &Path) -> Vec<(u32, String, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_deref() == Some(ns)
            && let Some((comm, state, _)) = proc_stat(pid)
        {
            out.push((pid, comm, state));
        }
    }
    out
}

/// The namespace's PID 1, seen from outside: the child of `unshare`.
fn namespace_init(unshare: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        (proc_stat(pid)?.2 == unshare).then_some(pid)
    })
}

/// Opens and closes `rounds` × (every target) ssh masters through the
/// worker; returns the zombie ssh processes of the namespace afterwards.
async fn masters_churn(fleet: &Fleet, with_init: bool, rounds: usize) -> (usize, Vec<(u32, String, char)>) {
    let cfg = fleet.write_config(&Opts::default());
    let log = fleet.tmp.path().join(format!("pid1-init-{with_init}.log"));
    let mut child = spawn_in_pid_namespace(&cfg, with_init, &log);
    let unshare = child.id();
    let mut init = None;
    let start = Instant::now();
    while init.is_none() {
        init = namespace_init(unshare);
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().ok().flatten().is_some() {
            panic!(
                "no PID 1 in the namespace ({:?}):\n{}",
                child.try_wait(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ns = pid_namespace(init.expect("init"));
    let mut client = Client::connect(fleet).await;
    let ca = TestCa::new();
    let mut opened = 0;
    for round in 0..rounds {
        let ids: Vec<String> = fleet.targets.iter().map(|t| format!("pid1-{with_init}-{round}-{}", t.name)).collect();
        for (t, id) in fleet.targets.iter().zip(&ids) {
            client.publish(&request(id, &t.name, &ca.leaf(&format!("r{round}.example"), 1), false)).await;
        }
        let seen = client.collect(Duration::from_secs(120), all_ids(&ids)).await;
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        for id in &ids {
            let r = seen.get(id).and_then(|v| v.first());
            assert!(
                r.is_some_and(|r| r.outcome == certdeploy_core::Outcome::Deployed),
                "{id}: {r:?}\n{}",
                tail(&log_text, 60)
            );
        }
        opened += fleet.targets.len();
        // Every master ends: its sshd side is killed; ssh exits.
        fleet.sshd.kill_connections();
        wait_for("every ssh master gone", Duration::from_secs(30), || {
            namespace_processes(&ns).iter().all(|(_, comm, state)| comm != "ssh" || *state == 'Z')
        });
    }
    // The namespace settles (an init reaps as SIGCHLD arrives).
    let mut zombies = Vec::new();
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) {
        zombies = namespace_processes(&ns).into_iter().filter(|(_, c, s)| c == "ssh" && *s == 'Z').collect();
        if zombies.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    // `--kill-child` kills the namespace's PID 1 asynchronously: the next
    // worker may open the journal only once every process of it is gone.
    wait_for("the namespace emptied", Duration::from_secs(30), || namespace_processes(&ns).is_empty());
    (opened, zombies)
}

#[tokio::test(flavor = "multi_thread")]
async fn as_pid1_of_a_namespace_closed_masters_are_reaped_only_with_an_init() {
    let fleet = Fleet::new(13, true);
    // Control: the worker itself as PID 1 keeps what it does not reap — the
    // test sees the bug an init is there for.
    let (opened, zombies) = masters_churn(&fleet, false, 1).await;
    assert!(
        !zombies.is_empty(),
        "without an init, {opened} closed masters left no zombie: the test cannot see the bug"
    );
    // With tini in front (the image's entrypoint, compose's `init: true`):
    // 52 masters opened and closed, none left a zombie.
    let (opened, zombies) = masters_churn(&fleet, true, 4).await;
    assert!(opened >= 50, "{opened}");
    assert!(zombies.is_empty(), "{} zombie ssh processes after {opened} masters: {zombies:?}", zombies.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_collects_its_journal_by_itself_and_keeps_what_is_in_place() {
    let fleet = Fleet::new(1, true);
    let opts =
        Opts { worker_extra: "journal_gc_interval_s = 1\njournal_retention_days = 0\n".into(), ..Opts::default() };
    let (cfg, metrics) = config_with_metrics(&fleet, &opts);
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let t0 = &fleet.targets[0];
    let ids: Vec<String> = (0..12).map(|i| format!("gc-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        // Each a later certificate than the one before (no supersede).
        client.publish(&request(id, &t0.name, &ca.leaf(&format!("gc{i}.example"), 12 - i as i64), false)).await;
    }
    let seen = client.collect(Duration::from_secs(120), all_ids(&ids)).await;
    for id in &ids {
        assert_eq!(
            seen.get(id).and_then(|v| v.first()).map(|r| r.outcome),
            Some(certdeploy_core::Outcome::Deployed),
            "{id}"
        );
    }
    // Retention 0: every finished deployment is collected but the last one,
    // which says what t0 holds now.
    let mut scrape = String::new();
    wait_for("the worker's gc to prune 11 deployments", Duration::from_secs(60), || {
        scrape = get(&metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
        sample(&scrape, "certdeploy_journal_gc_pruned_total").unwrap_or(0.0) >= 11.0
    });
    assert_eq!(sample(&scrape, "certdeploy_journal_gc_pruned_total"), Some(11.0), "{scrape}");
    assert!(sample(&scrape, "certdeploy_journal_last_gc_timestamp_seconds").unwrap_or(0.0) > 1.7e9, "{scrape}");
    assert!(sample(&scrape, "certdeploy_journal_size_bytes").unwrap_or(0.0) > 0.0, "{scrape}");
}

/// With a gc every second, zero retention and a 1 MiB compaction floor, the
/// worker compacts its journal while it runs (consumption held, nothing in
/// flight, compacted, resumed), more than once over 900 deployments (1,500
/// when the journal grows slowly);
/// deployments go on across the compactions, and requests of before them,
/// delivered again, get their recorded result (same attempt, same times)
/// without a second deployment.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_compacts_its_journal_while_it_runs_and_deploys_and_dedupes_after() {
    let fleet = Fleet::new(2, true);
    let opts = Opts {
        worker_extra: "journal_gc_interval_s = 1\njournal_retention_days = 0\njournal_compact_min_mb = 1\n".into(),
        ..Opts::default()
    };
    let (cfg, metrics) = config_with_metrics(&fleet, &opts);
    let mut client = Client::connect(&fleet).await;
    let w = Proc::worker(&fleet, &cfg, &[], "worker");
    let scrape = || get(&metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let compactions = || sample(&scrape(), "certdeploy_journal_compactions_total").unwrap_or(0.0);
    // One batch, notBefore rising in publish order per target: the first
    // 300 before any compaction, the other 600 after. The next compaction
    // is due at twice the size the first one left (results are kept for
    // redelivery, so that size grows with the first part): 600 deployments
    // grow the journal past it with a margin, 300 did not always; under
    // load (stress-ng on one core) 600 did not always either, so 600 more
    // follow when the second compaction has not come a minute after them.
    let batch = Batch::new(&fleet, "cmp", 1500);
    let (first, rest) = batch.items.split_at(300);
    let (second, extra) = rest.split_at(600);
    let ids = |items: &[Item]| items.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
    for it in first {
        client.publish(&it.body).await;
    }
    let seen = client.collect(Duration::from_secs(300), all_ids(&ids(first))).await;
    // A request the broker had sent but the worker not yet taken when it
    // held consumption is delivered again later, after newer ones for its
    // target: it is `superseded` then, the host never going back.
    let in_place = |r: &certdeploy_core::wire::ResultEvent| {
        matches!(r.outcome, certdeploy_core::Outcome::Deployed | certdeploy_core::Outcome::Superseded)
    };
    for it in first {
        assert!(seen.get(&it.id).is_some_and(|v| in_place(&v[0])), "{}: {:?}", it.id, seen.get(&it.id));
    }
    assert_eq!(scrape().lines().filter(|l| l.starts_with("certdeploy_journal_compactions_total")).count(), 1);
    wait_for("the worker's first compaction", Duration::from_secs(120), || compactions() >= 1.0);
    let after_first = compactions();

    // The second half, and the first ten of the first half again.
    for it in second.iter().chain(&first[..10]) {
        client.publish(&it.body).await;
    }
    let again = ids(&first[..10]);
    let more = client
        .collect(Duration::from_secs(300), |s| {
            second.iter().all(|i| s.contains_key(&i.id)) && again.iter().all(|id| s.contains_key(id))
        })
        .await;
    for it in second {
        assert!(more.get(&it.id).is_some_and(|v| in_place(&v[0])), "{}: {:?}", it.id, more.get(&it.id));
    }
    for id in &again {
        let (was, now) = (&seen[id][0], &more[id][0]);
        assert_eq!(
            (now.outcome, now.attempts, &now.started_at, &now.finished_at),
            (was.outcome, was.attempts, &was.started_at, &was.finished_at),
            "{id}: delivered again after a compaction, it was not answered from the journal"
        );
    }
    let mut published = 900;
    if !eventually(Duration::from_secs(60), || compactions() > after_first) {
        for it in extra {
            client.publish(&it.body).await;
        }
        let done = client.collect(Duration::from_secs(300), all_ids(&ids(extra))).await;
        for it in extra {
            assert!(done.get(&it.id).is_some_and(|v| in_place(&v[0])), "{}: {:?}", it.id, done.get(&it.id));
        }
        published = 1500;
    }
    wait_for("a compaction after the first", Duration::from_secs(120), || compactions() > after_first);
    for t in 0..fleet.targets.len() {
        let holds = host_state(&fleet, &batch, t).unwrap();
        let last = batch.items[..published].iter().rev().find(|i| i.target == t).map(|i| i.id.as_str());
        assert_eq!(holds.as_deref(), last, "{}", fleet.targets[t].name);
    }
    let body = scrape();
    assert!(sample(&body, "certdeploy_journal_last_compaction_duration_seconds").unwrap_or(0.0) > 0.0, "{body}");
    // Every compaction ran with consumption held and nothing in flight,
    // and ended before consumption resumed.
    let log = w.log_text();
    let (mut held, mut compacting, mut compacted) = (false, false, 0);
    for l in log.lines() {
        if l.contains("consumption paused") {
            held = true;
        } else if l.contains("consumption resumed") {
            assert!(!compacting, "resumed during a compaction:\n{}", tail(&log, 60));
            held = false;
        } else if l.contains("compacting the journal") {
            assert!(held, "compacting while consuming:\n{}", tail(&log, 60));
            compacting = true;
        } else if l.contains("journal compacted") {
            assert!(held && compacting, "{}", tail(&log, 60));
            compacting = false;
            compacted += 1;
        }
    }
    assert!(compacted >= 2 && f64::from(compacted) <= compactions(), "{compacted}: {}", tail(&log, 60));
    drop(w);
    // Stopped: the journal opens, and holds every result.
    let (code, out, err) = run(&cfg, &["journal", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(published), "{} rows", rows.as_array().map_or(0, Vec::len));
    let mut sibling = fleet.journal_path().into_os_string();
    sibling.push(".compact");
    assert!(!Path::new(&sibling).exists(), "a compaction's copy left beside the journal");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_worker_answers_journal_and_status_and_pauses_resumes_drains() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut client = Client::connect(&fleet).await;
    let w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    client.publish(&request("adm-1", "t0", &ca.leaf("adm1.example", 3), false)).await;
    let ids = vec!["adm-1".to_string()];
    let got = client.collect(Duration::from_secs(60), all_ids(&ids)).await;
    assert_eq!(got["adm-1"][0].outcome, certdeploy_core::Outcome::Deployed);

    // The worker holds the journal; the commands ask it through its socket.
    let mut sock = fleet.journal_path().into_os_string();
    sock.push(".admin.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("admin socket");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    let (code, out, err) = run(&cfg, &["journal", "list", "--json"]);
    assert_eq!(code, 0, "{err}\n{}", tail(&w.log_text(), 30));
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        rows.as_array().expect("array").iter().any(|r| r["deployment_id"] == "adm-1" && r["outcome"] == "deployed"),
        "{rows}"
    );
    let (code, out, _) = run(&cfg, &["journal", "show", "adm-1"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.split_whitespace().nth(1) == Some("finished")), "{out}");
    let (code, _, _) = run(&cfg, &["journal", "show", "nope"]);
    assert_eq!(code, 1);
    let (code, out, _) = run(&cfg, &["status", "--json"]);
    assert_eq!(code, 0);
    let st: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(st[0]["deployment_id"], "adm-1", "{st}");
    let (code, _, err) = run(&cfg, &["journal", "gc"]);
    assert_eq!(code, 1);
    assert!(err.contains("collects its journal itself"), "{err}");

    // Paused: a new request waits in the queue, untouched.
    let (code, out, err) = run(&cfg, &["control", "pause"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for("the pause logged", Duration::from_secs(30), || w.log_text().contains("consumption paused"));
    client.publish(&request("adm-2", "t0", &ca.leaf("adm2.example", 1), false)).await;
    let ids2 = vec!["adm-2".to_string()];
    let mut depth = 0;
    for _ in 0..100 {
        depth = client.broker.queue_depth("certdeploy.requests").await.expect("depth");
        if depth == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth, 1, "the request waits while the worker is paused");
    assert_eq!(fleet.reloads(&fleet.targets[0]), 1, "nothing deployed while paused");
    // Resumed: it is consumed and deployed.
    let (code, out, err) = run(&cfg, &["control", "resume"]);
    assert_eq!(code, 0, "{out}{err}");
    let got = client.collect(Duration::from_secs(60), all_ids(&ids2)).await;
    assert_eq!(
        got.get("adm-2").map(|v| v[0].outcome),
        Some(certdeploy_core::Outcome::Deployed),
        "{}",
        tail(&w.log_text(), 30)
    );
    // Drain: nothing in flight, so it answers drained at once.
    let (code, out, err) = run(&cfg, &["control", "drain"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!((v["drained"].as_bool(), v["paused"].as_bool()), (Some(true), Some(true)), "{v}");
}
