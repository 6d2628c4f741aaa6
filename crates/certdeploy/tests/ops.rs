//! Operator experience: the README quick start, metrics and health
//! endpoints, JSON logs, the example configs and the Grafana dashboard.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).expect("repo root")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// (status code, body) of a GET; None if nothing listens yet.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A metric sample's value, e.g. `certdeploy_deployments_total{outcome="deployed"}`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(repo().join("contrib/grafana/certdeploy.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut queried = Vec::new();
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
                    queried.push(base);
                }
            }
        }
    }
    assert!(queried.len() >= 10, "dashboard queries {queried:?}");
    for q in &queried {
        assert!(
            certdeploy::metrics::ALL.contains(&q.as_str()),
            "dashboard queries `{q}`, which the worker does not export"
        );
    }
}

#[test]
fn example_configs_parse() {
    for f in ["contrib/certdeploy.toml", "contrib/compose/certdeploy.toml"] {
        let text = std::fs::read_to_string(repo().join(f)).expect("read");
        let cfg = certdeploy::config::Config::parse(&text, f, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.targets.is_empty(), "{f} has a target");
    }
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
        ("CERTDEPLOY_BIN", BIN.to_string()),
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
    let submit = Command::new(BIN)
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
    let mut crashed = Command::new(BIN);
    crashed
        .args(["--config", cfg.to_str().unwrap(), "deploy", "--target", "t0", "--id", "crashed-1", "--cert"])
        .arg(d.join("c.pem"))
        .arg("--key")
        .arg(d.join("k.pem"))
        .env("FAILPOINTS", "after_write=panic");
    let out = crashed.output().expect("deploy");
    assert!(!out.status.success(), "the failpoint kills the process");

    // Recovery is slowed down (a sleeping failpoint before the restore):
    // meanwhile the worker is alive but not ready.
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[("FAILPOINTS", "before_restore=sleep(3000)")], "worker");
    wait_for("/healthz", Duration::from_secs(30), || get(&metrics, "/healthz").is_some());
    let (code, body) = get(&metrics, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("recovery_done=no"), "{body}");
    wait_for("/readyz 200", Duration::from_secs(30), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));
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
    // A zero-day retention prunes the finished records but keeps the result.
    let (code, out, _) = run(&cfg, &["journal", "gc", "--retention-days", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("pruned 1 finished deployment(s)") && out.contains("dropped 0 expired"), "{out}");
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
