//! Named scenarios. The first four mirror, one for one, the SSH rollback
//! tests of the Go tool certdeploy started from (named `Seed:` below); the
//! rest cover the paths that tool did not have.

mod common;

use certdeploy_core::testkit::*;
use certdeploy_core::*;
use common::*;

const OLD_CHAIN: &[u8] = b"OLD CHAIN\n";
const NEW_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MARKER-7f3a\n-----END PRIVATE KEY-----\n";
const NEW_CHAIN: &[u8] = b"NEW CHAIN\n";

fn with_originals(rig: &Rig) {
    rig.sim.put(CERT, OLD_CERT, 0o644);
    rig.sim.put(KEY, OLD_KEY, 0o600);
    rig.sim.put(CHAIN, OLD_CHAIN, 0o640);
}

fn plan(id: &str) -> (Plan, Payload) {
    test_plan(id, NEW_CERT, NEW_KEY, Some(NEW_CHAIN), false, false)
}

fn finished(t: Terminal) -> Report {
    match t {
        Terminal::Finished(r) => r,
        Terminal::Abandoned(why) => panic!("abandoned: {why}"),
    }
}

fn meta(r: &Report, k: &str) -> String {
    r.metadata().get(k).cloned().unwrap_or_else(|| "<absent>".into())
}

fn assert_originals(rig: &Rig) {
    assert_eq!(rig.sim.get(CERT), Some((OLD_CERT.to_vec(), 0o644)));
    assert_eq!(rig.sim.get(KEY), Some((OLD_KEY.to_vec(), 0o600)));
    assert_eq!(rig.sim.get(CHAIN), Some((OLD_CHAIN.to_vec(), 0o640)));
}

fn no_leftovers(rig: &Rig) {
    for p in rig.sim.list() {
        assert!(!p.contains(".certdeploy-tmp."), "temp file left: {p}");
    }
}

fn count(rig: &Rig, f: impl Fn(&OpKind) -> bool) -> usize {
    rig.sim.world().op_log.iter().filter(|o| f(o)).count()
}

/// Seed: TestSSH_ReloadFails_FilesRestored.
#[test]
fn reload_fails_files_restored() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.exit_codes(RELOAD, &[1, 0]);
    let (plan, payload) = plan("d-restore");
    let r = finished(rig.deploy(plan, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBack);
    assert!(
        r.message.starts_with("reload command failed; rolled back to pre-deploy state: exit status 1"),
        "{}",
        r.message
    );
    assert_originals(&rig);
    for role in ["cert", "key", "chain"] {
        assert_eq!(meta(&r, &format!("backup_status_{role}")), "restored");
    }
    assert_eq!(meta(&r, "failed_step"), "reload");
    assert_eq!(meta(&r, "rolled_back"), "true");
    assert!(meta(&r, "reload_error").contains("exit status 1"));
    // Every path existed: restores renamed backups back, no removals.
    assert_eq!(rig.sim.world().exec_log, vec![RELOAD, RELOAD]);
    assert!(!rig.sim.list().iter().any(|p| p.contains(".certdeploy-bak.")), "restore consumes the backups");
    no_leftovers(&rig);
}

