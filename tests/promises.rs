//! README promises that no other test proved: the second signal, what
//! `submit` fills in, the progress bar of `submit --wait`, `$HOME` left
//! alone, `accept-new` (once, and never for inline targets), and crashes
//! between the durable outcome and the result publish, and between the
//! publish confirm and the ack.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use certdeploy_core::Outcome;
use common::*;

const REQUESTS: &str = "certdeploy.requests";

fn wait_for_file(path: &Path, what: &str, log: impl Fn() -> String) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "{what} never happened\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every request delivered and acked (nothing ready, nothing unacked).
fn wait_requests_drained(fleet: &Fleet) {
    let vhost = fleet.vhost.as_ref().expect("a fleet with a broker");
    let s = tokio::task::block_in_place(|| wait_queue_empty(vhost, REQUESTS, Duration::from_secs(120)));
    assert_eq!(s, Some((0, 0)), "requests queue (ready, unacked)");
}

/// SIGTERM starts a graceful stop that waits for the deployment in flight;
/// a second signal exits at once with status 130.
#[tokio::test(flavor = "multi_thread")]
async fn second_signal_exits_130() {
    let fleet = Fleet::new(1, true);
    let t = &fleet.targets[0];
    let started = t.dir.join("reload-started");
    // A reload that outlasts the grace period (20 s in the test config).
    let cfg = fleet.write_config(&Opts {
        reload_command: Some(format!("touch {}; sleep 120", started.display())),
        ..Opts::default()
    });
    let client = Client::connect(&fleet).await;
    let mut w = Proc::worker(&fleet, &cfg, &[], "worker");
    client.publish(&request("sig-1", &t.name, &TestCa::new().leaf("sig.example", 1), true)).await;
    wait_for_file(&started, "the reload", || w.log_text());
    w.signal("TERM");
    let start = Instant::now();
    while !w.log_text().contains("graceful shutdown") {
        assert!(start.elapsed() < Duration::from_secs(60), "no graceful shutdown logged\n{}", w.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    w.signal("TERM");
    let status = w.wait_timeout(Duration::from_secs(120)).expect("the worker exits");
    assert_eq!(status.code(), Some(130), "exit status after a second signal\n{}", tail(&w.log_text(), 20));
}

/// `submit --batch`: a line without `deployment_id` or `schema` gets both,
/// and the ids are printed, one per line, as published.
#[tokio::test(flavor = "multi_thread")]
async fn submit_fills_in_deployment_id_and_schema_and_prints_the_ids() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    // Declares the topology, so the requests queue exists for the drain.
    let mut tap = ResultTap::connect(&fleet).await;
    let ca = TestCa::new();
    let line = |id: &str, keep_id: bool| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&request(id, "t0", &ca.leaf("s.example", 1), true)).expect("request JSON");
        let o = v.as_object_mut().expect("object");
        o.remove("schema");
        if !keep_id {
            o.remove("deployment_id");
        }
        v.to_string()
    };
    let batch = fleet.tmp.path().join("batch.jsonl");
    std::fs::write(&batch, format!("{}\n{}\n", line("unused", false), line("given-2", true))).unwrap();
    let (code, out, err) = run(&cfg, &["submit", "--batch", batch.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let printed: Vec<&str> = out.lines().collect();
    assert_eq!(printed.len(), 2, "one id per request: {out}");
    assert_eq!(printed[1], "given-2");
    assert!(certdeploy_core::valid_deployment_id(printed[0]), "generated id {:?}", printed[0]);
    let published = tap.drain(REQUESTS).await;
    assert_eq!(published.len(), 2);
    for ((body, _), id) in published.iter().zip(&printed) {
        let req = certdeploy_core::wire::decode_request(body).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(req.deployment_id, *id);
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["schema"], certdeploy_core::wire::REQUEST_SCHEMA);
    }
}

