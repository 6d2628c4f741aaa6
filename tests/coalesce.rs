//! One reload for many certificates, against a real nginx serving one TLS
//! server per certificate (SNI names) and a real sshd, deployments
//! submitted together over RabbitMQ to a real worker: deployments to the
//! same host account with the same validate (`nginx -t`) and reload
//! commands share them; a broken certificate among them makes the shared
//! validate fail, every member rolls back and deploys again alone, so only
//! the broken one ends `rolled_back`. Reloads are counted by the reload
//! command itself (a line per run in a log file), and nginx's own log.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use certdeploy_testbed::nginx::{NginxFixture, sha1_signed_bundle};
use common::*;

struct Many {
    fleet: Fleet,
    nginx: NginxFixture,
    cfg: PathBuf,
    metrics: String,
    /// Lines appended by each run of the reload command.
    reload_log: PathBuf,
}

fn sni(i: usize) -> String {
    format!("s{i}.example")
}

/// `n` targets on one host (one sshd address), each its own certificate,
/// key and chain path and its own SNI name in one nginx config, installed
/// with `originals`; the worker configured with nginx's validate and
/// reload commands, verify per SNI name, and `worker_extra`.
fn many(originals: &[Bundle], worker_extra: &str) -> Many {
    let mut fleet = Fleet::new(1, true);
    let base = fleet.targets[0].clone();
    fleet.targets = (0..originals.len())
        .map(|i| Target {
            name: format!("s{i}"),
            cert: base.dir.join(format!("s{i}.pem")),
            key: base.dir.join(format!("s{i}.key")),
            chain: base.dir.join(format!("s{i}.chain.pem")),
            ..base.clone()
        })
        .collect();
    for (t, b) in fleet.targets.iter().zip(originals) {
        fleet.sshd.write(&t.cert, b.cert_pem.as_bytes(), 0o644);
        fleet.sshd.write(&t.key, b.key_pem.as_bytes(), 0o600);
        fleet.sshd.write(&t.chain, b.chain_pem.as_bytes(), 0o644);
    }
    let sites: Vec<_> =
        fleet.targets.iter().enumerate().map(|(i, t)| (Some(sni(i)), t.cert.clone(), t.key.clone())).collect();
    let nginx = NginxFixture::start_sites(&sites, &base.addr);
    let reload_log = base.dir.join("reloads.log");
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = fleet.write_config(&Opts {
        validate_command: Some(nginx.validate_command()),
        reload_command: Some(format!("echo reload >> {} && {}", reload_log.display(), nginx.reload_command())),
        worker_extra: format!("verify_budget_ms = 20000\nverify_consecutive = 1\nverify_window_ms = 0\n{worker_extra}"),
        ..Opts::default()
    });
    // Verify per target: its own SNI name on the one nginx endpoint.
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    for i in 0..originals.len() {
        text = text.replace(
            &format!("[targets.s{i}]\n"),
            &format!("[targets.s{i}]\nverify_endpoint = \"{}\"\nverify_sni = \"{}\"\n", nginx.endpoint(), sni(i)),
        );
    }
    text = text.replace("metrics_listen = \"\"", &format!("metrics_listen = \"{metrics}\""));
    std::fs::write(&cfg, text).expect("config");
    Many { fleet, nginx, cfg, metrics, reload_log }
}

fn reload_runs(m: &Many) -> usize {
    std::fs::read_to_string(&m.reload_log).map(|s| s.lines().count()).unwrap_or(0)
}

/// Publish one request per target at once and collect every result.
async fn deploy_all(m: &Many, prefix: &str, bundles: &[Bundle]) -> Vec<ResultEvent> {
    let mut client = Client::connect(&m.fleet).await;
    let ids: Vec<String> = (0..bundles.len()).map(|i| format!("{prefix}-{i}")).collect();
    for (i, b) in bundles.iter().enumerate() {
        client.publish(&request(&ids[i], &format!("s{i}"), b, true)).await;
    }
    let seen = client.collect(Duration::from_secs(240), all_ids(&ids)).await;
    ids.iter()
        .map(|id| seen.get(id).and_then(|v| v.first()).cloned().unwrap_or_else(|| panic!("no result for {id}")))
        .collect()
}

fn reloads_saved(m: &Many) -> f64 {
    let (_, body) = get(&m.metrics, "/metrics").expect("metrics");
    sample(&body, "certdeploy_reloads_saved_total").unwrap_or(0.0)
}

const N: usize = 50;

