//! Property test of the revert: a deployment B over the files A of a host,
//! then the revert of B (journaled as `B.revert`) with a random fault
//! schedule (changed files, a backup gone, snapshot and write faults, a
//! validate or reload that refuses the old certificate, a broken daemon, a
//! reload without effect, a failed restore) and random crash points (before
//! or after any host operation or journal flush), each crash followed by
//! recovery from the durable journal or, when nothing needs recovering, a
//! new attempt (as the next `certdeploy revert` run makes):
//!
//! - the outcome is the one the schedule implies (oracle), and the same as
//!   the same schedule without crashes (or the `rollback_failed` a crash in
//!   the middle of a write may leave when restoring fails);
//! - `reverted`: the host holds A's bytes and modes again (a path B
//!   created is gone) and serves A's certificate; the result names B;
//! - `failed`: the host's whole tree is byte-identical to before the
//!   revert (no backup, temp or other file left or changed), nothing ran;
//! - a rollback: the host holds B's files again;
//! - no write before its snapshot and `Begun{write}` were durable; no temp
//!   file, no unfinished attempt, no key byte in the journal; the journal
//!   answers a second revert with the recorded result.

use std::collections::BTreeMap;

use certdeploy_core::revert::{revert_id, revert_plan};
use certdeploy_core::testkit::*;
use certdeploy_core::*;
use proptest::prelude::*;

const RELOAD: &str = "reload-daemon";
const VALIDATE: &str = "validate-config";
const CERT: &str = "/srv/tls/cert.pem";
const KEY: &str = "/srv/tls/key.pem";
const CHAIN: &str = "/srv/tls/chain.pem";
const MARKER: &str = "KEY-MARKER-5ca1ab1e";
const B: &str = "dep-b";

fn cert(g: u32) -> Vec<u8> {
    format!("CERT g{g} nb={}\nbody-{g}\n", 1000 + g).into_bytes()
}
fn key(g: u32) -> Vec<u8> {
    format!("-----BEGIN PRIVATE KEY-----\n{MARKER}-{g}\n-----END PRIVATE KEY-----\n").into_bytes()
}
fn chain(g: u32) -> Vec<u8> {
    format!("CHAIN g{g}\n").into_bytes()
}

/// How the host differs from what B left, before the revert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tamper {
    None,
    /// A file edited by hand.
    Edited(Role),
    /// A file removed by hand.
    Removed(Role),
    /// A later deployment C replaced B's files.
    LaterDeployment,
    /// The backup B kept of a file that existed before it is gone.
    BackupGone(Role),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Daemon {
    Ok,
    /// The first reload's outcome is unknown (a transient error).
    TransientOnce,
    /// Reload exits 1 while A's certificate is on disk.
    RejectsOld,
    /// Every reload fails, the retry too.
    Broken,
    /// Reload exits 0 and changes nothing (only with verify).
    NoEffect,
}

#[derive(Clone, Debug)]
struct Case {
    /// A had a chain file (else B created it and the revert removes it).
    chain_before: bool,
    validate: bool,
    verify: bool,
    keep_backups: u32,
    tamper: Tamper,
    snapshot_fault: Option<(Role, bool)>,
    write_fault: Option<(Role, bool)>,
    validate_rejects_old: bool,
    daemon: Daemon,
    restore_fault: Option<Role>,
    crashes: Vec<(u64, bool)>,
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Cert), Just(Role::Key), Just(Role::Chain)]
}