/// Seed: TestSSH_NoExistingCert_ReloadFails_NewCertRemoved.
#[test]
fn no_existing_cert_reload_fails_new_files_removed() {
    let rig = rig();
    rig.sim.exit_codes(RELOAD, &[1, 0]);
    let (plan, payload) = plan("d-first");
    let r = finished(rig.deploy(plan, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBack);
    for p in [CERT, KEY, CHAIN] {
        assert!(!rig.sim.exists(p), "{p} must be removed");
    }
    assert_eq!(count(&rig, |o| matches!(o, OpKind::Write(_))), 3, "exactly 3 writes (deploy only)");
    assert_eq!(count(&rig, |o| matches!(o, OpKind::Restore(_))), 3, "3 removals on rollback");
    for role in ["cert", "key", "chain"] {
        assert_eq!(meta(&r, &format!("backup_status_{role}")), "removed");
    }
    assert!(rig.sim.list().is_empty(), "host back to empty: {:?}", rig.sim.list());
}

/// Seed: TestSSH_ReloadFails_RollbackAlsoFails_OperatorActionable.
#[test]
fn reload_fails_rollback_also_fails_operator_actionable() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.exit_codes(RELOAD, &[1]);
    rig.sim.fail(
        OpKind::Restore(Role::Cert),
        1,
        Fault::Fail(StepError::permanent("/etc/ssl/site.pem: permission denied")),
    );
    let (plan, payload) = plan("d-rbfail");
    let r = finished(rig.deploy(plan, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RollbackFailed);
    assert!(!r.outcome.success());
    assert!(r.message.contains("reload command failed"), "{}", r.message);
    assert!(r.message.contains("exit status 1"), "reload error in message: {}", r.message);
    assert!(r.message.contains("permission denied"), "rollback error in message: {}", r.message);
    assert_eq!(meta(&r, "manual_action_required"), "true");
    assert!(meta(&r, "rollback_error").contains("cert restore_failed: /etc/ssl/site.pem: permission denied"));
    assert_eq!(meta(&r, "backup_status_cert"), "restore_failed");
    assert_eq!(meta(&r, "backup_status_key"), "restored");
    assert_eq!(meta(&r, "backup_path_cert"), "/etc/ssl/site.pem.certdeploy-bak.d-rbfail");
    // The backup is left on the host for the operator, and no retry-reload ran.
    assert!(rig.sim.exists("/etc/ssl/site.pem.certdeploy-bak.d-rbfail"));
    assert_eq!(rig.sim.world().exec_log, vec![RELOAD]);
}

/// Seed: TestSSH_ReloadFails_RestoreThenSecondReloadFails.
#[test]
fn reload_fails_restore_then_second_reload_fails() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.exit_codes(RELOAD, &[1, 1]);
    let (plan, payload) = plan("d-daemon");
    let r = finished(rig.deploy(plan, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBackDaemonUnknown);
    assert!(r.message.contains("rolled back files; retry-reload also failed"), "{}", r.message);
    assert_eq!(meta(&r, "daemon_state_unknown"), "true");
    assert!(meta(&r, "retry_reload_error").contains("exit status 1"));
    assert_originals(&rig);
    assert_eq!(rig.sim.world().exec_log, vec![RELOAD, RELOAD]);
}

/// A write failing mid-way (the key, after the cert was renamed into place)
/// is rolled back; no reload ever ran.
#[test]
fn write_fails_mid_way_rolled_back() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.fail(OpKind::Write(Role::Key), 1, Fault::Fail(StepError::permanent("/etc/ssl: read-only")));
    let (plan, payload) = plan("d-midway");
    let r = finished(rig.deploy(plan, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBack);
    assert_eq!(meta(&r, "failed_step"), "write");
    assert!(r.message.starts_with("write of key (/etc/ssl/site.key) failed; rolled back"), "{}", r.message);
    assert_eq!(count(&rig, |o| *o == OpKind::Write(Role::Cert)), 1, "the cert was written first");
    assert_originals(&rig);
    assert!(rig.sim.world().exec_log.is_empty(), "no reload after a failed write");
}

#[test]
fn deploys_and_prunes_old_backups() {
    let rig = rig();
    with_originals(&rig);
    let (p, payload) = plan("d-1");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert!(r.outcome.success());
    assert_eq!(r.message, "certificate deployed to web1.internal:22");
    assert_eq!(meta(&r, "backup_status_cert"), "snapshotted");
    assert_eq!(rig.sim.get(CERT), Some((NEW_CERT.to_vec(), 0o644)));
    assert_eq!(rig.sim.get(KEY), Some((NEW_KEY.to_vec(), 0o600)));
    assert_eq!(rig.sim.get(CHAIN), Some((NEW_CHAIN.to_vec(), 0o644)));
    assert!(rig.sim.exists("/etc/ssl/site.pem.certdeploy-bak.d-1"), "keeps the last backup");

    // A second deployment keeps only its own backup (retention 1).
    let (p, payload) = test_plan("d-2", b"CERT newer nb=300\n", NEW_KEY, Some(NEW_CHAIN), false, false);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed);
    assert!(rig.sim.exists("/etc/ssl/site.pem.certdeploy-bak.d-2"));
    assert!(!rig.sim.exists("/etc/ssl/site.pem.certdeploy-bak.d-1"), "older backup pruned");
}

#[test]
fn first_deploy_reports_no_pre_existing() {
    let rig = rig();
    let (p, payload) = test_plan("d-new", NEW_CERT, NEW_KEY, None, false, false);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed);
    assert_eq!(meta(&r, "backup_status_cert"), "no_pre_existing");
    assert_eq!(meta(&r, "backup_status_key"), "no_pre_existing");
    assert_eq!(meta(&r, "backup_status_chain"), "n/a");
}