/// 50 certificates on one nginx host, submitted together: every one
/// `deployed`, served on its own SNI name, nginx reloaded a handful of
/// times (not 50), each result saying how many shared its reload; the
/// reloads saved are counted.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_certificates_on_one_host_share_a_handful_of_reloads() {
    let ca = TestCa::new();
    let originals: Vec<Bundle> = (0..N).map(|i| ca.leaf(&sni(i), 3)).collect();
    let news: Vec<Bundle> = (0..N).map(|i| ca.leaf(&sni(i), 2)).collect();
    let m = many(&originals, "");
    let _w = Proc::worker(&m.fleet, &m.cfg, &[], "worker");

    let results = deploy_all(&m, "many", &news).await;
    for r in &results {
        assert_eq!(r.outcome, Outcome::Deployed, "{}: {}", r.deployment_id, r.message);
    }
    let runs = reload_runs(&m);
    eprintln!("{N} deployments, {runs} reload runs, shared with: {:?}", sizes(&results));
    assert!(runs <= 5, "{N} deployments reloaded nginx {runs} times (a handful at most)");
    // Each reload was shared by the deployments whose results say so.
    let shares: f64 = results.iter().map(|r| 1.0 / f64::from(r.reload_shared_with.expect("reload_shared_with"))).sum();
    assert_eq!(shares.round() as usize, runs, "sizes of the shared reloads: {:?}", sizes(&results));
    assert_eq!(reloads_saved(&m), (N - runs) as f64, "reloads saved");
    m.nginx.wait_settled(Duration::from_secs(20));
    assert!(m.nginx.reloads() <= runs, "nginx saw no more reloads than were run:\n{}", m.nginx.error_log());
    for (i, b) in news.iter().enumerate() {
        assert_eq!(m.nginx.served_leaf_sha256_for(&sni(i)), b.leaf_sha256, "{} serves its new certificate", sni(i));
        assert_eq!(m.fleet.sshd.read(&m.fleet.targets[i].cert), b.cert_pem.as_bytes());
    }
}

fn sizes(results: &[ResultEvent]) -> Vec<Option<u32>> {
    results.iter().map(|r| r.reload_shared_with).collect()
}

/// One broken certificate among 50 (nginx refuses it: `nginx -t` fails):
/// that one ends `rolled_back` and serves its original, the other 49 are
/// `deployed` (rolled back with it, then deployed again alone) and serve
/// their new certificates.
#[tokio::test(flavor = "multi_thread")]
async fn one_broken_certificate_among_fifty_rolls_back_alone() {
    let ca = TestCa::new();
    let originals: Vec<Bundle> = (0..N).map(|i| ca.leaf(&sni(i), 3)).collect();
    let broken = 17;
    let news: Vec<Bundle> =
        (0..N).map(|i| if i == broken { sha1_signed_bundle(&sni(i)) } else { ca.leaf(&sni(i), 2) }).collect();
    let m = many(&originals, "");
    let _w = Proc::worker(&m.fleet, &m.cfg, &[], "worker");

    let results = deploy_all(&m, "broken", &news).await;
    for (i, r) in results.iter().enumerate() {
        if i == broken {
            assert_eq!(r.outcome, Outcome::RolledBack, "{}: {}", r.deployment_id, r.message);
            assert_eq!(r.metadata.get("failed_step").map(String::as_str), Some("validate"), "{:?}", r.metadata);
            assert_eq!(r.reload_shared_with, Some(1), "the culprit's last attempt was alone");
        } else {
            assert_eq!(r.outcome, Outcome::Deployed, "{}: {}", r.deployment_id, r.message);
        }
    }
    eprintln!("one broken among {N}: {} reload runs, shared with: {:?}", reload_runs(&m), sizes(&results));
    m.nginx.wait_settled(Duration::from_secs(20));
    for (i, b) in news.iter().enumerate() {
        let want = if i == broken { &originals[i] } else { b };
        assert_eq!(m.nginx.served_leaf_sha256_for(&sni(i)), want.leaf_sha256, "{} serves", sni(i));
        assert_eq!(m.fleet.sshd.read(&m.fleet.targets[i].cert), want.cert_pem.as_bytes(), "{} file", sni(i));
    }
}

/// `reload_coalesce_ms = 0`: each deployment validates and reloads alone
/// (`reload_shared_with = 1`, one reload run each). The renewals keep
/// their keys: with nothing keeping a neighbour's files out, a whole-config
/// `nginx -t` run while another target's new certificate is in place but
/// its new key not yet would fail (the reason to coalesce), and this test
/// is about who shares a reload, not about that.
#[tokio::test(flavor = "multi_thread")]
async fn coalescing_off_reloads_each_deployment_alone() {
    let n = 6;
    let ca = TestCa::new();
    let originals: Vec<Bundle> = (0..n).map(|i| ca.leaf(&sni(i), 3)).collect();
    let news: Vec<Bundle> = originals.iter().enumerate().map(|(i, o)| ca.renewal_keeping_key(o, &sni(i), 2)).collect();
    let m = many(&originals, "reload_coalesce_ms = 0\n");
    let _w = Proc::worker(&m.fleet, &m.cfg, &[], "worker");

    let results = deploy_all(&m, "off", &news).await;
    for r in &results {
        assert_eq!(r.outcome, Outcome::Deployed, "{}: {}", r.deployment_id, r.message);
        assert_eq!(r.reload_shared_with, Some(1), "{}", r.deployment_id);
    }
    assert_eq!(reload_runs(&m), n, "one reload per deployment");
    assert_eq!(reloads_saved(&m), 0.0);
    for (i, b) in news.iter().enumerate() {
        assert_eq!(m.nginx.served_leaf_sha256_for(&sni(i)), b.leaf_sha256, "{} serves", sni(i));
    }
}