fn case() -> impl Strategy<Value = Case> {
    let tamper = prop_oneof![
        8 => Just(Tamper::None),
        1 => role().prop_map(Tamper::Edited),
        1 => role().prop_map(Tamper::Removed),
        1 => Just(Tamper::LaterDeployment),
        1 => prop_oneof![Just(Role::Cert), Just(Role::Key)].prop_map(Tamper::BackupGone),
    ];
    let daemon = prop_oneof![
        5 => Just(Daemon::Ok),
        1 => Just(Daemon::TransientOnce),
        2 => Just(Daemon::RejectsOld),
        1 => Just(Daemon::Broken),
        2 => Just(Daemon::NoEffect),
    ];
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), 1u32..=2, tamper),
        (
            prop::option::weighted(0.1, (role(), any::<bool>())),
            prop::option::weighted(0.15, (role(), any::<bool>())),
            prop::bool::weighted(0.1),
            daemon,
            prop::option::weighted(0.15, role()),
            prop::collection::vec((1u64..40, any::<bool>()), 0..=3),
        ),
    )
        .prop_map(
            |(
                (chain_before, validate, verify, keep_backups, tamper),
                (snapshot_fault, write_fault, validate_rejects_old, daemon, restore_fault, crashes),
            )| Case {
                chain_before,
                validate,
                verify,
                keep_backups,
                tamper,
                snapshot_fault,
                write_fault,
                validate_rejects_old: validate_rejects_old && validate,
                daemon: if daemon == Daemon::NoEffect && !verify { Daemon::Ok } else { daemon },
                restore_fault,
                crashes,
            },
        )
}

fn plan(c: &Case, id: &str, g: u32) -> (Plan, Payload) {
    let target = TargetSpec {
        host: "h1".into(),
        port: 22,
        user: "deploy".into(),
        cert_path: CERT.into(),
        key_path: KEY.into(),
        chain_path: Some(CHAIN.into()),
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: c.validate.then(|| VALIDATE.into()),
        reload_command: RELOAD.into(),
        verify_endpoint: c.verify.then(|| "h1:443".into()),
        verify_sni: None,
    };
    let material = Material {
        certificate_pem: String::from_utf8(cert(g)).unwrap(),
        private_key_pem: Secret::new(key(g)),
        chain_pem: Some(String::from_utf8(chain(g)).unwrap()),
    };
    let f = fake_cert_facts(&cert(g)).unwrap();
    let facts = MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) };
    let policy = Policy { verify_budget_ms: 3_000, keep_backups: c.keep_backups, ..Policy::default() };
    build_plan(id, "t1", &target, &material, &facts, policy, 1).unwrap()
}

/// Every path on the host: a file's bytes and mode, a link's target.
type Tree = BTreeMap<String, Result<(Vec<u8>, u32), String>>;

fn tree(sim: &Sim) -> Tree {
    let w = sim.world();
    w.paths
        .iter()
        .map(|(p, n)| {
            let v = match n {
                Node::File(i) => Ok((w.inodes[i].bytes.clone(), w.inodes[i].mode)),
                Node::Symlink(t) => Err(t.clone()),
            };
            (p.clone(), v)
        })
        .collect()
}

/// Cert, key and chain as they are now.
fn files(sim: &Sim) -> [Option<(Vec<u8>, u32)>; 3] {
    [sim.get(CERT), sim.get(KEY), sim.get(CHAIN)]
}

fn finished(t: Result<Terminal, SimulatedCrash>) -> Report {
    match t {
        Ok(Terminal::Finished(r)) => r,
        other => panic!("expected a finished deployment: {other:?}"),
    }
}

/// A host holding A (generation 1; modes other than certdeploy's), B
/// (generation 2) deployed over it without faults, then `c.tamper`.
fn setup(c: &Case) -> Sim {
    let sim = Sim::new();
    {
        let mut w = sim.world();
        w.reload_commands.insert(RELOAD.to_string());
        w.served_path = Some(CERT.to_string());
        w.served = Some(leaf_of(&cert(1)));
    }
    sim.put(CERT, &cert(1), 0o664);
    sim.put(KEY, &key(1), 0o640);
    if c.chain_before {
        sim.put(CHAIN, &chain(1), 0o664);
    }
    let rig = Rig::new(sim.clone());
    let (p, payload) = plan(c, B, 2);
    let r = finished(rig.deploy(p, &payload));
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let path = |r: Role| match r {
        Role::Cert => CERT,
        Role::Key => KEY,
        _ => CHAIN,
    };
    match c.tamper {
        Tamper::None => {}
        Tamper::Edited(r) => {
            let (mut bytes, mode) = sim.get(path(r)).unwrap();
            bytes.extend_from_slice(b"# edited by hand\n");
            sim.put(path(r), &bytes, mode);
        }
        Tamper::Removed(r) => {
            sim.world().paths.remove(path(r));
        }
        Tamper::LaterDeployment => {
            let (p, payload) = plan(c, "dep-c", 3);
            let r = finished(rig.deploy(p, &payload));
            assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
        }
        Tamper::BackupGone(r) => {
            sim.world().paths.remove(&backup_path(path(r), B));
        }
    }
    sim
}

