//! Operator experience: the README quick start, metrics and health
//! endpoints, JSON logs, the example configs and the Grafana dashboard.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root")
}

/// Metric families in a Prometheus scrape (histogram series folded into
/// their family).
fn families(scrape: &str) -> std::collections::BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|name| ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name).to_string())
        .collect()
}

/// Every metric the dashboard queries is in a scrape of a running worker
/// that has deployed once.
#[tokio::test(flavor = "multi_thread")]
async fn grafana_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(repo().join("contrib/grafana/certdeploy.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut queried = std::collections::BTreeSet::new();
    for p in json["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("certdeploy_") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word)
                        .to_string();
                    queried.insert(base);
                }
            }
        }
    }
    assert!(queried.len() >= 10, "dashboard queries {queried:?}");

    let fleet = Fleet::new(1, true);
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = fleet.write_config(&Opts::default());
    let config = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("metrics_listen = \"\"", &format!("metrics_listen = \"{metrics}\""));
    std::fs::write(&cfg, config).unwrap();
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    wait_for("/readyz 200", Duration::from_secs(60), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
    let ids = vec!["g-1".to_string()];
    client.publish(&request("g-1", &fleet.targets[0].name, &TestCa::new().leaf("g.example", 1), true)).await;
    let seen = client.collect(Duration::from_secs(60), all_ids(&ids)).await;
    assert_eq!(seen["g-1"][0].outcome, certdeploy_core::Outcome::Deployed, "{}", seen["g-1"][0].message);
    // The publish latency is recorded once the confirm is back, which may
    // be just after the client sees the result: scrape until every queried
    // family is there (bounded).
    let start = Instant::now();
    loop {
        let (_, scrape) = get(&metrics, "/metrics").expect("metrics");
        let exported = families(&scrape);
        let missing: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the dashboard queries {missing:?}, which the worker does not export:\n{scrape}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The fields the code accepts in one section, as serde lists them when it
/// refuses an unknown one (`expected one of `a`, `b`, ...`).
fn accepted_keys(section_header: &str, required: &str) -> Vec<String> {
    let text = format!("{section_header}\n{required}certdeploy_no_such_key = 1\n");
    let e = match certdeploy::config::Config::parse(&text, "probe.toml", &[]) {
        Ok(_) => panic!("an unknown key in {section_header} was accepted"),
        Err(e) => e.to_string(),
    };
    let list = e.split("expected one of").nth(1).unwrap_or_else(|| panic!("no field list in: {e}"));
    list.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// `contrib/certdeploy.toml` lists every key of every section, and each
/// value it shows is the default the code uses (keys without a default,
/// which default to none, may show an example value or be commented out).
#[test]
fn example_configs_parse() {
    use certdeploy::config::Config;
    for f in ["contrib/certdeploy.toml", "contrib/compose/certdeploy.toml"] {
        let text = std::fs::read_to_string(repo().join(f)).expect("read");
        let cfg = Config::parse(&text, f, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.targets.is_empty(), "{f} has a target");
    }

    let text = std::fs::read_to_string(repo().join("contrib/certdeploy.toml")).expect("read");
    let example: toml::Table = toml::from_str(&text).expect("example is TOML");
    // Keys shown commented out (`# key = value`), per section.
    let mut commented: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('[') {
            section = h.trim_end_matches(']').to_string();
        } else if let Some((k, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = "))
            && !k.contains(' ')
        {
            commented.entry(section.clone()).or_default().push(k.to_string());
        }
    }
    let web1 = example["targets"]["web1"].as_table().expect("[targets.web1]");
    let required = ["host", "user", "cert_path", "key_path", "reload_command"];
    let required_toml: String = required.iter().map(|k| format!("{k} = {}\n", web1[*k])).collect();
    let target_only = format!("[targets.web1]\n{required_toml}");
    let sections = [
        ("worker", "[worker]", String::new()),
        ("ssh", "[ssh]", String::new()),
        ("targets.web1", "[targets.web1]", required_toml.clone()),
    ];
    let mut problems = Vec::new();
    for (name, header, required) in &sections {
        let table = match *name {
            "targets.web1" => web1,
            n => example[n].as_table().unwrap_or_else(|| panic!("no [{n}]")),
        };
        let listed: Vec<&String> = table.keys().chain(commented.get(*name).into_iter().flatten()).collect();
        let keys = accepted_keys(header, required);
        assert!(keys.len() >= 5, "[{name}]: {keys:?}");
        for k in &keys {
            if !listed.contains(&k) {
                problems.push(format!("[{name}] {k} is not in contrib/certdeploy.toml"));
            }
        }
        // The section with nothing but the required keys, as the code sees it.
        let debug_of = |extra: &str| -> String {
            let body = if *name == "targets.web1" {
                format!("{target_only}{extra}")
            } else {
                format!("{header}\n{extra}{target_only}")
            };
            let cfg = Config::parse(&body, "defaults.toml", &[]).unwrap_or_else(|e| panic!("{e}\n{body}"));
            match *name {
                "worker" => format!("{:?}", cfg.worker),
                "ssh" => format!("{:?}", cfg.ssh),
                _ => format!("{:?}", cfg.targets["web1"]),
            }
        };
        let defaults = debug_of("");
        for (k, v) in table {
            if *name == "targets.web1" && required.contains(k) {
                continue;
            }
            let with_example = debug_of(&format!("{k} = {v}\n"));
            // Either the example shows the default, or the key has none.
            if with_example != defaults && !defaults.contains(&format!("{k}: None")) {
                problems.push(format!("[{name}] {k} = {v} is not the default the code uses:\n  {defaults}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// README quick start: `scripts/demo` runs the worker; `certdeploy submit
/// ... --wait` deploys the demo certificate. Also: JSON logs carry the
/// deployment id, /metrics counts the deployment, /readyz is 200.
#[tokio::test(flavor = "multi_thread")]
async fn readme_quick_start_deploys() {
    let vhost = Vhost::new();
    let dir = tempfile::Builder::new().prefix("certdeploy-demo-").tempdir().expect("tmp");
    let metrics = format!("127.0.0.1:{}", free_port());
    let port = free_port().to_string();
    // A loopback address of its own, so it never meets the fleet tests' sshd.
    let addr = format!("127.0.{}.{}", 100 + std::process::id() % 100, 2 + std::process::id() % 200);
    let envs = [
        ("CERTDEPLOY_DEMO_DIR", dir.path().to_str().unwrap().to_string()),
        ("CERTDEPLOY_DEMO_ADDR", addr.clone()),
        ("CERTDEPLOY_DEMO_PORT", port.clone()),
        ("CERTDEPLOY_DEMO_METRICS", metrics.clone()),
        ("CERTDEPLOY_BIN", bin().to_string()),
        ("CERTDEPLOY_AMQP_URL", vhost.url()),
        ("CERTDEPLOY_LOG_FORMAT", "json".to_string()),
    ];
    let log = dir.path().join("worker.log");
    let out = std::fs::File::create(&log).expect("log");
    // Step 1 of the quick start.
    let mut worker = Command::new(repo().join("scripts/demo"))
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("scripts/demo");
    let cfg = dir.path().join("certdeploy.toml");
    wait_for("/readyz 200", Duration::from_secs(60), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
    assert_eq!(get(&metrics, "/healthz").map(|r| r.0), Some(200));

    // The submit command the README shows.
    let submit = Command::new(bin())
        .args(["submit", "--config", cfg.to_str().unwrap(), "--target", "demo", "--cert"])
        .arg(dir.path().join("cert.pem"))
        .arg("--key")
        .arg(dir.path().join("key.pem"))
        .args(["--wait", "--quiet", "--timeout", "60"])
        .env("CERTDEPLOY_AMQP_URL", vhost.url())
        .output()
        .expect("submit");
    let stdout = String::from_utf8_lossy(&submit.stdout);
    assert!(submit.status.success(), "submit failed: {stdout}\n{}", String::from_utf8_lossy(&submit.stderr));
    assert!(stdout.contains("deployed"), "{stdout}");
    let deployed = std::fs::read(dir.path().join("target/site.pem")).expect("cert deployed");
    assert_eq!(deployed, std::fs::read(dir.path().join("cert.pem")).unwrap());

    let (_, body) = get(&metrics, "/metrics").expect("metrics");
    assert_eq!(sample(&body, "certdeploy_deployments_total{outcome=\"deployed\"}"), Some(1.0), "{body}");
    assert!(body.contains("certdeploy_step_duration_seconds_bucket{step=\"write\""), "{body}");

    let _ = Command::new("kill").arg(worker.id().to_string()).status();
    let status = worker.wait().expect("wait");
    let pid = std::fs::read_to_string(dir.path().join("ssh/sshd.pid")).unwrap_or_default();
    let _ = Command::new("kill").arg(pid.trim()).status();
    assert!(status.success(), "worker exits 0 on SIGTERM");

    // JSON logs: every line parses; lines about the deployment carry its id.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut about_deployment = 0;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let in_span = v["span"]["name"] == "deployment";
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        if in_span || message.starts_with("certificate deployed") {
            let id = v["fields"]["deployment_id"].as_str().or(v["span"]["deployment_id"].as_str());
            assert!(id.is_some_and(|i| i.starts_with("cd-demo-")), "deployment log line without deployment_id: {line}");
            about_deployment += 1;
        }
    }
    assert!(about_deployment > 0, "no deployment log lines in:\n{text}");
}

/// /readyz is 503 until recovery is done, then 200; after a deploy and a
/// rollback, /metrics shows both outcomes and the step histograms.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
async fn metrics_and_readiness() {
    let fleet = Fleet::new(2, true);
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let t0 = &fleet.targets[0];
    let t1 = &fleet.targets[1];
    // t1's reload fails while a certificate for rollback.example is on
    // disk, so the rollback's retry-reload succeeds.
    let t1_reload = format!("echo reload >> {}", t1.reload_log.display());
    let failing = format!("! openssl x509 -noout -subject -in {} | grep -q rollback.example", t1.cert.display());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("metrics_listen = \"\"", &format!("metrics_listen = \"{metrics}\""))
        .replace(&format!("reload_command = \"{t1_reload}\""), &format!("reload_command = \"{failing}\""));
    assert!(text.contains("rollback.example"));
    std::fs::write(&cfg, text).unwrap();

    // Leave an unfinished deployment behind: the process dies after writing.
    let b = ca.leaf("a.example", 2);
    let d = fleet.tmp.path();
    write_file(&d.join("c.pem"), &b.cert_pem);
    write_file(&d.join("k.pem"), &b.key_pem);
    let mut crashed = Command::new(bin());
    crashed
        .args(["--config", cfg.to_str().unwrap(), "deploy", "--target", "t0", "--id", "crashed-1", "--cert"])
        .arg(d.join("c.pem"))
        .arg("--key")
        .arg(d.join("k.pem"))
        .env("FAILPOINTS", "after_write=panic");
    let out = crashed.output().expect("deploy");
    assert!(!out.status.success(), "the failpoint kills the process");

    // Recovery cannot reach the host while sshd is stopped (the crashed
    // process's connections killed, the listeners frozen): meanwhile the
    // worker is alive but not ready, for as long as the test looks.
    let mut client = Client::connect(&fleet).await;
    fleet.sshd.kill_connections();
    fleet.sshd.freeze_listeners(true);
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    wait_for("/healthz", Duration::from_secs(60), || get(&metrics, "/healthz").is_some());
    let ready = get(&metrics, "/readyz");
    fleet.sshd.freeze_listeners(false);
    let (code, body) = ready.expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("recovery_done=no"), "{body}");
    wait_for("/readyz 200", Duration::from_secs(120), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
    assert!(fleet.leftovers(t0).is_empty());

    let ids = vec!["m-ok".to_string(), "m-rb".to_string()];
    client.publish(&request("m-ok", &t0.name, &ca.leaf("b.example", 1), true)).await;
    client.publish(&request("m-rb", &t1.name, &ca.leaf("rollback.example", 1), true)).await;
    let seen = client.collect(Duration::from_secs(60), all_ids(&ids)).await;
    assert_eq!(seen["m-ok"][0].outcome, certdeploy_core::Outcome::Deployed);
    assert_eq!(seen["m-rb"][0].outcome, certdeploy_core::Outcome::RolledBack, "{}", seen["m-rb"][0].message);

    let (_, body) = get(&metrics, "/metrics").expect("metrics");
    assert!(sample(&body, "certdeploy_deployments_total{outcome=\"deployed\"}").unwrap_or(0.0) >= 1.0, "{body}");
    assert_eq!(sample(&body, "certdeploy_deployments_total{outcome=\"rolled_back\"}"), Some(1.0), "{body}");
    for step in ["snapshot", "write", "exec", "restore", "prune"] {
        let count = sample(&body, &format!("certdeploy_step_duration_seconds_count{{step=\"{step}\"}}"));
        assert!(count.unwrap_or(0.0) >= 1.0, "no {step} latency samples:\n{body}");
    }
    assert!(body.contains("certdeploy_result_publish_duration_seconds_bucket"), "{body}");
    assert_eq!(sample(&body, "certdeploy_ready"), Some(1.0));
}

/// The journal and check commands of the README, on a real fleet.
#[test]
fn journal_and_check_commands() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let b = ca.leaf("j.example", 1);
    let args = deploy_args(fleet.tmp.path(), "t0", "j-1", &b, false, false);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, _) = run(&cfg, &["journal", "list"]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with("j-1 ")).unwrap_or_else(|| panic!("no row for j-1:\n{out}"));
    assert!(row.contains(" deployed ") && row.contains(" yes "), "{row}");
    let (code, out, _) = run(&cfg, &["journal", "show", "j-1"]);
    assert_eq!(code, 0);
    for event in ["started", "snapshotted", "begun", "written", "executed", "pruned", "finished"] {
        assert!(out.lines().any(|l| l.split_whitespace().nth(1) == Some(event)), "no {event} in:\n{out}");
    }
    assert!(!out.contains(b.key_pem.lines().nth(1).unwrap()), "journal show must not print key bytes");
    let (code, _, err) = run(&cfg, &["journal", "show", "nope"]);
    assert_eq!(code, 1, "{err}");
    // A zero-day retention keeps what t0 holds now (j-1 put it there) ...
    let (code, out, _) = run(&cfg, &["journal", "gc", "--retention-days", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("pruned 0 finished deployment(s)"), "{out}");
    // ... and once a later deployment replaced it, prunes j-1's records but
    // keeps its result.
    let args = deploy_args(fleet.tmp.path(), "t0", "j-2", &ca.leaf("j2.example", 0), false, false);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&cfg, &["journal", "gc", "--retention-days", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("pruned 1 finished deployment(s)") && out.contains("dropped 0 expired"), "{out}");
    let (code, out, _) = run(&cfg, &["journal", "show", "j-1"]);
    assert_eq!(code, 0);
    assert!(out.contains("result kept for redelivery") && out.contains("deployed"), "{out}");
    // Compacted by hand (the worker is stopped): the same answers after.
    let (_, list_before, _) = run(&cfg, &["journal", "list", "--json"]);
    let (code, out, err) = run(&cfg, &["journal", "compact"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("compacted ") && out.contains(" MiB -> "), "{out}");
    let (_, list_after, _) = run(&cfg, &["journal", "list", "--json"]);
    assert_eq!(list_after, list_before);
    let (code, out, _) = run(&cfg, &["journal", "show", "j-1"]);
    assert_eq!(code, 0);
    assert!(out.contains("result kept for redelivery") && out.contains("deployed"), "{out}");

    // Without `[ssh] control_dir`, `check` and `deploy` make their own
    // under TMPDIR and leave nothing there when they are done.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let own_dir = cfg.with_file_name("no-control-dir.toml");
    std::fs::write(&own_dir, text.lines().filter(|l| !l.starts_with("control_dir")).collect::<Vec<_>>().join("\n"))
        .unwrap();
    let in_tmp = |args: &[&str]| {
        let tmp = tempfile::tempdir().unwrap();
        let (code, out, _) = run_env(&own_dir, args, &[("TMPDIR", tmp.path())]);
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        (code, out, left)
    };
    let (code, out, left) = in_tmp(&["check", "--target", "t0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[ok]") && !out.contains("[FAIL]"), "{out}");
    assert!(left.is_empty(), "check left {left:?} in TMPDIR");
    let b2 = ca.leaf("j.example", 0);
    let (code, out, left) = in_tmp(&strs(&deploy_args(fleet.tmp.path(), "t0", "j-2", &b2, false, false)));
    assert_eq!(code, 0, "{out}");
    assert!(left.is_empty(), "deploy left {left:?} in TMPDIR");
    let (code, _, err) = run(&cfg, &["check", "--target", "nope"]);
    assert_eq!(code, 2, "{err}");
}
