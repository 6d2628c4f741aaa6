//! Validate, reload and verify against a real nginx (`/usr/sbin/nginx`,
//! Debian `nginx-light`) serving TLS from the files certdeploy deploys over
//! a real sshd. The validate and reload commands are nginx's own (`nginx -t`,
//! `nginx -s reload`), run over ssh by the unprivileged test user that also
//! runs the nginx master; "what is served" is checked with an independent
//! TLS client (`openssl s_client`) and with certdeploy's rustls verifier.

mod common;

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certdeploy_core::Outcome;
use certdeploy_core::driver::Verifier as _;
use certdeploy_core::wire::ResultEvent;
use certdeploy_testbed::nginx::{NginxFixture, runs_as_test_user, sha1_signed_bundle};
use common::*;

const SNI: &str = "web.example";

struct Site {
    fleet: Fleet,
    nginx: NginxFixture,
    cfg: PathBuf,
}

/// Put a bundle on the target as if deployed (modes as certdeploy writes
/// them: cert and chain 0644, key 0600), owned by the test user.
fn install(fleet: &Fleet, b: &Bundle) {
    let t = &fleet.targets[0];
    fleet.sshd.write(&t.cert, b.cert_pem.as_bytes(), 0o644);
    fleet.sshd.write(&t.key, b.key_pem.as_bytes(), 0o600);
    fleet.sshd.write(&t.chain, b.chain_pem.as_bytes(), 0o644);
}

fn assert_files(fleet: &Fleet, b: &Bundle) {
    let (c, k, ch) = fleet.files(&fleet.targets[0]);
    assert_eq!(c.as_deref(), Some(b.cert_pem.as_bytes()), "cert file");
    assert_eq!(k.as_deref(), Some(b.key_pem.as_bytes()), "key file");
    assert_eq!(ch.as_deref(), Some(b.chain_pem.as_bytes()), "chain file");
}

/// One host behind sshd, nginx on the same loopback address serving
/// `served`; certdeploy configured with nginx's validate/reload commands
/// (or `reload` instead) and verify on.
fn site(served: &Bundle, reload: Option<&str>) -> Site {
    site_with(served, reload, "verify_budget_ms = 3000\n", "")
}

/// [`site`] with these `[worker]` lines (instead of a 3 s verify budget)
/// and more target lines.
fn site_with(served: &Bundle, reload: Option<&str>, worker_extra: &str, target_extra: &str) -> Site {
    let fleet = Fleet::new(1, false);
    install(&fleet, served);
    let t = &fleet.targets[0];
    let nginx = NginxFixture::start(&t.cert, &t.key, &t.addr);
    assert!(runs_as_test_user(nginx.master_pid()), "nginx master runs as {TEST_USER}");
    assert_eq!(nginx.served_leaf_sha256(), served.leaf_sha256, "nginx serves the installed certificate");
    let cfg = fleet.write_config(&Opts {
        validate_command: Some(nginx.validate_command()),
        reload_command: Some(reload.map(str::to_string).unwrap_or_else(|| nginx.reload_command())),
        worker_extra: worker_extra.into(),
        target_extra: format!("verify_endpoint = \"{}\"\nverify_sni = \"{SNI}\"\n{target_extra}", nginx.endpoint()),
        ..Opts::default()
    });
    Site { fleet, nginx, cfg }
}

/// `certdeploy deploy --target t0 ... --id <id> --json` with `env`:
/// (exit code, stdout, stderr).
fn deploy_raw(s: &Site, id: &str, b: &Bundle, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(&s.cfg).args(deploy_args(s.fleet.tmp.path(), "t0", id, b, true, true));
    cmd.env("RUST_LOG", "info,certdeploy=debug");
    for (key, v) in env {
        cmd.env(key, v);
    }
    let out = cmd.output().expect("run certdeploy deploy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn deploy(s: &Site, id: &str, b: &Bundle) -> (i32, ResultEvent) {
    let (code, out, err) = deploy_raw(s, id, b, &[]);
    let ev: ResultEvent = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("json result ({e}); exit {code}\nstdout: {out}\nstderr: {err}"));
    (code, ev)
}