#[test]
fn chain_is_appended_to_cert_without_chain_path() {
    let (p, payload) = test_plan("d-app", NEW_CERT, NEW_KEY, None, false, false);
    assert_eq!(p.files.len(), 2);
    let target = TargetSpec {
        host: "h".into(),
        port: 22,
        user: "u".into(),
        cert_path: CERT.into(),
        key_path: KEY.into(),
        chain_path: None,
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: None,
        reload_command: "true".into(),
        verify_endpoint: None,
        verify_sni: None,
    };
    let material = Material {
        certificate_pem: "CERT a nb=1".into(),
        private_key_pem: Secret::new(b"k".to_vec()),
        chain_pem: Some("CHAIN\n".into()),
    };
    let (plan, payload2) =
        build_plan("x", "t", &target, &material, &MaterialFacts::default(), Policy::default(), 1).unwrap();
    assert_eq!(payload2.get(Role::Cert), Some(&b"CERT a nb=1\nCHAIN\n"[..]));
    assert!(plan.file(Role::Chain).is_none());
    drop(payload);
}

#[test]
fn unchanged_when_identical() {
    let rig = rig();
    rig.sim.put(CERT, NEW_CERT, 0o644);
    rig.sim.put(KEY, NEW_KEY, 0o600);
    rig.sim.put(CHAIN, NEW_CHAIN, 0o644);
    let (p, payload) = plan("d-same");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert_eq!(count(&rig, |o| matches!(o, OpKind::Write(_))), 0);
    assert!(rig.sim.world().exec_log.is_empty(), "no reload");
    assert!(!rig.sim.list().iter().any(|p| p.contains(".certdeploy-bak.")), "backups of this attempt removed");
}

#[test]
fn superseded_when_host_has_newer_cert() {
    let rig = rig();
    rig.sim.put(CERT, b"CERT newest nb=900\n", 0o644);
    rig.sim.put(KEY, OLD_KEY, 0o600);
    let (p, payload) = plan("d-old");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Superseded);
    assert!(r.message.contains("notBefore 900 > 200"), "{}", r.message);
    assert_eq!(rig.sim.get(CERT), Some((b"CERT newest nb=900\n".to_vec(), 0o644)));
    assert!(rig.sim.world().exec_log.is_empty());
    assert!(!rig.sim.list().iter().any(|p| p.contains(".certdeploy-bak.")));
}

#[test]
fn snapshot_failure_is_failed_and_untouched() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.fail(OpKind::Snapshot(Role::Key), 1, Fault::Fail(StepError::permanent("permission denied")));
    let (p, payload) = plan("d-snapfail");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(meta(&r, "failed_step"), "snapshot");
    assert!(r.message.contains("nothing written"), "{}", r.message);
    assert_originals(&rig);
    assert!(!rig.sim.list().iter().any(|p| p.contains(".certdeploy-")), "backup links removed: {:?}", rig.sim.list());
}

/// A snapshot retried after a transient error fails for good, and its answer
/// arrives after the deadline: the attempt still removes its backups and
/// reports `failed`. (The retry's time must not outlive the snapshot phase:
/// a stale one made the machine record a `GaveUp` for the cleanup that its
/// own fold then refused, so neither this process nor a recovery could end
/// the attempt.)
#[test]
fn snapshot_failing_for_good_after_a_retry_past_the_deadline_still_cleans_up() {
    let (p, _) = plan("d-late-snap");
    let t0 = Timestamp(1_800_000_000_000);
    let past_deadline = t0.plus_ms(p.policy.deadline_ms + 5);
    let snapshot = |role: Role| Snapshot { live_path: p.file(role).unwrap().path.clone(), pre: PreState::Missing };
    let key_failed = |error| Event::StepFailed { step: Step::Snapshot, role: Some(Role::Key), error };
    let mut d = Deployment::start(p.clone(), t0);
    for (at, event) in [
        (t0, Event::Snapshotted { role: Role::Cert, snapshot: snapshot(Role::Cert) }),
        (t0, Event::Snapshotted { role: Role::Chain, snapshot: snapshot(Role::Chain) }),
        (t0, key_failed(StepError::transient("connection reset"))),
        (past_deadline, key_failed(StepError::permanent("permission denied"))),
    ] {
        d.apply(&Record { at, event }).unwrap();
    }
    let now = past_deadline.plus_ms(1);
    assert!(matches!(d.next(now), Next::Perform(Action::RemoveBackups { .. })), "{:?}", d.next(now));
    d.apply(&Record { at: now, event: Event::BackupsRemoved { error: None } }).unwrap();
    let Next::Record(event) = d.next(now) else { panic!("{:?}", d.next(now)) };
    d.apply(&Record { at: now, event }).unwrap();
    let r = finished(d.terminal().cloned().expect("terminal"));
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(meta(&r, "failed_step"), "snapshot");
    assert!(r.message.ends_with("nothing written: permission denied"), "{}", r.message);
}

