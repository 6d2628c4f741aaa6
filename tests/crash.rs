//! Crash tests: the real binary is killed at every failpoint of the
//! driver (and, in the randomized variant, by SIGKILL at random instants),
//! restarted, and the host must end in one of the two states recovery
//! allows (it rolls back anything a confirmed reload did not settle, and
//! finishes what one did): all new files with the configured modes, or
//! exactly the originals. Never a mix, never a temp
//! file, never an in-flight deployment left in the journal, and never key
//! bytes in the journal.
//!
//! Failpoint tests need `--features certdeploy/failpoints`; the randomized
//! and the key-bytes tests run without it too.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use certdeploy_core::Outcome;
use common::*;

/// Modes of the original files (distinct from the configured 0644/0600, so a
/// restore that loses the mode is seen).
const ORIG_CERT_MODE: u32 = 0o664;
const ORIG_KEY_MODE: u32 = 0o640;
const ORIG_CHAIN_MODE: u32 = 0o660;
/// The configured (default) modes of new files.
const NEW_CERT_MODE: u32 = 0o644;
const NEW_KEY_MODE: u32 = 0o600;

fn octal(modes: &[u32]) -> String {
    modes.iter().map(|m| format!("{m:04o}")).collect::<Vec<_>>().join("/")
}

fn mode(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

/// A config written by the harness, with idle SSH masters closed quickly:
/// every crash leaves its ControlMaster behind until this timeout.
/// Written as `<name>.toml` (the harness always writes one path).
fn config(fleet: &Fleet, opts: &Opts, name: &str) -> PathBuf {
    let text = fs::read_to_string(fleet.write_config(opts)).expect("read config");
    let path = fleet.tmp.path().join(format!("{name}.toml"));
    fs::write(&path, text.replacen("[ssh]\n", "[ssh]\nidle_timeout_s = 3\n", 1)).expect("write config");
    path
}

/// Run the binary to completion with (or explicitly without) failpoints.
fn run_bin(cfg: &Path, args: &[&str], failpoints: Option<&str>) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(cfg).args(args).env_remove("FAILPOINTS").env("RUST_LOG", "info");
    if let Some(fp) = failpoints {
        cmd.env("FAILPOINTS", fp);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run certdeploy");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `journal list` rows as (id, state); panics-free: errors become `Err`.
fn journal_rows(cfg: &Path) -> Result<Vec<(String, String)>, String> {
    let (st, out, err) = run_bin(cfg, &["journal", "list"], None);
    if !st.success() {
        return Err(format!("journal list failed ({st}): {out}{err}"));
    }
    let mut rows = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || f[0] == "DEPLOYMENT" || line.ends_with("deployment(s)") {
            continue;
        }
        if f.len() < 3 {
            return Err(format!("journal list: unparsable row `{line}`"));
        }
        rows.push((f[0].to_string(), f[2].to_string()));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Failpoint crashes through `certdeploy deploy`.
// ---------------------------------------------------------------------------
#[cfg(feature = "failpoints")]
mod failpoints {
    use certdeploy_core::wire::ResultEvent;

    use super::*;

    /// cert, key, chain bytes.
    #[derive(Clone, PartialEq, Eq)]
    struct Material {
        cert: Vec<u8>,
        key: Vec<u8>,
        chain: Vec<u8>,
    }

    impl Material {
        fn of(b: &Bundle) -> Material {
            Material {
                cert: b.cert_pem.clone().into_bytes(),
                key: b.key_pem.clone().into_bytes(),
                chain: b.chain_pem.clone().into_bytes(),
            }
        }
    }

    /// What the deployment does when nothing crashes.
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    enum Flow {
        /// Originals on the host; validate `true`; reload succeeds: deployed.
        Deploy,
        /// Originals on the host; the reload fails while the new cert is on
        /// disk (and succeeds on the originals): rolled_back.
        Rollback,
        /// The host already holds the new files: unchanged (snapshot, cleanup).
        Unchanged,
        /// As `Deploy` and `Rollback`, on a host without any of the files
        /// (a rollback removes them).
        FreshDeploy,
        FreshRollback,
    }

    impl Flow {
        fn outcome(self) -> Outcome {
            match self {
                Flow::Deploy | Flow::FreshDeploy => Outcome::Deployed,
                Flow::Rollback | Flow::FreshRollback => Outcome::RolledBack,
                Flow::Unchanged => Outcome::Unchanged,
            }
        }
        /// Durable journal records (`record()` calls) of an uninterrupted run.
        fn records(self) -> usize {
            match self {
                // Started, Begun{Write}, Begun{Reload}, Begun{Commit}, Finished
                // (ReloadShared is appended and made durable by Begun{Reload}).
                Flow::Deploy | Flow::FreshDeploy => 5,
                // Started, Begun{Write}, Begun{Reload}, Begun{Restore},
                // Begun{RetryReload}, Finished.
                Flow::Rollback | Flow::FreshRollback => 6,
                // Started, Finished.
                Flow::Unchanged => 2,
            }
        }
    }

    struct Case {
        flow: Flow,
        /// One `FAILPOINTS` value per crashing run (a second one crashes the
        /// recovery of the first); then one clean run.
        crashes: Vec<String>,
    }

    impl Case {
        fn name(&self) -> String {
            format!("{:?} [{}]", self.flow, self.crashes.join(" ; "))
        }
    }

    /// `name` panicking at its `n`-th hit (0-based).
    fn nth(name: &str, n: usize) -> String {
        if n == 0 { format!("{name}=panic") } else { format!("{name}={n}*off->panic") }
    }

    fn single(flow: Flow, fps: &[&str]) -> Vec<Case> {
        let mut cases = Vec::new();
        for fp in ["before_journal_append", "after_journal_append", "after_journal_sync"] {
            for n in 0..flow.records() {
                cases.push(Case { flow, crashes: vec![nth(fp, n)] });
            }
        }
        for fp in fps {
            cases.push(Case { flow, crashes: vec![format!("{fp}=panic")] });
        }
        cases
    }

    struct Bench {
        fleet: Fleet,
        orig: Material,
        new: Material,
        /// Local copies of the new material for `--cert/--key/--chain`.
        args: [PathBuf; 3],
    }

    impl Bench {
        fn new() -> Bench {
            let fleet = Fleet::new(1, false);
            let ca = TestCa::new();
            let old = ca.leaf("crash.example", 30);
            let new = ca.leaf("crash.example", 1);
            // Marked, so the rollback flow's reload can tell the two apart.
            let orig = Material {
                cert: format!("ORIGINAL cert\n{}", old.cert_pem).into_bytes(),
                key: format!("ORIGINAL key\n{}", old.key_pem).into_bytes(),
                chain: format!("ORIGINAL chain\n{}", old.chain_pem).into_bytes(),
            };
            let dir = fleet.tmp.path();
            let args = [dir.join("new-cert.pem"), dir.join("new-key.pem"), dir.join("new-chain.pem")];
            write_file(&args[0], &new.cert_pem);
            write_file(&args[1], &new.key_pem);
            write_file(&args[2], &new.chain_pem);
            Bench { fleet, orig, new: Material::of(&new), args }
        }

        fn target(&self) -> &Target {
            &self.fleet.targets[0]
        }

        fn config(&self, flow: Flow) -> PathBuf {
            let t = self.target();
            let opts = match flow {
                Flow::Deploy | Flow::Unchanged | Flow::FreshDeploy => {
                    Opts { validate_command: Some("true".into()), ..Opts::default() }
                }
                Flow::Rollback | Flow::FreshRollback => Opts {
                    reload_command: Some(format!(
                        "echo reload >> {log}; test ! -e {cert} || grep -q ORIGINAL {cert}",
                        log = t.reload_log.display(),
                        cert = t.cert.display()
                    )),
                    ..Opts::default()
                },
            };
            config(&self.fleet, &opts, &format!("{flow:?}"))
        }

        /// A fresh host directory and journal for one case.
        fn reset(&self, flow: Flow) {
            let t = self.target();
            for e in fs::read_dir(&t.dir).expect("host dir").flatten() {
                let _ = fs::remove_file(e.path());
            }
            let _ = fs::remove_dir_all(self.fleet.journal_path());
            let sshd = &self.fleet.sshd;
            match flow {
                Flow::Deploy | Flow::Rollback => {
                    sshd.write(&t.cert, &self.orig.cert, ORIG_CERT_MODE);
                    sshd.write(&t.key, &self.orig.key, ORIG_KEY_MODE);
                    sshd.write(&t.chain, &self.orig.chain, ORIG_CHAIN_MODE);
                }
                Flow::Unchanged => {
                    sshd.write(&t.cert, &self.new.cert, NEW_CERT_MODE);
                    sshd.write(&t.key, &self.new.key, NEW_KEY_MODE);
                    sshd.write(&t.chain, &self.new.chain, NEW_CERT_MODE);
                }
                Flow::FreshDeploy | Flow::FreshRollback => {}
            }
        }

        fn deploy_args<'a>(&'a self, id: &'a str) -> Vec<&'a str> {
            vec![
                "deploy",
                "--target",
                "t0",
                "--cert",
                self.args[0].to_str().unwrap(),
                "--key",
                self.args[1].to_str().unwrap(),
                "--chain",
                self.args[2].to_str().unwrap(),
                "--id",
                id,
                "--json",
            ]
        }

        /// What the host holds: each live file must be whole (old or new).
        fn host_state(&self, flow: Flow) -> Result<[&'static str; 3], String> {
            let fresh = matches!(flow, Flow::FreshDeploy | Flow::FreshRollback);
            let t = self.target();
            let (c, k, ch) = self.fleet.files(t);
            let which = |got: Option<Vec<u8>>, old: &[u8], new: &[u8], role: &str| match got {
                Some(b) if b == new => Ok("new"),
                Some(b) if b == old => Ok("orig"),
                Some(b) => Err(format!("{role} is neither the original nor the new file ({} bytes)", b.len())),
                None if fresh => Ok("none"),
                None => Err(format!("{role} is missing")),
            };
            Ok([
                which(c, &self.orig.cert, &self.new.cert, "cert")?,
                which(k, &self.orig.key, &self.new.key, "key")?,
                which(ch, &self.orig.chain, &self.new.chain, "chain")?,
            ])
        }

        fn run_case(&self, case: &Case, id: &str) -> Result<String, String> {
            let flow = case.flow;
            self.reset(flow);
            let cfg = self.config(flow);
            let args = self.deploy_args(id);
            let t = self.target();
            let mut trail = Vec::new();
            for fp in &case.crashes {
                let (st, out, err) = run_bin(&cfg, &args, Some(fp));
                use std::os::unix::process::ExitStatusExt;
                if st.signal() != Some(6) {
                    return Err(format!(
                        "FAILPOINTS={fp}: expected an abort (SIGABRT), got {st}: the failpoint was not hit or the \
                         process did not die\nstdout: {out}\nstderr: {}",
                        tail(&err, 30)
                    ));
                }
                let state = self.host_state(flow).map_err(|e| format!("after the crash at {fp}: {e}"))?;
                trail.push(format!("{fp}: crash, host {state:?}"));
            }
            let (st, out, err) = run_bin(&cfg, &args, None);
            let show = || run_bin(&cfg, &["journal", "show", id], None).1;
            let line = out.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| {
                format!("restart printed no JSON result ({st})\nstdout: {out}\nstderr: {}", tail(&err, 30))
            })?;
            let ev: ResultEvent = serde_json::from_str(line).map_err(|e| format!("result JSON: {e}: {line}"))?;
            let expected = flow.outcome();
            if ev.outcome != expected {
                return Err(format!(
                    "outcome {} (expected {expected}): {}\njournal:\n{}",
                    ev.outcome.as_str(),
                    ev.message,
                    show()
                ));
            }
            let want_code = if expected.success() { 0 } else { 1 };
            if st.code() != Some(want_code) {
                return Err(format!("restart exited {st}, expected {want_code}\nstderr: {}", tail(&err, 80)));
            }
            // Host: all new with configured modes, or exactly the originals.
            let state = self.host_state(flow)?;
            let (want, modes) = match (expected, flow) {
                (Outcome::RolledBack, Flow::FreshRollback) => (["none"; 3], [0; 3]),
                (Outcome::RolledBack, _) => (["orig"; 3], [ORIG_CERT_MODE, ORIG_KEY_MODE, ORIG_CHAIN_MODE]),
                _ => (["new"; 3], [NEW_CERT_MODE, NEW_KEY_MODE, NEW_CERT_MODE]),
            };
            if state != want {
                return Err(format!("host holds {state:?} after outcome {expected}\njournal:\n{}", show()));
            }
            let got_modes = [mode(&t.cert), mode(&t.key), mode(&t.chain)].map(|m| m.unwrap_or(0));
            if got_modes != modes {
                return Err(format!("modes {}, expected {}", octal(&got_modes), octal(&modes)));
            }
            let temps = names_with(&t.dir, ".certdeploy-tmp.");
            if !temps.is_empty() {
                return Err(format!("temp files left: {temps:?}"));
            }
            let backups = names_with(&t.dir, ".certdeploy-bak.");
            let max_backups = if expected == Outcome::Deployed { 3 } else { 0 };
            if backups.len() > max_backups {
                return Err(format!("backups left after {expected}: {backups:?}"));
            }
            // Journal: nothing in flight; this id's latest attempt is terminal.
            let rows = journal_rows(&cfg)?;
            if let Some((rid, state)) = rows.iter().find(|(_, s)| s.starts_with("inflight")) {
                return Err(format!("journal list shows {rid} in flight ({state})"));
            }
            match rows.iter().find(|(rid, _)| rid == id) {
                Some((_, s)) if s == expected.as_str() => {}
                other => return Err(format!("journal list row for {id}: {other:?}, expected {expected}")),
            }
            // Reloads: a deployed/rolled-back run reloads at least once unless
            // nothing changed; each interrupted attempt adds at most a reload
            // and a retry-reload.
            let reloads = self.fleet.reloads(t);
            let (lo, hi) = match flow {
                Flow::Deploy | Flow::FreshDeploy => (1, 1 + 2 * case.crashes.len()),
                Flow::Rollback | Flow::FreshRollback => (2, 2 + 2 * case.crashes.len()),
                Flow::Unchanged => (0, 2 * case.crashes.len()),
            };
            if reloads < lo || reloads > hi {
                return Err(format!("{reloads} reloads, expected {lo}..={hi}\njournal:\n{}", show()));
            }
            trail.push(format!("restart: {} (attempts {}), {reloads} reload(s)", ev.outcome.as_str(), ev.attempts));
            Ok(trail.join("; "))
        }
    }

    /// Run every case on one fleet; report all failures at once.
    fn run_cases(test: &str, cases: Vec<Case>) {
        let bench = Bench::new();
        let started = Instant::now();
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let id = format!("{test}-{i}");
            let t = Instant::now();
            match bench.run_case(case, &id) {
                Ok(summary) => eprintln!("ok   {:<60} {:>5} ms  {summary}", case.name(), t.elapsed().as_millis()),
                Err(e) => {
                    eprintln!("FAIL {:<60} {e}", case.name());
                    failures.push(format!("{}: {e}", case.name()));
                }
            }
        }
        eprintln!("{test}: {} case(s) in {:.1} s", cases.len(), started.elapsed().as_secs_f64());
        assert!(
            failures.is_empty(),
            "{} of {} case(s) failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n\n")
        );
    }

    #[test]
    fn crash_at_every_failpoint_of_a_deployment() {
        let fps = [
            "before_snapshot",
            "after_snapshot",
            "before_write",
            "after_write",
            "before_validate",
            "after_validate",
            "before_reload",
            "after_reload",
            "before_prune",
            "after_prune",
        ];
        run_cases("deploy", single(Flow::Deploy, &fps));
    }

    #[test]
    fn crash_during_rollback_ends_at_the_originals() {
        let fps = [
            "before_write",
            "after_write",
            "before_reload",
            "after_reload",
            "before_restore",
            "after_restore",
            "before_retry_reload",
            "after_retry_reload",
        ];
        run_cases("rollback", single(Flow::Rollback, &fps));
    }

    #[test]
    fn crash_when_nothing_changes_and_during_recovery() {
        let mut cases =
            single(Flow::Unchanged, &["before_snapshot", "after_snapshot", "before_cleanup", "after_cleanup"]);
        // A second crash inside the recovery of the first: every recovery step
        // must be safe to run again.
        let twice = |flow, a: &str, b: &str| Case { flow, crashes: vec![a.to_string(), b.to_string()] };
        cases.extend([
            twice(Flow::Deploy, "after_snapshot=panic", "before_cleanup=panic"),
            twice(Flow::Deploy, "after_snapshot=panic", "after_cleanup=panic"),
            twice(Flow::Deploy, "after_write=panic", "after_journal_sync=panic"),
            twice(Flow::Deploy, "after_write=panic", "before_restore=panic"),
            twice(Flow::Deploy, "after_write=panic", "after_restore=panic"),
            twice(Flow::Deploy, "after_reload=panic", "before_retry_reload=panic"),
            twice(Flow::Deploy, "after_reload=panic", "after_retry_reload=panic"),
            twice(Flow::Deploy, "before_prune=panic", "after_prune=panic"),
            twice(Flow::Rollback, "after_restore=panic", "after_restore=panic"),
            twice(Flow::Rollback, "before_retry_reload=panic", "after_retry_reload=panic"),
            twice(Flow::Unchanged, "after_snapshot=panic", "after_cleanup=panic"),
        ]);
        run_cases("recovery", cases);
    }

    #[test]
    fn crash_on_a_host_without_the_files() {
        // No file on the host before: a rollback removes the new ones.
        let mut cases = Vec::new();
        for flow in [Flow::FreshDeploy, Flow::FreshRollback] {
            for n in 0..flow.records() {
                cases.push(Case { flow, crashes: vec![nth("after_journal_sync", n)] });
            }
            let last = if flow == Flow::FreshDeploy { "after_prune" } else { "after_restore" };
            for fp in ["after_snapshot", "before_write", "after_write", "after_reload", last] {
                cases.push(Case { flow, crashes: vec![format!("{fp}=panic")] });
            }
        }
        run_cases("fresh", cases);
    }
}

