//! The worker's promises (nothing lost, no host half-deployed, each id
//! deployed once, order per target kept): the real `certdeploy worker` binary
//! against the machine's RabbitMQ (a vhost per test) and a real sshd fleet
//! on loopback addresses. Every test checks results *and* what the hosts
//! hold afterwards (files byte for byte, key matching certificate, reload
//! counts), plus what is left in the queues.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;

const REQUESTS: &str = "certdeploy.requests";
const DEAD: &str = "certdeploy.dead";

fn vhost(fleet: &Fleet) -> &Vhost {
    fleet.vhost.as_ref().expect("fleet with a broker")
}

/// Every result of one id is the same event (a re-publish, never a redo).
fn assert_identical_results(seen: &BTreeMap<String, Vec<ResultEvent>>) {
    for (id, results) in seen {
        for r in &results[1..] {
            assert_eq!(
                (&r.outcome, &r.message, &r.metadata, &r.started_at, &r.attempts),
                (
                    &results[0].outcome,
                    &results[0].message,
                    &results[0].metadata,
                    &results[0].started_at,
                    &results[0].attempts
                ),
                "{id}: results differ: {results:#?}"
            );
        }
    }
}

fn outcome_counts(seen: &BTreeMap<String, Vec<ResultEvent>>) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for results in seen.values() {
        *m.entry(results[0].outcome.as_str()).or_default() += 1;
    }
    m
}

/// After a crash, before recovery: a pair may be mid-deployment (cert new,
/// key old), but each live file must be whole: exactly one of the batch's
/// certificates / keys / the chain, never a torn write.
fn assert_files_whole(fleet: &Fleet, batch: &Batch) {
    let certs: BTreeSet<&str> = batch.items.iter().map(|i| i.bundle.cert_pem.as_str()).collect();
    let keys: BTreeSet<&str> = batch.items.iter().map(|i| i.bundle.key_pem.as_str()).collect();
    for t in &fleet.targets {
        let (c, k, ch) = fleet.files(t);
        if let Some(c) = c {
            assert!(
                certs.contains(String::from_utf8_lossy(&c).as_ref()),
                "{}: torn certificate ({} bytes)",
                t.name,
                c.len()
            );
        }
        if let Some(k) = k {
            assert!(keys.contains(String::from_utf8_lossy(&k).as_ref()), "{}: torn key ({} bytes)", t.name, k.len());
        }
        if let Some(ch) = ch {
            assert_eq!(ch, batch.items[0].bundle.chain_pem.as_bytes(), "{}: torn chain", t.name);
        }
    }
}

/// Every host holds the newest request meant for it, as a matching set.
fn assert_hosts_hold_newest(fleet: &Fleet, batch: &Batch) {
    for t in 0..fleet.targets.len() {
        let want = batch.last_for(t).map(|i| i.id.clone());
        let got = host_state(fleet, batch, t).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, want, "{} does not hold its last request", fleet.targets[t].name);
    }
}

/// Deployed ids per target index.
fn deployed_per_target(batch: &Batch, seen: &BTreeMap<String, Vec<ResultEvent>>) -> BTreeMap<usize, usize> {
    let mut m = BTreeMap::new();
    for item in &batch.items {
        if seen.get(&item.id).is_some_and(|r| r[0].outcome == Outcome::Deployed) {
            *m.entry(item.target).or_default() += 1;
        }
    }
    m
}

/// The requests queue ends empty: the broker's counts read 0 ready and 0
/// unacked for a whole stats tick, and a `basic.get` finds nothing.
async fn wait_drained(fleet: &Fleet, tap: &mut ResultTap) {
    let s = tokio::task::block_in_place(|| wait_queue_empty(vhost(fleet), REQUESTS, Duration::from_secs(30)));
    assert_eq!(s, Some((0, 0)), "requests queue (ready, unacked) at the end");
    let left = tap.drain(REQUESTS).await;
    assert!(left.is_empty(), "{} request(s) still in the queue", left.len());
}