/// `certdeploy journal show <id>` (through the running worker): (event
/// name, JSON detail) per record.
fn journal(m: &Many, id: &str) -> Vec<(String, String)> {
    try_journal(m, id).unwrap_or_else(|e| panic!("journal show {id}: {e}"))
}

/// [`journal`], `Err` while the deployment is not in the journal yet.
fn try_journal(m: &Many, id: &str) -> Result<Vec<(String, String)>, String> {
    let (code, out, err) = run(&m.cfg, &["journal", "show", id]);
    if code != 0 {
        return Err(format!("{out}\n{err}"));
    }
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let _at = parts.next()?;
            let name = parts.next()?.to_string();
            let detail = l.split_once(&name).map(|(_, d)| d.trim().to_string()).unwrap_or_default();
            Some((name, detail))
        })
        .collect())
}

fn begun_reload(j: &[(String, String)]) -> bool {
    j.iter().any(|(n, d)| n == "begun" && d.contains("\"reload\""))
}

/// The worker is killed (SIGKILL) while the shared reload of 8
/// deployments is about to run (`before_reload` failpoint), every member's
/// own `begun(reload)` durable. The restarted worker recovers each member
/// from its own journal like a reload of its own (restore, retry-reload,
/// abandoned), then the redelivered requests deploy afresh: all
/// `deployed`, each served on its own SNI name.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
async fn a_crash_at_the_shared_reload_recovers_each_member_like_its_own_reload() {
    let n = 8;
    let ca = TestCa::new();
    let originals: Vec<Bundle> = (0..n).map(|i| ca.leaf(&sni(i), 3)).collect();
    let news: Vec<Bundle> = (0..n).map(|i| ca.leaf(&sni(i), 2)).collect();
    // A window wide enough for all 8 to share one batch.
    let m = many(&originals, "reload_coalesce_ms = 2000\n");
    let mut w = Proc::worker(&m.fleet, &m.cfg, &[("FAILPOINTS", "before_reload=sleep(60000)")], "worker-1");
    // Ready first: a `journal show` run before the worker holds its
    // journal would keep the worker out of it.
    wait_for("the worker ready", Duration::from_secs(60), || {
        get(&m.metrics, "/metrics").and_then(|(_, b)| sample(&b, "certdeploy_ready")) == Some(1.0)
    });
    let mut client = Client::connect(&m.fleet).await;
    let ids: Vec<String> = (0..n).map(|i| format!("crash-{i}")).collect();
    for (i, b) in news.iter().enumerate() {
        client.publish(&request(&ids[i], &format!("s{i}"), b, true)).await;
    }
    wait_for("every member's begun(reload) journaled", Duration::from_secs(60), || {
        assert!(w.child.try_wait().unwrap().is_none(), "worker exited:\n{}", tail(&w.log_text(), 40));
        ids.iter().all(|id| try_journal(&m, id).is_ok_and(|j| begun_reload(&j)))
    });
    let shared: Vec<String> = ids
        .iter()
        .map(|id| journal(&m, id).into_iter().find(|(n, _)| n == "reload_shared").map(|(_, d)| d).unwrap_or_default())
        .collect();
    assert!(shared.iter().all(|d| d.contains(&format!("\"with\":{n}"))), "one batch of {n}: {shared:?}");
    w.kill9();
    assert_eq!(reload_runs(&m), 0, "killed before the shared reload ran");

    let _w2 = Proc::worker(&m.fleet, &m.cfg, &[], "worker-2");
    let seen = client.collect(Duration::from_secs(240), all_ids(&ids)).await;
    for (i, id) in ids.iter().enumerate() {
        let r = seen.get(id).and_then(|v| v.first()).unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(r.outcome, Outcome::Deployed, "{id}: {}", r.message);
        let j = journal(&m, id);
        let names: Vec<&str> = j.iter().map(|(n, _)| n.as_str()).collect();
        let rec =
            names.iter().position(|x| *x == "recovering").unwrap_or_else(|| panic!("{id}: no recovery: {names:?}"));
        let after = &j[rec..];
        assert!(
            after.iter().any(|(n, d)| n == "executed" && d.contains("\"retry_reload\"")),
            "{id}: recovery rolled back with its own retry-reload: {names:?}"
        );
        assert!(after.iter().any(|(n, _)| n == "abandoned"), "{id}: then abandoned: {names:?}");
        assert_eq!(names.iter().filter(|x| **x == "started").count(), 2, "{id}: deployed afresh once: {names:?}");
        assert_eq!(m.nginx.served_leaf_sha256_for(&sni(i)), news[i].leaf_sha256, "{} serves", sni(i));
    }
}