/// Arm the schedule's faults for the revert.
fn arm(sim: &Sim, c: &Case) {
    sim.reset_faults();
    let mut w = sim.world();
    if let Some((r, permanent)) = c.snapshot_fault {
        if permanent {
            w.always.insert(OpKind::Snapshot(r), StepError::permanent("permission denied"));
        } else {
            w.faults.insert((OpKind::Snapshot(r), 1), Fault::Fail(StepError::transient("connection reset")));
        }
    }
    if let Some((r, permanent)) = c.write_fault {
        if permanent {
            w.always.insert(OpKind::Write(r), StepError::permanent("read-only file system"));
        } else {
            w.faults.insert((OpKind::Write(r), 1), Fault::Fail(StepError::transient("channel closed")));
        }
    }
    if c.validate_rejects_old {
        w.rejects.insert(VALIDATE.into(), cert(1));
    }
    match c.daemon {
        Daemon::Ok => {}
        Daemon::TransientOnce => {
            w.faults.insert(
                (OpKind::Exec(RELOAD.into()), 1),
                Fault::Fail(StepError::transient("connection lost; outcome unknown")),
            );
        }
        Daemon::RejectsOld => {
            w.rejects.insert(RELOAD.into(), cert(1));
        }
        Daemon::Broken => {
            w.commands.insert(RELOAD.into(), 1);
        }
        Daemon::NoEffect => w.reload_is_noop = true,
    }
    if let Some(r) = c.restore_fault {
        w.always.insert(OpKind::Restore(r), StepError::permanent("permission denied"));
    }
}

/// The outcome the schedule implies, without crashes.
fn oracle(c: &Case) -> Outcome {
    if c.tamper != Tamper::None {
        return Outcome::Failed;
    }
    if let Some((_, true)) = c.snapshot_fault {
        return Outcome::Failed;
    }
    let rollback = if c.restore_fault.is_some() { Outcome::RollbackFailed } else { Outcome::RolledBack };
    if let Some((_, true)) = c.write_fault {
        return rollback;
    }
    if c.validate_rejects_old {
        return rollback;
    }
    match c.daemon {
        Daemon::Ok | Daemon::TransientOnce => Outcome::Reverted,
        Daemon::RejectsOld | Daemon::NoEffect => rollback,
        Daemon::Broken if c.restore_fault.is_some() => Outcome::RollbackFailed,
        Daemon::Broken => Outcome::RolledBackDaemonUnknown,
    }
}

/// Run the revert of B to its end, crashing as scheduled; after a crash,
/// what a restarted `certdeploy revert` does: recover the attempt the
/// journal holds unfinished, or start a new one.
fn revert_to_end(sim: &Sim, crashes: &[(u64, bool)]) -> (Report, bool) {
    let rig = Rig::new(sim.clone());
    let key = revert_id(B);
    let mut crashes = crashes.iter().copied();
    let mut crashed = false;
    let mut attempt = 1;
    let arm_crash = |c: Option<(u64, bool)>| {
        let mut w = sim.world();
        w.crash_at = c.map(|(k, after)| (w.steps + k, after));
    };
    let start = |attempt: u32| {
        let plan = revert_plan(B, &sim.durable_records(B), attempt).expect("B is revertible");
        assert_eq!(plan.deployment_id, key);
        rig.deploy(plan, &Payload::default())
    };
    arm_crash(crashes.next());
    let mut result = start(attempt);
    for _ in 0..20 {
        match result {
            Ok(Terminal::Finished(r)) => {
                sim.world().crash_at = None;
                return (r, crashed);
            }
            Ok(Terminal::Abandoned(_)) => {
                attempt += 1;
                arm_crash(crashes.next());
                result = start(attempt);
            }
            Err(SimulatedCrash) => {
                crashed = true;
                let records = sim.durable_records(&key);
                match Deployment::replay(&records).ok() {
                    Some(d) if d.terminal().is_some() => result = Ok(d.terminal().cloned().unwrap()),
                    Some(_) => {
                        arm_crash(crashes.next());
                        result = rig.recover(&key);
                    }
                    // Nothing durable: the next run starts afresh.
                    None => result = Ok(Terminal::Abandoned("nothing journaled".into())),
                }
            }
        }
    }
    panic!("no terminal state after 20 cycles");
}

