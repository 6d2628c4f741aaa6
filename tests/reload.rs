//! Targets from include files, and SIGHUP: a real worker over RabbitMQ
//! and a real sshd. A reload swaps in the targets for the requests received
//! after it; a request received before keeps the configuration it was
//! checked with through every step; a configuration that does not load (or
//! that changes a `[worker]` key) is refused and logged, and the running
//! one stays.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;

/// A fleet whose main config holds no target and includes
/// `targets.d/*.toml` (relative to it), with metrics on a port of its own.
/// Returns (config path, include dir, metrics address).
fn include_config(fleet: &Fleet, opts: &Opts) -> (PathBuf, PathBuf, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let opts = Opts { worker_extra: format!("include = \"targets.d/*.toml\"\n{}", opts.worker_extra), ..opts.clone() };
    let cfg = fleet.write_config(&opts);
    let text = std::fs::read_to_string(&cfg).expect("config");
    let main = text[..text.find("[targets.").expect("targets")].to_string();
    std::fs::write(&cfg, main.replace("metrics_listen = \"\"", &format!("metrics_listen = \"{metrics}\"")))
        .expect("config");
    let dir = cfg.parent().expect("dir").join("targets.d");
    std::fs::create_dir_all(&dir).expect("targets.d");
    (cfg, dir, metrics)
}

/// `certdeploy_config_reloads_total{result}` now.
fn reloads(metrics: &str, result: &str) -> f64 {
    let (_, body) = get(metrics, "/metrics").expect("metrics");
    sample(&body, &format!("certdeploy_config_reloads_total{{result=\"{result}\"}}"))
        .unwrap_or_else(|| panic!("no reload counter for {result}:\n{body}"))
}

/// Send SIGHUP and wait until the reload it caused is counted under `result`.
fn sighup(w: &Proc, metrics: &str, result: &str) {
    let before = reloads(metrics, result);
    w.signal("HUP");
    wait_for(&format!("a reload counted as {result}"), Duration::from_secs(30), || reloads(metrics, result) > before);
}

/// Publish one request and return its (first) result.
async fn deploy(client: &mut Client, id: &str, target: &str, b: &Bundle) -> ResultEvent {
    client.publish(&request(id, target, b, true)).await;
    let ids = vec![id.to_string()];
    let seen = client.collect(Duration::from_secs(90), all_ids(&ids)).await;
    seen.get(id).and_then(|v| v.first()).cloned().unwrap_or_else(|| panic!("no result for {id}"))
}

/// The reload command of the default test config, also recording which
/// host address the command ran on (sshd's `SSH_CONNECTION`).
fn reload_recording_host(t: &Target) -> String {
    format!("echo \"reload $SSH_CONNECTION\" >> {}", t.reload_log.display())
}

