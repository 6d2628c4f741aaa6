//! Several workers sharing one queue and one fleet, end to end: several
//! `certdeploy worker` processes of the real binary (each with its own
//! journal, SSH control directory and name) consume one RabbitMQ vhost and
//! deploy to one sshd fleet. What must hold:
//!
//! - deployments to one target never overlap, across workers: every
//!   deployment holds the host lock (`<cert_path>.certdeploy-lock`) while it
//!   validates and reloads, and the validate..reload intervals of two
//!   deployments never intersect;
//! - a SIGKILLed worker's deployment is taken over once its lease expires:
//!   the host is rolled back to its pre-deploy state (one retry reload; on a
//!   machine too slow for the lease, repeated by the next taker when a
//!   taker's own lease overran before it rewrote the lock, and always before
//!   anything else runs on the target), and the next deployment proceeds;
//! - a worker restarted right after a SIGKILL (same journal) and another
//!   worker never both undo the same deployment;
//! - a deployment slower than the lease keeps its lock (renewed) and the
//!   next request for that target is deferred, then deployed;
//! - a request deferred `max_deferrals` times ends `failed`, host untouched.
//!
//! How the host is observed: every target's `validate_command` and
//! `reload_command` is a small shell hook (run over SSH as the test user)
//! that appends one line to `<host dir>/hooks.log`:
//!
//! ```text
//! <V|R|E> <ns since epoch> <sha256 of the live cert file> <lock file content, one line>
//! ```
//!
//! `V` = validate, `R` = reload started, `E` = reload finished. The lock
//! content tells which deployment (and which lock acquisition: `token`) held
//! the target at that instant; the digest tells whose certificate was live.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;

const LOCK_SUFFIX: &str = ".certdeploy-lock";
const REQUESTS: &str = "certdeploy.requests";
const RETRY: &str = "certdeploy.retry";

/// The hook run as validate and reload command: `hook.sh <V|R> <host dir>`.
///
/// Markers in the host directory (created by the test):
/// - `sleep-once`: the first reload that renames it away sleeps that many
///   seconds, then logs `E` as usual;
/// - `hang-once`: the first reload that renames it away sleeps that many
///   seconds and logs nothing more (its worker is killed meanwhile; the
///   orphaned remote command must not log late lines).
const HOOK: &str = r#"#!/bin/sh
kind=$1
dir=$2
line() {
  ts=$(date +%s%N)
  sum=$(sha256sum < "$dir/site.pem" 2>/dev/null | cut -d' ' -f1)
  lock=$(tr -d '\n' < "$dir/site.pem.certdeploy-lock" 2>/dev/null)
  echo "$1 $ts ${sum:--} $lock" >> "$dir/hooks.log"
}
line "$kind"
# Validate takes a moment: a wider window for an overlap to show.
if [ "$kind" = V ]; then sleep 0.05; fi
if [ "$kind" = R ]; then
  if mv "$dir/hang-once" "$dir/hang-once.taken" 2>/dev/null; then
    sleep "$(cat "$dir/hang-once.taken")"
    exit 0
  fi
  if mv "$dir/sleep-once" "$dir/sleep-once.taken" 2>/dev/null; then
    sleep "$(cat "$dir/sleep-once.taken")"
  fi
  line E
fi
exit 0
"#;

// ---------------------------------------------------------------------------
// Fixture: a fleet, N workers, their configs
// ---------------------------------------------------------------------------

/// Per-test settings of the `[worker]` table shared by every worker.
struct Setup {
    lease_s: u64,
    defer_delay_ms: u64,
    max_deferrals: u32,
    concurrency: usize,
}

struct Mw {
    /// Live worker processes by name. Dropping a `Proc` SIGKILLs it: the
    /// guard that no worker outlives the test. First field, so dropped
    /// first: before the sshd and the temp dir the workers use go away.
    procs: BTreeMap<String, Proc>,
    fleet: Fleet,
    hook: PathBuf,
    setup: Setup,
    /// Worker name -> its config file.
    configs: BTreeMap<String, PathBuf>,
    /// Log files of every process ever started, by label (for post-mortems).
    logs: Vec<(String, PathBuf)>,
}

impl Mw {
    fn new(hosts: usize, setup: Setup) -> Mw {
        let fleet = Fleet::new(hosts, true);
        let hook = fleet.sshd.dir().join("hook.sh");
        fs::write(&hook, HOOK).expect("write hook");
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod hook");
        Mw { procs: BTreeMap::new(), fleet, hook, setup, configs: BTreeMap::new(), logs: Vec::new() }
    }

    fn hook_log(&self, t: usize) -> PathBuf {
        self.fleet.targets[t].dir.join("hooks.log")
    }

    /// Write `<name>.toml`: own journal, control dir and worker name; the
    /// same targets for everyone.
    fn config(&mut self, name: &str) -> PathBuf {
        let f = &self.fleet;
        let tmp = f.tmp.path();
        let s = &self.setup;
        let mut c = format!(
            "[worker]\namqp_url = \"{url}\"\njournal_path = \"{journal}\"\nconcurrency = {conc}\n\
             per_host_concurrency = 4\nmetrics_listen = \"\"\nshutdown_grace_s = 20\nworker_name = \"{name}\"\n\
             lock_lease_s = {lease}\ndefer_delay_ms = {defer}\nmax_deferrals = {maxd}\n\n",
            url = f.amqp_url(),
            journal = tmp.join(format!("journal-{name}")).display(),
            conc = s.concurrency,
            lease = s.lease_s,
            defer = s.defer_delay_ms,
            maxd = s.max_deferrals,
        );
        c.push_str(&format!(
            "[ssh]\nknown_hosts = \"{}\"\nidentity_file = \"{}\"\nconnect_timeout_s = 5\ncontrol_dir = \"{}\"\n\
             idle_timeout_s = 3\n\n",
            f.sshd.known_hosts_path().display(),
            f.sshd.identity_path().display(),
            tmp.join(format!("ssh-{name}")).display()
        ));
        for t in &f.targets {
            let hook = |k: &str| format!("{} {k} {}", self.hook.display(), t.dir.display());
            c.push_str(&f.target_section(t, &hook("R"), Some(&hook("V"))));
            c.push('\n');
        }
        let path = tmp.join(format!("{name}.toml"));
        fs::write(&path, c).expect("write config");
        self.configs.insert(name.to_string(), path.clone());
        path
    }

    /// Start worker `name` (writing its config on first use), logging to
    /// `<label>.log`.
    fn start(&mut self, name: &str, label: &str, env: &[(&str, &str)]) {
        let cfg = match self.configs.get(name) {
            Some(c) => c.clone(),
            None => self.config(name),
        };
        let p = Proc::worker(&self.fleet, &cfg, env, label);
        self.logs.push((label.to_string(), p.log.clone()));
        assert!(self.procs.insert(name.to_string(), p).is_none(), "{name} already running");
    }