fn check(c: &Case) {
    let sim = setup(c);
    let before = tree(&sim);
    let b_files = files(&sim);
    let (reloads_before, served_before) = {
        let w = sim.world();
        (w.exec_log.len(), w.served)
    };

    let base = sim.fork();
    arm(&base, c);
    let (base_report, _) = revert_to_end(&base, &[]);
    arm(&sim, c);
    let (report, crashed) = revert_to_end(&sim, &c.crashes);

    for (world, name) in [(&sim, "crash run"), (&base, "baseline")] {
        let w = world.world();
        assert!(w.violations.is_empty(), "write-ahead violated ({name}): {:?}", w.violations);
    }
    let expected = oracle(c);
    assert_eq!(base_report.outcome, expected, "baseline: {}", base_report.message);
    let crash_alternative = crashed && c.restore_fault.is_some() && report.outcome == Outcome::RollbackFailed;
    assert!(
        report.outcome == expected || crash_alternative,
        "outcome {} ({}) but the schedule implies {expected}",
        report.outcome,
        report.message
    );
    assert_eq!(report.deployment_id, revert_id(B));
    assert_eq!(report.reverts.as_deref(), Some(B), "every revert result names what it reverts");

    match report.outcome {
        Outcome::Reverted => {
            let chain_a = c.chain_before.then(|| (chain(1), 0o664));
            assert_eq!(
                files(&sim),
                [Some((cert(1), 0o664)), Some((key(1), 0o640)), chain_a],
                "A's bytes and modes are back (a path B created is gone)"
            );
            assert!(report.outcome.success());
            assert_eq!(sim.world().served, Some(leaf_of(&cert(1))), "the old certificate is served");
        }
        Outcome::Failed => {
            assert_eq!(tree(&sim), before, "a failed revert leaves the host's tree as it was: {}", report.message);
            let w = sim.world();
            assert_eq!((w.exec_log.len(), w.served), (reloads_before, served_before), "nothing ran");
            drop(w);
            let named = match c.tamper {
                Tamper::Edited(r) | Tamper::Removed(r) => Some(match r {
                    Role::Cert => CERT.to_string(),
                    Role::Key => KEY.to_string(),
                    _ => CHAIN.to_string(),
                }),
                Tamper::LaterDeployment => Some(CERT.to_string()),
                Tamper::BackupGone(r) => Some(backup_path(if r == Role::Cert { CERT } else { KEY }, B)),
                Tamper::None => None,
            };
            // (A snapshot that fails for good is named instead.)
            if let Some(path) = named.filter(|_| !matches!(c.snapshot_fault, Some((_, true)))) {
                assert!(report.message.contains(&path), "the message names {path}: {}", report.message);
            }
        }
        Outcome::RollbackFailed => {}
        _ => assert_eq!(files(&sim), b_files, "rolled back to B's files: {}", report.message),
    }
    if !crash_alternative {
        assert_eq!(report.outcome, base_report.outcome);
        if report.outcome != Outcome::RollbackFailed {
            assert_eq!(files(&sim), files(&base), "crash run and baseline end with the same files");
        }
    }
    for p in sim.list() {
        assert!(!p.contains(".certdeploy-tmp."), "temp file left: {p}");
    }
    assert!(sim.unfinished().is_empty(), "unfinished: {:?}", sim.unfinished());
    let bytes = sim.journal_bytes();
    assert!(!bytes.windows(MARKER.len()).any(|x| x == MARKER.as_bytes()), "key bytes in the journal");
    // A second revert finds the recorded result.
    let again = Deployment::replay(&sim.durable_records(&revert_id(B))).expect("journaled");
    assert_eq!(again.terminal(), Some(&Terminal::Finished(report.clone())), "the journal holds the result");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2048, ..ProptestConfig::default() })]
    #[test]
    fn revert_with_faults_and_crashes(c in case()) {
        check(&c);
    }
}