fn still_running(w: &mut Proc) -> bool {
    matches!(w.child.try_wait(), Ok(None))
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_adds_changes_and_removes_targets_and_a_refused_config_keeps_the_running_one() {
    let fleet = Fleet::new(3, true);
    let (a, b, c) = (&fleet.targets[0], &fleet.targets[1], &fleet.targets[2]);
    let (cfg, dir, metrics) = include_config(&fleet, &Opts::default());
    let section = |t: &Target| fleet.target_section(t, &reload_recording_host(t), None);
    std::fs::write(dir.join("a.toml"), section(a)).unwrap();

    // The command line sees the included targets too.
    let (code, out, err) = run(&cfg, &["check", "--target", &a.name]);
    assert_eq!(code, 0, "check of an included target: {out}{err}");
    assert!(out.contains("[ok]") && !out.contains("[FAIL]"), "{out}");
    let (code, _, err) = run(&cfg, &["check", "--target", &b.name]);
    assert_eq!(code, 2, "{err}");

    let mut client = Client::connect(&fleet).await;
    let mut w = Proc::worker(&fleet, &cfg, &[], "worker");
    wait_for("/readyz 200", Duration::from_secs(60), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
    assert_eq!((reloads(&metrics, "ok"), reloads(&metrics, "error")), (0.0, 0.0), "registered at zero");
    let ca = TestCa::new();

    // B is not configured: rejected like any unknown target.
    let r = deploy(&mut client, "b-1", &b.name, &ca.leaf("b1.example", 1)).await;
    assert_eq!(r.outcome, Outcome::Rejected, "{}", r.message);
    assert!(r.message.contains(&format!("unknown target `{}`", b.name)), "{}", r.message);

    // B in a new include file, SIGHUP: B deploys.
    std::fs::write(dir.join("b.toml"), section(b)).unwrap();
    sighup(&w, &metrics, "ok");
    assert!(w.log_text().contains(&format!("added: {}", b.name)), "{}", tail(&w.log_text(), 20));
    let bundle = ca.leaf("b2.example", 1);
    let r = deploy(&mut client, "b-2", &b.name, &bundle).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert_eq!(fleet.sshd.read(&b.cert), bundle.cert_pem.as_bytes());

    // An include file the worker may not take: refused, logged naming the
    // file and the problem; the worker runs on with the configuration it had.
    let bad = dir.join("c.toml");
    std::fs::write(&bad, "[worker]\nconcurrency = 1\n").unwrap();
    sighup(&w, &metrics, "error");
    let want = format!(
        "configuration reload refused; the running configuration stays: {}: line 1: `worker` is not allowed in an include file",
        bad.display()
    );
    assert!(strip_ansi(&w.log_text()).contains(&want), "no `{want}` in\n{}", tail(&w.log_text(), 20));
    // Also one that does not parse, and one that defines A a second time.
    std::fs::write(&bad, "[targets.x\n").unwrap();
    sighup(&w, &metrics, "error");
    std::fs::write(&bad, section(a)).unwrap();
    sighup(&w, &metrics, "error");
    let twice = format!("target {} is defined twice: also in {}", a.name, dir.join("a.toml").display());
    assert!(w.log_text().contains(&twice), "no `{twice}` in\n{}", tail(&w.log_text(), 20));
    assert!(still_running(&mut w), "the worker keeps running");
    for (id, t) in [("a-1", a), ("b-3", b)] {
        let r = deploy(&mut client, id, &t.name, &ca.leaf(&format!("{id}.example"), 1)).await;
        assert_eq!(r.outcome, Outcome::Deployed, "{id} after refused reloads: {}", r.message);
    }
    std::fs::remove_file(&bad).unwrap();

    // A [worker] key changed: refused, naming the key (only targets reload).
    let main = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, main.replace("concurrency = 64", "concurrency = 8")).unwrap();
    std::fs::write(dir.join("c.toml"), section(c)).unwrap();
    sighup(&w, &metrics, "error");
    assert!(
        w.log_text().contains(": worker.concurrency: changed, and only targets are reloaded"),
        "{}",
        tail(&w.log_text(), 20)
    );
    let r = deploy(&mut client, "c-1", &c.name, &ca.leaf("c1.example", 1)).await;
    assert_eq!(r.outcome, Outcome::Rejected, "nothing of the refused file is in use: {}", r.message);
    std::fs::write(&cfg, &main).unwrap();
    std::fs::remove_file(dir.join("c.toml")).unwrap();

    // B moved to another host address: the next deployment connects there.
    let moved = Target { addr: c.addr.clone(), ..b.clone() };
    std::fs::write(dir.join("b.toml"), fleet.target_section(&moved, &reload_recording_host(b), None)).unwrap();
    sighup(&w, &metrics, "ok");
    assert!(w.log_text().contains(&format!("changed: {}", b.name)), "{}", tail(&w.log_text(), 20));
    let r = deploy(&mut client, "b-4", &b.name, &ca.leaf("b4.example", 1)).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let hosts: Vec<String> = std::fs::read_to_string(&b.reload_log)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_string())
        .collect();
    assert_eq!(hosts, [b.addr.as_str(), b.addr.as_str(), c.addr.as_str()], "the host each of B's reloads ran on");

    // B removed: rejected again; A is untouched.
    std::fs::remove_file(dir.join("b.toml")).unwrap();
    sighup(&w, &metrics, "ok");
    let r = deploy(&mut client, "b-5", &b.name, &ca.leaf("b5.example", 1)).await;
    assert_eq!(r.outcome, Outcome::Rejected, "{}", r.message);
    assert!(r.message.contains(&format!("unknown target `{}`", b.name)), "{}", r.message);
    let r = deploy(&mut client, "a-2", &a.name, &ca.leaf("a2.example", 1)).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert_eq!((reloads(&metrics, "ok"), reloads(&metrics, "error")), (3.0, 4.0));
    assert!(still_running(&mut w));
}

