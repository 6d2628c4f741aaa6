//! Target groups against the real worker binary, a real RabbitMQ (a vhost
//! of the test's own) and one real sshd serving a host per loopback
//! address: waves in order, a halted group, a group that reverts its
//! deployed members (a real nginx on the canary's files), and SIGKILLs of
//! the worker in the middle of a group.
//!
//! Each host's reload command appends `<unix ns> <sha256 prefix of the
//! certificate file>` to its reload log: when it reloaded, and what.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use certdeploy_core::wire::ResultEvent;
use certdeploy_testbed::certs::{Bundle, TestCa, request};
use certdeploy_testbed::nginx::NginxFixture;
use common::*;

/// Every event the worker published, from its durable results queue
/// (`result.#` and `group.#`): (routing key, correlation id, body).
struct Events {
    broker: certdeploy_amqp::Broker,
    consumer: certdeploy_amqp::Consumer,
    got: Vec<(String, Option<String>, serde_json::Value)>,
}

impl Events {
    async fn connect(fleet: &Fleet) -> Events {
        let cfg = fleet.broker_config("e2e-groups");
        let broker = certdeploy_amqp::connect(&cfg).await.expect("connect");
        let consumer = broker.consume_queue("certdeploy.results", "e2e-groups").await.expect("consume results");
        Events { broker, consumer, got: Vec::new() }
    }

    async fn publish(&self, body: &[u8]) {
        self.broker.publish_request(body).await.expect("publish request");
    }

    /// Receive until `until` holds (true) or `timeout` passes (false).
    async fn collect(&mut self, timeout: Duration, until: impl Fn(&Events) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !until(self) {
            match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let v: serde_json::Value = serde_json::from_slice(&d.body).expect("event is JSON");
                    let corr = d.correlation_id().map(str::to_string);
                    let _ = d.ack().await;
                    self.got.push((d.routing_key.clone(), corr, v));
                }
                _ => return until(self),
            }
        }
        true
    }

    fn groups(&self, id: &str) -> Vec<&serde_json::Value> {
        self.got
            .iter()
            .filter(|(rk, _, v)| rk.starts_with("group.") && v["deployment_id"] == id)
            .map(|e| &e.2)
            .collect()
    }

    fn children(&self, id: &str) -> BTreeMap<String, Vec<ResultEvent>> {
        let mut out: BTreeMap<String, Vec<ResultEvent>> = BTreeMap::new();
        for (rk, _, v) in &self.got {
            if rk.starts_with("result.") && v["parent_id"] == id {
                let r: ResultEvent = serde_json::from_value(v.clone()).expect("a result event");
                out.entry(r.target.clone()).or_default().push(r);
            }
        }
        out
    }
}

/// A worker identity (the group's request is kept sealed to it).
fn identity(fleet: &Fleet) -> PathBuf {
    let ident = fleet.tmp.path().join("worker.agekey");
    let out = Command::new(bin()).args(["keygen", "--out"]).arg(&ident).output().expect("keygen");
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    ident
}

/// The reload command of target `t`: log when and which certificate.
fn logging_reload(t: &Target) -> String {
    format!(
        "echo $(date +%s%N) $( (sha256sum < {} 2>/dev/null || echo missing) | cut -c1-16) >> {}",
        t.cert.display(),
        t.reload_log.display()
    )
}

/// (unix ns, certificate digest prefix) per line of a reload log.
fn reload_lines(t: &Target) -> Vec<(u128, String)> {
    fs::read_to_string(&t.reload_log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let ns = f.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("reload log line `{l}`"));
            (ns, f.next().unwrap_or("").to_string())
        })
        .collect()
}