/// Only a `deployed` deployment can be reverted: the plan is refused,
/// naming the deployment and its outcome, before anything runs.
#[test]
fn only_a_deployed_deployment_is_revertible() {
    let c = Case {
        chain_before: true,
        validate: false,
        verify: false,
        keep_backups: 1,
        tamper: Tamper::None,
        snapshot_fault: None,
        write_fault: None,
        validate_rejects_old: false,
        daemon: Daemon::Ok,
        restore_fault: None,
        crashes: vec![],
    };
    let sim = setup(&c);
    sim.world().commands.insert(RELOAD.into(), 1);
    let rig = Rig::new(sim.clone());
    let (p, payload) = plan(&c, "dep-rb", 3);
    let r = finished(rig.deploy(p, &payload));
    assert_eq!(r.outcome, Outcome::RolledBackDaemonUnknown);
    let why = revert_plan("dep-rb", &sim.durable_records("dep-rb"), 1).expect_err("not deployed");
    assert!(why.contains("dep-rb") && why.contains("rolled_back_daemon_unknown"), "{why}");
    // A revert is not revertible either.
    sim.world().commands.clear();
    let plan = revert_plan(B, &sim.durable_records(B), 1).expect("B deployed");
    let r = finished(rig.deploy(plan, &Payload::default()));
    assert_eq!(r.outcome, Outcome::Reverted, "{}", r.message);
    let why = revert_plan(&revert_id(B), &sim.durable_records(&revert_id(B)), 1).expect_err("a revert");
    assert!(why.contains("reverted, not deployed"), "{why}");
}

/// A revert runs under the target lock like a deployment, and a worker
/// that finds that lock expired handles it like a deployment's: worker w1
/// dies while its revert of B puts the files back (the lock says
/// `writing`, with the revert's snapshots); a lease later, worker w2's
/// deployment C takes the lock over, rolls the half-done revert back to
/// B's files from those snapshots, and deploys C. When w1 comes back, its
/// revert is abandoned without touching the host (the lock is no longer
/// its own), and a new revert of B ends `failed`, naming the path that C
/// changed, the host untouched.
#[test]
fn a_revert_interrupted_under_its_lock_is_rolled_back_by_the_worker_taking_it_over() {
    use certdeploy_core::attempt::{self, Executed, Notice, Worker};
    use certdeploy_core::lock::{LockPhase, LockRecord, Parsed, Planted, lock_path};

    let c = Case {
        chain_before: false,
        validate: true,
        verify: true,
        keep_backups: 1,
        tamper: Tamper::None,
        snapshot_fault: None,
        write_fault: None,
        validate_rejects_old: false,
        daemon: Daemon::Ok,
        restore_fault: None,
        crashes: vec![],
    };
    let sim = setup(&c);
    let rig = Rig::new(sim.clone());
    let b_files = files(&sim);
    let lease_ms = 30_000;
    let dead_own = |_: &LockRecord| false;
    let notice = |_: Notice| {};
    let worker = |name, journal_id| Worker {
        name,
        journal_id,
        lease_ms,
        dead_own: &dead_own,
        notice: &notice,
        planted: Planted::None,
    };
    let (w1, w2) = (worker("w1", "journal-1"), worker("w2", "journal-2"));

    // w1 dies right after putting back the first file (the cert).
    sim.reset_faults();
    sim.fail(OpKind::Write(Role::Cert), 1, Fault::CrashAfter);
    let plan = revert_plan(B, &sim.durable_records(B), 1).expect("revertible");
    let died =
        run_until_crash(|| block_on(attempt::execute(&rig.env(), &w1, plan, &Payload::default(), "token-w1".into())));
    assert!(died.is_err(), "w1 died in the revert's write");
    sim.crash_journal();
    sim.reset_faults();
    assert_eq!(sim.get(CERT), Some((cert(1), 0o664)), "half reverted: A's cert is back");
    assert_eq!(sim.get(KEY), b_files[1], "half reverted: B's key is still there");
    let lock = lock_path(CERT);
    let (bytes, _) = sim.world().lock_files.get(&lock).cloned().expect("the lock is left");
    let Ok(Parsed::Lock(held)) = LockRecord::parse(&lock, &bytes) else { panic!("not a lock") };
    assert_eq!((held.deployment_id.as_str(), held.phase), (revert_id(B).as_str(), LockPhase::Writing));

    // A lease later, w2 deploys C: it takes the lock over first.
    sim.world().now += lease_ms + 5_000;
    let (p, payload) = plan_c(&c);
    let r = block_on(attempt::execute(&rig.env(), &w2, p, &payload, "token-w2".into())).expect("no driver error");
    let Executed::Report(r) = r else { panic!("C: {r:?}") };
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let taken = sim.world().records.iter().any(|(k, _, _)| k.starts_with(&format!("{}~takeover~", revert_id(B))));
    assert!(taken, "the half-done revert was rolled back under a takeover key of its own");
    assert_eq!(sim.get(CERT).map(|f| f.0), Some(cert(3)), "C is deployed");
    assert!(sim.world().violations.is_empty(), "{:?}", sim.world().violations);

    // w1 restarts: its revert is no longer its to finish.
    let c_tree = tree(&sim);
    let key = revert_id(B);
    let t = block_on(attempt::resume(&rig.env(), &w1, &key, &sim.durable_records(&key))).expect("resumed");
    assert!(matches!(&t, Terminal::Abandoned(why) if why.contains("taken over")), "{t:?}");
    assert_eq!(tree(&sim), c_tree, "w1 did not touch the host again");

    // And B can no longer be reverted: C changed its files.
    let plan = revert_plan(B, &sim.durable_records(B), 2).expect("revertible");
    let r = block_on(attempt::execute(&rig.env(), &w1, plan, &Payload::default(), "token-w1b".into()))
        .expect("no driver error");
    let Executed::Report(r) = r else { panic!("revert: {r:?}") };
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.message);
    assert!(r.message.contains(CERT), "{}", r.message);
    assert_eq!(tree(&sim), c_tree, "the host is untouched");
}