// ---------------------------------------------------------------------------
// Randomized: SIGKILL the worker at random instants.
// ---------------------------------------------------------------------------

/// splitmix64: a seeded generator without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Without the `failpoints` feature the failpoint crash tests cannot run:
/// they are listed as ignored, with the reason, instead of vanishing.
#[cfg(not(feature = "failpoints"))]
mod failpoints {
    #[test]
    #[ignore = "needs --features certdeploy-e2e/failpoints"]
    fn crash_at_every_failpoint_of_a_deployment() {}

    #[test]
    #[ignore = "needs --features certdeploy-e2e/failpoints"]
    fn crash_during_rollback_ends_at_the_originals() {}

    #[test]
    #[ignore = "needs --features certdeploy-e2e/failpoints"]
    fn crash_when_nothing_changes_and_during_recovery() {}

    #[test]
    #[ignore = "needs --features certdeploy-e2e/failpoints"]
    fn crash_on_a_host_without_the_files() {}
}

/// N of the worker's "recovering N unfinished deployment(s)" (0 if none).
fn recovered_count(log: &str) -> usize {
    log.lines()
        .filter_map(|l| l.split("recovering ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_survives_random_sigkills() {
    let seed = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("random-kill seed: CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let fleet = Fleet::new(3, true);
    let cfg = config(&fleet, &Opts::default(), "worker");
    let ca = TestCa::new();
    // Same notBefore everywhere: the order in which requests land on a
    // target may change with every crash, and none may be "superseded".
    let nb = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 - 86_400;
    let old = ca.leaf_at("old.example", nb - 86_400, nb + 300 * 86_400);
    for t in &fleet.targets {
        fleet.sshd.write(&t.cert, old.cert_pem.as_bytes(), ORIG_CERT_MODE);
        fleet.sshd.write(&t.key, old.key_pem.as_bytes(), ORIG_KEY_MODE);
        fleet.sshd.write(&t.chain, old.chain_pem.as_bytes(), ORIG_CHAIN_MODE);
    }
    let n = 60;
    let bundles: Vec<Bundle> = (0..n).map(|i| ca.leaf_at(&format!("r{i}.example"), nb, nb + 365 * 86_400)).collect();
    let mut client = Client::connect(&fleet).await;
    let ids: Vec<String> = (0..n).map(|i| format!("rk-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        client.publish(&request(id, &fleet.targets[i % 3].name, &bundles[i], true)).await;
    }
    let kills = rng.range(3, 5);
    let mut worker = Proc::worker(&fleet, &cfg, &[], "worker-0");
    let mut intervals = Vec::new();
    // Per restart: deployments the journal held unfinished at the kill,
    // and how many the restarted worker said it resumed.
    let (mut unfinished, mut recovered) = (Vec::new(), Vec::new());
    for k in 0..kills {
        // From the moment the worker consumes (after its recovery), so the
        // kill lands among deployments rather than in the start-up.
        let ready = Instant::now();
        while !worker.log_text().contains("consuming") {
            assert!(
                ready.elapsed() < Duration::from_secs(120),
                "worker-{k} never began consuming (CRASH_SEED={seed})\n{}",
                tail(&worker.log_text(), 40)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if k > 0 {
            recovered.push(recovered_count(&worker.log_text()));
        }
        let ms = rng.range(100, 800);
        intervals.push(ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        worker.kill9();
        let rows = journal_rows(&cfg).unwrap_or_else(|e| panic!("CRASH_SEED={seed}: {e}"));
        unfinished.push(rows.iter().filter(|(_, state)| state.starts_with("inflight")).count());
        worker = Proc::worker(&fleet, &cfg, &[], &format!("worker-{}", k + 1));
    }
    eprintln!("killed {kills} times, {intervals:?} ms after consuming began");
    let seen = client.collect(Duration::from_secs(120), all_ids(&ids)).await;
    recovered.push(recovered_count(&worker.log_text()));
    worker.signal("TERM");
    let stopped = worker.wait_timeout(Duration::from_secs(30));
    assert!(stopped.is_some(), "worker did not stop on SIGTERM (seed {seed})");

    let mut problems = Vec::new();
    // Every restart resumes exactly what the journal held unfinished.
    if recovered != unfinished {
        problems.push(format!(
            "restarts resumed {recovered:?} deployment(s), the journal held {unfinished:?} unfinished at the kills"
        ));
    }
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut duplicates = 0;
    for id in &ids {
        match seen.get(id) {
            None => problems.push(format!("{id}: no result")),
            Some(rs) => {
                duplicates += rs.len() - 1;
                *outcomes.entry(rs[0].outcome.as_str()).or_default() += 1;
                if rs[0].outcome != Outcome::Deployed {
                    problems.push(format!("{id}: {} ({})", rs[0].outcome.as_str(), rs[0].message));
                }
                if rs.iter().any(|r| r.outcome != rs[0].outcome) {
                    problems.push(format!(
                        "{id}: conflicting results {:?}",
                        rs.iter().map(|r| r.outcome).collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    for (h, t) in fleet.targets.iter().enumerate() {
        let (c, k, ch) = fleet.files(t);
        let (c, k, ch) = (c.unwrap_or_default(), k.unwrap_or_default(), ch.unwrap_or_default());
        match bundles.iter().position(|b| b.cert_pem.as_bytes() == c.as_slice()) {
            None => problems.push(format!("{}: the cert on disk is none of the requests'", t.name)),
            Some(i) => {
                if i % 3 != h {
                    problems.push(format!("{}: holds request {i}'s cert, meant for another target", t.name));
                }
                if bundles[i].key_pem.as_bytes() != k.as_slice() {
                    problems.push(format!("{}: the key on disk does not belong to the cert on disk (rk-{i})", t.name));
                }
                if bundles[i].chain_pem.as_bytes() != ch.as_slice() {
                    problems.push(format!("{}: chain mismatch", t.name));
                }
            }
        }
        let modes = [mode(&t.cert), mode(&t.key), mode(&t.chain)].map(|m| m.unwrap_or(0));
        if modes != [NEW_CERT_MODE, NEW_KEY_MODE, NEW_CERT_MODE] {
            problems.push(format!("{}: modes {}", t.name, octal(&modes)));
        }
        let temps = names_with(&t.dir, ".certdeploy-tmp.");
        if !temps.is_empty() {
            problems.push(format!("{}: temp files left: {temps:?}", t.name));
        }
        let backups = names_with(&t.dir, ".certdeploy-bak.");
        if backups.len() > 3 {
            problems.push(format!("{}: {} backups left (keep 1 per path): {backups:?}", t.name, backups.len()));
        }
        // Every deployed request reloaded at least once; an interrupted
        // attempt adds at most a reload and a retry-reload.
        let per_target = n / 3;
        let reloads = fleet.reloads(t);
        if reloads < per_target || reloads > per_target + 2 * kills as usize {
            problems.push(format!("{}: {reloads} reloads for {per_target} deployments and {kills} kills", t.name));
        }
    }
    match journal_rows(&cfg) {
        Ok(rows) => {
            for (id, state) in &rows {
                if state.starts_with("inflight") {
                    problems.push(format!("journal: {id} in flight ({state})"));
                }
            }
            if rows.len() != n {
                problems.push(format!("journal lists {} deployments, expected {n}", rows.len()));
            }
        }
        Err(e) => problems.push(e),
    }
    eprintln!(
        "random kills: seed {seed}, {kills} kills at {intervals:?} ms, deployments resumed by each restart \
         {recovered:?} (unfinished at the kills {unfinished:?}), outcomes {outcomes:?}, {duplicates} re-published \
         result(s), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "CRASH_SEED={seed}: {} problem(s):\n{}", problems.len(), problems.join("\n"));
}

// ---------------------------------------------------------------------------
// The journal never holds key bytes.
// ---------------------------------------------------------------------------

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Distinctive pieces of a key PEM: every 32-char slice of each line of its
/// base64 body (as stored in a PEM file), then every 16-byte slice of its
/// DER (as a binary encoding would hold it).
fn key_needles(key_pem: &str) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let lines: Vec<&str> = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let b64 =
        lines.iter().flat_map(|l| l.as_bytes().chunks(32)).filter(|c| c.len() == 32).map(<[u8]>::to_vec).collect();
    let der = b64_decode(&lines.concat());
    (b64, der.chunks(16).filter(|c| c.len() == 16).map(<[u8]>::to_vec).collect())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { files_under(&p, out) } else { out.push(p) }
    }
}

#[test]
fn journal_never_holds_key_bytes() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    let ca = TestCa::new();
    let dir = fleet.tmp.path();
    let old = ca.leaf("keys.example", 30);
    fleet.sshd.write(&t.cert, old.cert_pem.as_bytes(), ORIG_CERT_MODE);
    fleet.sshd.write(&t.key, old.key_pem.as_bytes(), ORIG_KEY_MODE);
    let mut keys = vec![old.key_pem.clone()];
    let mut outputs = String::new();
    let deploy = |cfg: &Path, b: &Bundle, id: &str, fp: Option<&str>| {
        let args = deploy_args(dir, "t0", id, b, false, false);
        run_bin(cfg, &strs(&args), fp)
    };
    // A plain deployment, then one that rolls back (reload fails on it).
    let cfg = config(&fleet, &Opts::default(), "good");
    let b1 = ca.leaf("keys.example", 2);
    keys.push(b1.key_pem.clone());
    let (st, out, err) = deploy(&cfg, &b1, "keys-1", None);
    assert!(st.success(), "{out}{err}");
    outputs.push_str(&(out + &err));
    let bad = config(&fleet, &Opts { reload_command: Some("false".into()), ..Opts::default() }, "bad");
    let b2 = ca.leaf("keys.example", 1);
    keys.push(b2.key_pem.clone());
    let (st, out, err) = deploy(&bad, &b2, "keys-2", None);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(out.contains("rolled_back"), "{out}");
    outputs.push_str(&(out + &err));
    // A crash after the write and a recovery, where the failpoints exist.
    if cfg!(feature = "failpoints") {
        let b3 = ca.leaf("keys.example", 0);
        keys.push(b3.key_pem.clone());
        let (st, out, err) = deploy(&cfg, &b3, "keys-3", Some("after_write=panic"));
        assert!(!st.success(), "{out}{err}");
        outputs.push_str(&(out + &err));
        let (st, out, err) = deploy(&cfg, &b3, "keys-3", None);
        assert!(st.success(), "{out}{err}");
        outputs.push_str(&(out + &err));
    }
    let (_, list, _) = run_bin(&cfg, &["journal", "list"], None);
    assert!(list.contains("keys-1") && list.contains("keys-2"), "{list}");

    // The scan finds what it looks for: the deployed key is on the host.
    let live = fs::read(&t.key).expect("live key");
    let (b64, _) = key_needles(keys.last().expect("keys"));
    assert!(!b64.is_empty() && b64.iter().all(|n| contains(&live, n)), "the needles miss the live key");
    let mut files = Vec::new();
    files_under(&fleet.journal_path(), &mut files);
    assert!(!files.is_empty(), "no journal files under {}", fleet.journal_path().display());
    let mut scanned = 0usize;
    for (k, key) in keys.iter().enumerate() {
        let (b64, der) = key_needles(key);
        let needles: Vec<&Vec<u8>> = b64.iter().chain(&der).collect();
        for f in &files {
            let bytes = fs::read(f).unwrap_or_default();
            scanned += bytes.len();
            if let Some(n) = needles.iter().find(|n| contains(&bytes, n)) {
                panic!("key {k}'s bytes ({}) found in journal file {}", String::from_utf8_lossy(n), f.display());
            }
        }
        assert!(!needles.iter().any(|n| contains(outputs.as_bytes(), n)), "key {k}'s bytes in the command output");
    }
    eprintln!("scanned {} journal file(s) ({} bytes) for {} keys", files.len(), scanned / keys.len(), keys.len());
}

/// A crash while the snapshot backs up a file by copy (hard link refused,
/// e.g. a root-owned original under fs.protected_hardlinks) must not leave
/// `<path>.certdeploy-bak.<id>.certdeploy-tmp.<id>` (the original's bytes,
/// here a key) behind: recovery's cleanup and restore remove it too.
#[test]
fn crash_during_a_backup_copy_leaves_no_temp() {
    use std::os::unix::fs::chown;
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    let ca = TestCa::new();
    let old = ca.leaf("copy.example", 30);
    let new = ca.leaf("copy.example", 1);
    // A large original key (slow to copy) owned by root: no hard link.
    let big_key = format!("{}{}", old.key_pem, "#".repeat(64 << 20));
    fleet.sshd.write(&t.cert, old.cert_pem.as_bytes(), 0o644);
    fleet.sshd.write(&t.key, big_key.as_bytes(), 0o644);
    chown(&t.key, Some(0), Some(0)).expect("chown root");
    let dir = fleet.tmp.path();
    let cfg = config(&fleet, &Opts::default(), "copy");
    let args = |id: &str| deploy_args(dir, "t0", id, &new, false, false);
    let a = args("copy-1");
    let mut p = Proc::spawn(&cfg, &strs(&a), &[], dir.join("copy-1.log"));
    let start = Instant::now();
    while names_with(&t.dir, ".certdeploy-bak.copy-1.certdeploy-tmp.").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "no backup copy seen\n{}", p.log_text());
        std::thread::sleep(Duration::from_millis(2));
    }
    p.kill9();
    // Another request (the first is never retried) recovers the first...
    let b = args("copy-2");
    // ... and rolls back (a commit would prune the leftover as an old backup).
    let bad = config(&fleet, &Opts { reload_command: Some("false".into()), ..Opts::default() }, "copy-bad");
    let (st, out, err) = run_bin(&bad, &strs(&b), None);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    let (_, list, _) = run_bin(&cfg, &["journal", "list"], None);
    eprintln!("{list}\nhost dir: {:?}", names_with(&t.dir, ""));
    let temps = names_with(&t.dir, ".certdeploy-tmp.");
    assert!(temps.is_empty(), "temp files left: {temps:?}");
}