async fn publish_all(tap: &mut ResultTap, batch: &Batch) {
    for item in &batch.items {
        tap.publish(&item.body).await;
    }
}

/// After interruptions: every request's first result is `deployed` or
/// `superseded`, repeated results agree, and each host holds its newest
/// certificate.
fn assert_batch_landed(fleet: &Fleet, batch: &Batch, ids: &[String], seen: &BTreeMap<String, Vec<ResultEvent>>) {
    for id in ids {
        let r = &seen[id];
        assert!(
            matches!(r[0].outcome, Outcome::Deployed | Outcome::Superseded),
            "{id}: {} {}",
            r[0].outcome,
            r[0].message
        );
    }
    assert_identical_results(seen);
    assert_hosts_hold_newest(fleet, batch);
}

/// The shared start of the batch tests: 5 targets, a result tap, a batch of
/// 200 requests named `prefix-*`, a worker called `worker` (default
/// config), and the batch published.
struct BatchRun {
    fleet: Fleet,
    cfg: std::path::PathBuf,
    tap: ResultTap,
    batch: Batch,
    ids: Vec<String>,
}

async fn start_batch(prefix: &str, worker: &str) -> (BatchRun, Proc) {
    let fleet = Fleet::new(5, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut tap = ResultTap::connect(&fleet).await;
    let batch = Batch::new(&fleet, prefix, 200);
    let ids = batch.ids();
    let w = Proc::worker(&fleet, &cfg, &[], worker);
    publish_all(&mut tap, &batch).await;
    (BatchRun { fleet, cfg, tap, batch, ids }, w)
}

/// Must be true #1: A batch of 200 over 5 targets: all deployed, in order per target.
#[tokio::test(flavor = "multi_thread")]
async fn batch_of_200_over_5_targets_all_deployed() {
    let start = Instant::now();
    let (BatchRun { fleet, mut tap, batch, ids, .. }, w) = start_batch("batch", "worker").await;
    let done = tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await;
    assert!(done, "results for {}/{} requests", count_done(&tap.seen, &ids), ids.len());
    tap.settle_after_drain(&fleet).await;
    let elapsed = start.elapsed();

    assert_eq!(tap.received, 200, "exactly one result per delivery");
    for id in &ids {
        let r = &tap.seen[id];
        assert_eq!(r.len(), 1, "{id}: {r:#?}");
        assert_eq!(r[0].outcome, Outcome::Deployed, "{id}: {}", r[0].message);
        assert!(r[0].success);
        assert_eq!(r[0].attempts, 1);
    }
    // In delivery order per target: the first deployment found nothing, every
    // later one snapshotted its predecessor.
    for t in 0..5 {
        for (n, item) in batch.items.iter().filter(|i| i.target == t).enumerate() {
            let want = if n == 0 { "no_pre_existing" } else { "snapshotted" };
            let md = &tap.seen[&item.id][0].metadata;
            assert_eq!(md.get("backup_status_cert").map(String::as_str), Some(want), "{}", item.id);
            assert_eq!(md.get("backup_status_key").map(String::as_str), Some(want), "{}", item.id);
        }
    }
    assert_hosts_hold_newest(&fleet, &batch);
    for (i, t) in fleet.targets.iter().enumerate() {
        assert_eq!(fleet.reloads(t), 40, "{}: one reload per deployment", t.name);
        let last = batch.last_for(i).expect("requests for every target");
        assert_eq!(std::fs::read(&t.cert).expect("cert"), last.bundle.cert_pem.as_bytes());
        assert_eq!(std::fs::read(&t.key).expect("key"), last.bundle.key_pem.as_bytes());
        assert_eq!(std::fs::read(&t.chain).expect("chain"), last.bundle.chain_pem.as_bytes());
    }
    wait_drained(&fleet, &mut tap).await;
    assert!(tap.drain(DEAD).await.is_empty(), "nothing dead-lettered");
    eprintln!("batch: 200 requests over 5 targets deployed in {elapsed:?}");
    drop(w);
    tap.close().await;
}

/// Must be true #2: The same deployment_id delivered twice deploys once and publishes
/// the same result twice.
#[tokio::test(flavor = "multi_thread")]
async fn same_deployment_id_twice_deploys_once() {
    let fleet = Fleet::new(2, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut tap = ResultTap::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();

    // Back to back: the second delivery may arrive while the first runs.
    let a = ca.leaf("a.example", 2);
    let body_a = request("dup-a", "t0", &a, true);
    tap.publish(&body_a).await;
    tap.publish(&body_a).await;
    let ids_a = vec!["dup-a".to_string()];
    assert!(tap.collect(Duration::from_secs(30), each_at_least(&ids_a, 2)).await, "two results for dup-a");

    // One after the other: the host must not be touched the second time.
    let b = ca.leaf("b.example", 2);
    let body_b = request("dup-b", "t1", &b, true);
    let ids_b = vec!["dup-b".to_string()];
    tap.publish(&body_b).await;
    assert!(tap.collect(Duration::from_secs(30), each_at_least(&ids_b, 1)).await);
    let t1 = &fleet.targets[1];
    let before: Vec<_> = [&t1.cert, &t1.key, &t1.chain].iter().map(|p| fleet.sshd.stat(p)).collect();
    let listing = fleet.sshd.list(&t1.dir);
    tap.publish(&body_b).await;
    assert!(tap.collect(Duration::from_secs(30), each_at_least(&ids_b, 2)).await);
    // A third delivery of the id with a different (newer) certificate:
    // still the recorded result, nothing written.
    let b2 = ca.leaf("b2.example", 1);
    tap.publish(&request("dup-b", "t1", &b2, true)).await;
    assert!(tap.collect(Duration::from_secs(30), each_at_least(&ids_b, 3)).await);
    tap.settle_after_drain(&fleet).await;

    for (id, n, t, bundle) in [("dup-a", 2, 0, &a), ("dup-b", 3, 1, &b)] {
        let r = &tap.seen[id];
        assert_eq!(r.len(), n, "{id}: one result per delivery: {r:#?}");
        assert_eq!(r[0].outcome, Outcome::Deployed, "{}", r[0].message);
        assert_identical_results(&tap.seen);
        let target = &fleet.targets[t];
        assert_eq!(fleet.reloads(target), 1, "{id}: deployed (and reloaded) once");
        assert_eq!(std::fs::read_to_string(&target.cert).unwrap(), bundle.cert_pem);
        assert_eq!(std::fs::read_to_string(&target.key).unwrap(), bundle.key_pem);
    }
    let after: Vec<_> = [&t1.cert, &t1.key, &t1.chain].iter().map(|p| fleet.sshd.stat(p)).collect();
    assert_eq!(format!("{before:?}"), format!("{after:?}"), "redeliveries rewrote files on t1");
    assert_eq!(listing, fleet.sshd.list(&t1.dir), "redeliveries changed t1's directory");
    wait_drained(&fleet, &mut tap).await;
    tap.close().await;
}

/// Must be true #3: SIGKILL mid-batch, twice; restart on the same journal.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_then_restart_loses_nothing() {
    let start = Instant::now();
    let (BatchRun { fleet, cfg, mut tap, batch, ids }, mut w) = start_batch("kill", "worker-1").await;
    let mut kills = Vec::new();
    for (n, (at, next)) in [(40, "worker-2"), (110, "worker-3")].into_iter().enumerate() {
        let ok = tap.collect(Duration::from_secs(40), |s| count_done(s, &ids) >= at).await;
        assert!(ok, "kill {}: only {} results", n + 1, count_done(&tap.seen, &ids));
        w.kill9();
        let done = count_done(&tap.seen, &ids);
        kills.push(done);
        // The crash may leave a pair mid-deployment, never a torn file.
        assert_files_whole(&fleet, &batch);
        w = Proc::worker(&fleet, &cfg, &[], next);
    }
    let done = tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await;
    assert!(done, "results for {}/{} requests", count_done(&tap.seen, &ids), ids.len());
    wait_drained(&fleet, &mut tap).await;
    tap.settle_after_drain(&fleet).await;

    let counts = outcome_counts(&tap.seen);
    assert_batch_landed(&fleet, &batch, &ids, &tap.seen);
    assert!(tap.drain(DEAD).await.is_empty(), "nothing dead-lettered");
    // Backups: the retention keeps one per path; a crashed attempt's links
    // are removed by recovery.
    for t in &fleet.targets {
        let backups: Vec<String> =
            fleet.sshd.list(&t.dir).into_iter().filter(|n| n.contains(".certdeploy-bak.")).collect();
        assert!(backups.len() <= 3, "{}: backups left: {backups:?}", t.name);
    }
    let recovered: Vec<u64> = ["worker-2", "worker-3"]
        .iter()
        .map(|n| {
            let log = strip_ansi(&std::fs::read_to_string(fleet.tmp.path().join(format!("{n}.log"))).unwrap());
            let line = log.lines().find(|l| l.contains("recovery done")).unwrap_or_else(|| panic!("{n}: no recovery"));
            line.split("recovered=").nth(1).and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(0)
        })
        .collect();
    assert!(recovered.iter().sum::<u64>() >= 1, "the kills interrupted no deployment: {recovered:?}");
    eprintln!(
        "sigkill: 200 requests, 2 kills (after {kills:?} results), {recovered:?} deployments recovered after \
         each, outcomes {counts:?}, {} result events ({} re-published), {:?}",
        tap.received,
        tap.received - ids.len(),
        start.elapsed()
    );
    tap.close().await;
}

/// Must be true #4: The broker drops every connection, twice, mid-batch.
#[tokio::test(flavor = "multi_thread")]
async fn broker_connection_loss_twice_mid_batch() {
    let start = Instant::now();
    let (BatchRun { fleet, mut tap, batch, ids, .. }, w) = start_batch("conn", "worker").await;
    let mut cuts = Vec::new();
    for at in [40, 110] {
        let ok = tap.collect(Duration::from_secs(40), |s| count_done(s, &ids) >= at).await;
        assert!(ok, "only {} results before cut", count_done(&tap.seen, &ids));
        vhost(&fleet).close_all_connections();
        cuts.push(count_done(&tap.seen, &ids));
    }
    let done = tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await;
    assert!(done, "results for {}/{} requests", count_done(&tap.seen, &ids), ids.len());
    wait_drained(&fleet, &mut tap).await;
    tap.settle_after_drain(&fleet).await;

    assert!(tap.reconnects >= 2, "the test client was cut too ({} reconnects)", tap.reconnects);
    let log = w.log_text();
    assert!(log.matches("reconnected to the broker").count() >= 2, "worker reconnected twice");
    let counts = outcome_counts(&tap.seen);
    assert_batch_landed(&fleet, &batch, &ids, &tap.seen);
    // Nothing deployed twice: one reload per deployed id.
    let deployed = deployed_per_target(&batch, &tap.seen);
    for (i, t) in fleet.targets.iter().enumerate() {
        assert_eq!(fleet.reloads(t), deployed.get(&i).copied().unwrap_or(0), "{}: reloads vs deployed ids", t.name);
    }
    eprintln!(
        "connection loss: 200 requests, 2 cuts (after {cuts:?} results), outcomes {counts:?}, {} result events \
         (+{} redelivered to the test client), worker acks lost {}, {:?}",
        tap.received,
        tap.duplicates_dropped,
        log.matches("ack lost").count() + log.matches("ack failed").count(),
        start.elapsed()
    );
    tap.close().await;
}

/// Must be true #5: Malformed messages are rejected and dead-lettered with a reason, in a
/// stream of valid requests that still deploy.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_rejected_and_dead_lettered() {
    let fleet = Fleet::new(2, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut tap = ResultTap::connect(&fleet).await;
    let mut w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let good = |id: &str, t: &str, b: &Bundle| request(id, t, b, true);
    let json =
        |id: &str, t: &str, b: &Bundle| -> serde_json::Value { serde_json::from_slice(&good(id, t, b)).unwrap() };

    let b0 = ca.leaf("x.example", 3);
    let mut wrong_schema = json("bad-schema", "t0", &b0);
    wrong_schema["schema"] = "certdeploy.deploy-request.v9".into();
    let mut missing = json("bad-missing", "t0", &b0);
    missing.as_object_mut().unwrap().remove("certificate_pem");
    let expired = ca.leaf_at("old.example", now - 400 * 86_400, now - 35 * 86_400);
    let other = ca.leaf("other.example", 3);
    let mut mismatch = json("bad-keymismatch", "t0", &b0);
    mismatch["private_key_pem"] = other.key_pem.clone().into();
    let mut huge = json("bad-huge", "t0", &b0);
    huge["padding"] = "x".repeat(2 * 1024 * 1024).into();
    let mut non_utf8 = b"\xff\xfe\x00".to_vec();
    non_utf8.extend_from_slice(&good("bad-utf8", "t0", &b0));

    // (deployment_id in the result, body, field the message must name, expected substring)
    let bad: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("unknown", b"this is not json".to_vec(), "body", "not valid JSON"),
        ("bad-schema", serde_json::to_vec(&wrong_schema).unwrap(), "schema", "unknown schema version"),
        ("unknown", serde_json::to_vec(&huge).unwrap(), "body", "exceeds the limit"),
        ("bad-target", good("bad-target", "nope", &b0), "target", "unknown target `nope`"),
        ("bad-missing", serde_json::to_vec(&missing).unwrap(), "certificate_pem", "missing"),
        ("unknown", non_utf8, "body", "UTF-8"),
        ("bad-expired", good("bad-expired", "t0", &expired), "certificate_pem", "expired"),
        ("bad-keymismatch", serde_json::to_vec(&mismatch).unwrap(), "private_key_pem", "does not match"),
    ];
    // Valid requests interleaved: one before every bad message and one at
    // the end, alternating targets, newer each time.
    let mut valid = Vec::new();
    for (i, (_, body, _, _)) in bad.iter().enumerate() {
        let b = ca.leaf_at(&format!("ok{i}.example"), now - 86_400 + i as i64, now + 300 * 86_400);
        let id = format!("ok-{i}");
        tap.publish(&good(&id, &format!("t{}", i % 2), &b)).await;
        valid.push((id, i % 2, b));
        tap.publish(body).await;
    }
    let b = ca.leaf_at("ok-last.example", now - 86_400 + 100, now + 300 * 86_400);
    tap.publish(&good("ok-last", "t0", &b)).await;
    valid.push(("ok-last".into(), 0, b));

    let mut want: Vec<String> = valid.iter().map(|(id, _, _)| id.clone()).collect();
    want.extend(bad.iter().map(|(id, ..)| id.to_string()).filter(|id| id != "unknown"));
    let unknowns = bad.iter().filter(|(id, ..)| *id == "unknown").count();
    let ok = tap
        .collect(Duration::from_secs(40), |s| {
            want.iter().all(|id| s.contains_key(id)) && s.get("unknown").is_some_and(|v| v.len() >= unknowns)
        })
        .await;
    assert!(ok, "results: {:?}", tap.seen.keys().collect::<Vec<_>>());
    tap.settle_after_drain(&fleet).await;

    // Rejected results name the field.
    let mut unknown_results: Vec<&ResultEvent> =
        tap.seen.get("unknown").map(|v| v.iter().collect()).unwrap_or_default();
    assert_eq!(unknown_results.len(), unknowns, "{unknown_results:#?}");
    for (id, _, field, needle) in &bad {
        let r = if *id == "unknown" {
            let pos = unknown_results
                .iter()
                .position(|r| r.message.contains(needle))
                .unwrap_or_else(|| panic!("no rejected result mentioning {needle:?}: {unknown_results:#?}"));
            unknown_results.remove(pos)
        } else {
            let v = &tap.seen[*id];
            assert_eq!(v.len(), 1, "{id}: {v:#?}");
            &v[0]
        };
        assert_eq!(r.outcome, Outcome::Rejected, "{id}: {}", r.message);
        assert!(!r.success);
        let prefix = format!("request rejected: {field}: ");
        assert!(r.message.starts_with(&prefix), "{id}: message should name `{field}`: {}", r.message);
        assert!(r.message.contains(needle), "{id}: {}", r.message);
        assert!(!r.message.contains("PRIVATE KEY"), "{id}: key material in the result");
    }

    // Every bad message is in the dead-letter queue with its reason.
    // (The dead letter follows the rejected result: poll briefly.)
    let mut dead = Vec::new();
    let t = Instant::now();
    while dead.len() < bad.len() && t.elapsed() < Duration::from_secs(10) {
        dead.extend(tap.drain(DEAD).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), bad.len(), "dead letters: {:?}", dead.iter().map(|d| &d.1).collect::<Vec<_>>());
    let mut dead_left: Vec<&(Vec<u8>, Option<String>)> = dead.iter().collect();
    for (id, body, field, needle) in &bad {
        // The dead letter is the body without the key in clear.
        let redacted = certdeploy::sealed::redact_body(body);
        let pos = dead_left
            .iter()
            .position(|(b, _)| *b == redacted)
            .unwrap_or_else(|| panic!("{id} ({needle}) not dead-lettered with its (redacted) body"));
        let text = String::from_utf8_lossy(&dead_left[pos].0);
        assert!(!text.contains("PRIVATE KEY"), "{id}: dead letter holds a private key");
        let (_, reason) = dead_left.remove(pos);
        let reason = reason.as_deref().unwrap_or_else(|| panic!("{id}: no x-certdeploy-reason header"));
        assert!(reason.starts_with(&format!("{field}: ")), "{id}: reason {reason:?}");
        assert!(reason.contains(needle), "{id}: reason {reason:?}");
    }

    // The valid ones deployed; the worker is still running.
    for (id, _, _) in &valid {
        let r = &tap.seen[id];
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].outcome, Outcome::Deployed, "{id}: {}", r[0].message);
    }
    assert!(w.child.try_wait().expect("try_wait").is_none(), "the worker exited");
    for (t, target) in fleet.targets.iter().enumerate() {
        let mine: Vec<_> = valid.iter().filter(|(_, vt, _)| *vt == t).collect();
        let (_, _, last) = mine.last().expect("valid requests per target");
        assert_eq!(std::fs::read_to_string(&target.cert).unwrap(), last.cert_pem);
        assert_eq!(std::fs::read_to_string(&target.key).unwrap(), last.key_pem);
        assert_eq!(fleet.reloads(target), mine.len(), "{}: rejected requests never touch a host", target.name);
    }
    wait_drained(&fleet, &mut tap).await;
    assert!(tap.drain(DEAD).await.is_empty(), "each bad message dead-lettered once");
    tap.close().await;
}

