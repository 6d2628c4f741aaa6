//! Private key bytes never appear in logs, traces, results or the
//! journal — checked at TRACE level (every crate, including the SSH/SFTP
//! stack) through a real deploy and a real rollback over sshd.

#![allow(clippy::type_complexity)] // common/mod.rs (Fleet::files)

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Every base64 line of the key, and every 24-character slice of its
/// base64 that does not also occur in the public certificate or chain.
fn secrets(b: &Bundle) -> (Vec<String>, Vec<String>) {
    let lines: Vec<String> =
        b.key_pem.lines().filter(|l| !l.starts_with("-----") && !l.trim().is_empty()).map(str::to_string).collect();
    let b64: String = lines.concat();
    let public: String = format!("{}{}", b.cert_pem, b.chain_pem).lines().collect();
    let chars: Vec<char> = b64.chars().collect();
    let slices: Vec<String> =
        chars.windows(24).map(|w| w.iter().collect::<String>()).filter(|s| !public.contains(s.as_str())).collect();
    assert!(slices.len() > 20);
    (lines, slices)
}

fn assert_clean(what: &str, text: &str, b: &Bundle) {
    let (lines, slices) = secrets(b);
    for l in &lines {
        assert!(!text.contains(l.as_str()), "{what}: contains a line of the private key: {l}");
    }
    for s in &slices {
        assert!(!text.contains(s.as_str()), "{what}: contains key base64 `{s}`");
    }
    assert!(!text.contains("PRIVATE KEY-----\n"), "{what}: contains a PEM key header with body");
}

fn deploy_traced(config: &Path, id: &str, files: (&Path, &Path, &Path), format: &str) -> (i32, String) {
    let out = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(["--log-format", format, "deploy", "--target", "t0", "--id", id, "--json"])
        .arg("--cert")
        .arg(files.0)
        .arg("--key")
        .arg(files.1)
        .arg("--chain")
        .arg(files.2)
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run certdeploy");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn all_bytes_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(all_bytes_under(&p));
            } else if let Ok(b) = std::fs::read(&p) {
                out.extend(b);
            }
        }
    }
    out
}

#[test]
fn trace_logs_of_deploy_and_rollback_hold_no_key_material() {
    let fleet = Fleet::new(1, false);
    let ca = TestCa::new();
    let dir = fleet.tmp.path();
    let t = fleet.targets[0].clone();

    // 1. A successful deploy, human logs.
    let b1 = ca.leaf("www.example.com", 2);
    let (c, k, ch) = (dir.join("c1.pem"), dir.join("k1.pem"), dir.join("ch1.pem"));
    write_file(&c, &b1.cert_pem);
    write_file(&k, &b1.key_pem);
    write_file(&ch, &b1.chain_pem);
    let cfg = fleet.write_config(&Opts::default());
    let (code, log) = deploy_traced(&cfg, "leak-1", (&c, &k, &ch), "human");
    assert_eq!(code, 0, "{}", tail(&log, 60));
    assert!(log.contains("TRACE"), "trace level is on: {}", tail(&log, 20));
    assert!(log.contains("\"deployed\""), "{}", tail(&log, 20));
    assert_eq!(std::fs::read_to_string(&t.key).unwrap(), b1.key_pem, "the key really went over the wire");
    assert_clean("deploy logs", &log, &b1);

    // 2. A failing reload: rollback, JSON logs.
    let b2 = ca.leaf("www.example.com", 1);
    let (c, k, ch) = (dir.join("c2.pem"), dir.join("k2.pem"), dir.join("ch2.pem"));
    write_file(&c, &b2.cert_pem);
    write_file(&k, &b2.key_pem);
    write_file(&ch, &b2.chain_pem);
    let cfg = fleet.write_config(&Opts {
        reload_command: Some(format!("echo reload >> {} && echo boom >&2 && exit 1", t.reload_log.display())),
        ..Opts::default()
    });
    let (code, log) = deploy_traced(&cfg, "leak-2", (&c, &k, &ch), "json");
    assert_eq!(code, 1, "{}", tail(&log, 60));
    assert!(log.contains("\"rolled_back"), "{}", tail(&log, 20));
    assert_eq!(std::fs::read_to_string(&t.key).unwrap(), b1.key_pem, "rolled back to the first key");
    assert_clean("rollback logs", &log, &b2);
    assert_clean("rollback logs", &log, &b1);

    // 3. A request refused for a mismatched key: the error names the field
    //    and echoes nothing of either key.
    let (c, k) = (dir.join("c3.pem"), dir.join("k3.pem"));
    write_file(&c, &b2.cert_pem);
    write_file(&k, &b1.key_pem);
    let (code, log) = deploy_traced(&cfg, "leak-3", (&c, &k, &ch), "human");
    assert_ne!(code, 0);
    assert!(log.contains("private_key_pem"), "{}", tail(&log, 20));
    assert_clean("rejection output", &log, &b1);

    // 4. The journal on disk.
    let journal = String::from_utf8_lossy(&all_bytes_under(&fleet.journal_path())).into_owned();
    assert!(journal.contains("leak-2"), "journal was written");
    assert_clean("journal files", &journal, &b1);
    assert_clean("journal files", &journal, &b2);
}

/// The worker at TRACE over a real RabbitMQ: lapin logs every
/// frame with its body at trace, which would print each request, key
/// included, as a list of bytes. The log holds neither the key nor any
/// rendering of the request body.
#[tokio::test(flavor = "multi_thread")]
async fn worker_trace_logs_hold_no_key_and_no_request_body() {
    let fleet = Fleet::new(1, true);
    let ca = TestCa::new();
    let t = fleet.targets[0].clone();
    let cfg = fleet.write_config(&Opts::default());
    let mut client = Client::connect(&fleet).await;
    let w = Proc::worker(&fleet, &cfg, &[("RUST_LOG", "trace"), ("CERTDEPLOY_LOG_FORMAT", "human")], "worker-trace");
    let b = ca.leaf("www.example.com", 2);
    let body = certdeploy_testbed::certs::request("leak-w1", &t.name, &b, true);
    client.publish(&body).await;
    let ids = vec!["leak-w1".to_string()];
    let seen = client.collect(std::time::Duration::from_secs(120), all_ids(&ids)).await;
    assert_eq!(seen["leak-w1"][0].outcome, certdeploy_core::Outcome::Deployed, "{}", seen["leak-w1"][0].message);
    assert_eq!(std::fs::read_to_string(&t.key).unwrap(), b.key_pem, "the key really went over the wire");
    let log = w.log_text();
    assert!(log.contains("TRACE"), "trace level is on: {}", tail(&log, 20));
    assert_clean("worker trace logs", &log, &b);
    // A body rendered as bytes (`[123, 34, ...]`, how Debug shows a
    // Vec<u8>), in decimal or hex, or as an escaped string.
    let key_at = body.windows(5).position(|w| w == b"-----").expect("PEM in the body");
    let slice = &body[key_at..key_at + 24];
    let decimal = format!("{slice:?}");
    let decimal = decimal.trim_matches(|c| c == '[' || c == ']');
    let hex: String = slice.iter().map(|b| format!("{b:02x}")).collect();
    for (what, needle) in [("decimal bytes", decimal.to_string()), ("hex bytes", hex)] {
        assert!(!log.contains(&needle), "the log renders the request body as {what}: {needle}");
    }
    let first = format!("{:?}", &body[..12]);
    assert!(!log.contains(first.trim_matches(|c| c == '[' || c == ']')), "the log renders a body: {first}");
    assert!(!log.contains("deploy-request.v1\\\""), "the log holds the request JSON");
}