/// `certdeploy journal show <id>`: (event name, JSON detail) per record.
fn journal(s: &Site, id: &str) -> Vec<(String, String)> {
    let (code, out, err) = run(&s.cfg, &["journal", "show", id]);
    assert_eq!(code, 0, "journal show: {out}\n{err}");
    out.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let _at = parts.next()?;
            let name = parts.next()?.to_string();
            let detail = l.split_once(&name).map(|(_, d)| d.trim().to_string()).unwrap_or_default();
            Some((name, detail))
        })
        .collect()
}

fn names(j: &[(String, String)]) -> Vec<&str> {
    j.iter().map(|(n, _)| n.as_str()).collect()
}

/// The leaf a rustls handshake (certdeploy's own verifier) is served.
fn rustls_leaf(endpoint: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let v = certdeploy::verify::TlsVerifier::new(Duration::from_secs(5));
    rt.block_on(v.served_leaf(endpoint, Some(SNI))).expect("rustls handshake").to_hex()
}

fn md(ev: &ResultEvent, k: &str) -> String {
    ev.metadata.get(k).cloned().unwrap_or_else(|| panic!("metadata `{k}` missing: {:?}", ev.metadata))
}

/// (a) B over A with validate, reload and verify on: `deployed`, and a
/// fresh handshake (openssl and rustls) is served B by a new worker of the
/// same master.
#[test]
fn deploy_b_over_a_is_served() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site(&a, None);
    let master = s.nginx.master_pid();
    let workers = s.nginx.worker_pids();

    let (code, ev) = deploy(&s, "ngx-a", &b);
    assert_eq!(code, 0, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);
    assert_files(&s.fleet, &b);

    let now = s.nginx.wait_settled(Duration::from_secs(10));
    assert_ne!(now, workers, "the reload replaced the worker");
    assert_eq!(s.nginx.master_pid(), master, "a reload, not a restart");
    assert_eq!(s.nginx.reloads(), 1, "exactly one SIGHUP:\n{}", s.nginx.error_log());
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256, "openssl s_client sees B");
    assert_eq!(rustls_leaf(&s.nginx.endpoint()), b.leaf_sha256, "certdeploy's verifier sees B");
    assert_ne!(a.leaf_sha256, b.leaf_sha256);
}

/// (b) A certificate certdeploy accepts but nginx's config test rejects:
/// the leaf is signed with SHA-1, which OpenSSL 3 refuses at its default
/// security level ("ca md too weak"). `nginx -t` fails -> `rolled_back`,
/// `failed_step = validate`, nginx never signalled, B still served.
#[test]
fn nginx_config_test_failure_rolls_back_without_reload() {
    let ca = TestCa::new();
    let b = ca.leaf(SNI, 2);
    let s = site(&b, None);
    let master = s.nginx.master_pid();
    let workers = s.nginx.worker_pids();
    let weak = sha1_signed_bundle(SNI);

    let (code, ev) = deploy(&s, "ngx-b", &weak);
    assert_eq!(code, 1, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::RolledBack, "{}", ev.message);
    assert_eq!(md(&ev, "failed_step"), "validate");
    let why = md(&ev, "validate_error");
    assert!(why.contains("ca md too weak"), "nginx's own reason: {why}");
    assert!(!ev.metadata.contains_key("original_verified"), "no reload, so nothing to re-verify: {:?}", ev.metadata);

    // nginx was never asked to reload.
    let j = journal(&s, "ngx-b");
    assert!(
        !j.iter().any(|(n, d)| (n == "begun" || n == "executed") && d.contains("reload")),
        "no reload step in the journal: {j:?}"
    );
    assert_eq!(s.nginx.reloads(), 0, "no SIGHUP reached the master:\n{}", s.nginx.error_log());
    assert_eq!(s.nginx.master_pid(), master);
    assert_eq!(s.nginx.worker_pids(), workers, "same worker: no reconfiguration");
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256, "still serving B");
    assert_files(&s.fleet, &b);
    assert!(s.fleet.leftovers(&s.fleet.targets[0]).is_empty());
}