/// Must be true #6: SIGTERM mid-batch: exit 0 within the grace period, then a restart
/// finishes the batch without redoing anything.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_batch_exits_zero_and_restart_finishes() {
    let start = Instant::now();
    let (BatchRun { fleet, cfg, mut tap, batch, ids }, mut w) = start_batch("term", "worker-1").await; // shutdown_grace_s = 20
    assert!(tap.collect(Duration::from_secs(40), |s| count_done(s, &ids) >= 50).await, "no progress");
    w.signal("TERM");
    let t = Instant::now();
    let at_signal = count_done(&tap.seen, &ids);
    let status = w.wait_timeout(Duration::from_secs(25)).expect("worker exits within the grace period (20 s)");
    let stop_time = t.elapsed();
    assert!(status.success(), "exit status {status:?}\n{}", tail(&w.log_text(), 40));
    assert!(w.log_text().contains("worker stopped"));
    // In-flight deployments finished: every host holds a matching set.
    for t in 0..fleet.targets.len() {
        host_state(&fleet, &batch, t).unwrap_or_else(|e| panic!("after SIGTERM: {e}"));
    }
    // Everything received before the stop has its result now (the worker
    // has exited: nothing more is published).
    tap.settle().await;
    let before_restart = count_done(&tap.seen, &ids);
    let waiting = (ids.len() - before_restart) as u64;
    let state = tokio::task::block_in_place(|| {
        wait_queue_state(vhost(&fleet), REQUESTS, Duration::from_secs(20), |s| s == (waiting, 0))
    });
    assert_eq!(
        state,
        Some((waiting, 0)),
        "every request has a result or waits in the queue (ready), none held (unacked)"
    );

    let w2 = Proc::worker(&fleet, &cfg, &[], "worker-2");
    let done = tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await;
    assert!(done, "results for {}/{} requests", count_done(&tap.seen, &ids), ids.len());
    wait_drained(&fleet, &mut tap).await;
    tap.settle_after_drain(&fleet).await;

    for id in &ids {
        let r = &tap.seen[id];
        assert_eq!(r.len(), 1, "{id}: a result per delivery, none repeated: {r:#?}");
        assert_eq!(r[0].outcome, Outcome::Deployed, "{id}: {}", r[0].message);
    }
    assert_hosts_hold_newest(&fleet, &batch);
    let deployed = deployed_per_target(&batch, &tap.seen);
    for (i, t) in fleet.targets.iter().enumerate() {
        assert_eq!(fleet.reloads(t), deployed[&i], "{}: reloads vs deployed ids (nothing redone)", t.name);
    }
    assert!(!w2.log_text().contains("recovering"), "a graceful stop leaves nothing to recover");
    eprintln!(
        "sigterm: 200 requests, SIGTERM after {at_signal} results, exit 0 after {stop_time:?} with {before_restart} \
         results, the rest after restart, {:?}",
        start.elapsed()
    );
    tap.close().await;
}