#[test]
fn validate_failure_rolls_back_without_any_reload() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.world().commands.insert("nginx -t".into(), 1);
    let (p, payload) = test_plan("d-val", NEW_CERT, NEW_KEY, Some(NEW_CHAIN), true, false);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBack);
    assert_eq!(meta(&r, "failed_step"), "validate");
    assert!(r.message.starts_with("validate command failed; rolled back"), "{}", r.message);
    assert_eq!(rig.sim.world().exec_log, vec!["nginx -t"], "validate only, never a reload");
    assert_originals(&rig);
}

#[test]
fn transient_errors_are_retried_with_backoff() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.fail(OpKind::Snapshot(Role::Cert), 1, Fault::Fail(StepError::transient("connection reset")));
    rig.sim.fail(OpKind::Write(Role::Key), 1, Fault::Fail(StepError::transient("channel lost")));
    rig.sim.fail(OpKind::Exec(RELOAD.into()), 1, Fault::Fail(StepError::transient("connection lost; outcome unknown")));
    let t0 = rig.clock_now();
    let (p, payload) = plan("d-transient");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert!(rig.clock_now() > t0, "waited virtual time between retries");
    assert_eq!(rig.sim.get(KEY), Some((NEW_KEY.to_vec(), 0o600)));
}

#[test]
fn deadline_before_first_write_is_failed_after_is_rolled_back() {
    // Snapshot keeps failing transiently: gives up at the deadline, `failed`.
    let rig = rig();
    with_originals(&rig);
    rig.sim.fail_always(OpKind::Snapshot(Role::Chain), StepError::transient("connection refused"));
    let (p, payload) = plan("d-dl1");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.message.contains("deadline passed"), "{}", r.message);
    assert_originals(&rig);

    // Reload keeps failing transiently: rolled back once the deadline passes.
    let rig2 = self::rig();
    with_originals(&rig2);
    rig2.sim.fail_always(OpKind::Exec(RELOAD.into()), StepError::transient("connection reset"));
    let (p, payload) = plan("d-dl2");
    let r = finished(rig2.deploy(p, &payload).unwrap());
    // The retry-reload can't run either: daemon state unknown.
    assert_eq!(r.outcome, Outcome::RolledBackDaemonUnknown, "{}", r.message);
    assert_originals(&rig2);
}

#[test]
fn verify_mismatch_rolls_back_and_checks_original_is_served() {
    let rig = rig();
    with_originals(&rig);
    // The daemon serves the old cert before and ignores reloads.
    {
        let mut w = rig.sim.world();
        w.served = Some(leaf_of(OLD_CERT));
        w.reload_is_noop = true;
    }
    let (p, payload) = test_plan("d-ver", NEW_CERT, NEW_KEY, Some(NEW_CHAIN), false, true);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "verify");
    assert_eq!(meta(&r, "original_verified"), "true");
    assert_originals(&rig);
    assert_eq!(rig.sim.world().exec_log, vec![RELOAD, RELOAD], "reload then retry-reload");
}

#[test]
fn verify_ok_deploys() {
    let rig = rig();
    with_originals(&rig);
    let (p, payload) = test_plan("d-vok", NEW_CERT, NEW_KEY, Some(NEW_CHAIN), true, true);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert_eq!(rig.sim.world().served, Some(leaf_of(NEW_CERT)));
}

#[test]
fn unchanged_but_not_served_reloads_and_verifies() {
    let rig = rig();
    rig.sim.put(CERT, NEW_CERT, 0o644);
    rig.sim.put(KEY, NEW_KEY, 0o600);
    rig.sim.put(CHAIN, NEW_CHAIN, 0o644);
    rig.sim.world().served = Some(leaf_of(OLD_CERT));
    let (p, payload) = test_plan("d-lost-reload", NEW_CERT, NEW_KEY, Some(NEW_CHAIN), false, true);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert_eq!(count(&rig, |o| matches!(o, OpKind::Write(_))), 0, "nothing written");
    assert_eq!(rig.sim.world().exec_log, vec![RELOAD]);
}

#[test]
fn symlinked_path_is_written_through() {
    let rig = rig();
    rig.sim.put("/etc/ssl/real/site.pem", OLD_CERT, 0o644);
    rig.sim.symlink(CERT, "/etc/ssl/real/site.pem");
    let (p, payload) = test_plan("d-link", NEW_CERT, NEW_KEY, None, false, false);
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed);
    assert!(matches!(rig.sim.world().paths.get(CERT), Some(Node::Symlink(_))), "link stays a link");
    assert_eq!(rig.sim.get("/etc/ssl/real/site.pem").map(|x| x.0), Some(NEW_CERT.to_vec()));
}