/// `submit --wait` on a terminal shows a progress bar with the counts per
/// outcome (run under a pseudo-terminal with util-linux `script`).
#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_shows_a_progress_bar_on_a_terminal() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let b = TestCa::new().leaf("bar.example", 1);
    let d = fleet.tmp.path();
    write_file(&d.join("c.pem"), &b.cert_pem);
    write_file(&d.join("k.pem"), &b.key_pem);
    let command = format!(
        "{} --config {} submit --target t0 --cert {} --key {} --wait --timeout 120",
        bin(),
        cfg.display(),
        d.join("c.pem").display(),
        d.join("k.pem").display()
    );
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("script")
            .args(["-qefc", &command, "/dev/null"])
            .env("TERM", "xterm")
            .output()
            .expect("script (util-linux)")
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "submit --wait under a terminal: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1/1"), "no progress bar position in:\n{text:?}");
    assert!(text.contains('█') || text.contains('░'), "no progress bar drawn in:\n{text:?}");
    assert!(text.contains("deployed=1"), "no count per outcome on the bar in:\n{text:?}");
}

/// `deploy`, `check` and `journal` write nothing to `$HOME`.
#[test]
fn nothing_is_written_to_home() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let home = tempfile::tempdir().expect("home");
    let env = [("HOME", home.path())];
    let b = TestCa::new().leaf("home.example", 1);
    let deploy = deploy_args(fleet.tmp.path(), "t0", "home-1", &b, true, false);
    for args in [strs(&deploy), vec!["check"], vec!["journal", "list"]] {
        let (code, out, err) = run_env(&cfg, &args, &env);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    let mut left = Vec::new();
    let mut dirs = vec![home.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read home").flatten() {
            left.push(e.path());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    assert!(left.is_empty(), "written to $HOME: {left:?}");
}

/// `host_key_policy = "accept-new"` trusts an unknown host key once, for
/// the configured target; an inline request to the same host is never
/// trusted on first sight (even when a configured target named `inline`
/// would allow it, which the configuration refuses).
#[tokio::test(flavor = "multi_thread")]
async fn accept_new_trusts_a_configured_target_once_and_never_an_inline_one() {
    let fleet = Fleet::new(1, true);
    let t = &fleet.targets[0];
    let known_hosts = fleet.tmp.path().join("known_hosts.accept-new");
    std::fs::write(&known_hosts, "").unwrap();
    let reload = format!("echo reload >> {}", t.reload_log.display());
    let glob = format!("{}/*", t.dir.display());
    let cfg = fleet.write_config(&Opts {
        worker_extra: format!(
            "allow_inline_targets = true\ninline_host_allowlist = [\"{}\"]\ninline_command_allowlist = [\"{reload}\"]\n\
             inline_path_allowlist = [\"{glob}\"]\n",
            t.addr
        ),
        target_extra: "host_key_policy = \"accept-new\"\n".into(),
        ..Opts::default()
    });
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("known_hosts = \"{}\"", fleet.sshd.known_hosts_path().display()),
        &format!("known_hosts = \"{}\"", known_hosts.display()),
    );
    assert!(text.contains(known_hosts.to_str().unwrap()));
    std::fs::write(&cfg, &text).unwrap();
    // A configured target named `inline` (the name results give inline
    // targets) is refused.
    let clash = fleet.tmp.path().join("inline-name.toml");
    std::fs::write(&clash, text.replace(&format!("[targets.{}]", t.name), "[targets.inline]")).unwrap();
    let (code, _, err) = run(&clash, &["check"]);
    assert_eq!(code, 2, "a target named `inline` was accepted: {err}");
    assert!(err.contains("inline"), "{err}");

    let ca = TestCa::new();
    let inline = |id: &str, cn: &str| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&request(id, &t.name, &ca.leaf(cn, 1), true)).expect("request JSON");
        let o = v.as_object_mut().expect("object");
        o.remove("target");
        o.insert(
            "target_spec".into(),
            serde_json::json!({
                "host": t.addr, "port": fleet.sshd.port(), "user": fleet.sshd.user(),
                // Paths of its own: a configured target's are not an inline one's to share.
                "cert_path": t.dir.join("inline.pem"), "key_path": t.dir.join("inline.key"),
                "chain_path": t.dir.join("inline-chain.pem"), "reload_command": reload,
            }),
        );
        serde_json::to_vec(&v).unwrap()
    };
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let mut seen = std::collections::BTreeMap::new();
    for (id, body) in [
        ("an-inline-1", inline("an-inline-1", "i1.example")),
        ("an-conf-1", request("an-conf-1", &t.name, &ca.leaf("c1.example", 1), true)),
        ("an-inline-2", inline("an-inline-2", "i2.example")),
    ] {
        client.publish(&body).await;
        let ids = vec![id.to_string()];
        seen.extend(client.collect(Duration::from_secs(120), all_ids(&ids)).await);
        assert!(seen.contains_key(id), "no result for {id}");
        let trusted = std::fs::read_to_string(&known_hosts).unwrap();
        match id {
            "an-inline-1" => {
                let r = &seen[id][0];
                assert_eq!(r.outcome, Outcome::Failed, "an inline target trusted an unknown host key: {}", r.message);
                assert!(r.message.contains("host key"), "{}", r.message);
                assert_eq!(trusted, "", "an inline request added a host key");
            }
            _ => {
                assert_eq!(seen[id][0].outcome, Outcome::Deployed, "{id}: {}", seen[id][0].message);
                assert_eq!(trusted.lines().count(), 1, "accept-new trusts the key once: {trusted}");
                assert!(trusted.contains(&t.addr), "{trusted}");
            }
        }
    }
}