/// (c) A reload that exits 0 but changes nothing (`true`): verify sees B,
/// not C, until the budget ends -> roll back; verify-original finds B
/// served -> `rolled_back` with `original_verified = true`.
#[test]
fn ineffective_reload_is_caught_by_verify() {
    let ca = TestCa::new();
    let (b, c) = (ca.leaf(SNI, 2), ca.leaf(SNI, 1));
    let s = site(&b, Some("true"));

    let (code, ev) = deploy(&s, "ngx-c", &c);
    assert_eq!(code, 1, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::RolledBack, "{}", ev.message);
    assert_eq!(md(&ev, "failed_step"), "verify");
    assert_eq!(md(&ev, "original_verified"), "true");
    assert!(ev.message.contains(&b.leaf_sha256), "the mismatch names what was served: {}", ev.message);

    let j = journal(&s, "ngx-c");
    let n = names(&j);
    assert!(n.contains(&"gave_up"), "verify gave up: {n:?}");
    assert!(
        j.iter().any(|(n, d)| n == "verified" && d.contains("verify_original") && d.contains("\"matched\":true")),
        "verify-original matched: {j:?}"
    );
    assert_eq!(s.nginx.reloads(), 0, "`true` never signals nginx");
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256, "still serving B");
    assert_files(&s.fleet, &b);
}

/// Whether a file of the journal directory holds `needle` (sled writes
/// records uncompressed; a flushed record is in its files).
fn journal_files_hold(dir: &std::path::Path, needle: &[u8]) -> bool {
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            } else if std::fs::read(e.path()).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                return true;
            }
        }
    }
    false
}

/// Kill certdeploy (SIGKILL) while it sleeps in the `before_verify`
/// failpoint, once `ready` says the reload has happened and the journal's
/// files hold the durable `Begun{verify}` record (written before the
/// verify starts): the journal then says "reload succeeded, verify
/// pending".
fn crash_in_verify(s: &Site, id: &str, b: &Bundle, ready: impl Fn() -> bool) {
    let d = s.fleet.tmp.path();
    let args = deploy_args(d, "t0", id, b, true, true);
    let mut p =
        Proc::spawn(&s.cfg, &strs(&args), &[("FAILPOINTS", "before_verify=sleep(20000)")], d.join(format!("{id}.log")));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let journal = s.fleet.journal_path();
    while !ready() || !journal_files_hold(&journal, br#""type":"begun","step":"verify""#) {
        assert!(p.child.try_wait().unwrap().is_none(), "certdeploy exited early:\n{}", p.log_text());
        assert!(std::time::Instant::now() < deadline, "no reload and durable Begun(verify):\n{}", p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.child.try_wait().unwrap().is_none(), "still in the failpoint:\n{}", p.log_text());
    p.kill9();
}

/// The crash left the journal at "reload succeeded, verify pending".
fn assert_verify_pending(j: &[(String, String)]) {
    let n = names(j);
    assert!(j.iter().any(|(n, d)| n == "executed" && d.contains("\"reload\"")), "reload result journaled: {n:?}");
    assert!(!n.contains(&"verified") && !n.contains(&"finished"), "crashed before verify: {n:?}");
}

/// (d) The process is killed between reload and verify, with the reload's
/// success journaled. nginx already serves B. The next `certdeploy deploy`
/// recovers first: it verifies again from the journaled fingerprint (no
/// second write, no second reload, no rollback) and commits `deployed`.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
fn crash_between_reload_and_verify_recovers_to_deployed() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site(&a, None);

    crash_in_verify(&s, "ngx-d", &b, || s.nginx.reloads() == 1);
    assert_verify_pending(&journal(&s, "ngx-d"));
    s.nginx.wait_settled(Duration::from_secs(10));
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256, "nginx reloaded before the crash");

    let (code, ev) = deploy(&s, "ngx-d", &b);
    assert_eq!(code, 0, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);
    assert_eq!(md(&ev, "recovered"), "true");

    let j = journal(&s, "ngx-d");
    let n = names(&j);
    let rec = n.iter().position(|x| *x == "recovering").unwrap_or_else(|| panic!("no recovering record: {n:?}"));
    let after = &j[rec..];
    assert!(after.iter().any(|(n, d)| n == "verified" && d.contains("\"matched\":true")), "re-verified: {j:?}");
    assert!(
        !after.iter().any(|(n, _)| ["written", "executed", "restored", "started"].contains(&n.as_str())),
        "no write, reload, restore or new attempt after the crash: {:?}",
        names(after)
    );
    let (last, detail) = j.last().expect("records");
    assert_eq!(last, "finished", "{j:?}");
    assert!(detail.contains("\"deployed\""), "{detail}");

    assert_eq!(s.nginx.reloads(), 1, "recovery verified, it did not reload again");
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256);
    assert_files(&s.fleet, &b);
}

