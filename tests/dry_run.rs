//! Dry runs over a real sshd (and, for requests, the real worker on the
//! machine's RabbitMQ): the host is read and compared, the result is
//! `planned` with the plan per file, and nothing on the host changes —
//! no backup, temp, staging, probe or lock file, not even for a moment.
//! The id of a dry run is never recorded: the same id then deploys.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;
use sha2::Digest as _;

/// Everything about a directory tree that a change would show: per entry
/// (the directory itself included) its kind, mode, owner, size, mtime to
/// the nanosecond, and a file's sha256. A file created and removed again
/// changes its directory's mtime, so even a transient name shows.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let digest = if m.is_file() {
            format!("{:x}", sha2::Sha256::digest(std::fs::read(&p).expect("read")))
        } else {
            String::new()
        };
        let line = format!(
            "mode={:o} uid={} gid={} size={} mtime={}.{:09} ino={} nlink={} {digest}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino(),
            m.nlink()
        );
        out.insert(p.clone(), line);
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("read_dir").flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Lists `dir` over and over (a cheap poll) until stopped; every name
/// ever seen that `known` lacks.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Watch {
    fn start(dir: &Path) -> Watch {
        let dir = dir.to_path_buf();
        let known: Vec<String> = names(&dir);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut strange = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for n in names(&dir) {
                    if !known.contains(&n) && !strange.contains(&n) {
                        strange.push(n);
                    }
                }
                std::thread::yield_now();
            }
            strange
        });
        Watch { stop, thread }
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("watch thread")
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// `request` with `"dry_run": true`.
fn dry_request(id: &str, target: &str, b: &Bundle) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&request(id, target, b, true)).expect("json");
    v["dry_run"] = serde_json::Value::Bool(true);
    serde_json::to_vec(&v).expect("json")
}

fn meta<'a>(r: &'a ResultEvent, k: &str) -> &'a str {
    r.metadata.get(k).map(String::as_str).unwrap_or("<absent>")
}

fn one(tap: &ResultTap, id: &str) -> ResultEvent {
    let r = &tap.seen[id];
    assert_eq!(r.len(), 1, "{id}: one result: {r:#?}");
    r[0].clone()
}

/// Deploy one certificate, then dry-run a newer one, the same one and an
/// older one: each `planned` with the right plan, and the target directory
/// (names, content, modes, owners, mtimes, the directory's own mtime)
/// exactly as before; no other name appears in it at any moment.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_plans_and_leaves_the_host_exactly_as_it_was() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut tap = ResultTap::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let t = &fleet.targets[0];

    let current = ca.leaf("www.example.com", 2);
    tap.publish(&request("dr-current", "t0", &current, true)).await;
    let ids = vec!["dr-current".to_string()];
    assert!(tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await, "no result for dr-current");
    assert_eq!(one(&tap, "dr-current").outcome, Outcome::Deployed, "{:?}", tap.seen["dr-current"]);
    let reloads = fleet.reloads(t);

    let before = tree(&t.dir);
    let watch = Watch::start(&t.dir);
    let newer = ca.leaf("www.example.com", 1);
    let older = ca.leaf("www.example.com", 30);
    tap.publish(&dry_request("dr-newer", "t0", &newer)).await;
    tap.publish(&dry_request("dr-same", "t0", &current)).await;
    tap.publish(&dry_request("dr-older", "t0", &older)).await;
    let ids: Vec<String> = ["dr-newer", "dr-same", "dr-older"].map(String::from).into();
    assert!(tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await, "dry-run results: {:?}", tap.seen);
    let strange = watch.finish();
    tap.settle_after_drain(&fleet).await;

    assert_eq!(strange, Vec::<String>::new(), "names that appeared in {} during the dry runs", t.dir.display());
    assert_eq!(tree(&t.dir), before, "the dry runs changed the target directory");
    assert_eq!(fleet.reloads(t), reloads, "a dry run never reloads");
    assert_eq!(fleet.files(t).0, Some(current.cert_pem.clone().into_bytes()));

    let newer_r = one(&tap, "dr-newer");
    let same_r = one(&tap, "dr-same");
    let older_r = one(&tap, "dr-older");
    for r in [&newer_r, &same_r, &older_r] {
        assert_eq!((r.outcome, r.success), (Outcome::Planned, true), "{}: {}", r.deployment_id, r.message);
        assert!(r.message.contains("nothing was changed"), "{}", r.message);
    }
    // The chain comes from the same CA: identical on the host already.
    let plan = |r: &ResultEvent| {
        ["plan_cert", "plan_key", "plan_chain", "plan_supersede", "plan_outcome"].map(|k| meta(r, k).to_string())
    };
    assert_eq!(plan(&newer_r), ["write", "write", "unchanged", "false", "deployed"], "{newer_r:#?}");
    assert_eq!(plan(&same_r), ["unchanged", "unchanged", "unchanged", "false", "unchanged"], "{same_r:#?}");
    assert_eq!(plan(&older_r), ["write", "write", "unchanged", "true", "superseded"], "{older_r:#?}");
    assert_eq!(meta(&older_r, "existing_not_before"), current.not_before.to_string());
    // Nothing was snapshotted: no backup statuses.
    assert!(!newer_r.metadata.keys().any(|k| k.starts_with("backup_")), "{newer_r:#?}");
    tap.close().await;
}

