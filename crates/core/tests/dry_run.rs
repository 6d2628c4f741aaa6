//! The dry run against the in-memory host: the plan a deployment would
//! follow, and nothing changed on the host or in the journal.

mod common;

use certdeploy_core::testkit::*;
use certdeploy_core::*;
use common::*;

const NEWER_CERT: &[u8] = b"CERT newer nb=300\nnewer-body\n";
const NEW_KEY: &[u8] = b"NEW KEY\n";
const CHAIN_BYTES: &[u8] = b"CHAIN\n";

fn dry(rig: &Rig, verify: bool) -> Report {
    let (plan, _) = test_plan("dry-1", NEW_CERT, NEW_KEY, Some(CHAIN_BYTES), false, verify);
    block_on(dry_run::dry_run(&rig.host, &rig.verifier, &rig.clock, fake_cert_facts, &plan, None))
}

fn meta(r: &Report, k: &str) -> String {
    r.metadata().get(k).cloned().unwrap_or_else(|| "<absent>".into())
}

/// Every path of the host with its content and mode.
type HostState = Vec<(String, Option<(Vec<u8>, u32)>)>;

fn state(rig: &Rig) -> HostState {
    rig.sim.list().into_iter().map(|p| (p.clone(), rig.sim.get(&p))).collect()
}

#[test]
fn a_dry_run_plans_per_file_and_changes_nothing() {
    let rig = rig();
    rig.sim.put(CERT, OLD_CERT, 0o644);
    rig.sim.put(KEY, OLD_KEY, 0o600);
    rig.sim.put(CHAIN, CHAIN_BYTES, 0o644);
    let before = state(&rig);
    let r = dry(&rig, false);
    assert_eq!(r.outcome, Outcome::Planned, "{}", r.message);
    assert!(r.outcome.success());
    assert_eq!(meta(&r, "plan_cert"), "write");
    assert_eq!(meta(&r, "plan_key"), "write");
    assert_eq!(meta(&r, "plan_chain"), "unchanged");
    assert_eq!(meta(&r, "plan_supersede"), "false");
    assert_eq!(meta(&r, "plan_outcome"), "deployed");
    assert_eq!(state(&rig), before, "the dry run changed the host");
    assert!(rig.sim.world().records.is_empty(), "a dry run journals nothing");
    assert!(!rig.sim.world().exec_log.iter().any(|c| c == RELOAD), "a dry run never reloads");
}

#[test]
fn a_dry_run_sees_identical_files_and_a_newer_certificate() {
    let rig = rig();
    rig.sim.put(CERT, NEW_CERT, 0o644);
    rig.sim.put(KEY, NEW_KEY, 0o600);
    rig.sim.put(CHAIN, CHAIN_BYTES, 0o644);
    let r = dry(&rig, false);
    assert_eq!(r.outcome, Outcome::Planned, "{}", r.message);
    for role in ["cert", "key", "chain"] {
        assert_eq!(meta(&r, &format!("plan_{role}")), "unchanged", "{role}");
    }
    assert_eq!(meta(&r, "plan_outcome"), "unchanged");

    rig.sim.put(CERT, NEWER_CERT, 0o644);
    let r = dry(&rig, false);
    assert_eq!(r.outcome, Outcome::Planned, "{}", r.message);
    assert_eq!(meta(&r, "plan_supersede"), "true");
    assert_eq!(meta(&r, "plan_outcome"), "superseded");
    assert_eq!(meta(&r, "existing_not_before"), "300");
}

#[test]
fn a_dry_run_of_identical_files_not_served_plans_a_reload() {
    let rig = rig();
    rig.sim.put(CERT, NEW_CERT, 0o644);
    rig.sim.put(KEY, NEW_KEY, 0o600);
    rig.sim.put(CHAIN, CHAIN_BYTES, 0o644);
    // The daemon serves nothing yet: a deployment would reload.
    let r = dry(&rig, true);
    assert_eq!(r.outcome, Outcome::Planned, "{}", r.message);
    assert_eq!(meta(&r, "plan_cert"), "unchanged");
    assert_eq!(meta(&r, "plan_outcome"), "deployed");
    assert!(r.message.contains("reload"), "{}", r.message);
}