/// Must be true #7: `submit --batch --wait --quiet`: exit 1 listing the failures when
/// some deployments roll back, exit 0 when all succeed.
#[test]
fn submit_batch_wait_reports_failures_in_exit_code() {
    let fleet = Fleet::new(2, true);
    let opts = Opts { reload_overrides: vec![("t1".into(), "false".into())], ..Opts::default() };
    let cfg = fleet.write_config(&opts);
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let leaf = |n: i64| ca.leaf_at(&format!("s{n}.example"), now - 86_400 + n, now + 300 * 86_400);
    let write_batch = |name: &str, lines: &[(String, &str, Bundle)]| {
        let text: String = lines
            .iter()
            .map(|(id, t, b)| format!("{}\n", String::from_utf8(request(id, t, b, true)).unwrap()))
            .collect();
        let path = fleet.tmp.path().join(name);
        write_file(&path, &text);
        path
    };

    let first: Vec<(String, &str, Bundle)> = vec![
        ("sub-1".into(), "t0", leaf(1)),
        ("sub-2".into(), "t1", leaf(2)),
        ("sub-3".into(), "t0", leaf(3)),
        ("sub-4".into(), "t1", leaf(4)),
        ("sub-5".into(), "t0", leaf(5)),
    ];
    let path = write_batch("first.jsonl", &first);
    let args = ["submit", "--batch", path.to_str().unwrap(), "--wait", "--quiet", "--timeout", "60"];
    let (code, out, err) = run(&cfg, &args);
    assert_eq!(code, 1, "some deployments rolled back\nstdout:\n{out}\nstderr:\n{err}");
    let failed = out.split("FAILED:").nth(1).unwrap_or_else(|| panic!("no FAILED section:\n{out}"));
    for id in ["sub-2", "sub-4"] {
        let line = failed.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("{id} not listed:\n{out}"));
        assert!(line.contains("t1") && line.contains("rolled_back"), "{line}");
        assert!(line.contains("reload"), "the failure names the step: {line}");
    }
    for id in ["sub-1", "sub-3", "sub-5"] {
        assert!(!failed.contains(id), "{id} succeeded but is listed:\n{out}");
    }
    assert!(out.lines().any(|l| l.starts_with("deployed") && l.trim_end().ends_with('3')), "summary:\n{out}");
    let (t0, t1) = (&fleet.targets[0], &fleet.targets[1]);
    assert_eq!(std::fs::read_to_string(&t0.cert).unwrap(), first[4].2.cert_pem);
    assert_eq!(std::fs::read_to_string(&t0.key).unwrap(), first[4].2.key_pem);
    assert_eq!(fleet.files(t1), (None, None, None), "t1 rolled back to its pre-deploy state (no files)");

    let second: Vec<(String, &str, Bundle)> = vec![("sub-6".into(), "t0", leaf(6)), ("sub-7".into(), "t0", leaf(7))];
    let path = write_batch("second.jsonl", &second);
    let args = ["submit", "--batch", path.to_str().unwrap(), "--wait", "--quiet", "--timeout", "60"];
    let (code, out, err) = run(&cfg, &args);
    assert_eq!(code, 0, "all deployed\nstdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("deployed") && l.trim_end().ends_with('2')), "summary:\n{out}");
    assert_eq!(std::fs::read_to_string(&t0.cert).unwrap(), second[1].2.cert_pem);
    assert_eq!(fleet.reloads(t0), 5);
}