/// A dry run's id is not recorded for dedupe: the same id sent again
/// without `dry_run` deploys (and its redelivery is then deduplicated as
/// usual).
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_id_is_never_recorded_the_same_id_then_deploys() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let mut tap = ResultTap::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let t = &fleet.targets[0];
    let b = ca.leaf("www.example.com", 1);
    let ids = vec!["dr-then-real".to_string()];

    tap.publish(&dry_request("dr-then-real", "t0", &b)).await;
    assert!(tap.collect(Duration::from_secs(60), each_at_least(&ids, 1)).await);
    let dry = tap.seen["dr-then-real"][0].clone();
    assert_eq!(dry.outcome, Outcome::Planned, "{}", dry.message);
    // Nothing there yet: every file would be written.
    assert_eq!(meta(&dry, "plan_cert"), "write");
    assert_eq!(fleet.files(t), (None, None, None), "the dry run wrote files");

    tap.publish(&request("dr-then-real", "t0", &b, true)).await;
    assert!(tap.collect(Duration::from_secs(60), each_at_least(&ids, 2)).await);
    let real = tap.seen["dr-then-real"][1].clone();
    assert_eq!(real.outcome, Outcome::Deployed, "{}", real.message);
    assert_eq!(fleet.files(t).0, Some(b.cert_pem.clone().into_bytes()));
    assert_eq!(fleet.reloads(t), 1);

    // And a dry run of that id now plans afresh (it is not answered with
    // the recorded deployment): everything identical.
    tap.publish(&dry_request("dr-then-real", "t0", &b)).await;
    assert!(tap.collect(Duration::from_secs(60), each_at_least(&ids, 3)).await);
    let again = tap.seen["dr-then-real"][2].clone();
    assert_eq!(again.outcome, Outcome::Planned, "{}", again.message);
    assert_eq!(meta(&again, "plan_outcome"), "unchanged");
    tap.settle_after_drain(&fleet).await;
    assert_eq!(tap.seen["dr-then-real"].len(), 3, "one result per request: {:#?}", tap.seen["dr-then-real"]);
    assert_eq!(fleet.reloads(t), 1);
    tap.close().await;
}