/// The plan a deployment's `started` record holds: (reload command, mode of
/// the file at `cert`), read from a running worker through `journal show`.
fn started_plan(cfg: &Path, id: &str, cert: &Path) -> (String, u64) {
    let (code, out, err) = run(cfg, &["journal", "show", id, "--json"]);
    assert_eq!(code, 0, "journal show {id}: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let records = v["records"].as_array().expect("records");
    let started =
        records.iter().find(|r| r["event"] == "started").unwrap_or_else(|| panic!("no started record: {out}"));
    let plan = &started["detail"]["plan"];
    let files = plan["files"].as_array().expect("files");
    let file = files.iter().find(|f| f["path"] == cert.to_str().unwrap()).expect("the cert file in the plan");
    (plan["reload_command"].as_str().expect("reload_command").to_string(), file["mode"].as_u64().expect("mode"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_in_flight_across_sighup_keeps_the_plan_it_was_built_with() {
    let fleet = Fleet::new(1, true);
    let t = &fleet.targets[0];
    let (cfg, dir, metrics) = include_config(&fleet, &Opts::default());
    let (started, release, log) = (t.dir.join("started"), t.dir.join("release"), t.dir.join("versions.log"));
    // v1's reload waits for the test's go, then records itself.
    let v1 = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.1; done; echo v1 >> {}",
        started.display(),
        release.display(),
        log.display()
    );
    let v2 = format!("echo v2 >> {}", log.display());
    std::fs::write(dir.join("t.toml"), fleet.target_section(t, &v1, None)).unwrap();

    let mut client = Client::connect(&fleet).await;
    let mut w = Proc::worker(&fleet, &cfg, &[], "worker");
    wait_for("/readyz 200", Duration::from_secs(60), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
    let ca = TestCa::new();
    let bundles: Vec<Bundle> = (0..3).map(|i| ca.leaf(&format!("r{i}.example"), 3 - i)).collect();

    // r1 is in its reload step; r2 is received and checked, waiting behind it.
    client.publish(&request("r1", &t.name, &bundles[0], true)).await;
    wait_for("r1's reload to start", Duration::from_secs(60), || started.exists());
    client.publish(&request("r2", &t.name, &bundles[1], true)).await;
    wait_for("r2 to be checked", Duration::from_secs(60), || {
        w.log_text().lines().any(|l| l.contains("request checked") && l.contains("r2"))
    });

    // The target changes (reload command, certificate mode) while both are in flight.
    let changed = fleet.target_section(t, &v2, None) + "cert_mode = \"0640\"\n";
    std::fs::write(dir.join("t.toml"), changed).unwrap();
    sighup(&w, &metrics, "ok");
    // r3 comes after the reload.
    client.publish(&request("r3", &t.name, &bundles[2], true)).await;
    std::fs::write(&release, "").unwrap();

    let ids: Vec<String> = ["r1", "r2", "r3"].map(String::from).into();
    let seen = client.collect(Duration::from_secs(120), all_ids(&ids)).await;
    for id in &ids {
        let r = seen.get(id).and_then(|v| v.first()).unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(r.outcome, Outcome::Deployed, "{id}: {}", r.message);
    }
    assert!(still_running(&mut w));
    // Each ran the reload command of the configuration it was received
    // under, in the order received; and its whole plan is of that one
    // configuration.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "v1\nv1\nv2\n");
    assert_eq!(started_plan(&cfg, "r1", &t.cert), (v1.clone(), 0o644));
    assert_eq!(started_plan(&cfg, "r2", &t.cert), (v1, 0o644));
    assert_eq!(started_plan(&cfg, "r3", &t.cert), (v2, 0o640));
    assert_eq!(fleet.sshd.stat(&t.cert).mode & 0o777, 0o640);
    assert_eq!(fleet.sshd.read(&t.cert), bundles[2].cert_pem.as_bytes());
}

#[test]
fn a_worker_with_a_target_defined_twice_exits_2_naming_both_files() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    let (cfg, dir, _) = include_config(&fleet, &Opts::default());
    let section = fleet.target_section(t, "true", None);
    std::fs::write(dir.join("a.toml"), &section).unwrap();
    std::fs::write(dir.join("b.toml"), &section).unwrap();
    let (code, _, err) = run(&cfg, &["worker"]);
    assert_eq!(code, 2, "{err}");
    let want = format!(
        "config error: {}: targets.{}: target {} is defined twice: also in {}",
        dir.join("b.toml").display(),
        t.name,
        t.name,
        dir.join("a.toml").display()
    );
    assert!(err.contains(&want), "no `{want}` in {err}");
}