fn sha_prefix(pem: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(pem.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The configuration: every target with the logging reload (or its
/// override), the worker's identity, and `[groups.fleet]`.
fn config(fleet: &Fleet, ident: &Path, group: &str, overrides: Vec<(String, String)>) -> PathBuf {
    config_with(fleet, ident, group, overrides, "")
}

/// [`config`] with `target_extra` lines in every target's table.
fn config_with(
    fleet: &Fleet,
    ident: &Path,
    group: &str,
    overrides: Vec<(String, String)>,
    target_extra: &str,
) -> PathBuf {
    let mut reloads: Vec<(String, String)> =
        fleet.targets.iter().map(|t| (t.name.clone(), logging_reload(t))).collect();
    for (name, cmd) in overrides {
        reloads.retain(|(n, _)| *n != name);
        reloads.push((name, cmd));
    }
    let opts = Opts {
        worker_extra: format!("key_identities = [\"{}\"]\n", ident.display()),
        reload_overrides: reloads,
        target_extra: target_extra.to_string(),
        ..Opts::default()
    };
    let path = fleet.write_config(&opts);
    let mut text = fs::read_to_string(&path).expect("config");
    text.push_str(group);
    // Idle masters close fast: a killed worker leaves its masters behind.
    let text =
        text.replacen("[ssh]\n", "[ssh]\nidle_timeout_s = 3\n", 1).replacen("concurrency = 64", "concurrency = 8", 1);
    fs::write(&path, text).expect("write config");
    path
}

fn group_section(fleet: &Fleet, waves: &str) -> String {
    let names: Vec<String> = fleet.targets.iter().map(|t| format!("\"{}\"", t.name)).collect();
    format!("\n[groups.fleet]\ntargets = [{}]\nwaves = {waves}\n", names.join(", "))
}

/// A group request: the ordinary request with `group` for `target`.
fn group_request(id: &str, b: &Bundle) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&request(id, "x", b, true)).expect("request");
    let o = v.as_object_mut().expect("object");
    o.remove("target");
    o.insert("group".into(), "fleet".into());
    serde_json::to_vec(&v).expect("json")
}

fn ms_of(rfc3339: &str) -> u128 {
    let t = humantime::parse_rfc3339_weak(rfc3339).unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
    t.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis()
}

/// No member of a wave reloaded (by its host's log: its last reload)
/// before every member of the waves before it had finished (by its
/// result's `finished_at`) and reloaded.
fn assert_waves_in_order(fleet: &Fleet, waves: &[usize], children: &BTreeMap<String, Vec<ResultEvent>>) {
    let mut start = 0;
    let mut done_ms = 0u128;
    let mut done_ns = 0u128;
    for (w, &end) in waves.iter().enumerate() {
        for t in &fleet.targets[start..end] {
            let lines = reload_lines(t);
            let first = lines.first().unwrap_or_else(|| panic!("{} never reloaded", t.name)).0;
            assert!(
                first > done_ns && first / 1_000_000 >= done_ms,
                "wave {w}: {} reloaded at {first} ns before the earlier waves finished (last reload {done_ns} ns, \
                 last finished_at {done_ms} ms)",
                t.name
            );
        }
        for t in &fleet.targets[start..end] {
            done_ns = done_ns.max(reload_lines(t).last().expect("reloaded").0);
            let r = children.get(&t.name).and_then(|v| v.last()).unwrap_or_else(|| panic!("no result for {}", t.name));
            done_ms = done_ms.max(ms_of(&r.finished_at));
        }
        start = end;
    }
}

/// Twelve members in waves [1, "25%", "100%"] (1, 3, 12): every member
/// deployed once, twelve child results and one group result `deployed`,
/// and no wave's member reloaded before the earlier waves had finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_deploys_wave_by_wave() {
    let fleet = Fleet::new(12, true);
    let ident = identity(&fleet);
    let cfg = config(&fleet, &ident, &group_section(&fleet, "[1, \"25%\", \"100%\"]"), Vec::new());
    let _worker = Proc::worker(&fleet, &cfg, &[], "worker");
    let mut ev = Events::connect(&fleet).await;
    let b = TestCa::new().leaf("fleet.example", 1);
    ev.publish(&group_request("g-waves", &b)).await;
    let done = ev.collect(Duration::from_secs(50), |e| !e.groups("g-waves").is_empty()).await;
    assert!(
        done,
        "no group result; log:\n{}",
        tail(&fs::read_to_string(fleet.tmp.path().join("worker.log")).unwrap_or_default(), 40)
    );
    let g = ev.groups("g-waves")[0].clone();
    assert_eq!(g["schema"], "certdeploy.group-result.v1");
    assert_eq!(g["outcome"], "deployed", "{g}");
    assert_eq!((g["waves"].as_u64(), g["waves_run"].as_u64(), g["members"].as_u64()), (Some(3), Some(3), Some(12)));
    assert!(g["children"].as_object().expect("children").values().all(|o| o == "deployed"), "{g}");
    let corr: Vec<&Option<String>> = ev.got.iter().map(|e| &e.1).collect();
    assert!(corr.iter().all(|c| c.as_deref() == Some("g-waves")), "correlation ids: {corr:?}");
    let children = ev.children("g-waves");
    assert_eq!(children.len(), 12, "child results: {:?}", children.keys());
    let new = sha_prefix(&b.cert_pem);
    for t in &fleet.targets {
        let r = &children[&t.name][0];
        assert_eq!(r.deployment_id, format!("g-waves:{}", t.name));
        assert_eq!((r.outcome.as_str(), r.group.as_deref()), ("deployed", Some("fleet")));
        let lines = reload_lines(t);
        assert_eq!(lines.len(), 1, "{}: reloads {lines:?}", t.name);
        assert_eq!(lines[0].1, new, "{} reloaded another certificate", t.name);
        assert_eq!(fleet.files(t).0.as_deref(), Some(b.cert_pem.as_bytes()));
    }
    assert_waves_in_order(&fleet, &[1, 3, 12], &children);
    // `journal show` (through the running worker) lists the group's records.
    let (code, out, err) = tokio::task::block_in_place(|| run(&cfg, &["journal", "show", "g-waves"]));
    assert_eq!(code, 0, "journal show: {out}{err}");
    let events: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(events.iter().filter(|e| **e == "wave_started").count(), 3, "{out}");
    assert!(events.contains(&"accepted") && events.contains(&"ended") && events.contains(&"published"), "{out}");
    assert!(out.contains("[kept sealed]") && !out.contains("AGE ENCRYPTED"), "{out}");
    // The request is kept (for a restart) sealed: no piece of the key in
    // the journal's files.
    let mut files = Vec::new();
    files_under(&fleet.journal_path(), &mut files);
    let needles: Vec<&[u8]> = b
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.as_bytes().chunks(32))
        .filter(|c| c.len() == 32)
        // Not the public part an EC key shares with its certificate.
        .filter(|c| !b.cert_pem.as_bytes().windows(32).any(|w| w == *c))
        .collect();
    assert!(!needles.is_empty());
    for f in &files {
        let bytes = fs::read(f).expect("journal file");
        for n in &needles {
            if let Some(at) = bytes.windows(n.len()).position(|w| w == *n) {
                let from = at.saturating_sub(300);
                panic!(
                    "{} holds key bytes: …{}…",
                    f.display(),
                    String::from_utf8_lossy(&bytes[from..(at + 100).min(bytes.len())])
                );
            }
        }
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { files_under(&p, out) } else { out.push(p) }
    }
}

