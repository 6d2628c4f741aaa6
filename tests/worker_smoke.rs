//! The whole path once: `deploy` without a broker, then the worker with
//! RabbitMQ, against a real sshd.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn deploy_command_deploys_over_real_sshd() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let b = ca.leaf("web1.example", 1);
    let args = deploy_args(fleet.tmp.path(), "t0", "smoke-1", &b, true, true);
    let args = strs(&args);
    let (code, out, err) = run(&cfg, &args);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let ev: certdeploy_core::wire::ResultEvent = serde_json::from_str(out.trim()).expect("json result");
    assert_eq!(ev.outcome, certdeploy_core::Outcome::Deployed);
    let t = &fleet.targets[0];
    assert_eq!(std::fs::read_to_string(&t.cert).unwrap(), b.cert_pem);
    assert_eq!(std::fs::read_to_string(&t.key).unwrap(), b.key_pem);
    assert_eq!(fleet.reloads(t), 1);
    // Same id again: the recorded result, nothing touched.
    let (code, out, _) = run(&cfg, &args);
    assert_eq!(code, 0);
    assert!(out.contains("\"deployed\""), "{out}");
    assert_eq!(fleet.reloads(t), 1, "second run re-publishes, no second reload");
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_deploys_requests_from_rabbitmq() {
    let fleet = Fleet::new(2, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let t = &fleet.targets[i % 2];
        let b = ca.leaf("web.example", 10 - i as i64);
        let id = format!("smoke-{i}");
        client.publish(&request(&id, &t.name, &b, true)).await;
        ids.push(id);
    }
    let seen = client.collect(Duration::from_secs(120), all_ids(&ids)).await;
    for id in &ids {
        let r = &seen.get(id).unwrap_or_else(|| panic!("no result for {id}"))[0];
        assert_eq!(r.outcome, certdeploy_core::Outcome::Deployed, "{}", r.message);
    }
}

/// A redelivered id whose deployment finished gets the recorded result
/// again, even when its content would now be rejected (here: the same id
/// carrying an expired certificate); the host is not touched.
#[tokio::test(flavor = "multi_thread")]
async fn finished_id_is_answered_from_the_journal_before_validation() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let t = &fleet.targets[0];
    let good = ca.leaf("web.example", 1);
    client.publish(&request("dedupe-1", &t.name, &good, true)).await;
    let ids = vec!["dedupe-1".to_string()];
    let first = client.collect(Duration::from_secs(60), all_ids(&ids)).await;
    assert_eq!(first["dedupe-1"][0].outcome, certdeploy_core::Outcome::Deployed);

    client.publish(&request("dedupe-1", &t.name, &ca.expired_leaf("web.example", 3), true)).await;
    let again = client.collect(Duration::from_secs(60), |s| s.get("dedupe-1").is_some_and(|v| !v.is_empty())).await;
    let r = &again["dedupe-1"][0];
    assert_eq!(r.outcome, certdeploy_core::Outcome::Deployed, "{}", r.message);
    assert_eq!(r.started_at, first["dedupe-1"][0].started_at, "the recorded result, not a new one");
    assert_eq!(std::fs::read_to_string(&t.cert).unwrap(), good.cert_pem);
    assert_eq!(fleet.reloads(t), 1);
}