/// (d, as briefed) `FAILPOINTS=before_verify=panic`: the process aborts
/// right after the reload. Whatever the journal kept, the next `certdeploy
/// deploy` recovers and ends `deployed` with B served.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
fn abort_before_verify_recovers_to_deployed() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site(&a, None);

    let (code, out, err) = deploy_raw(&s, "ngx-d1", &b, &[("FAILPOINTS", "before_verify=panic")]);
    assert_ne!(code, 0, "the failpoint kills the process\nstdout: {out}\nstderr: {err}");
    assert!(out.trim().is_empty(), "no result was printed: {out}");
    assert_eq!(s.nginx.reloads(), 1, "nginx was reloaded before the abort");

    let (code, ev) = deploy(&s, "ngx-d1", &b);
    assert_eq!(code, 0, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);
    let j = journal(&s, "ngx-d1");
    let n = names(&j);
    assert!(n.contains(&"recovering"), "{n:?}");
    let (last, detail) = j.last().expect("records");
    assert_eq!(last, "finished", "{n:?}");
    assert!(detail.contains("\"deployed\""), "{detail}");
    s.nginx.wait_settled(Duration::from_secs(10));
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256);
    assert_files(&s.fleet, &b);
}

/// With `before_verify=panic` the reload's success must already be durable
/// (`Begun{verify}` is journaled first), so recovery takes the "reload
/// succeeded, verify pending" row: it only verifies — no restore, no extra
/// reload, no new attempt.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
fn abort_before_verify_recovery_only_verifies() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site(&a, None);

    let (code, _, _) = deploy_raw(&s, "ngx-d3", &b, &[("FAILPOINTS", "before_verify=panic")]);
    assert_ne!(code, 0);
    assert_verify_pending(&journal(&s, "ngx-d3"));
    let (code, ev) = deploy(&s, "ngx-d3", &b);
    assert_eq!(code, 0, "{}", ev.message);
    assert_eq!(md(&ev, "recovered"), "true");
    let n = names(&journal(&s, "ngx-d3")).into_iter().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(n.iter().filter(|x| *x == "started").count(), 1, "one attempt: {n:?}");
    assert_eq!(s.nginx.reloads(), 1, "no rollback reload, no second deploy reload");
}