/// The canary's reload fails with `on_failure = "halt"`: the canary is
/// rolled back, the eleven others are never touched and get `failed`
/// results with `failed_step = "halted"`, and the group is `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_halts_the_group() {
    let fleet = Fleet::new(12, true);
    let ident = identity(&fleet);
    let canary = &fleet.targets[0];
    // Fails once (the deploy's reload), then succeeds (the retry-reload
    // after the rollback).
    let flag = canary.dir.join("fail-once");
    fs::write(&flag, "").expect("flag");
    let reload = format!("{}; if [ -f {f} ]; then rm {f}; exit 1; fi", logging_reload(canary), f = flag.display());
    let section = group_section(&fleet, "[1, \"25%\", \"100%\"]") + "on_failure = \"halt\"\n";
    let cfg = config(&fleet, &ident, &section, vec![(canary.name.clone(), reload)]);
    let _worker = Proc::worker(&fleet, &cfg, &[], "worker");
    let mut ev = Events::connect(&fleet).await;
    let b = TestCa::new().leaf("fleet.example", 1);
    ev.publish(&group_request("g-canary", &b)).await;
    let done = ev
        .collect(Duration::from_secs(50), |e| !e.groups("g-canary").is_empty() && e.children("g-canary").len() == 12)
        .await;
    assert!(done, "no group result and 12 child results; got {:?}", ev.got.iter().map(|e| &e.0).collect::<Vec<_>>());
    let g = ev.groups("g-canary")[0].clone();
    assert_eq!(g["outcome"], "failed", "{g}");
    assert_eq!((g["waves_run"].as_u64(), g["counts"]["halted"].as_u64()), (Some(1), Some(11)), "{g}");
    let children = ev.children("g-canary");
    assert_eq!(children[&canary.name][0].outcome.as_str(), "rolled_back");
    assert_eq!(reload_lines(canary).len(), 2, "the canary reloads, fails, and reloads its originals");
    for t in &fleet.targets[1..] {
        let r = &children[&t.name][0];
        assert_eq!(r.outcome.as_str(), "failed", "{r:?}");
        assert_eq!(r.metadata.get("failed_step").map(String::as_str), Some("halted"), "{r:?}");
        assert!(reload_lines(t).is_empty(), "{} was reloaded", t.name);
        assert_eq!(fleet.files(t), (None, None, None), "{} was written", t.name);
        let names: Vec<String> = fs::read_dir(&t.dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.is_empty(), "{}: files {names:?}", t.name);
    }
}