/// The process dies after the outcome is journaled, before the result is
/// published: the restarted worker publishes it for the redelivery,
/// without deploying again.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
async fn crash_between_durable_outcome_and_publish() {
    crash_around_the_result("before_result_publish", 1).await;
}

/// The process dies after the result publish is confirmed, before the ack:
/// the redelivery is answered from the journal (a second, identical
/// result), without deploying again.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
async fn crash_between_publish_confirm_and_ack() {
    crash_around_the_result("before_ack", 2).await;
}

async fn crash_around_the_result(failpoint: &str, results: usize) {
    let fleet = Fleet::new(1, true);
    let t = &fleet.targets[0];
    let cfg = fleet.write_config(&Opts::default());
    let mut client = Client::connect(&fleet).await;
    let id = format!("fp-{failpoint}");
    let b = TestCa::new().leaf("fp.example", 1);
    client.publish(&request(&id, &t.name, &b, true)).await;
    let spec = format!("{failpoint}=panic");
    let mut w = Proc::worker(&fleet, &cfg, &[("FAILPOINTS", spec.as_str())], "crashing");
    let st = w.wait_timeout(Duration::from_secs(120)).expect("the failpoint kills the worker");
    assert!(!st.success(), "{}", tail(&w.log_text(), 20));
    assert_eq!(fleet.reloads(t), 1, "deployed before the crash");
    let (code, out, _) = run(&cfg, &["journal", "list"]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(" deployed ") && row.contains(" no "), "outcome durable, not acked: {row}");

    let mut w = Proc::worker(&fleet, &cfg, &[], "restarted");
    let mut seen = client.collect(Duration::from_secs(120), |s| s.get(&id).is_some_and(|v| v.len() >= results)).await;
    assert!(seen.contains_key(&id), "no result for {id}");
    wait_requests_drained(&fleet);
    client.settle(&mut seen).await;
    let rs = &seen[&id];
    assert_eq!(rs.len(), results, "results for {id}: {rs:#?}");
    assert!(rs.iter().all(|r| r.outcome == Outcome::Deployed), "{rs:#?}");
    assert_eq!(fleet.reloads(t), 1, "deployed once");
    assert_eq!(fleet.files(t).0.as_deref(), Some(b.cert_pem.as_bytes()));
    w.signal("TERM");
    assert!(w.wait_timeout(Duration::from_secs(120)).is_some_and(|s| s.success()), "{}", tail(&w.log_text(), 20));
    let (_, out, _) = run(&cfg, &["journal", "list"]);
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(" yes "), "acked after the restart: {row}");
}