/// (d') Killed between a reload that did not take effect (`true`) and the
/// verify: recovery must not trust the journaled "reload succeeded"; its
/// verify sees A, so it rolls back and confirms A is served.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features certdeploy-e2e/failpoints")]
fn crash_between_ineffective_reload_and_verify_recovers_to_rolled_back() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site(&a, Some("true"));
    let t = s.fleet.targets[0].clone();
    let written = || std::fs::read(&t.cert).ok().as_deref() == Some(b.cert_pem.as_bytes());

    crash_in_verify(&s, "ngx-d2", &b, written);
    assert_verify_pending(&journal(&s, "ngx-d2"));
    assert_files(&s.fleet, &b);
    assert_eq!(s.nginx.served_leaf_sha256(), a.leaf_sha256, "files are B, nginx still serves A");

    let (code, ev) = deploy(&s, "ngx-d2", &b);
    assert_eq!(code, 1, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::RolledBack, "{}", ev.message);
    assert_eq!(md(&ev, "failed_step"), "verify");
    assert_eq!(md(&ev, "original_verified"), "true");
    assert_eq!(md(&ev, "recovered"), "true");
    let n = names(&journal(&s, "ngx-d2")).into_iter().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(n.iter().filter(|x| *x == "started").count(), 1, "decided by recovery, no new attempt: {n:?}");
    assert_files(&s.fleet, &a);
    assert_eq!(s.nginx.served_leaf_sha256(), a.leaf_sha256);
    assert_eq!(s.nginx.reloads(), 0);
}

/// (e) The files already hold B but nginx was never reloaded (serves A):
/// content is `unchanged`, yet the pre-verify sees A, so certdeploy reloads
/// (writing nothing) and verifies -> `deployed`, B served.
#[test]
fn unchanged_files_not_served_are_reloaded() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site(&a, None);
    install(&s.fleet, &b);
    assert_eq!(s.nginx.served_leaf_sha256(), a.leaf_sha256, "files are B, nginx serves A");

    let (code, ev) = deploy(&s, "ngx-e", &b);
    assert_eq!(code, 0, "{}", ev.message);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);

    let j = journal(&s, "ngx-e");
    let n = names(&j);
    assert!(!n.contains(&"written"), "nothing written: {n:?}");
    assert!(
        j.iter().any(|(n, d)| n == "verified" && d.contains("\"matched\":false")),
        "the pre-verify saw the old certificate: {j:?}"
    );
    assert!(j.iter().any(|(n, d)| n == "executed" && d.contains("\"reload\"")), "reloaded: {j:?}");
    s.nginx.wait_settled(Duration::from_secs(10));
    assert_eq!(s.nginx.reloads(), 1);
    assert_eq!(s.nginx.served_leaf_sha256(), b.leaf_sha256);
    assert_files(&s.fleet, &b);
}

/// What one client connection saw: when it was opened, and the leaf it was
/// served (hex SHA-256) or why the handshake failed.
type Seen = (Instant, Result<String, String>);

/// A client that opens a new TLS connection every few ms (a tokio task
/// looping connect + handshake with certdeploy's rustls verifier) and
/// records each one.
struct Prober {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(endpoint: String) -> Prober {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (log, halt) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let task = tokio::spawn(async move {
                    let v = certdeploy::verify::TlsVerifier::new(Duration::from_secs(5));
                    while !halt.load(Ordering::Relaxed) {
                        let opened = Instant::now();
                        let leaf = v.served_leaf(&endpoint, Some(SNI)).await.map(|d| d.to_hex());
                        log.lock().unwrap().push((opened, leaf));
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                });
                task.await.expect("prober task");
            });
        });
        Prober { seen, stop, thread: Some(thread) }
    }

    /// Connections opened at or after `t`, in order.
    fn since(&self, t: Instant) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|(at, _)| *at >= t).cloned().collect()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `certdeploy deploy --json`, returning the result and the instant its