    fn wait_consuming(&self, name: &str, timeout: Duration) {
        let p = &self.procs[name];
        let start = Instant::now();
        while !p.log_text().contains("consuming") {
            assert!(start.elapsed() < timeout, "{name} not consuming after {timeout:?}:\n{}", tail(&p.log_text(), 40));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self, name: &str) -> Proc {
        let mut p = self.procs.remove(name).unwrap_or_else(|| panic!("{name} is not running"));
        p.kill9();
        p
    }

    /// SIGTERM every worker; each must exit 0 within the grace period.
    fn stop_all(&mut self) {
        for p in self.procs.values() {
            p.signal("TERM");
        }
        let mut problems = Vec::new();
        for (name, p) in self.procs.iter_mut() {
            match p.wait_timeout(Duration::from_secs(30)) {
                Some(s) if s.success() => {}
                Some(s) => problems.push(format!("{name} exited with {s}:\n{}", tail(&p.log_text(), 30))),
                None => problems.push(format!("{name} did not stop within 30 s of SIGTERM")),
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    fn log_of(&self, label: &str) -> String {
        self.logs
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, p)| fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Every worker log, concatenated (for messages).
    fn all_logs_tail(&self, lines: usize) -> String {
        self.logs
            .iter()
            .map(|(l, p)| format!("---- {l} ----\n{}", tail(&fs::read_to_string(p).unwrap_or_default(), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Lines of every worker log that mention `needle` (ANSI colours removed).
    fn log_lines_about(&self, needle: &str, max: usize) -> String {
        let mut out = Vec::new();
        for (l, p) in &self.logs {
            for line in strip_ansi(&fs::read_to_string(p).unwrap_or_default()).lines() {
                if line.contains(needle) && out.len() < max {
                    out.push(format!("{l}: {line}"));
                }
            }
        }
        out.join("\n")
    }

    /// Drop a marker file (owned by the test user) into target `t`'s dir.
    fn marker(&self, t: usize, name: &str, content: &str) {
        let path = self.fleet.targets[t].dir.join(name);
        self.fleet.sshd.write(&path, content.as_bytes(), 0o644);
    }
}

// ---------------------------------------------------------------------------
// Observations
// ---------------------------------------------------------------------------

/// One line of a target's hook log.
#[derive(Clone, Debug)]
struct Hook {
    kind: char,
    ts: u128,
    sha: String,
    lock: Option<Lock>,
    raw: String,
}

#[derive(Clone, Debug, PartialEq)]
struct Lock {
    token: String,
    worker: String,
    deployment_id: String,
    attempt: Option<u64>,
    phase: String,
    lease_ms: Option<u64>,
    /// sha256 of the certificate the lock's snapshots say was live before
    /// its deployment wrote (what a rollback of it restores).
    cert_pre: Option<String>,
}

fn parse_lock(text: &str) -> Result<Option<Lock>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("lock is not JSON ({e}): {text}"))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64());
    Ok(Some(Lock {
        token: s("token").ok_or_else(|| format!("lock without a string `token`: {text}"))?,
        worker: s("worker").ok_or_else(|| format!("lock without a string `worker`: {text}"))?,
        deployment_id: s("deployment_id").ok_or_else(|| format!("lock without a string `deployment_id`: {text}"))?,
        attempt: n("attempt"),
        phase: s("phase").ok_or_else(|| format!("lock without a string `phase`: {text}"))?,
        lease_ms: n("lease_ms"),
        cert_pre: v.get("snapshots").and_then(|x| x.as_array()).and_then(|snaps| {
            snaps
                .iter()
                .find(|e| e.get(0).and_then(|r| r.as_str()) == Some("cert"))
                .and_then(|e| e.get(1)?.get("pre")?.get("sha256")?.as_str().map(str::to_string))
        }),
    }))
}

fn hook_lines(path: &Path) -> Vec<Hook> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let kind = it.next().and_then(|k| k.chars().next()).unwrap_or('?');
            let ts = it.next().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("bad hook line {l:?}"));
            let sha = it.next().unwrap_or("-").to_string();
            let lock = parse_lock(it.next().unwrap_or("")).unwrap_or_else(|e| panic!("hook line {l:?}: {e}"));
            Hook { kind, ts, sha, lock, raw: l.to_string() }
        })
        .collect()
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos()
}

/// sha256 (hex) of each text, via `sha256sum` (one process for all).
fn sha256_many(dir: &Path, texts: &[(&str, &str)]) -> HashMap<String, String> {
    let d = dir.join("sha-input");
    fs::create_dir_all(&d).expect("mkdir");
    let mut cmd = Command::new("sha256sum");
    cmd.current_dir(&d);
    for (i, (_, text)) in texts.iter().enumerate() {
        let name = format!("{i}");
        fs::write(d.join(&name), text).expect("write sha input");
        cmd.arg(name);
    }
    let out = cmd.output().expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let mut by_index = HashMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = l.split_whitespace();
        let (Some(sum), Some(name)) = (it.next(), it.next()) else { continue };
        by_index.insert(name.trim_start_matches('*').to_string(), sum.to_string());
    }
    let _ = fs::remove_dir_all(&d);
    texts.iter().enumerate().map(|(i, (key, _))| (key.to_string(), by_index[&format!("{i}")].clone())).collect()
}

/// Requests with one notBefore for all (no request supersedes another,
/// whatever order workers pick them in), older originals on every host.
struct Work {
    batch: Batch,
    orig: Bundle,
    /// deployment id / "orig" -> sha256 of its certificate PEM.
    sha: HashMap<String, String>,
    /// The configured lease, as the lock file must state it.
    lease_ms: u64,
}

impl Work {
    /// `per_target` requests for every target, interleaved round-robin.
    fn new(mw: &Mw, prefix: &str, per_target: usize, originals: bool) -> Work {
        let fleet = &mw.fleet;
        let ca = TestCa::new();
        let nb = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 - 86_400;
        let orig = ca.leaf_at(&format!("{prefix}-orig.example"), nb - 86_400, nb + 300 * 86_400);
        let n = per_target * fleet.targets.len();
        let items: Vec<Item> = (0..n)
            .map(|i| {
                let target = i % fleet.targets.len();
                let bundle = ca.leaf_at(&format!("{prefix}-{i}.example"), nb, nb + 365 * 86_400);
                let id = format!("{prefix}-{i:04}");
                let body = request(&id, &fleet.targets[target].name, &bundle, true);
                Item { id, target, bundle, body }
            })
            .collect();
        if originals {
            for t in &fleet.targets {
                fleet.sshd.write(&t.cert, orig.cert_pem.as_bytes(), 0o644);
                fleet.sshd.write(&t.key, orig.key_pem.as_bytes(), 0o600);
                fleet.sshd.write(&t.chain, orig.chain_pem.as_bytes(), 0o644);
            }
        }
        let mut texts: Vec<(&str, &str)> = items.iter().map(|i| (i.id.as_str(), i.bundle.cert_pem.as_str())).collect();
        texts.push(("orig", orig.cert_pem.as_str()));
        let sha = sha256_many(fleet.tmp.path(), &texts);
        Work { batch: Batch { ca, items }, orig, sha, lease_ms: mw.setup.lease_s * 1000 }
    }