#[test]
fn crash_after_reload_recovers_by_verifying_again() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.fail(OpKind::Exec(RELOAD.into()), 1, Fault::CrashAfter);
    let (p, payload) = test_plan("d-crash-verify", NEW_CERT, NEW_KEY, Some(NEW_CHAIN), false, true);
    assert!(rig.deploy(p, &payload).is_err(), "crashed");
    // Reload result was not journaled: recovery rolls back (a reload may have started).
    let t = rig.recover("d-crash-verify").unwrap();
    assert!(matches!(t, Terminal::Abandoned(_)), "{t:?}");
    assert_originals(&rig);
    assert_eq!(rig.sim.world().served, Some(leaf_of(OLD_CERT)), "retry-reload serves the original again");
    assert!(rig.sim.unfinished().is_empty());
}

#[test]
fn no_key_bytes_in_journal() {
    let rig = rig();
    with_originals(&rig);
    rig.sim.exit_codes(RELOAD, &[1, 0]);
    let (p, payload) = plan("d-secret");
    let _ = rig.deploy(p, &payload).unwrap();
    let bytes = rig.sim.journal_bytes();
    assert!(!bytes.is_empty());
    let marker = b"SECRET-KEY-MARKER-7f3a";
    assert!(!bytes.windows(marker.len()).any(|w| w == marker), "key bytes in journal");
    assert!(format!("{payload:?}").contains("[redacted]"));
    assert!(!format!("{payload:?}").contains("SECRET"));
}

trait ClockNow {
    fn clock_now(&self) -> u64;
}
impl ClockNow for Rig {
    fn clock_now(&self) -> u64 {
        self.sim.world().now
    }
}

/// Another worker takes over a dead worker's deployment from the
/// snapshots its target lock carries (`TakenOver`), without the dead
/// worker's journal: restore, retry-reload, abandon. Whether the dead
/// worker got as far as the reload or only to the snapshots, the host ends
/// on its originals (a file that did not exist is removed again) and the
/// daemon serves the original certificate.
#[test]
fn taken_over_deployment_is_rolled_back_from_the_lock_snapshots() {
    for crash_op in [OpKind::Exec(RELOAD.into()), OpKind::Write(Role::Key)] {
        let rig = rig();
        rig.sim.put(CERT, OLD_CERT, 0o644);
        rig.sim.put(KEY, OLD_KEY, 0o600);
        rig.sim.world().served = Some(leaf_of(OLD_CERT));
        rig.sim.fail(crash_op.clone(), 1, Fault::CrashAfter);
        let (p, payload) = plan("d-dead");
        assert!(rig.deploy(p.clone(), &payload).is_err(), "the first worker died");
        let snapshots: Vec<(Role, Snapshot)> = rig
            .sim
            .durable_records("d-dead")
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Snapshotted { role, snapshot } => Some((role, snapshot)),
                _ => None,
            })
            .collect();
        assert_eq!(snapshots.len(), 3);
        // The taker's journal has only what the lock told it.
        let at = Timestamp(rig.clock_now());
        let records = vec![
            Record { at, event: Event::Started { plan: p } },
            Record { at, event: Event::TakenOver { from: "worker w1".into(), snapshots } },
        ];
        let t = run_until_crash(|| block_on(driver::resume(&rig.env(), &records))).unwrap().unwrap();
        assert!(matches!(&t, Terminal::Abandoned(why) if why.contains("rolled back")), "{crash_op:?}: {t:?}");
        assert_eq!(rig.sim.get(CERT), Some((OLD_CERT.to_vec(), 0o644)), "{crash_op:?}");
        assert_eq!(rig.sim.get(KEY), Some((OLD_KEY.to_vec(), 0o600)), "{crash_op:?}");
        assert!(!rig.sim.exists(CHAIN), "{crash_op:?}: the chain did not exist before");
        assert_eq!(rig.sim.world().served, Some(leaf_of(OLD_CERT)), "{crash_op:?}: retry-reload ran");
        no_leftovers(&rig);
    }
}

/// A `TakenOver` record anywhere but right after `Started` is refused.
#[test]
fn taken_over_only_opens_an_attempt() {
    let (p, _) = plan("d-x");
    let at = Timestamp(1);
    let records = vec![
        Record { at, event: Event::Started { plan: p } },
        Record { at, event: Event::TakenOver { from: "w".into(), snapshots: vec![] } },
    ];
    assert!(Deployment::replay(&records).is_err(), "snapshots must cover the plan's files");
}