/// `certdeploy deploy --dry-run` prints the plan and exits 0; nothing is
/// written to the host or recorded in the journal, so the same id then
/// deploys.
#[test]
fn deploy_dry_run_exits_0_and_prints_the_plan() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let t = &fleet.targets[0];
    let dir = fleet.tmp.path();
    let first = ca.leaf("www.example.com", 2);
    let args = deploy_args(dir, &t.name, "cli-first", &first, true, false);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}\n{err}");

    let before = tree(&t.dir);
    let newer = ca.leaf("www.example.com", 1);
    let mut args = deploy_args(dir, &t.name, "cli-dry", &newer, true, false);
    args.push("--dry-run".into());
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "a planned dry run exits 0:\n{out}\n{err}");
    assert!(out.contains("cli-dry: planned"), "{out}");
    for line in ["plan_cert = write", "plan_key = write", "plan_chain = unchanged", "plan_supersede = false"] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    assert_eq!(tree(&t.dir), before, "deploy --dry-run changed the target directory");

    // --json prints the result event.
    let mut args = deploy_args(dir, &t.name, "cli-dry", &newer, true, true);
    args.push("--dry-run".into());
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}\n{err}");
    let ev: ResultEvent = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!((ev.outcome, ev.success), (Outcome::Planned, true));
    assert_eq!(meta(&ev, "plan_cert"), "write");

    let (code, _, _) = run(&cfg, &["journal", "show", "cli-dry", "--json"]);
    assert_ne!(code, 0, "a dry run is not in the journal");
    let args = deploy_args(dir, &t.name, "cli-dry", &newer, true, true);
    let (code, out, err) = run(&cfg, &strs(&args));
    let ev: ResultEvent = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!((code, ev.outcome), (0, Outcome::Deployed), "{}", ev.message);
    assert_eq!(fleet.files(t).0, Some(newer.cert_pem.clone().into_bytes()));
}

/// `certdeploy submit --dry-run --wait` sends dry runs (one request, or
/// every line of a batch) and prints each plan; exit 0, nothing written.
#[test]
fn submit_dry_run_sends_dry_runs_and_prints_the_plans() {
    let fleet = Fleet::new(1, true);
    let cfg = fleet.write_config(&Opts::default());
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    let ca = TestCa::new();
    let t = &fleet.targets[0];
    let dir = fleet.tmp.path();
    let b = ca.leaf("www.example.com", 1);
    let (cert, key, chain) = (dir.join("s.pem"), dir.join("s.key"), dir.join("s.chain"));
    write_file(&cert, &b.cert_pem);
    write_file(&key, &b.key_pem);
    write_file(&chain, &b.chain_pem);
    let before = tree(&t.dir);
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let args: Vec<String> = [
        "submit",
        "--target",
        "t0",
        "--cert",
        &p(&cert),
        "--key",
        &p(&key),
        "--chain",
        &p(&chain),
        "--id",
        "sub-dry-1",
        "--dry-run",
        "--wait",
        "--quiet",
        "--timeout",
        "60",
    ]
    .map(String::from)
    .into();
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let planned = out.split("PLANNED:").nth(1).unwrap_or_else(|| panic!("no PLANNED section:\n{out}"));
    let line = planned.lines().find(|l| l.contains("sub-dry-1")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("plan_cert=write") && line.contains("plan_supersede=false"), "{line}");

    let batch = dir.join("dry.jsonl");
    write_file(&batch, &format!("{}\n", String::from_utf8(request("sub-dry-2", "t0", &b, true)).unwrap()));
    let args = ["submit", "--batch", batch.to_str().unwrap(), "--dry-run", "--wait", "--quiet", "--timeout", "60"];
    let (code, out, err) = run(&cfg, &args);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.lines().any(|l| l.starts_with("planned") && l.trim_end().ends_with('1')), "summary:\n{out}");
    assert!(out.contains("sub-dry-2 t0 plan_cert=write plan_chain=write plan_key=write"), "{out}");
    assert_eq!(tree(&t.dir), before, "submit --dry-run changed the target directory");
    assert_eq!(fleet.files(t), (None, None, None));
}