/// A failed fsync poisons the journal: every later write fails too, so the
/// worker stops (exit 1, the reason in its log) instead of taking delivery
/// after delivery it cannot journal; the request goes back to the queue and
/// the restarted worker deploys it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_journal_stops_the_worker_and_the_restart_deploys() {
    let fleet = Fleet::new(1, true);
    let t0 = &fleet.targets[0];
    let cfg = fleet.write_config(&Opts::default());
    let mut client = Client::connect(&fleet).await;
    let ca = TestCa::new();
    let b = ca.leaf("poisoned.example.test", 1);
    // The worker's first journal fsync fails.
    let mut w = Proc::worker(&fleet, &cfg, &[("FAILPOINTS", "journal_fsync=return")], "poisoned");
    client.publish(&request("poisoned-1", &t0.name, &b, true)).await;
    let status = w
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the worker keeps running on a poisoned journal:\n{}", tail(&w.log_text(), 40)));
    let log = w.log_text();
    assert_eq!(status.code(), Some(1), "exit status {status}:\n{}", tail(&log, 40));
    assert!(log.contains("the journal is poisoned"), "the log says why:\n{}", tail(&log, 40));
    assert!(
        log.contains("deployment_id=poisoned-1") && log.contains("deployment could not run"),
        "the deployment met the poisoned journal (not the start):\n{}",
        tail(&log, 40)
    );
    assert_eq!(fleet.reloads(t0), 0, "nothing reloaded without a journal");
    drop(w);

    let mut w = Proc::worker(&fleet, &cfg, &[], "restarted");
    let ids = vec!["poisoned-1".to_string()];
    let seen = client.collect(Duration::from_secs(90), all_ids(&ids)).await;
    let r = seen.get("poisoned-1").and_then(|v| v.first()).unwrap_or_else(|| panic!("no result:\n{}", w.log_text()));
    assert_eq!(r.outcome, Outcome::Deployed, "{r:?}");
    assert_eq!(std::fs::read_to_string(&t0.cert).unwrap(), b.cert_pem);
    w.signal("TERM");
    assert!(w.wait_timeout(Duration::from_secs(30)).is_some());
}

#[cfg(not(feature = "failpoints"))]
#[test]
#[ignore = "needs --features certdeploy-e2e/failpoints"]
fn a_poisoned_journal_stops_the_worker_and_the_restart_deploys() {}