/// (bytes, mode) of a file, `None` when missing.
fn file_and_mode(p: &Path) -> Option<(Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let m = fs::metadata(p).ok()?;
    Some((fs::read(p).ok()?, m.permissions().mode() & 0o7777))
}

/// A target's cert, key and chain: bytes and mode of each.
fn files_and_modes(t: &Target) -> [Option<(Vec<u8>, u32)>; 3] {
    [file_and_mode(&t.cert), file_and_mode(&t.key), file_and_mode(&t.chain)]
}

/// `on_failure = "revert"`: five members in waves [1, "50%", "100%"]
/// (1, 3, 5) all hold certificate A from a first group (no chain file,
/// cert 0644, key 0600); the worker restarts configured with other modes
/// (cert 0640, key 0400) and group B (with a chain) follows, whose last
/// member's reload fails while B is in place. That member is rolled back;
/// the four that deployed B (the canary, the second wave and the last
/// wave's other member) are reverted: each gets a result `<child>.revert`
/// on `result.reverted` (`reverts` = the child id); every member's cert,
/// key and chain are A's bytes and modes again (B's chain file removed);
/// nginx on the canary's files serves A again; the group result is
/// `reverted` on `group.reverted`, its `children` the members' own
/// outcomes and its `reverts` every reverted member. The worker dies right
/// after publishing group B's result: the next one publishes the reverts'
/// results and the group result again, the same copies.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_last_wave_reverts_every_deployed_member() {
    const SNI: &str = "fleet.example";
    let fleet = Fleet::new(5, true);
    let ident = identity(&fleet);
    let ca = TestCa::new();
    let (first, a, b) = (ca.leaf(SNI, 4), ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    // nginx on the canary's files, first serving a certificate of its own.
    let canary = fleet.targets[0].clone();
    fleet.sshd.write(&canary.cert, first.cert_pem.as_bytes(), 0o644);
    fleet.sshd.write(&canary.key, first.key_pem.as_bytes(), 0o600);
    let nginx = NginxFixture::start(&canary.cert, &canary.key, &canary.addr);
    // The last member's reload fails while B's certificate is in place
    // (its rollback puts A back, and then it succeeds).
    let last = fleet.targets[4].clone();
    let failing = format!(
        "{}; if [ \"$(sha256sum < {} | cut -c1-16)\" = {} ]; then exit 1; fi",
        logging_reload(&last),
        last.cert.display(),
        sha_prefix(&b.cert_pem)
    );
    let section = group_section(&fleet, "[1, \"50%\", \"100%\"]") + "on_failure = \"revert\"\n";
    let write_config = |modes: &str| {
        let overrides = vec![(canary.name.clone(), nginx.reload_command()), (last.name.clone(), failing.clone())];
        let path = config_with(&fleet, &ident, &section, overrides, &format!("keep_backups = 1\n{modes}"));
        let header = format!("[targets.{}]\n", canary.name);
        let nginx_lines = format!(
            "{header}validate_command = \"{}\"\nverify_endpoint = \"{}\"\nverify_sni = \"{SNI}\"\n",
            nginx.validate_command(),
            nginx.endpoint()
        );
        let text = fs::read_to_string(&path).expect("config").replacen(&header, &nginx_lines, 1);
        fs::write(&path, text).expect("write config");
        path
    };
    let cfg = write_config("cert_mode = \"0644\"\nkey_mode = \"0600\"\n");
    let mut worker = Proc::worker(&fleet, &cfg, &[], "worker-a");
    let mut ev = Events::connect(&fleet).await;
    let mut without_chain: serde_json::Value = serde_json::from_slice(&group_request("g-a", &a)).expect("json");
    without_chain.as_object_mut().expect("object").remove("chain_pem");
    ev.publish(&serde_json::to_vec(&without_chain).expect("json")).await;
    let done = ev.collect(Duration::from_secs(50), |e| !e.groups("g-a").is_empty()).await;
    assert!(done, "no result of group A:\n{}", tail(&worker.log_text(), 40));
    assert_eq!(ev.groups("g-a")[0]["outcome"], "deployed", "{}", ev.groups("g-a")[0]);
    assert_eq!(nginx.served_leaf_sha256(), a.leaf_sha256, "nginx serves A");
    let before: Vec<_> = fleet.targets.iter().map(files_and_modes).collect();
    for (t, f) in fleet.targets.iter().zip(&before) {
        assert_eq!(f[0], Some((a.cert_pem.clone().into_bytes(), 0o644)), "{} holds A", t.name);
        assert_eq!(f[1], Some((a.key_pem.clone().into_bytes(), 0o600)), "{} holds A's key", t.name);
        assert_eq!(f[2], None, "A has no chain file on {}", t.name);
    }

    // B's files get other modes: a revert must put back A's own.
    worker.signal("TERM");
    let stopped = tokio::task::block_in_place(|| worker.wait_timeout(Duration::from_secs(30)));
    assert!(stopped.is_some(), "the worker did not stop:\n{}", tail(&worker.log_text(), 20));
    let cfg = write_config("cert_mode = \"0640\"\nkey_mode = \"0400\"\n");
    // This worker dies right after publishing the group result, before
    // recording that it did: the next one publishes the reverts' results
    // and the group result again, from the journal.
    let mut first = Proc::worker(&fleet, &cfg, &[("FAILPOINTS", "group_after_publish=panic")], "worker-b");
    let reloads = nginx.reloads();
    ev.publish(&group_request("g-b", &b)).await;
    let died = tokio::task::block_in_place(|| first.wait_timeout(Duration::from_secs(60)));
    assert!(
        died.is_some_and(|s| !s.success()),
        "the failpoint did not end the worker:\n{}",
        tail(&first.log_text(), 40)
    );
    let worker = Proc::worker(&fleet, &cfg, &[], "worker-b2");
    let of_b =
        |e: &Events| e.got.iter().filter(|(rk, _, v)| rk.starts_with("result.") && v["parent_id"] == "g-b").count();
    // The members' and the reverts' results are published before the
    // group result (into the same queue).
    let done = ev.collect(Duration::from_secs(60), |e| e.groups("g-b").len() == 2).await;
    assert!(done, "no second copy of group B's result:\n{}", tail(&worker.log_text(), 40));
    let copies = ev.groups("g-b");
    assert_eq!(copies[0], copies[1], "the group result's copies differ");
    let (rk, corr, g) = ev
        .got
        .iter()
        .find(|(rk, _, v)| rk.starts_with("group.") && v["deployment_id"] == "g-b")
        .cloned()
        .expect("group result");
    assert_eq!((rk.as_str(), corr.as_deref()), ("group.reverted", Some("g-b")), "{g}");
    assert_eq!(g["outcome"], "reverted", "every deployed member reverted: {g}");
    assert_eq!((g["waves_run"].as_u64(), g["members"].as_u64()), (Some(3), Some(5)), "{g}");
    let names: Vec<&str> = fleet.targets.iter().map(|t| t.name.as_str()).collect();
    let children: BTreeMap<&str, &str> =
        names.iter().map(|&n| (n, if n == last.name { "rolled_back" } else { "deployed" })).collect();
    assert_eq!(g["children"], serde_json::json!(children), "children: the members' own outcomes");
    let reverts: BTreeMap<&str, &str> = names[..4].iter().map(|&n| (n, "reverted")).collect();
    assert_eq!(g["reverts"], serde_json::json!(reverts), "reverts: every member that deployed B");
    let counts = &g["counts"];
    assert_eq!(
        [&counts["deployed"], &counts["rolled_back"], &counts["reverted"], &counts["halted"]],
        [4, 1, 4, 0].map(serde_json::Value::from).each_ref(),
        "{g}"
    );
    for (rk, corr, v) in ev.got.iter().filter(|(_, _, v)| v["parent_id"] == "g-b" || v["deployment_id"] == "g-b") {
        assert_eq!(corr.as_deref(), Some("g-b"), "correlation id of {rk} {v}");
    }
    // Five members' results (recorded as published), four reverts'
    // results twice (before each copy of the group result).
    assert_eq!(
        of_b(&ev),
        13,
        "results of group B: {:?}",
        ev.got.iter().map(|e| (&e.0, &e.2["deployment_id"])).collect::<Vec<_>>()
    );
    let results = ev.children("g-b");
    for (i, t) in fleet.targets.iter().enumerate() {
        let child = format!("g-b:{}", t.name);
        let rs = &results[&t.name];
        let deploys: Vec<&ResultEvent> = rs.iter().filter(|r| r.deployment_id == child).collect();
        let revert_id = format!("{child}.revert");
        let revs: Vec<&ResultEvent> = rs.iter().filter(|r| r.deployment_id == revert_id).collect();
        if t.name == last.name {
            assert_eq!(deploys.len(), 1, "{rs:?}");
            assert_eq!(deploys[0].outcome.as_str(), "rolled_back", "{:?}", deploys[0]);
            assert!(revs.is_empty(), "{}: a member that did not deploy is not reverted: {revs:?}", t.name);
        } else {
            assert_eq!(deploys.len(), 1, "{rs:?}");
            assert_eq!(deploys[0].outcome.as_str(), "deployed", "{:?}", deploys[0]);
            assert_eq!(revs.len(), 2, "{}: the revert's result with each copy of the group's: {rs:?}", t.name);
            let r = revs[0];
            let again = ResultEvent { worker: r.worker.clone(), ..revs[1].clone() };
            assert_eq!(r, &again, "{}: the revert's result copies differ (apart from the publishing worker)", t.name);
            assert_eq!((r.outcome.as_str(), r.success), ("reverted", true), "{}: {}", t.name, r.message);
            assert_eq!(r.reverts.as_deref(), Some(child.as_str()), "{r:?}");
            assert_eq!((r.group.as_deref(), r.parent_id.as_deref()), (Some("fleet"), Some("g-b")), "{r:?}");
            if t.name == canary.name {
                assert!(r.message.contains("old certificate is served"), "the revert verified A: {}", r.message);
            }
        }
        // Every member ends on A's files and modes (B's chain file gone):
        // reverted, or rolled back by its own deployment.
        let now = files_and_modes(t);
        let show = |f: &[Option<(Vec<u8>, u32)>; 3]| {
            f.iter()
                .map(|x| x.as_ref().map(|(b, m)| (sha_prefix(&String::from_utf8_lossy(b)), format!("{m:o}"))))
                .collect::<Vec<_>>()
        };
        assert!(
            now == before[i],
            "{}: (cert, key, chain) now {:?}, before B {:?}",
            t.name,
            show(&now),
            show(&before[i])
        );
        assert!(fleet.leftovers(t).is_empty(), "{}: {:?}", t.name, fleet.leftovers(t));
    }
    // The reverts reloaded A: the last reload of each logging member is A's.
    let (pa, pb) = (sha_prefix(&a.cert_pem), sha_prefix(&b.cert_pem));
    for t in &fleet.targets[1..4] {
        let lines: Vec<String> = reload_lines(t).into_iter().map(|l| l.1).collect();
        assert_eq!(lines, [pa.clone(), pb.clone(), pa.clone()], "{}: reloads of A, B, A again", t.name);
    }
    assert!(nginx.reloads() >= reloads + 2, "nginx reloaded for B and for the revert");
    assert_eq!(nginx.served_leaf_sha256(), a.leaf_sha256, "nginx on the canary serves A again");
}