#[test]
fn a_dry_run_that_cannot_read_fails_naming_the_path() {
    let rig = rig();
    rig.sim.symlink(CERT, CERT);
    let r = dry(&rig, false);
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.message);
    assert!(r.message.contains(CERT), "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "snapshot");
}

#[test]
fn a_dry_run_names_a_missing_directory_or_program() {
    let rig = rig();
    rig.sim.put(CERT, OLD_CERT, 0o644);
    // The host's answer to the check script: the reload program is missing.
    let (plan, _) = test_plan("dry-1", NEW_CERT, NEW_KEY, Some(CHAIN_BYTES), false, false);
    let host = Scripted(rig.host.clone(), "cmd 'systemctl'".into());
    let r = block_on(dry_run::dry_run(&host, &rig.verifier, &rig.clock, fake_cert_facts, &plan, None));
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "reload");
    assert!(r.message.contains("systemctl"), "{}", r.message);
    let host = Scripted(rig.host.clone(), "dir '/etc/ssl'".into());
    let r = block_on(dry_run::dry_run(&host, &rig.verifier, &rig.clock, fake_cert_facts, &plan, None));
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "write");
    assert!(r.message.contains("/etc/ssl"), "{}", r.message);
}

/// The in-memory host whose every command fails with `output`.
struct Scripted(MemHost, String);

impl driver::Host for Scripted {
    async fn inspect(&self, files: &[SnapshotRequest]) -> Vec<Result<driver::Snapped, StepError>> {
        self.0.inspect(files).await
    }
    async fn snapshot(&self, id: &str, files: &[SnapshotRequest]) -> Vec<Result<driver::Snapped, StepError>> {
        self.0.snapshot(id, files).await
    }
    async fn write(&self, id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        self.0.write(id, files).await
    }
    async fn exec(&self, _command: &str, _timeout_ms: u64) -> Result<ExecResult, StepError> {
        Ok(ExecResult { exit_code: Some(1), output: self.1.clone() })
    }
    async fn restore(&self, id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        self.0.restore(id, files).await
    }
    async fn remove_backups(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        self.0.remove_backups(id, paths).await
    }
    async fn prune(&self, id: &str, live: &[String], keep: u32) -> Result<(), StepError> {
        self.0.prune(id, live, keep).await
    }
    async fn write_locked(
        &self,
        id: &str,
        files: &[(WriteRequest, &[u8])],
        lock: driver::LockWrite<'_>,
    ) -> driver::WrittenLocked {
        self.0.write_locked(id, files, lock).await
    }
    async fn prune_locked(
        &self,
        id: &str,
        live: &[String],
        keep: u32,
        lock: driver::LockWrite<'_>,
    ) -> driver::PrunedLocked {
        self.0.prune_locked(id, live, keep, lock).await
    }
    async fn discard_temps(&self, id: &str, paths: &[String]) -> Result<(), StepError> {
        self.0.discard_temps(id, paths).await
    }
    async fn exec_guarded(&self, c: &str, t: u64, g: &ExecGuard) -> Result<ExecResult, StepError> {
        self.0.exec_guarded(c, t, g).await
    }
    async fn lock_create(&self, p: &str, b: &[u8]) -> Result<lock::Created, StepError> {
        self.0.lock_create(p, b).await
    }
    async fn lock_replace(&self, p: &str, b: &[u8], d: bool, f: driver::Fence<'_>) -> Result<Option<u64>, StepError> {
        self.0.lock_replace(p, b, d, f).await
    }
    async fn lock_read(&self, p: &str) -> Result<Option<lock::LockFile>, StepError> {
        self.0.lock_read(p).await
    }
    async fn lock_remove(&self, p: &str) -> Result<(), StepError> {
        self.0.lock_remove(p).await
    }
    async fn lock_sweep(&self, l: &str, b: u64) -> Result<u32, StepError> {
        self.0.lock_sweep(l, b).await
    }
    async fn resolve_path(&self, p: &str) -> Result<String, StepError> {
        self.0.resolve_path(p).await
    }
}
