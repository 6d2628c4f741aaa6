//! The bus contract, with the real `certdeploy` binary, the machine's
//! RabbitMQ (a vhost per test), a real sshd fleet and Debian's `age` CLI as
//! the independent implementation of the age format:
//!
//! - private keys sealed with age: `age -r` seals, the worker opens;
//!   `certdeploy keygen` writes an identity `age -d` uses; `submit
//!   --recipient` seals what `age -d` opens; wrong recipient and clear keys
//!   (when sealed keys are required) are rejected naming the field; no PEM
//!   key in results, dead letters, the retry queue or the worker's logs;
//! - results kept in `certdeploy.results` while nobody listens, each with
//!   its `correlation_id`; `reply_to` honoured, a missing reply queue
//!   logged and never blocking;
//! - a request that crashes the worker each time ends `failed` with
//!   `failed_step = delivery_limit` and a redacted dead letter;
//! - forged broker headers, stale requests, `submitted_by`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use certdeploy_amqp::{Broker, RequestOptions};
use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;

const RESULTS: &str = "certdeploy.results";
const DEAD: &str = "certdeploy.dead";
const RETRY: &str = "certdeploy.retry";

/// Run Debian's `age`/`age-keygen` with `input` on stdin: (success, stdout, stderr).
fn age(program: &str, args: &[&str], input: &[u8]) -> (bool, Vec<u8>, String) {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (Debian package `age`) must be installed: {e}"));
    child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Seal `plaintext` to `recipient` with `age -a -r`.
fn age_seal(recipient: &str, plaintext: &str) -> String {
    let (ok, out, err) = age("age", &["-a", "-r", recipient], plaintext.as_bytes());
    assert!(ok, "age -r: {err}");
    String::from_utf8(out).expect("armor is text")
}

/// A request body whose key travels sealed in `private_key_age`.
fn sealed_request(id: &str, target: &str, b: &Bundle, armored: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&request(id, target, b, true)).expect("json");
    let obj = v.as_object_mut().expect("object");
    obj.remove("private_key_pem");
    obj.insert("private_key_age".into(), armored.into());
    serde_json::to_vec(&v).expect("json")
}

/// A result with the AMQP `correlation_id` it came with.
#[derive(Debug)]
struct Got {
    event: ResultEvent,
    correlation_id: Option<String>,
    raw: String,
}