/// SIGKILL of the worker at random instants while a group of 30 runs,
/// restarted each time: every member deployed exactly once (one child
/// result outcome per member, re-published from its record; on its host, the
/// new certificate reloaded and kept once after any rolled-back attempt),
/// the waves in order, and every copy of the group result identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_during_a_group_deploy_no_member_twice() {
    let fleet = Fleet::new(30, true);
    let ident = identity(&fleet);
    let cfg = config(&fleet, &ident, &group_section(&fleet, "[1, \"10%\", \"40%\", \"100%\"]"), Vec::new());
    let mut ev = Events::connect(&fleet).await;
    let b = TestCa::new().leaf("fleet.example", 1);
    ev.publish(&group_request("g-crash", &b)).await;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").subsec_nanos() as u64;
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let kills = 3 + (next() % 3) as usize;
    let reloaded = |f: &Fleet| f.targets.iter().filter(|t| !reload_lines(t).is_empty()).count();
    let mut resumed = 0;
    for k in 0..kills {
        let before = reloaded(&fleet);
        if before == fleet.targets.len() {
            break;
        }
        let mut w = Proc::worker(&fleet, &cfg, &[], &format!("worker-{k}"));
        // Killed while the group runs: once one more host reloaded, after
        // a random pause (the next member may be anywhere in its steps,
        // the next wave may be starting).
        let progressed =
            tokio::task::block_in_place(|| eventually(Duration::from_secs(20), || reloaded(&fleet) > before));
        assert!(progressed, "seed {seed}: no progress after restart {k}:\n{}", tail(&w.log_text(), 30));
        let wait = Duration::from_millis(next() % 800);
        tokio::time::sleep(wait).await;
        w.kill9();
        resumed += usize::from(w.log_text().contains("resuming target group"));
        eprintln!("seed {seed}: kill {k} after {wait:?} past {before} reloaded host(s)");
    }
    let last = Proc::worker(&fleet, &cfg, &[], "worker-last");
    let done = ev.collect(Duration::from_secs(50), |e| !e.groups("g-crash").is_empty()).await;
    assert!(done, "seed {seed}: no group result");
    resumed += usize::from(last.log_text().contains("resuming target group"));
    assert!(resumed >= 1, "seed {seed}: no restart resumed the group: the kills missed it");
    // Every copy published so far; then the settled queue.
    let _ = ev.collect(Duration::from_secs(2), |_| false).await;
    let copies = ev.groups("g-crash");
    assert!(copies.windows(2).all(|c| c[0] == c[1]), "seed {seed}: group result copies differ: {copies:?}");
    let g = copies[0].clone();
    assert_eq!(g["outcome"], "deployed", "seed {seed}: {g}");
    let children = ev.children("g-crash");
    let new = sha_prefix(&b.cert_pem);
    for t in &fleet.targets {
        let rs = children.get(&t.name).unwrap_or_else(|| panic!("seed {seed}: no result for {}", t.name));
        // Copies re-published after a restart name the worker that
        // published them; everything else is the recorded report.
        let same = |a: &ResultEvent, b: &ResultEvent| {
            ResultEvent { worker: String::new(), ..a.clone() } == ResultEvent { worker: String::new(), ..b.clone() }
        };
        assert!(rs.windows(2).all(|c| same(&c[0], &c[1])), "seed {seed}: {} results differ: {rs:?}", t.name);
        assert_eq!(rs[0].outcome.as_str(), "deployed", "seed {seed}: {:?}", rs[0]);
        // The new certificate is reloaded and kept once: every earlier
        // reload of it was followed by the rollback's retry-reload.
        let lines = reload_lines(t);
        assert_eq!(lines.last().map(|l| l.1.as_str()), Some(new.as_str()), "seed {seed}: {}: {lines:?}", t.name);
        let kept = lines.windows(2).filter(|w| w[0].1 == new && w[1].1 == new).count() + 1;
        assert_eq!(kept, 1, "seed {seed}: {} deployed more than once: {lines:?}", t.name);
        assert_eq!(fleet.files(t).0.as_deref(), Some(b.cert_pem.as_bytes()), "seed {seed}: {}", t.name);
        assert!(fleet.leftovers(t).is_empty(), "seed {seed}: {}: {:?}", t.name, fleet.leftovers(t));
    }
    assert_waves_in_order(&fleet, &[1, 3, 12, 30], &children);
}