    fn ids(&self) -> Vec<String> {
        self.batch.ids()
    }

    fn id_of_sha(&self, sha: &str) -> Option<&str> {
        self.sha.iter().find(|(_, s)| s.as_str() == sha).map(|(id, _)| id.as_str())
    }
}

/// What a target holds: the originals, or exactly one request's set.
fn host_holds(mw: &Mw, work: &Work, t: usize) -> Result<String, String> {
    let target = &mw.fleet.targets[t];
    let (c, k, ch) = mw.fleet.files(target);
    let o = &work.orig;
    if c.as_deref() == Some(o.cert_pem.as_bytes())
        && k.as_deref() == Some(o.key_pem.as_bytes())
        && ch.as_deref() == Some(o.chain_pem.as_bytes())
    {
        return Ok("orig".into());
    }
    host_state(&mw.fleet, &work.batch, t)?.ok_or_else(|| format!("{}: no files at all", target.name))
}

/// Fail with every problem found, after printing t0's hook log and the
/// tail of every worker's log.
fn assert_no_problems(mw: &Mw, problems: &[String]) {
    if !problems.is_empty() {
        eprintln!("t0 hook log:\n{}", fs::read_to_string(mw.hook_log(0)).unwrap_or_default());
        eprintln!("{}", mw.all_logs_tail(60));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// After all workers stopped: target `t` holds the set of the deployment
/// that reloaded last (`iv` from [`check_hook_log`]), no lock, claim or
/// temp file is left, and at most one backup per path. After a kill at
/// `kill_ns`, a lock temp or claim file written within 3 s of it may be
/// left: a kill leaves one when it lands between the write and the rename,
/// and only a taker more than a lease later removes it
/// (`repeated_kills_during_a_batch_leave_no_lock_claim_or_temp` proves that).
fn check_final_state(
    mw: &Mw,
    work: &Work,
    t: usize,
    iv: &[(u128, u128, String, String)],
    kill_ns: Option<u128>,
    problems: &mut Vec<String>,
) {
    let target = &mw.fleet.targets[t];
    match host_holds(mw, work, t) {
        Err(e) => problems.push(e),
        Ok(id) => {
            let want = iv.last().map(|x| x.3.clone()).unwrap_or_default();
            if id != want {
                problems.push(format!("{}: holds {id}, but the last deployment to reload was {want}", target.name));
            }
        }
    }
    let mut left = lock_leftovers(&target.dir);
    if let Some(kill) = kill_ns {
        left.retain(|name| {
            let litter =
                name.contains(&format!("{LOCK_SUFFIX}.tmp.")) || name.contains(&format!("{LOCK_SUFFIX}.claim."));
            let written = fs::metadata(target.dir.join(name))
                .and_then(|m| m.modified())
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos())
                .unwrap_or(0);
            !(litter && written.abs_diff(kill) <= 3_000_000_000)
        });
    }
    if !left.is_empty() {
        problems.push(format!("{}: left after all workers stopped: {left:?}", target.name));
    }
    let backups = names_with(&target.dir, ".certdeploy-bak.");
    if backups.len() > 3 {
        problems.push(format!("{}: {} backups left (keep 1 per path): {backups:?}", target.name, backups.len()));
    }
}

/// Lock, claim and temp names left in a target's directory.
fn lock_leftovers(dir: &Path) -> Vec<String> {
    let mut v = names_with(dir, LOCK_SUFFIX);
    v.extend(names_with(dir, ".certdeploy-tmp."));
    v
}

/// Checks of one target's hook log that hold in every test. Returns the
/// per-token intervals (start, end, token, deployment id), sorted.
fn check_hook_log(
    target: &str,
    lines: &[Hook],
    work: &Work,
    problems: &mut Vec<String>,
) -> Vec<(u128, u128, String, String)> {
    let mut by_token: BTreeMap<String, (u128, u128, BTreeSet<String>)> = BTreeMap::new();
    for h in lines {
        let Some(lock) = &h.lock else {
            problems.push(format!("{target}: `{}` ran without the lock file present: {}", h.kind, h.raw));
            continue;
        };
        if lock.deployment_id.is_empty() || lock.token.is_empty() || lock.worker.is_empty() {
            problems.push(format!("{target}: lock with an empty field during `{}`: {}", h.kind, h.raw));
        }
        if !["locked", "writing", "committing"].contains(&lock.phase.as_str()) {
            problems.push(format!("{target}: lock phase {:?} is not locked|writing|committing: {}", lock.phase, h.raw));
        }
        if lock.attempt.is_none() {
            problems.push(format!("{target}: lock without a numeric `attempt`: {}", h.raw));
        }
        if lock.lease_ms != Some(work.lease_ms) {
            problems.push(format!(
                "{target}: lock `lease_ms` {:?}, configured {} ms: {}",
                lock.lease_ms, work.lease_ms, h.raw
            ));
        }
        let e = by_token.entry(lock.token.clone()).or_insert((h.ts, h.ts, BTreeSet::new()));
        e.0 = e.0.min(h.ts);
        e.1 = e.1.max(h.ts);
        e.2.insert(lock.deployment_id.clone());
        // The certificate live during validate/reload is the lock holder's,
        // or (the retry reload of a rollback) the original, or what the
        // lock's own snapshots say was live before its deployment (a
        // rollback of a deployment that followed another one: on a
        // machine too slow for the lease, live workers' attempts are
        // rolled back too).
        let own = work.sha.get(&lock.deployment_id);
        let rollback_of_own = h.kind != 'V' && lock.cert_pre.as_ref() == Some(&h.sha);
        if own.is_none() {
            problems.push(format!("{target}: the lock names an unknown deployment: {}", h.raw));
        } else if own != Some(&h.sha) && h.sha != work.sha["orig"] && !rollback_of_own {
            problems.push(format!(
                "{target}: during `{}` under {}'s lock the live cert is {} (neither its own nor the original)",
                h.kind,
                lock.deployment_id,
                work.id_of_sha(&h.sha).unwrap_or("unknown")
            ));
        }
    }
    let mut iv: Vec<(u128, u128, String, String)> = by_token
        .into_iter()
        .map(|(tok, (a, b, ids))| (a, b, tok, ids.into_iter().collect::<Vec<_>>().join(",")))
        .collect();
    iv.sort();
    for w in iv.windows(2) {
        if w[1].0 <= w[0].1 {
            problems.push(format!(
                "{target}: two lock holders overlap: {} (token {}) ran {}..{} and {} (token {}) started at {} ({} ms \
                 before the first ended)",
                w[0].3,
                w[0].2,
                w[0].0,
                w[0].1,
                w[1].3,
                w[1].2,
                w[1].0,
                (w[0].1 - w[1].0) / 1_000_000
            ));
        }
    }
    iv
}

fn last_results(seen: &BTreeMap<String, Vec<ResultEvent>>) -> BTreeMap<&str, &ResultEvent> {
    seen.iter().filter_map(|(id, v)| Some((id.as_str(), v.last()?))).collect()
}

fn outcome_counts(seen: &BTreeMap<String, Vec<ResultEvent>>) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for r in last_results(seen).values() {
        *m.entry(r.outcome.as_str()).or_default() += 1;
    }
    m
}