/// Read `queue` with `basic.get` until every id in `ids` has a result
/// (acking what it reads); results of other ids are kept too.
async fn read_results(broker: &Broker, queue: &str, ids: &[&str], timeout: Duration) -> BTreeMap<String, Vec<Got>> {
    let mut seen: BTreeMap<String, Vec<Got>> = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while !ids.iter().all(|id| seen.contains_key(*id)) && Instant::now() < deadline {
        match broker.get(queue).await.expect("basic.get") {
            Some(d) => {
                d.ack().await.expect("ack");
                let raw = String::from_utf8_lossy(&d.body).into_owned();
                let event: ResultEvent = serde_json::from_slice(&d.body).expect("result parses");
                let correlation_id = d.correlation_id().map(str::to_string);
                seen.entry(event.deployment_id.clone()).or_default().push(Got { event, correlation_id, raw });
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    seen
}

/// Every message of a queue: (body, reason header).
async fn drain(broker: &Broker, queue: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    while let Some(d) = broker.get(queue).await.expect("basic.get") {
        d.ack().await.expect("ack");
        out.push((String::from_utf8_lossy(&d.body).into_owned(), d.reason()));
    }
    out
}

/// No line of any of the keys' base64 in `text`, and no PEM private key block.
fn assert_no_key(what: &str, text: &str, keys: &[&str]) {
    assert!(!text.contains("PRIVATE KEY-----"), "{what}: holds a PEM private key block");
    for key in keys {
        for line in key.lines().filter(|l| !l.starts_with("-----") && l.len() > 16) {
            assert!(!text.contains(line), "{what}: holds a line of a private key");
        }
    }
}

/// The config file with `concurrency = 1` (a consumer prefetch of one).
fn one_at_a_time(cfg: std::path::PathBuf) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&cfg).expect("config");
    assert!(text.contains("concurrency = 64\n"), "{text}");
    std::fs::write(&cfg, text.replace("concurrency = 64\n", "concurrency = 1\n")).expect("config");
    cfg
}

async fn client(fleet: &Fleet) -> Broker {
    certdeploy_amqp::connect(&fleet.broker_config("bus-test")).await.expect("connect")
}

/// Must be true: sealed keys with the `age` CLI as the independent
/// implementation, in both directions, and no key in clear anywhere the
/// worker writes.
#[tokio::test(flavor = "multi_thread")]
async fn sealed_keys_interoperate_with_the_age_cli_and_never_leak() {
    let fleet = Fleet::new(3, true);
    let dir = fleet.tmp.path().to_path_buf();
    let ident = dir.join("worker.agekey");

    // keygen: an identity file 0600, only the recipient on stdout.
    let out = Command::new(bin()).args(["keygen", "--out"]).arg(&ident).output().expect("keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1, "only the recipient: {stdout}");
    let recipient = stdout.trim().to_string();
    assert!(recipient.starts_with("age1"), "{recipient}");
    assert_eq!(std::fs::metadata(&ident).unwrap().permissions().mode() & 0o777, 0o600);
    let again = Command::new(bin()).args(["keygen", "--out"]).arg(&ident).output().expect("keygen");
    assert!(!again.status.success(), "keygen must not overwrite an identity");
    // age-keygen agrees on the recipient of that identity.
    let (ok, y, err) = age("age-keygen", &["-y", ident.to_str().unwrap()], b"");
    assert!(ok, "age-keygen -y: {err}");
    assert_eq!(String::from_utf8_lossy(&y).trim(), recipient);
    // Direction 1: `age -r` seals, `age -d -i <keygen's file>` opens.
    let (ok, plain, err) =
        age("age", &["-d", "-i", ident.to_str().unwrap()], age_seal(&recipient, "probe\n").as_bytes());
    assert!(ok && plain == b"probe\n", "age -d with keygen's identity: {err}");
    // Direction 2: certdeploy's sealing opens with `age -d`.
    let r = certdeploy::sealed::parse_recipient(&recipient).expect("recipient");
    let ours = certdeploy::sealed::seal(&[r], b"ours\n").expect("seal");
    let (ok, plain, err) = age("age", &["-d", "-i", ident.to_str().unwrap()], ours.as_bytes());
    assert!(ok && plain == b"ours\n", "age -d of certdeploy's seal: {err}");

    // A stranger's identity (age-keygen).
    let stranger_file = dir.join("stranger.agekey");
    let (ok, _, err) = age("age-keygen", &["-o", stranger_file.to_str().unwrap()], b"");
    assert!(ok, "age-keygen: {err}");
    let (_, y, _) = age("age-keygen", &["-y", stranger_file.to_str().unwrap()], b"");
    let stranger = String::from_utf8_lossy(&y).trim().to_string();

    let worker_extra = format!("key_identities = [\"{}\"]\nrequire_sealed_keys = true\n", ident.display());
    let cfg = fleet.write_config(&Opts { worker_extra: worker_extra.clone(), ..Opts::default() });

    // The identity file's permissions are checked at start.
    std::fs::set_permissions(&ident, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut w = Proc::worker(&fleet, &cfg, &[], "refused");
    let status = w.wait_timeout(Duration::from_secs(20)).expect("a worker with a readable identity exits");
    assert_eq!(status.code(), Some(2), "{}", w.log_text());
    let log = w.log_text();
    assert!(log.contains("key_identities") && log.contains("0640") && log.contains("worker.agekey"), "{log}");
    std::fs::set_permissions(&ident, std::fs::Permissions::from_mode(0o400)).unwrap();

    let w = Proc::worker(&fleet, &cfg, &[], "worker");
    let broker = client(&fleet).await;
    let ca = TestCa::new();
    let (a, b, c, d) =
        (ca.leaf("a.example", 2), ca.leaf("b.example", 2), ca.leaf("c.example", 2), ca.leaf("d.example", 2));
    // a: sealed by the age CLI. c: sealed to a stranger. d: in clear. e: not age at all.
    broker.publish_request(&sealed_request("seal-a", "t0", &a, &age_seal(&recipient, &a.key_pem))).await.unwrap();
    broker.publish_request(&sealed_request("seal-c", "t2", &c, &age_seal(&stranger, &c.key_pem))).await.unwrap();
    broker.publish_request(&request("seal-d", "t2", &d, true)).await.unwrap();
    broker
        .publish_request(&sealed_request("seal-e", "t2", &d, "-----BEGIN AGE ENCRYPTED FILE-----\nnope\n"))
        .await
        .unwrap();
    // b: `certdeploy submit --recipient` seals it.
    let (kb, cb, chb) = (dir.join("b.key"), dir.join("b.pem"), dir.join("b.chain"));
    write_file(&kb, &b.key_pem);
    write_file(&cb, &b.cert_pem);
    write_file(&chb, &b.chain_pem);
    let (code, _, err) = run(
        &cfg,
        &[
            "submit",
            "--target",
            "t1",
            "--id",
            "seal-b",
            "--cert",
            cb.to_str().unwrap(),
            "--key",
            kb.to_str().unwrap(),
            "--chain",
            chb.to_str().unwrap(),
            "--recipient",
            &recipient,
        ],
    );
    assert_eq!(code, 0, "{err}");

    let ids = ["seal-a", "seal-b", "seal-c", "seal-d", "seal-e"];
    let seen = read_results(&broker, RESULTS, &ids, Duration::from_secs(60)).await;
    assert!(ids.iter().all(|id| seen.contains_key(*id)), "results: {:?}\n{}", seen.keys(), tail(&w.log_text(), 40));
    assert_eq!(seen["seal-b"][0].event.submitted_by.as_deref(), Some("guest"), "submit sets its user_id");
    for (id, bundle, t) in [("seal-a", &a, 0), ("seal-b", &b, 1)] {
        let r = &seen[id][0].event;
        assert_eq!(r.outcome, Outcome::Deployed, "{id}: {}", r.message);
        let target = &fleet.targets[t];
        assert_eq!(
            std::fs::read_to_string(&target.key).unwrap(),
            bundle.key_pem,
            "{id}: the opened key is on the host"
        );
        assert_eq!(std::fs::read_to_string(&target.cert).unwrap(), bundle.cert_pem);
    }
    for (id, field) in [("seal-c", "private_key_age"), ("seal-d", "private_key_pem"), ("seal-e", "private_key_age")] {
        let r = &seen[id][0].event;
        assert_eq!(r.outcome, Outcome::Rejected, "{id}: {}", r.message);
        assert!(r.message.starts_with(&format!("request rejected: {field}: ")), "{id}: {}", r.message);
    }
    assert!(seen["seal-c"][0].event.message.contains("identit"), "{}", seen["seal-c"][0].event.message);
    assert!(fleet.files(&fleet.targets[2]).0.is_none(), "rejected requests never touch a host");

    // Nothing in clear: results, dead letters (with their reasons), the
    // retry queue, the worker's logs.
    let keys = [a.key_pem.as_str(), b.key_pem.as_str(), c.key_pem.as_str(), d.key_pem.as_str()];
    for (id, v) in &seen {
        for g in v {
            assert_no_key(&format!("result of {id}"), &g.raw, &keys);
        }
    }
    let mut dead = Vec::new();
    let t = Instant::now();
    while dead.len() < 3 && t.elapsed() < Duration::from_secs(10) {
        dead.extend(drain(&broker, DEAD).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 3, "the three rejected requests are dead-lettered");
    for (body, reason) in &dead {
        assert_no_key("dead letter", body, &keys);
        assert_no_key("dead letter reason", reason.as_deref().unwrap_or(""), &keys);
        assert!(!body.contains("private_key_pem"), "{body}");
    }
    assert!(dead.iter().any(|(b, _)| b.contains("seal-d")), "the clear request is dead-lettered, redacted");
    assert!(drain(&broker, RETRY).await.is_empty());
    let log = w.log_text();
    assert!(log.contains("seal-a"), "the log is the worker's");
    assert_no_key("worker log", &log, &keys);
    broker.close().await;
}

/// Must be true: a request deferred because its target is locked waits in
/// the retry queue sealed to the worker's first identity (`age -d` opens
/// it), then deploys; who submitted it survives the trip.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_clear_request_waits_sealed_and_keeps_its_submitter() {
    let fleet = Fleet::new(1, true);
    let dir = fleet.tmp.path().to_path_buf();
    let ident = dir.join("worker.agekey");
    let out = Command::new(bin()).args(["keygen", "--out"]).arg(&ident).output().expect("keygen");
    assert!(out.status.success());
    let t0 = fleet.targets[0].clone();
    let opts = Opts {
        worker_extra: format!("key_identities = [\"{}\"]\ndefer_delay_ms = 1500\nlock_lease_s = 10\n", ident.display()),
        reload_command: Some(format!("sleep 4 && echo reload >> {}", t0.reload_log.display())),
        ..Opts::default()
    };
    let cfg = one_at_a_time(fleet.write_config(&opts));
    // A second worker with its own journal, on the same target.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let journal2 = dir.join("journal-2");
    let cfg2 = dir.join("certdeploy-2.toml");
    std::fs::write(&cfg2, text.replace(&fleet.journal_path().display().to_string(), &journal2.display().to_string()))
        .unwrap();
    let _wa = Proc::worker(&fleet, &cfg, &[], "worker-a");
    let _wb = Proc::spawn(&cfg2, &["worker"], &[], dir.join("worker-b.log"));
    let broker = client(&fleet).await;
    let ca = TestCa::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let first = ca.leaf_at("first.example", now - 7200, now + 86_400 * 90);
    let second = ca.leaf_at("second.example", now - 3600, now + 86_400 * 90);
    let as_guest = RequestOptions { user_id: Some("guest".into()), ..RequestOptions::default() };
    broker.publish_request_with(&request("lock-1", "t0", &first, true), &as_guest).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.publish_request_with(&request("lock-2", "t0", &second, true), &as_guest).await.unwrap();

    // Catch the deferred copy in the retry queue, look, and put it back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let copy = loop {
        assert!(Instant::now() < deadline, "no deferred copy in {RETRY}");
        if let Some(d) = broker.get(RETRY).await.expect("basic.get") {
            let body = d.body.clone();
            d.reject_requeue().await.expect("requeue");
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = String::from_utf8(copy.clone()).expect("utf-8");
    assert_no_key("deferred copy", &text, &[&second.key_pem]);
    let v: serde_json::Value = serde_json::from_slice(&copy).expect("json");
    assert!(v.get("private_key_pem").is_none(), "{v}");
    let armored = v["private_key_age"].as_str().expect("sealed key");
    let (ok, plain, err) = age("age", &["-d", "-i", ident.to_str().unwrap()], armored.as_bytes());
    assert!(ok, "age -d: {err}");
    assert_eq!(String::from_utf8(plain).unwrap(), second.key_pem, "sealed to the worker's first identity");

    let seen = read_results(&broker, RESULTS, &["lock-1", "lock-2"], Duration::from_secs(90)).await;
    for id in ["lock-1", "lock-2"] {
        let r = &seen.get(id).unwrap_or_else(|| panic!("no result for {id}"))[0];
        assert_eq!(r.event.outcome, Outcome::Deployed, "{id}: {}", r.event.message);
        assert_eq!(r.event.submitted_by.as_deref(), Some("guest"), "{id}");
    }
    assert_eq!(std::fs::read_to_string(&t0.key).unwrap(), second.key_pem);
    broker.close().await;
}

/// Must be true: the results of a batch published while no consumer is
/// bound are all in `certdeploy.results` after the worker restarts, each
/// with its `correlation_id`; `reply_to` requests also get theirs on the
/// reply queue, the others do not; a missing reply queue is logged and
/// does not hold the ack.
#[tokio::test(flavor = "multi_thread")]
async fn results_wait_in_the_results_queue_and_reply_to_is_honoured() {
    let fleet = Fleet::new(3, true);
    let cfg = fleet.write_config(&Opts::default());
    let vhost = fleet.vhost.as_ref().expect("broker");
    let mut w = Proc::worker(&fleet, &cfg, &[], "worker-1");
    let broker = client(&fleet).await;
    // The reply queue: a durable queue of the requester.
    let reply_queue = "requester.replies";
    let expr = format!(
        "rabbit_amqqueue:declare(rabbit_misc:r(<<\"{}\">>, queue, <<\"{reply_queue}\">>), true, false, [], none, \
         <<\"guest\">>).",
        vhost.name
    );
    certdeploy_testbed::rabbit::rabbitmqctl(&["eval", &expr]);

    // The worker declared it: quorum, bounded, oldest dropped first, bound
    // to every result and group result.
    let queues =
        certdeploy_testbed::rabbit::rabbitmqctl(&["list_queues", "-q", "-p", &vhost.name, "name", "type", "arguments"]);
    let line = queues.lines().find(|l| l.starts_with("certdeploy.results\t")).unwrap_or_else(|| panic!("{queues}"));
    for want in ["\tquorum\t", "x-max-length", "1000000", "x-overflow", "drop-head"] {
        assert!(line.contains(want), "{want}: {line}");
    }
    let bindings = certdeploy_testbed::rabbit::rabbitmqctl(&["list_bindings", "-q", "-p", &vhost.name]);
    for key in ["result.#", "group.#"] {
        let want = format!("certdeploy.events\texchange\tcertdeploy.results\tqueue\t{key}");
        assert!(bindings.lines().any(|l| l.starts_with(&want)), "{want}: {bindings}");
    }

    let batch = Batch::new(&fleet, "keep", 12);
    let ids = batch.ids();
    let with_reply: Vec<&str> = ids.iter().take(3).map(String::as_str).collect();
    let missing_reply = ids[3].as_str();
    for item in &batch.items {
        let reply_to = if with_reply.contains(&item.id.as_str()) {
            Some(reply_queue.to_string())
        } else if item.id == missing_reply {
            Some("no.such.queue".to_string())
        } else {
            None
        };
        broker
            .publish_request_with(&item.body, &RequestOptions { reply_to, ..RequestOptions::default() })
            .await
            .unwrap();
    }
    // Nobody reads results; the worker answers everything (the requests
    // queue drains), then restarts.
    let s = tokio::task::block_in_place(|| wait_queue_empty(vhost, "certdeploy.requests", Duration::from_secs(90)));
    assert_eq!(s, Some((0, 0)), "every request answered and acked\n{}", tail(&w.log_text(), 40));
    w.kill9();
    let log1 = w.log_text();
    assert!(log1.contains("reply_to queue does not exist") && log1.contains("no.such.queue"), "{}", tail(&log1, 40));
    let w2 = Proc::worker(&fleet, &cfg, &[], "worker-2");

    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let seen = read_results(&broker, RESULTS, &id_refs, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), ids.len(), "{:?}", seen.keys());
    for id in &ids {
        let got = &seen[id];
        assert_eq!(got.len(), 1, "{id}: one result");
        assert_eq!(got[0].event.outcome, Outcome::Deployed, "{id}: {}", got[0].event.message);
        assert_eq!(got[0].correlation_id.as_deref(), Some(id.as_str()), "{id}: correlation_id");
        assert!(got[0].event.submitted_by.is_none(), "no user_id, no submitted_by");
    }
    let replies = read_results(&broker, reply_queue, &with_reply, Duration::from_secs(10)).await;
    assert_eq!(replies.keys().map(String::as_str).collect::<Vec<_>>(), with_reply, "exactly the reply_to requests");
    for (id, got) in &replies {
        assert_eq!(got.len(), 1, "{id}");
        assert_eq!(got[0].correlation_id.as_deref(), Some(id.as_str()));
        assert_eq!(got[0].event, seen[id][0].event, "{id}: the same result");
    }
    assert!(broker.get(reply_queue).await.unwrap().is_none(), "nothing else on the reply queue");
    assert!(drain(&broker, DEAD).await.is_empty(), "nothing dead-lettered");
    drop(w2);
    broker.close().await;
}

/// A request whose processing crashes the worker every time (failpoint
/// `worker_crash_on`), with the worker restarted after each crash as a
/// supervisor would: after `delivery_limit` crashes the last delivery is
/// answered `failed` / `delivery_limit` and dead-lettered redacted; the
/// other requests deploy. `concurrency = 1`: a worker that dies holds only
/// the request it is processing (every message a dying worker holds is
/// counted as a delivery by the broker, see the README).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_crashes_the_worker_ends_delivery_limit() {
    let fleet = Fleet::new(2, true);
    let limit = 3;
    let cfg = one_at_a_time(
        fleet.write_config(&Opts { worker_extra: format!("delivery_limit = {limit}\n"), ..Opts::default() }),
    );
    let broker = client_with_limit(&fleet, limit).await;
    let batch = Batch::new(&fleet, "loop", 8);
    let ids = batch.ids();
    let poison = ids[3].clone();
    for item in &batch.items {
        broker.publish_request(&item.body).await.unwrap();
    }
    let env = [("FAILPOINTS", format!("worker_crash_on=return({poison})"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut crashes = 0;
    let mut seen: BTreeMap<String, Vec<Got>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !id_refs.iter().all(|id| seen.contains_key(*id)) {
        assert!(Instant::now() < deadline, "results: {:?} after {crashes} crashes", seen.keys());
        let mut w = Proc::worker(&fleet, &cfg, &env, &format!("worker-{crashes}"));
        // Collect while the worker lives; a crash ends this round.
        loop {
            for (id, mut v) in read_results(&broker, RESULTS, &id_refs, Duration::from_millis(500)).await {
                seen.entry(id).or_default().append(&mut v);
            }
            if id_refs.iter().all(|id| seen.contains_key(*id)) {
                break;
            }
            if let Ok(Some(status)) = w.child.try_wait() {
                assert!(!status.success(), "the worker stopped without crashing: {}", tail(&w.log_text(), 30));
                assert!(w.log_text().contains("failpoint worker_crash_on"), "{}", tail(&w.log_text(), 30));
                crashes += 1;
                break;
            }
            assert!(Instant::now() < deadline, "stuck: {}", tail(&w.log_text(), 30));
        }
    }
    assert_eq!(crashes, limit, "one crash per delivery before the last one");
    let r = &seen[&poison];
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].event.outcome, Outcome::Failed, "{}", r[0].event.message);
    assert_eq!(r[0].event.metadata.get("failed_step").map(String::as_str), Some("delivery_limit"));
    assert_eq!(r[0].correlation_id.as_deref(), Some(poison.as_str()));
    for id in ids.iter().filter(|id| **id != poison) {
        assert_eq!(seen[id][0].event.outcome, Outcome::Deployed, "{id}: {}", seen[id][0].event.message);
    }
    let dead = drain(&broker, DEAD).await;
    assert_eq!(dead.len(), 1, "only the worker's own copy, nothing from the broker: {dead:?}");
    let (body, reason) = &dead[0];
    assert!(body.contains(&poison) && !body.contains("private_key_pem"), "redacted copy: {body}");
    let item = batch.item(&poison).expect("poison");
    assert_no_key("dead letter", body, &[&item.bundle.key_pem]);
    assert!(reason.as_deref().is_some_and(|r| r.starts_with("delivery_limit")), "{reason:?}");
    broker.close().await;
}

/// Connect with the topology of a worker whose delivery limit is `limit`.
async fn client_with_limit(fleet: &Fleet, limit: u32) -> Broker {
    let mut c = fleet.broker_config("bus-test");
    c.topology.delivery_limit = limit;
    certdeploy_amqp::connect(&c).await.expect("connect")
}

/// Headers a publisher writes prove nothing: a forged `x-delivery-count`
/// on a first delivery does not end a request. Stale requests are rejected
/// naming `requested_at`; `submitted_by` is the broker-validated `user_id`.
#[tokio::test(flavor = "multi_thread")]
async fn forged_headers_stale_requests_and_submitted_by() {
    let fleet = Fleet::new(2, true);
    let cfg = fleet.write_config(&Opts { worker_extra: "max_request_age_s = 3600\n".into(), ..Opts::default() });
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let broker = client(&fleet).await;
    let ca = TestCa::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let fresh = |id: &str, t: &str, b: &Bundle| {
        let mut v: serde_json::Value = serde_json::from_slice(&request(id, t, b, true)).unwrap();
        v["requested_at"] = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().into();
        serde_json::to_vec(&v).unwrap()
    };
    let (a, b, c) =
        (ca.leaf_at("a.example", now - 60, now + 90 * 86_400), ca.leaf("b.example", 2), ca.leaf("c.example", 2));
    let forged = RequestOptions {
        user_id: Some("guest".into()),
        int_headers: vec![("x-delivery-count".into(), 99)],
        ..RequestOptions::default()
    };
    broker.publish_request_with(&fresh("forged", "t0", &a), &forged).await.unwrap();
    // requested_at of the testbed's requests is 2026-11-27T21:00:00Z: days old.
    broker.publish_request(&request("stale", "t1", &b, true)).await.unwrap();
    let mut no_time: serde_json::Value = serde_json::from_slice(&request("undated", "t1", &c, true)).unwrap();
    no_time.as_object_mut().unwrap().remove("requested_at");
    broker.publish_request(&serde_json::to_vec(&no_time).unwrap()).await.unwrap();
    // A user_id that is not the connection's user is refused by the broker
    // (which closes that publishing channel: a connection of its own).
    let impostor = RequestOptions { user_id: Some("admin".into()), ..RequestOptions::default() };
    let other = client(&fleet).await;
    assert!(other.publish_request_with(&fresh("impostor", "t1", &c), &impostor).await.is_err());

    let seen = read_results(&broker, RESULTS, &["forged", "stale", "undated"], Duration::from_secs(60)).await;
    let r = &seen.get("forged").expect("result")[0].event;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert_eq!(r.submitted_by.as_deref(), Some("guest"));
    for id in ["stale", "undated"] {
        let r = &seen.get(id).expect("result")[0].event;
        assert_eq!(r.outcome, Outcome::Rejected, "{id}: {}", r.message);
        assert!(r.message.starts_with("request rejected: requested_at: "), "{id}: {}", r.message);
        assert!(r.submitted_by.is_none());
    }
    assert!(seen["stale"][0].event.message.contains("stale"), "{}", seen["stale"][0].event.message);
    assert!(fleet.files(&fleet.targets[1]).0.is_none(), "rejected requests never touch a host");
    broker.close().await;
}