/// `certdeploy submit --batch --wait` takes a group line (`group` instead
/// of `target`): it waits for every member's result and the group's, and
/// its summary counts members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_batch_waits_for_a_group_line() {
    let fleet = Fleet::new(3, true);
    let ident = identity(&fleet);
    let cfg = config(&fleet, &ident, &group_section(&fleet, "[1]"), Vec::new());
    let _worker = Proc::worker(&fleet, &cfg, &[], "worker");
    let b = TestCa::new().leaf("fleet.example", 1);
    let mut line: serde_json::Value = serde_json::from_slice(&group_request("unused", &b)).expect("json");
    line.as_object_mut().expect("object").remove("deployment_id");
    let batch = fleet.tmp.path().join("batch.jsonl");
    fs::write(&batch, format!("{line}\n")).expect("batch");
    let (code, out, err) = tokio::task::block_in_place(|| {
        run(&cfg, &["submit", "--batch", batch.to_str().expect("utf-8"), "--wait", "--quiet", "--timeout", "50"])
    });
    assert_eq!(code, 0, "submit: {out}{err}");
    let deployed = out.lines().find(|l| l.starts_with("deployed")).unwrap_or_else(|| panic!("no deployed row: {out}"));
    assert_eq!(deployed.split_whitespace().nth(1), Some("3"), "members counted: {out}");
    assert!(out.contains("GROUPS:") && out.lines().any(|l| l.contains(" fleet deployed:")), "{out}");
    for t in &fleet.targets {
        assert_eq!(reload_lines(t).len(), 1, "{}", t.name);
    }
}