/// Wait up to `timeout` for a result for every id; otherwise fail with how
/// many came, their outcomes and the last `tail` lines of every worker log.
async fn expect_every_result(tap: &mut ResultTap, ids: &[String], timeout: Duration, mw: &Mw, tail: usize) {
    let t = Instant::now();
    let done = tap.collect(timeout, each_at_least(ids, 1)).await;
    assert!(
        done,
        "results for {}/{} requests after {:?}, outcomes {:?}\n{}",
        count_done(&tap.seen, ids),
        ids.len(),
        t.elapsed(),
        outcome_counts(&tap.seen),
        mw.all_logs_tail(tail)
    );
}

// ---------------------------------------------------------------------------
// 1. Three workers, ten targets, 500 requests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_never_overlap_on_a_target() {
    let start = Instant::now();
    let mut mw = Mw::new(10, Setup { lease_s: 5, defer_delay_ms: 200, max_deferrals: 5000, concurrency: 16 });
    let work = Work::new(&mw, "ov", 50, false);
    let ids = work.ids();
    let mut tap = ResultTap::connect(&mw.fleet).await;
    let names = ["ov-w0", "ov-w1", "ov-w2"];
    for n in names {
        mw.start(n, n, &[]);
    }
    for n in names {
        mw.wait_consuming(n, Duration::from_secs(30));
    }
    for item in &work.batch.items {
        tap.publish(&item.body).await;
    }
    let published = start.elapsed();
    expect_every_result(&mut tap, &ids, Duration::from_secs(150), &mw, 30).await;
    let elapsed = start.elapsed();
    tap.settle_after_drain(&mw.fleet).await;
    mw.stop_all();

    let mut problems = Vec::new();
    let last = last_results(&tap.seen);
    let mut by_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        let r = last[id.as_str()];
        *by_worker.entry(r.worker.as_str()).or_default() += 1;
        if r.outcome != Outcome::Deployed {
            problems.push(format!("{id}: {} ({})", r.outcome.as_str(), r.message));
        }
    }
    for (t, target) in mw.fleet.targets.iter().enumerate() {
        let lines = hook_lines(&mw.hook_log(t));
        let iv = check_hook_log(&target.name, &lines, &work, &mut problems);
        // Independently of what the lock file says: the live certificate
        // identifies the deployment, and the hook intervals of two
        // certificates never intersect either.
        let mut by_sha: BTreeMap<&str, (u128, u128)> = BTreeMap::new();
        for h in &lines {
            let e = by_sha.entry(h.sha.as_str()).or_insert((h.ts, h.ts));
            e.0 = e.0.min(h.ts);
            e.1 = e.1.max(h.ts);
        }
        let mut sha_iv: Vec<(u128, u128, &str)> = by_sha.iter().map(|(s, (a, b))| (*a, *b, *s)).collect();
        sha_iv.sort();
        for w in sha_iv.windows(2) {
            if w[1].0 <= w[0].1 {
                problems.push(format!(
                    "{}: deployments interleave on the host: {}'s validate..reload spans {}..{}, and {}'s validate \
                     started at {} ({} ms before)",
                    target.name,
                    work.id_of_sha(w[0].2).unwrap_or("?"),
                    w[0].0,
                    w[0].1,
                    work.id_of_sha(w[1].2).unwrap_or("?"),
                    w[1].0,
                    (w[0].1 - w[1].0) / 1_000_000
                ));
            }
        }
        // No takeover, no retry: one lock acquisition per deployment, with
        // exactly one validate, reload start and reload end, in order, with
        // the deployment's own certificate live.
        let mut per_id: BTreeMap<String, Vec<&Hook>> = BTreeMap::new();
        for h in &lines {
            if let Some(l) = &h.lock {
                per_id.entry(l.deployment_id.clone()).or_default().push(h);
            }
        }
        for item in work.batch.items.iter().filter(|i| i.target == t) {
            let Some(hs) = per_id.get(&item.id) else {
                problems.push(format!("{}: {} never validated/reloaded under its lock", target.name, item.id));
                continue;
            };
            let kinds: String = hs.iter().map(|h| h.kind).collect();
            if kinds != "VRE" {
                problems.push(format!("{}: {}: hook sequence {kinds:?}, expected \"VRE\"", target.name, item.id));
            }
            let tokens: BTreeSet<&str> = hs.iter().filter_map(|h| h.lock.as_ref()).map(|l| l.token.as_str()).collect();
            if tokens.len() != 1 {
                problems.push(format!("{}: {} held the lock under {} tokens", target.name, item.id, tokens.len()));
            }
            for h in hs {
                if h.sha != work.sha[&item.id] {
                    problems.push(format!(
                        "{}: {}: `{}` ran with another cert live: {}",
                        target.name, item.id, h.kind, h.raw
                    ));
                }
                let l = h.lock.as_ref().expect("lock");
                if let Some(r) = last.get(item.id.as_str())
                    && l.worker != r.worker
                {
                    problems.push(format!(
                        "{}: {}: lock names worker {:?}, the result {:?}",
                        target.name, item.id, l.worker, r.worker
                    ));
                }
            }
        }
        check_final_state(&mw, &work, t, &iv, None, &mut problems);
    }
    eprintln!(
        "three workers: {} requests over {} targets, published in {published:?}, all results after {elapsed:?}; \
         outcomes {:?}; last results by worker {by_worker:?}; {} result events",
        ids.len(),
        mw.fleet.targets.len(),
        outcome_counts(&tap.seen),
        tap.received
    );
    if !problems.is_empty() {
        // The worker log lines about each request that did not deploy.
        for id in ids.iter().filter(|id| last[id.as_str()].outcome != Outcome::Deployed).take(5) {
            eprintln!("---- worker log lines about {id} ----\n{}", mw.log_lines_about(id, 20));
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    assert!(by_worker.len() >= 2, "only one worker did the work: {by_worker:?}");
    tap.close().await;
}

/// A batch through three workers while they are SIGKILLed and restarted
/// again and again (8 kills, on the same journals): every request gets a
/// result, no two lock holders overlap, and once a lease has passed and one
/// more deployment per target ran (the next taker removes what kills left,
/// once older than a lease), no target holds any lock, claim or temp file.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_kills_during_a_batch_leave_no_lock_claim_or_temp() {
    const KILLS: usize = 8;
    let mut mw = Mw::new(6, Setup { lease_s: 2, defer_delay_ms: 200, max_deferrals: 5000, concurrency: 8 });
    let work = Work::new(&mw, "rk", 20, true);
    let ids = work.ids();
    let mut tap = ResultTap::connect(&mw.fleet).await;
    let names = ["rk-w0", "rk-w1", "rk-w2"];
    for n in names {
        mw.start(n, n, &[]);
    }
    for n in names {
        mw.wait_consuming(n, Duration::from_secs(30));
    }
    for item in &work.batch.items {
        tap.publish(&item.body).await;
    }
    // Kill one worker every 0.7 s (round-robin), restart it 0.3 s later.
    for k in 0..KILLS {
        tap.collect(Duration::from_millis(700), |_| false).await;
        let name = names[k % names.len()];
        let _dead = mw.kill9(name);
        tap.collect(Duration::from_millis(300), |_| false).await;
        mw.start(name, &format!("{name}-r{k}"), &[]);
    }
    expect_every_result(&mut tap, &ids, Duration::from_secs(240), &mw, 40).await;
    let mut left_by_kills = Vec::new();
    for t in &mw.fleet.targets {
        left_by_kills.extend(lock_leftovers(&t.dir));
    }
    // A lease later, one more deployment per target.
    tap.collect(Duration::from_millis(mw.setup.lease_s * 1000 + 2_000), |_| false).await;
    let next = Work::new(&mw, "rk-next", 1, false);
    for item in &next.batch.items {
        tap.publish(&item.body).await;
    }
    expect_every_result(&mut tap, &next.ids(), Duration::from_secs(120), &mw, 40).await;
    tap.settle_after_drain(&mw.fleet).await;
    mw.stop_all();

    let mut problems = Vec::new();
    let last = last_results(&tap.seen);
    for id in ids.iter().chain(next.ids().iter()) {
        let r = last[id.as_str()];
        // `unchanged`: killed after its deployment but before its ack, the
        // redelivered request finds its own files in place.
        if !matches!(r.outcome, Outcome::Deployed | Outcome::Unchanged) {
            problems.push(format!("{id}: {} ({})", r.outcome.as_str(), r.message));
        }
    }
    for (t, target) in mw.fleet.targets.iter().enumerate() {
        let mut lines = hook_lines(&mw.hook_log(t));
        lines.retain(|h| h.lock.as_ref().is_some_and(|l| !l.deployment_id.starts_with("rk-next")));
        // Of the hook log's checks, the lock's: no command without the lock,
        // no overlap of two holders (a takeover's retry reload runs with the
        // previous deployment's certificate live, not the test's originals).
        let mut hook_problems = Vec::new();
        check_hook_log(&target.name, &lines, &work, &mut hook_problems);
        hook_problems.retain(|p| p.contains("overlap") || p.contains("without the lock file"));
        problems.extend(hook_problems);
        let left = lock_leftovers(&target.dir);
        if !left.is_empty() {
            problems.push(format!("{}: left after the batch and one more deployment: {left:?}", target.name));
        }
    }
    eprintln!(
        "repeated kills: {} requests, {KILLS} kills; outcomes {:?}; lock/claim/temp files right after the batch \
         drained (removed by the next deployment): {left_by_kills:?}",
        ids.len(),
        outcome_counts(&tap.seen)
    );
    assert_no_problems(&mw, &problems);
    tap.close().await;
}

