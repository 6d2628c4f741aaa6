//! The target lock's host operations over a real sshd: commands guarded by
//! the lock's token, and the sweep of lock temp and claim files that killed
//! workers leave.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use certdeploy_core::driver::Host;
use certdeploy_core::lock::{LOCK_VERSION, LockPhase, LockRecord};
use certdeploy_core::*;
use common::*;

fn record(token: &str) -> LockRecord {
    LockRecord {
        v: LOCK_VERSION,
        token: token.into(),
        worker: "w".into(),
        journal: "0123456789abcdef".into(),
        deployment_id: "d-1".into(),
        attempt: 1,
        phase: LockPhase::Writing,
        lease_ms: 4_000,
        seq: 0,
        acquired_at_ms: 0,
        snapshots: vec![],
    }
}

fn age(path: &std::path::Path) {
    let st = Command::new("touch").args(["-h", "-d", "2000-01-01"]).arg(path).status().expect("touch");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_command_runs_only_while_the_lock_holds_the_token() {
    let rig = Rig::new();
    let dir = rig.dir("guard");
    let lock = dir.join("site.pem.certdeploy-lock").display().to_string();
    let host = rig.host();
    let mine = record("d-1/1/0a1b2c");
    let c = host.lock_create(&lock, &mine.bytes()).await.expect("create");
    assert!(c.created && c.host_now > 1_700_000_000, "{c:?}");
    let marker = dir.join("ran");
    let cmd = format!("touch {}", marker.display());
    let guard = ExecGuard { lock_path: lock.clone(), token: mine.token.clone() };

    let r = host.exec_guarded(&cmd, 5_000, &guard).await.expect("guarded exec");
    assert_eq!(r.exit_code, Some(0), "{}", r.output);
    assert!(rig.sshd.exists(&marker));
    std::fs::remove_file(&marker).expect("remove marker");

    // Another worker's lock now: nothing runs.
    host.lock_replace(&lock, &record("d-2/1/3d4e5f").bytes(), false, &|| true).await.expect("replace");
    let e = host.exec_guarded(&cmd, 5_000, &guard).await.expect_err("lock of another token");
    assert!(e.is_lock_lost(), "{e}");
    assert!(!rig.sshd.exists(&marker), "the command did not run");

    // No lock at all: nothing runs either.
    host.lock_remove(&lock).await.expect("remove");
    let e = host.exec_guarded(&cmd, 5_000, &guard).await.expect_err("no lock");
    assert!(e.is_lock_lost(), "{e}");
    assert!(!rig.sshd.exists(&marker));

    // The command's own exit status, even the guard's, stays the command's.
    host.lock_create(&lock, &mine.bytes()).await.expect("create again");
    let r = host.exec_guarded("echo out; exit 75", 5_000, &guard).await.expect("guarded exec");
    assert_eq!((r.exit_code, r.output.trim()), (Some(75), "out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_only_lock_temps_and_claims_older_than_given() {
    let rig = Rig::new();
    let dir = rig.dir("sweep");
    let lock = dir.join("site.pem.certdeploy-lock");
    let named = |suffix: &str| dir.join(format!("site.pem.certdeploy-lock{suffix}"));
    let old_temp = named(".tmp.4242.0.1f");
    let old_claim = named(".claim.0011223344556677");
    let old_claim_temp = named(".claim.0011223344556677.tmp.4242.1.2f");
    let young_temp = named(".tmp.4243.0.3f");
    let other = dir.join("site.pem.tmp.1");
    for p in [&lock, &old_temp, &old_claim, &old_claim_temp, &young_temp, &other] {
        rig.sshd.write(p, b"{}", 0o600);
    }
    for p in [&lock, &old_temp, &old_claim, &old_claim_temp, &other] {
        age(p);
    }
    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() - 60;
    let n = rig.host().lock_sweep(&lock.display().to_string(), before).await.expect("sweep");
    assert_eq!(n, 3);
    for p in [&old_temp, &old_claim, &old_claim_temp] {
        assert!(!rig.sshd.exists(p), "{} left", p.display());
    }
    for p in [&lock, &young_temp, &other] {
        assert!(rig.sshd.exists(p), "{} removed", p.display());
    }
}

/// A lock's rewrites fill a temp created with the operation before (in
/// its last batch); that spare temp goes with the lock's removal, so a
/// lock taken, rewritten and released leaves nothing behind, and each
/// rewrite leaves the lock with its new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_rewritten_and_removed_leaves_no_temp() {
    let rig = Rig::new();
    let dir = rig.dir("spare");
    let lock = dir.join("site.pem.certdeploy-lock").display().to_string();
    let host = rig.host();
    let c = host.lock_create(&lock, &record("d-1/1/aa").bytes()).await.expect("create");
    assert!(c.created);
    for (i, token) in ["d-1/1/bb", "d-1/1/cc"].into_iter().enumerate() {
        let written = record(token).bytes();
        let now = host.lock_replace(&lock, &written, i == 0, &|| true).await.expect("replace");
        assert!(now.is_some());
        assert_eq!(rig.sshd.read(&lock), written);
    }
    host.lock_remove(&lock).await.expect("remove");
    assert_eq!(rig.sshd.list(&dir), Vec::<String>::new(), "no lock and no temp left");
}