/// A worker that dies after publishing the group result and before
/// recording that: its restart publishes it again, identical (the copy
/// comes from the record, not from a new computation).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_result_published_again_after_a_crash_is_identical() {
    let fleet = Fleet::new(3, true);
    let ident = identity(&fleet);
    let cfg = config(&fleet, &ident, &group_section(&fleet, "[1]"), Vec::new());
    let mut ev = Events::connect(&fleet).await;
    let b = TestCa::new().leaf("fleet.example", 1);
    ev.publish(&group_request("g-again", &b)).await;
    let mut first = Proc::worker(&fleet, &cfg, &[("FAILPOINTS", "group_after_publish=panic")], "worker-1");
    let died = tokio::task::block_in_place(|| first.wait_timeout(Duration::from_secs(40)));
    assert!(
        died.is_some_and(|s| !s.success()),
        "the failpoint did not end the worker:\n{}",
        tail(&first.log_text(), 20)
    );
    assert!(ev.collect(Duration::from_secs(10), |e| e.groups("g-again").len() == 1).await, "the first copy");
    // Later than the first copy's: a recomputed result would differ in it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _second = Proc::worker(&fleet, &cfg, &[], "worker-2");
    assert!(ev.collect(Duration::from_secs(40), |e| e.groups("g-again").len() == 2).await, "no second copy");
    let copies = ev.groups("g-again");
    assert_eq!(copies[0], copies[1], "the copies differ");
    assert_eq!(copies[0]["outcome"], "deployed");
    for t in &fleet.targets {
        assert_eq!(reload_lines(t).len(), 1, "{} reloaded again", t.name);
    }
}