/// line arrived on stdout (before the process has even exited).
fn deploy_timed(s: &Site, id: &str, b: &Bundle) -> (ResultEvent, Instant) {
    let d = s.fleet.tmp.path();
    let log = std::fs::File::create(d.join(format!("{id}.log"))).expect("log file");
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(&s.cfg)
        .args(deploy_args(d, "t0", id, b, true, true))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("run certdeploy deploy");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read the result");
    let received = Instant::now();
    let status = child.wait().expect("wait for certdeploy");
    let ev: ResultEvent = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        let err = std::fs::read_to_string(d.join(format!("{id}.log"))).unwrap_or_default();
        panic!("json result ({e}); {status}\nstdout: {line}\nstderr: {}", tail(&err, 40))
    });
    (ev, received)
}

/// What the client saw around `runs` deployments alternating two
/// certificates, with these `[worker]` verify settings.
#[derive(Debug, Default)]
struct Race {
    /// Connections opened after `deployed` was received that got the
    /// certificate being replaced.
    old_after_result: usize,
    /// ... and all connections opened after it (up to the next deployment).
    after_result: usize,
    /// Connections that got the replaced certificate although an earlier
    /// connection of the same deployment already got the new one: the
    /// graceful reload's race, whatever verify made of it.
    old_after_new: usize,
    failed_handshakes: usize,
}

fn race(worker_extra: &str, runs: usize, prefix: &str) -> Race {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(SNI, 3), ca.leaf(SNI, 2));
    let s = site_with(&a, None, worker_extra, "allow_downgrade = true\n");
    let prober = Prober::start(s.nginx.endpoint());
    let mut r = Race::default();
    let mut served = &a;
    for i in 0..runs {
        let new = if i % 2 == 0 { &b } else { &a };
        let start = Instant::now();
        let (ev, received) = deploy_timed(&s, &format!("{prefix}-{i}"), new);
        assert_eq!(ev.outcome, Outcome::Deployed, "deployment {i}: {}", ev.message);
        // Let the client open enough connections after the result (and
        // nginx's old worker leave) before the next deployment.
        wait_for("client connections after the result", Duration::from_secs(60), || prober.since(received).len() >= 40);
        s.nginx.wait_settled(Duration::from_secs(30));
        let during = prober.since(start);
        let mut saw_new = false;
        for (at, leaf) in &during {
            match leaf {
                Ok(l) if *l == new.leaf_sha256 => saw_new = true,
                Ok(l) if *l == served.leaf_sha256 => {
                    r.old_after_new += usize::from(saw_new);
                    r.old_after_result += usize::from(*at >= received);
                }
                Ok(l) => panic!("deployment {i}: a connection got neither certificate: {l}"),
                Err(_) => r.failed_handshakes += 1,
            }
            r.after_result += usize::from(*at >= received);
        }
        served = new;
    }
    drop(prober);
    eprintln!("{prefix}: {runs} deployments with [{}]: {r:?}", worker_extra.trim().replace('\n', ", "));
    r
}

/// A graceful reload keeps nginx's old worker accepting for a moment: verify
/// passes only after 3 handshakes in a row over 1 s present the new leaf, so
/// once `deployed` is received no new client connection gets the replaced
/// certificate. 20 deployments alternating two certificates, a client
/// connecting every few ms throughout.
#[test]
fn no_client_gets_the_old_certificate_after_deployed() {
    let r = race("verify_consecutive = 3\nverify_window_ms = 1000\n", 20, "ngx-race");
    assert!(r.after_result >= 20 * 40, "{r:?}");
    assert_eq!(r.old_after_result, 0, "connections opened after `deployed` got the old certificate: {r:?}");
}

/// The same with one handshake deciding (`verify_consecutive = 1`, window
/// 0): how often does a client still get the old certificate after
/// `deployed`? A measurement, not a guarantee (two runs here: 64 and 33 of
/// about 930 connections opened after `deployed`): run it with
/// `--run-ignored only` and read its output.
#[test]
#[ignore = "measurement of the race a single-handshake verify leaves open"]
fn single_handshake_verify_race_measurement() {
    let r = race("verify_consecutive = 1\nverify_window_ms = 0\n", 20, "ngx-race1");
    assert!(r.after_result >= 20 * 40, "{r:?}");
}