/// Deployment C (generation 3) of the target.
fn plan_c(c: &Case) -> (Plan, Payload) {
    plan(c, "dep-c", 3)
}

/// A revert validates, reloads and verifies as the target is configured
/// now: with an endpoint configured since, it checks that the certificate
/// found before the reverted deployment is served there; without one, it
/// checks nothing.
#[test]
fn a_revert_verifies_the_old_certificate_at_the_endpoint_configured_now() {
    use certdeploy_core::revert::{TargetNow, configured_now};
    let c = Case {
        chain_before: true,
        validate: false,
        verify: false,
        keep_backups: 1,
        tamper: Tamper::None,
        snapshot_fault: None,
        write_fault: None,
        validate_rejects_old: false,
        daemon: Daemon::Ok,
        restore_fault: None,
        crashes: vec![],
    };
    let sim = setup(&c);
    let mut plan = revert_plan(B, &sim.durable_records(B), 1).expect("revertible");
    assert_eq!(plan.verify, None, "B had no endpoint");
    let now = |endpoint: Option<&str>| TargetNow {
        validate_command: Some(VALIDATE.into()),
        reload_command: "reload-now".into(),
        verify_endpoint: endpoint.map(str::to_string),
        verify_sni: Some("www.example".into()),
        policy: Policy { keep_backups: 3, ..Policy::default() },
    };
    configured_now(&mut plan, now(Some("h1:8443")));
    let v = plan.verify.clone().expect("verified now");
    assert_eq!((v.endpoint.as_str(), v.sni.as_deref()), ("h1:8443", Some("www.example")));
    assert_eq!(v.expected, leaf_of(&cert(1)), "the old certificate, A's");
    assert_eq!((plan.reload_command.as_str(), plan.policy.keep_backups), ("reload-now", 3));
    configured_now(&mut plan, now(None));
    assert_eq!(plan.verify, None);
    // And it runs so: the old certificate is served after the revert.
    configured_now(&mut plan, now(Some("h1:8443")));
    plan.reload_command = RELOAD.into();
    plan.validate_command = None;
    let r = finished(Rig::new(sim.clone()).deploy(plan, &Payload::default()));
    assert_eq!(r.outcome, Outcome::Reverted, "{}", r.message);
    assert!(r.message.contains("old certificate is served"), "{}", r.message);
}