/// The worker killed at each of a group's own steps: after journaling the
/// fan-out but before the ack (the message comes back and finds the group
/// journaled), when the second wave starts, and when the group ends. The
/// restarted worker finishes the group: every member deployed once, the
/// waves in order, one result per member, the group `deployed`.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_at_each_group_step_resumes_the_group() {
    for (n, fp) in
        ["group_before_ack=panic", "group_before_wave=1*off->panic", "group_before_end=panic"].into_iter().enumerate()
    {
        let fleet = Fleet::new(4, true);
        let ident = identity(&fleet);
        let cfg = config(&fleet, &ident, &group_section(&fleet, "[1, \"50%\"]"), Vec::new());
        let mut ev = Events::connect(&fleet).await;
        let b = TestCa::new().leaf("fleet.example", 1);
        let id = format!("g-step-{n}");
        ev.publish(&group_request(&id, &b)).await;
        let mut first = Proc::worker(&fleet, &cfg, &[("FAILPOINTS", fp)], "worker-1");
        let died = tokio::task::block_in_place(|| first.wait_timeout(Duration::from_secs(40)));
        assert!(died.is_some_and(|s| !s.success()), "{fp}: the worker did not die:\n{}", tail(&first.log_text(), 20));
        let _second = Proc::worker(&fleet, &cfg, &[], "worker-2");
        let done = ev.collect(Duration::from_secs(40), |e| !e.groups(&id).is_empty()).await;
        assert!(done, "{fp}: no group result");
        let g = ev.groups(&id)[0].clone();
        assert_eq!(g["outcome"], "deployed", "{fp}: {g}");
        let children = ev.children(&id);
        for t in &fleet.targets {
            let rs = &children[&t.name];
            assert!(rs.iter().all(|r| r.outcome.as_str() == "deployed"), "{fp}: {rs:?}");
            assert_eq!(reload_lines(t).len(), 1, "{fp}: {} reloads", t.name);
        }
        assert_waves_in_order(&fleet, &[1, 2, 4], &children);
        if fp.starts_with("group_before_ack") {
            // The redelivered message found the group journaled and was acked.
            let vhost = fleet.vhost.as_ref().expect("vhost");
            let q =
                tokio::task::block_in_place(|| wait_queue_empty(vhost, "certdeploy.requests", Duration::from_secs(20)));
            assert_eq!(q, Some((0, 0)), "{fp}: the request is acked");
        }
    }
}