// ---------------------------------------------------------------------------
// 2./3. A worker SIGKILLed inside a deployment
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// The victim stays dead: another worker must take over.
    Never,
    /// Restarted at once on its journal: its recovery races the lease.
    Immediately,
    /// Restarted only after another worker has taken over.
    AfterTakeover,
}

const KILL_LEASE_S: u64 = 3;

async fn kill_inside_a_deployment(prefix: &str, restart: Restart) {
    let start = Instant::now();
    let mut mw = Mw::new(3, Setup { lease_s: KILL_LEASE_S, defer_delay_ms: 300, max_deferrals: 1000, concurrency: 4 });
    let work = Work::new(&mw, prefix, 5, true);
    let ids = work.ids();
    // The first reload on t0 hangs (longer than the lease): the victim is
    // killed there, after its writes, with its reload started.
    mw.marker(0, "hang-once", "8");
    let mut tap = ResultTap::connect(&mw.fleet).await;
    let names: Vec<String> = (0..3).map(|i| format!("{prefix}-w{i}")).collect();
    for n in &names {
        mw.start(n, n, &[]);
    }
    for n in &names {
        mw.wait_consuming(n, Duration::from_secs(30));
    }
    for item in &work.batch.items {
        tap.publish(&item.body).await;
    }
    let t0 = &mw.fleet.targets[0];
    let taken = t0.dir.join("hang-once.taken");
    let wait = Instant::now();
    while !taken.exists() {
        assert!(wait.elapsed() < Duration::from_secs(60), "no reload started on t0\n{}", mw.all_logs_tail(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let lines = hook_lines(&mw.hook_log(0));
    let hang = lines.iter().rev().find(|h| h.kind == 'R').expect("the hanging reload's line").clone();
    let vlock = hang.lock.clone().unwrap_or_else(|| panic!("the victim's reload ran without a lock: {}", hang.raw));
    assert_eq!(vlock.phase, "writing", "lock during the victim's reload: {}", hang.raw);
    assert_eq!(hang.sha, work.sha[&vlock.deployment_id], "the victim's own cert is live during its reload");
    let victim = vlock.worker.clone();
    assert!(names.contains(&victim), "lock names worker {victim:?}, not one of {names:?}");
    // Kill while the hook sleeps (8 s, the lease is 3 s).
    let mut dead = mw.kill9(&victim);
    let kill_ns = now_ns();
    let killed_at = Instant::now();
    eprintln!("{prefix}: killed {victim} inside {} (token {})", vlock.deployment_id, vlock.token);

    let rollback_line = |mw: &Mw| {
        hook_lines(&mw.hook_log(0)).into_iter().find(|h| h.ts > kill_ns && h.kind == 'R' && h.sha == work.sha["orig"])
    };
    let mut restarted_label = None;
    match restart {
        Restart::Never => {}
        Restart::Immediately => {
            let label = format!("{victim}-restarted");
            mw.start(&victim, &label, &[]);
            restarted_label = Some(label);
        }
        Restart::AfterTakeover => {
            let wait = Instant::now();
            while rollback_line(&mw).is_none() {
                assert!(
                    wait.elapsed() < Duration::from_secs(KILL_LEASE_S + 15),
                    "no takeover within {} s of the kill\n{}",
                    KILL_LEASE_S + 15,
                    mw.all_logs_tail(40)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let label = format!("{victim}-restarted");
            mw.start(&victim, &label, &[]);
            restarted_label = Some(label);
        }
    }
    expect_every_result(&mut tap, &ids, Duration::from_secs(120), &mw, 40).await;
    tap.settle_after_drain(&mw.fleet).await;
    let all_done = killed_at.elapsed();
    mw.stop_all();
    dead.kill9();

    let mut problems = Vec::new();
    let last = last_results(&tap.seen);
    for id in &ids {
        let r = last[id.as_str()];
        if r.outcome != Outcome::Deployed {
            problems.push(format!("{id}: {} ({})", r.outcome.as_str(), r.message));
        }
    }
    let lines = hook_lines(&mw.hook_log(0));
    let t0_lock = format!("{}{LOCK_SUFFIX}", mw.fleet.targets[0].cert.display());
    // Workers that found their lease on t0's lock run out by their own
    // clock (a stall longer than lease − margin; each stopped touching the
    // host there and then, and said so). On a machine too slow for the 3 s
    // lease this happens to live workers too, and whoever takes such a
    // lock next redoes what it still describes: a rollback again, or a
    // takeover of a live worker's lock. Those are allowed below only for
    // workers that logged an overrun.
    let overran: BTreeSet<String> = mw
        .logs
        .iter()
        .filter(|(_, p)| {
            strip_ansi(&fs::read_to_string(p).unwrap_or_default())
                .lines()
                .any(|x| x.contains("lease overrun") && x.contains(&t0_lock))
        })
        .map(|(l, _)| l.strip_suffix("-restarted").unwrap_or(l).to_string())
        .collect();
    // The rollback of the victim's deployment: exactly one reload with the
    // original certificate live, after the kill, and before anything else
    // happens on t0. More than one only when the taker of each earlier one
    // overran its lease before it rewrote the lock (the lock still
    // described the victim's deployment), and still all of them before
    // anything else ran on t0: never undoing a later deployment.
    let after: Vec<&Hook> = lines.iter().filter(|h| h.ts > kill_ns).collect();
    let rollbacks: Vec<&&Hook> = after.iter().filter(|h| h.sha == work.sha["orig"]).collect();
    let rollback_r: Vec<&&&Hook> = rollbacks.iter().filter(|h| h.kind == 'R').collect();
    let victim_rollback = |h: &Hook| {
        h.kind != 'V'
            && h.sha == work.sha["orig"]
            && h.lock.as_ref().is_some_and(|l| l.deployment_id == vlock.deployment_id && l.attempt == vlock.attempt)
    };
    let victim_r: Vec<&&Hook> = after.iter().filter(|h| h.kind == 'R' && victim_rollback(h)).collect();
    let redone_after_overruns = !overran.is_empty()
        && !victim_r.is_empty()
        && victim_r[..victim_r.len() - 1].iter().all(|h| h.lock.as_ref().is_some_and(|l| overran.contains(&l.worker)))
        && after
            .iter()
            .rposition(|h| victim_rollback(h))
            .is_none_or(|i| after[..=i].iter().all(|h| victim_rollback(h)));
    if rollback_r.len() != 1 && !redone_after_overruns {
        problems.push(format!(
            "t0: {} reload(s) with the original certificate live after the kill (one retry reload expected{}): {:#?}",
            rollback_r.len(),
            if overran.is_empty() {
                String::new()
            } else {
                format!(
                    "; or, after lease overruns of {overran:?}, repeats by the next takers before anything else ran \
                     on t0"
                )
            },
            rollbacks.iter().map(|h| &h.raw).collect::<Vec<_>>()
        ));
    }
    if rollbacks.iter().any(|h| h.kind == 'V') {
        problems.push("t0: a validate ran with the original certificate live (the rollback validated?)".into());
    }
    match after.first() {
        None => problems.push("t0: nothing ran on t0 after the kill".into()),
        Some(h) if !(h.kind == 'R' && h.sha == work.sha["orig"]) => {
            problems.push(format!("t0: the first hook after the kill is not the rollback's retry reload: {}", h.raw))
        }
        Some(_) => {}
    }
    let mut takeover_by = String::new();
    if let Some(r) = rollback_r.first() {
        let l = r.lock.as_ref();
        let secs = (r.ts - kill_ns) as f64 / 1e9;
        takeover_by = format!(
            "{} (token {}, deployment {}) {secs:.2} s after the kill",
            l.map(|l| l.worker.as_str()).unwrap_or("?"),
            l.map(|l| l.token.as_str()).unwrap_or("?"),
            l.map(|l| l.deployment_id.as_str()).unwrap_or("?")
        );
        // Lease 3 s: judged by whole-second mtimes and found by a deferred
        // retry, so allow generous slack.
        if secs > (KILL_LEASE_S + 10) as f64 {
            problems.push(format!("t0: rollback only {secs:.1} s after the kill (lease {KILL_LEASE_S} s)"));
        }
        if restart == Restart::Never && l.is_some_and(|l| l.worker == victim) {
            problems.push(format!("t0: the dead worker's name holds the lock for the rollback: {}", r.raw));
        }
        if restart != Restart::Immediately && l.is_some_and(|l| l.token == vlock.token) {
            problems.push(format!("t0: the rollback ran under the dead lock's token, not a taker's: {}", r.raw));
        }
    }
    // After the kill the dead lock acquisition (token) never acts again,
    // except when the restarted worker recovers its own deployment itself.
    for h in &after {
        if let Some(l) = &h.lock
            && l.token == vlock.token
            && !(restart == Restart::Immediately && h.kind != 'V' && h.sha == work.sha["orig"])
        {
            problems.push(format!("t0: the dead lock's token acted after the kill: {}", h.raw));
        }
    }
    for (t, target) in mw.fleet.targets.iter().enumerate() {
        let lines = hook_lines(&mw.hook_log(t));
        let iv = check_hook_log(&target.name, &lines, &work, &mut problems);
        check_final_state(&mw, &work, t, &iv, Some(kill_ns), &mut problems);
    }
    // Workers' own account: how many times t0's lock was taken over.
    let takeovers: Vec<String> = mw
        .logs
        .iter()
        .flat_map(|(l, p)| {
            strip_ansi(&fs::read_to_string(p).unwrap_or_default())
                .lines()
                .filter(|x| x.contains("took over the target lock") && x.contains(&t0_lock))
                .map(|x| format!("{l}: {x}"))
                .collect::<Vec<_>>()
        })
        .collect();
    let want_takeovers = match restart {
        Restart::Never | Restart::AfterTakeover => 1..=1,
        // The restarted worker usually reclaims its own lock first.
        Restart::Immediately => 0..=1,
    };
    if overran.is_empty() {
        if !want_takeovers.contains(&takeovers.len()) {
            problems.push(format!("t0's lock was taken over {} times: {takeovers:#?}", takeovers.len()));
        }
    } else {
        // After lease overruns: the victim's acquisition is taken over as
        // often as without them, and any other lock taken over is one of a
        // worker that logged an overrun.
        let victim_lock = format!(
            "of worker {victim} (deployment {} attempt {},",
            vlock.deployment_id,
            vlock.attempt.map_or("?".to_string(), |a| a.to_string())
        );
        let of_victim = takeovers.iter().filter(|x| x.contains(&victim_lock)).count();
        if !want_takeovers.contains(&of_victim) {
            problems.push(format!("t0: the victim's lock was taken over {of_victim} times: {takeovers:#?}"));
        }
        for x in takeovers.iter().filter(|x| !x.contains(&victim_lock)) {
            let holder = x.split("of worker ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("?");
            if !overran.contains(holder) {
                problems.push(format!(
                    "t0: the lock of live worker {holder} was taken over, and it logged no lease overrun: {x}"
                ));
            }
        }
    }
    if let Some(label) = &restarted_label {
        let log = strip_ansi(&mw.log_of(label));
        if !log.contains("recovering 1 unfinished deployment") {
            problems.push(format!("{label}: did not find its deployment in flight in its journal"));
        }
        if restart == Restart::AfterTakeover && !log.contains("taken over") {
            problems.push(format!("{label}: does not say that its deployment was taken over"));
        }
    }
    let recovery = restarted_label
        .as_ref()
        .map(|l| {
            mw.log_of(l)
                .lines()
                .filter(|x| x.contains("recover") || x.contains("taken over") || x.contains("takeover"))
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let victim_result =
        last.get(vlock.deployment_id.as_str()).map(|r| (r.outcome.as_str(), r.worker.clone(), r.attempts));
    eprintln!(
        "{prefix} ({restart:?}): victim {victim} in {} ; rollback by {takeover_by}; victim's request ended {victim_result:?}; \
         outcomes {:?}; all results {all_done:?} after the kill, {:?} in all; lease overruns on t0 by {overran:?}\n\
         restarted worker's recovery lines:\n{recovery}",
        vlock.deployment_id,
        outcome_counts(&tap.seen),
        start.elapsed()
    );
    assert_no_problems(&mw, &problems);
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_is_taken_over_after_lease() {
    kill_inside_a_deployment("kt", Restart::Never).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_worker_does_not_double_take_over() {
    kill_inside_a_deployment("rs", Restart::Immediately).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_restarted_after_takeover_leaves_the_host_alone() {
    kill_inside_a_deployment("ra", Restart::AfterTakeover).await;
}

// ---------------------------------------------------------------------------
// 4. A reload slower than the lease
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn slow_reload_is_not_taken_over() {
    let start = Instant::now();
    let lease_s = 2;
    let sleep_s = 5;
    let mut mw = Mw::new(1, Setup { lease_s, defer_delay_ms: 300, max_deferrals: 1000, concurrency: 8 });
    let work = Work::new(&mw, "sl", 2, true);
    let (first, second) = (&work.batch.items[0], &work.batch.items[1]);
    mw.marker(0, "sleep-once", &sleep_s.to_string());
    let mut tap = ResultTap::connect(&mw.fleet).await;
    // Worker A takes one message at a time (prefetch 1): while it sleeps in
    // the first reload, the second request can only go to B or C.
    mw.start("sl-a", "sl-a", &[("CERTDEPLOY_CONCURRENCY", "1")]);
    mw.wait_consuming("sl-a", Duration::from_secs(30));
    tap.publish(&first.body).await;
    let t0 = mw.fleet.targets[0].clone();
    let lock_path = PathBuf::from(format!("{}{LOCK_SUFFIX}", t0.cert.display()));
    let taken = t0.dir.join("sleep-once.taken");
    let wait = Instant::now();
    while !taken.exists() {
        assert!(wait.elapsed() < Duration::from_secs(30), "the first reload never started\n{}", mw.all_logs_tail(40));
        std::thread::sleep(Duration::from_millis(10));
    }
    let reload_started = Instant::now();
    let lines = hook_lines(&mw.hook_log(0));
    let r = lines.iter().find(|h| h.kind == 'R').expect("R line");
    let held = r.lock.clone().expect("lock during the first reload");
    assert_eq!(held.deployment_id, first.id);
    assert_eq!(held.worker, "sl-a");
    mw.start("sl-b", "sl-b", &[]);
    mw.start("sl-c", "sl-c", &[]);
    mw.wait_consuming("sl-b", Duration::from_secs(20));
    mw.wait_consuming("sl-c", Duration::from_secs(20));
    tap.publish(&second.body).await;

    // Watch the lock while the first reload sleeps: same holder, renewed
    // (mtime moves), never a claim file.
    let mut samples: Vec<(String, String, i64)> = Vec::new();
    let mut claims = BTreeSet::new();
    let mut other_holders = BTreeSet::new();
    let mut modes = BTreeSet::new();
    while !hook_lines(&mw.hook_log(0)).iter().any(|h| h.kind == 'E') {
        assert!(reload_started.elapsed() < Duration::from_secs(sleep_s + 20), "the slow reload never ended");
        if let (Ok(text), Ok(meta)) = (fs::read_to_string(&lock_path), fs::metadata(&lock_path)) {
            match parse_lock(&text) {
                Ok(Some(l)) => {
                    if l.token != held.token {
                        other_holders.insert(format!("{} {} {}", l.worker, l.deployment_id, l.token));
                    }
                    if meta.mode() & 0o7777 != 0o600 {
                        modes.insert(format!("{:04o}", meta.mode() & 0o7777));
                    }
                    samples.push((l.token, l.phase, meta.mtime()));
                }
                Ok(None) => {}
                Err(e) => panic!("{e}"),
            }
        }
        for n in names_with(&t0.dir, ".claim.") {
            claims.insert(n);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ids = work.ids();
    let done = tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await;
    assert!(done, "results: {:?}\n{}", tap.seen.keys().collect::<Vec<_>>(), mw.all_logs_tail(40));
    tap.settle_after_drain(&mw.fleet).await;
    let retry_queue = mw.fleet.vhost.as_ref().and_then(|v| queue_state(v, RETRY));
    let requests_queue = mw.fleet.vhost.as_ref().and_then(|v| queue_state(v, REQUESTS));
    mw.stop_all();

    let mut problems = Vec::new();
    let last = last_results(&tap.seen);
    let (r1, r2) = (last[first.id.as_str()], last[second.id.as_str()]);
    if r1.outcome != Outcome::Deployed {
        problems.push(format!("{}: {} ({}), expected deployed (not taken over)", first.id, r1.outcome, r1.message));
    }
    if r1.worker != "sl-a" {
        problems.push(format!("{}: result from {}, expected sl-a", first.id, r1.worker));
    }
    if tap.seen[&first.id].iter().any(|r| r.outcome != Outcome::Deployed) {
        problems.push(format!("{}: some result is not deployed: {:#?}", first.id, tap.seen[&first.id]));
    }
    if r2.outcome != Outcome::Deployed {
        problems.push(format!("{}: {} ({})", second.id, r2.outcome, r2.message));
    }
    if !other_holders.is_empty() {
        problems.push(format!("during the slow reload the lock changed hands: {other_holders:?}"));
    }
    if !claims.is_empty() {
        problems.push(format!("claim files appeared during the slow reload (a takeover attempt): {claims:?}"));
    }
    if !modes.is_empty() {
        problems.push(format!("the lock file had mode(s) {modes:?}, not 0600"));
    }
    let mtimes: BTreeSet<i64> = samples.iter().map(|s| s.2).collect();
    if mtimes.len() < 2 {
        problems.push(format!(
            "the lease was not renewed during a {sleep_s} s reload (lease {lease_s} s): lock mtimes {mtimes:?} over {} samples",
            samples.len()
        ));
    }
    let phases: BTreeSet<&str> = samples.iter().map(|s| s.1.as_str()).collect();
    let lines = hook_lines(&mw.hook_log(0));
    let iv = check_hook_log("t0", &lines, &work, &mut problems);
    let kinds: Vec<(char, String)> =
        lines.iter().map(|h| (h.kind, h.lock.as_ref().map(|l| l.deployment_id.clone()).unwrap_or_default())).collect();
    let want: Vec<(char, String)> = ['V', 'R', 'E']
        .into_iter()
        .map(|k| (k, first.id.clone()))
        .chain(['V', 'R', 'E'].into_iter().map(|k| (k, second.id.clone())))
        .collect();
    if kinds != want {
        problems.push(format!("t0 hooks {kinds:?}, expected the first deployment's V R E, then the second's"));
    }
    if lines.iter().any(|h| h.sha == work.sha["orig"]) {
        problems.push("a hook ran with the original certificate live: something was rolled back".into());
    }
    match host_holds(&mw, &work, 0) {
        Ok(id) if id == second.id => {}
        Ok(id) => problems.push(format!("t0 holds {id}, expected {}", second.id)),
        Err(e) => problems.push(e),
    }
    let left = lock_leftovers(&t0.dir);
    if !left.is_empty() {
        problems.push(format!("left after all workers stopped: {left:?}"));
    }
    // The second request was deferred (it reached B or C while A held the
    // lock): some worker log says so, naming it.
    let deferrals: Vec<String> = ["sl-a", "sl-b", "sl-c"]
        .iter()
        .flat_map(|l| {
            mw.log_of(l)
                .lines()
                .filter(|x| x.contains(&second.id) && x.to_ascii_lowercase().contains("defer"))
                .map(|x| format!("{l}: {x}"))
                .collect::<Vec<_>>()
        })
        .collect();
    if deferrals.is_empty() {
        problems.push(format!("no worker logged deferring {}", second.id));
    }
    if retry_queue.is_none() {
        problems.push(format!("queue {RETRY} was never declared"));
    }
    eprintln!(
        "slow reload: lease {lease_s} s, reload {sleep_s} s; lock samples {} (phases {phases:?}, {} distinct mtimes); \
         second deployed by {} after {} deferral log line(s); intervals {:?}; queues: retry {retry_queue:?}, \
         requests {requests_queue:?}; {:?}",
        samples.len(),
        mtimes.len(),
        r2.worker,
        deferrals.len(),
        iv.iter().map(|x| (x.3.clone(), (x.1 - x.0) / 1_000_000)).collect::<Vec<_>>(),
        start.elapsed()
    );
    assert_no_problems(&mw, &problems);
    tap.close().await;
}

// ---------------------------------------------------------------------------
// 5. Deferrals are bounded
// ---------------------------------------------------------------------------

/// A request that keeps finding its target locked gives up after
/// `max_deferrals` with `failed`, without touching the host; the holder's
/// deployment is unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn deferrals_end_in_failed_after_max_deferrals() {
    let start = Instant::now();
    let (max_deferrals, delay_ms) = (3u32, 300u64);
    let mut mw = Mw::new(1, Setup { lease_s: 2, defer_delay_ms: delay_ms, max_deferrals, concurrency: 8 });
    let work = Work::new(&mw, "md", 2, true);
    let (first, second) = (&work.batch.items[0], &work.batch.items[1]);
    // Long enough for every deferral of the second request to find the lock.
    mw.marker(0, "sleep-once", "8");
    let mut tap = ResultTap::connect(&mw.fleet).await;
    mw.start("md-a", "md-a", &[("CERTDEPLOY_CONCURRENCY", "1")]);
    mw.wait_consuming("md-a", Duration::from_secs(30));
    tap.publish(&first.body).await;
    let taken = mw.fleet.targets[0].dir.join("sleep-once.taken");
    let wait = Instant::now();
    while !taken.exists() {
        assert!(wait.elapsed() < Duration::from_secs(30), "the first reload never started\n{}", mw.all_logs_tail(40));
        std::thread::sleep(Duration::from_millis(10));
    }
    let reload_started = Instant::now();
    mw.start("md-b", "md-b", &[]);
    mw.wait_consuming("md-b", Duration::from_secs(20));
    tap.publish(&second.body).await;
    let ids = vec![second.id.clone()];
    assert!(
        tap.collect(Duration::from_secs(30), each_at_least(&ids, 1)).await,
        "no result for the deferred request\n{}",
        mw.all_logs_tail(40)
    );
    let gave_up_after = reload_started.elapsed();
    let ids = work.ids();
    assert!(tap.collect(Duration::from_secs(40), each_at_least(&ids, 1)).await, "{}", mw.all_logs_tail(40));
    tap.settle_after_drain(&mw.fleet).await;
    mw.stop_all();

    let mut problems = Vec::new();
    let last = last_results(&tap.seen);
    let (r1, r2) = (last[first.id.as_str()], last[second.id.as_str()]);
    if r1.outcome != Outcome::Deployed {
        problems.push(format!("{}: {} ({})", first.id, r1.outcome, r1.message));
    }
    if r2.outcome != Outcome::Failed || r2.success {
        problems.push(format!(
            "{}: {} ({}), expected failed after {max_deferrals} deferrals",
            second.id, r2.outcome, r2.message
        ));
    }
    if r2.metadata.get("failed_step").map(String::as_str) != Some("lock") {
        problems.push(format!("{}: failed_step {:?}, expected \"lock\"", second.id, r2.metadata.get("failed_step")));
    }
    if !r2.message.contains("locked") {
        problems.push(format!("{}: the message does not say the target was locked: {}", second.id, r2.message));
    }
    if gave_up_after >= Duration::from_secs(8) {
        problems.push(format!("{} gave up only after {gave_up_after:?}, when the holder had finished", second.id));
    }
    let deferrals = mw.log_lines_about(&second.id, 100).lines().filter(|l| l.contains("retrying in")).count();
    if deferrals != max_deferrals as usize {
        problems.push(format!("{} deferred {deferrals} times, max_deferrals = {max_deferrals}", second.id));
    }
    let lines = hook_lines(&mw.hook_log(0));
    check_hook_log("t0", &lines, &work, &mut problems);
    if lines
        .iter()
        .any(|h| h.lock.as_ref().is_some_and(|l| l.deployment_id == second.id) || h.sha == work.sha[&second.id])
    {
        problems.push(format!("{} touched the host", second.id));
    }
    match host_holds(&mw, &work, 0) {
        Ok(id) if id == first.id => {}
        Ok(id) => problems.push(format!("t0 holds {id}, expected {}", first.id)),
        Err(e) => problems.push(e),
    }
    let left = lock_leftovers(&mw.fleet.targets[0].dir);
    if !left.is_empty() {
        problems.push(format!("left after all workers stopped: {left:?}"));
    }
    eprintln!(
        "max deferrals: {} ended {} after {gave_up_after:?} ({deferrals} deferrals logged): {}; {:?}",
        second.id,
        r2.outcome,
        r2.message,
        start.elapsed()
    );
    if !problems.is_empty() {
        eprintln!("{}", mw.all_logs_tail(60));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    tap.close().await;
}
