//! A target lock is a file in the target's directory, so it is only as
//! trustworthy as that directory. An expired lock whose rollback
//! instructions name files that are not the target's (or backups under a
//! foreign name) is refused: the request ends `failed` naming the lock,
//! and nothing outside the target's files is renamed or removed.

mod common;

use std::process::Command;

use certdeploy_testbed::certs::TestCa;
use common::*;

fn lock_json(deployment_id: &str, live_path: &str, pre: serde_json::Value) -> String {
    serde_json::json!({
        "v": 1, "token": "dead/1/0", "worker": "gone-1", "journal": "elsewhere:/j",
        "deployment_id": deployment_id, "attempt": 1, "phase": "writing",
        "lease_ms": 2000, "seq": 3, "acquired_at_ms": 0,
        "snapshots": [["cert", {"live_path": live_path, "pre": pre}]]
    })
    .to_string()
}

#[test]
fn crafted_lock_instructions_are_refused() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    let cfg = fleet.write_config(&Opts { worker_extra: "lock_lease_s = 2\n".into(), ..Opts::default() });
    // A file the test user could delete, outside the target's paths.
    let victim = t.dir.join("victim.txt");
    fleet.sshd.write(&victim, b"keep me\n", 0o644);
    let foreign_backup = t.dir.join("elsewhere.bak");
    fleet.sshd.write(&foreign_backup, b"not a backup\n", 0o644);
    let cert = t.cert.to_str().unwrap();
    let cases = [
        // "Remove this file, it did not exist before": not the target's cert.
        ("d-evil", lock_json("d-evil", victim.to_str().unwrap(), serde_json::json!({"state": "missing"}))),
        // The target's cert, but "restore" it from a file with a foreign name.
        (
            "d-evil2",
            lock_json(
                "d-evil2",
                cert,
                serde_json::json!({"state": "existing", "backup_path": foreign_backup.to_str().unwrap(),
                    "sha256": "00".repeat(32), "size": 13, "mode": 420, "uid": 0, "gid": 0}),
            ),
        ),
        // A deployment id that would make paths of its own.
        ("../x", lock_json("../x", cert, serde_json::json!({"state": "missing"}))),
    ];
    let ca = TestCa::new();
    for (i, (what, lock)) in cases.iter().enumerate() {
        let lock_path = format!("{cert}.certdeploy-lock");
        fleet.sshd.write(&lock_path, lock.as_bytes(), 0o600);
        // Expired long ago by the host's clock.
        let st = Command::new("touch").args(["-d", "2000-01-01", &lock_path]).status().expect("touch");
        assert!(st.success());
        let b = ca.leaf("hostile.example", 2);
        let args = deploy_args(fleet.tmp.path(), "t0", &format!("hl-{i}"), &b, false, true);
        let (code, out, err) = run(&cfg, &strs(&args));
        assert_eq!(code, 1, "{what}: exit code of a deployment that did not succeed\n{out}{err}");
        let result: serde_json::Value =
            serde_json::from_str(out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{what}: --json output: {e}\n{out}{err}"));
        assert_eq!(result["outcome"], "failed", "{what}: {out}");
        assert_eq!(result["success"], false, "{what}: {out}");
        let message = result["message"].as_str().unwrap_or_default();
        assert!(message.contains("will not follow"), "{what}: {out}{err}");
        assert!(message.contains(&lock_path), "{what}: the message does not name the lock {lock_path}: {out}");
        assert_eq!(fleet.sshd.read(&victim), b"keep me\n", "{what}");
        assert_eq!(fleet.sshd.read(&foreign_backup), b"not a backup\n", "{what}");
        assert!(!fleet.sshd.exists(&t.cert) || fleet.sshd.read(&t.cert) != b.cert_pem.as_bytes(), "{what}");
        std::fs::remove_file(&lock_path).unwrap();
    }
}

/// The target directory, writable by the attacker's group.
fn share_with_attacker(t: &Target) {
    let (_, shared) = certdeploy_testbed::ensure_attacker();
    std::os::unix::fs::chown(&t.dir, None, Some(shared)).expect("chown dir");
    std::fs::set_permissions(&t.dir, std::os::unix::fs::PermissionsExt::from_mode(0o775)).expect("chmod dir");
}

fn attacker(cmd: &str) {
    let out = certdeploy_testbed::run_as_attacker(cmd);
    assert!(out.status.success(), "attacker `{cmd}`: {}", String::from_utf8_lossy(&out.stderr));
}

/// The last JSON line of `certdeploy deploy --json`.
fn result_of(out: &str, err: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default())
        .unwrap_or_else(|e| panic!("--json output: {e}\n{out}{err}"))
}

/// certdeploy's names in the target's directory, but the lock itself.
fn certdeploy_names(t: &Target) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&t.dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".certdeploy-") && !n.ends_with(".certdeploy-lock"))
        .collect();
    v.sort();
    v
}

/// sha256 of every file in `dir` (a canary set outside the target).
fn sums(dir: &std::path::Path) -> Vec<(String, String)> {
    use sha2::Digest as _;
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), format!("{:x}", sha2::Sha256::digest(&bytes)))
        })
        .collect();
    v.sort();
    v
}

/// A FIFO at the lock path (an open of it blocks the SFTP server): the
/// lock step fails, naming the lock, in far less than the deadline.
#[test]
fn fifo_at_the_lock_path_fails_the_lock_step() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    share_with_attacker(t);
    let cfg = fleet.write_config(&Opts::default());
    let lock_path = format!("{}.certdeploy-lock", t.cert.display());
    attacker(&format!("mkfifo {lock_path}"));
    let b = TestCa::new().leaf("fifo.example", 2);
    let args = deploy_args(fleet.tmp.path(), "t0", "fifo-1", &b, false, true);
    let start = std::time::Instant::now();
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 1, "{out}{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20), "took {:?}", start.elapsed());
    let r = result_of(&out, &err);
    assert_eq!(r["outcome"], "failed", "{out}");
    assert_eq!(r["metadata"]["failed_step"], "lock", "{out}");
    let message = r["message"].as_str().unwrap_or_default();
    assert!(message.contains(&lock_path) && message.contains("FIFO"), "{out}");
    assert!(!fleet.sshd.exists(&t.cert), "nothing written");
    let left = certdeploy_names(t);
    assert!(left.is_empty(), "{left:?}");
}

/// A crafted lock whose lease is enormous holds the target no longer than
/// this worker's own configured lease.
#[test]
fn crafted_lease_is_bounded_by_the_configuration() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    share_with_attacker(t);
    let cfg = fleet.write_config(&Opts { worker_extra: "lock_lease_s = 2\n".into(), ..Opts::default() });
    let lock_path = format!("{}.certdeploy-lock", t.cert.display());
    let mut lock: serde_json::Value = serde_json::from_str(&lock_json(
        "d-forever",
        t.cert.to_str().unwrap(),
        serde_json::json!({"state": "missing"}),
    ))
    .unwrap();
    lock["lease_ms"] = serde_json::json!(1_000_000_000_000_000u64);
    lock["phase"] = serde_json::json!("locked");
    lock["snapshots"] = serde_json::json!([]);
    std::fs::write(&lock_path, lock.to_string()).unwrap();
    let st = Command::new("touch").args(["-d", "2000-01-01", &lock_path]).status().expect("touch");
    assert!(st.success());
    let b = TestCa::new().leaf("lease.example", 2);
    let args = deploy_args(fleet.tmp.path(), "t0", "lease-1", &b, false, true);
    let (code, out, err) = run(&cfg, &strs(&args));
    let r = result_of(&out, &err);
    assert_eq!(r["outcome"], "deployed", "{out}{err}");
    assert_eq!(code, 0);
    assert_eq!(fleet.sshd.read(&t.cert), b.cert_pem.as_bytes());
}

/// The attacker makes the cert path a link to a file outside the target
/// and leaves an expired lock whose rollback says "remove that file": the
/// takeover does not follow their link, the file stays.
#[test]
fn crafted_lock_with_a_symlinked_cert_path_is_refused() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    share_with_attacker(t);
    let cfg = fleet.write_config(&Opts { worker_extra: "lock_lease_s = 2\n".into(), ..Opts::default() });
    // Canary files outside the target the SSH user can write.
    let canary = t.dir.parent().unwrap().join("canary");
    fleet.sshd.mkdir(&canary, 0o755);
    let victim = canary.join("victim.pem");
    fleet.sshd.write(&victim, b"victim\n", 0o644);
    fleet.sshd.write(canary.join("other"), b"other\n", 0o644);
    let before = sums(&canary);
    let cert = t.cert.to_str().unwrap();
    attacker(&format!("ln -sf {} {cert}", victim.display()));
    let lock_path = format!("{cert}.certdeploy-lock");
    let lock = lock_json("d-evil3", victim.to_str().unwrap(), serde_json::json!({"state": "missing"}));
    attacker(&format!("printf '%s' '{lock}' > {lock_path} && touch -d 2000-01-01 {lock_path}"));
    let b = TestCa::new().leaf("hostile.example", 2);
    let args = deploy_args(fleet.tmp.path(), "t0", "hl-link", &b, false, true);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 1, "{out}{err}");
    let r = result_of(&out, &err);
    assert_eq!(r["outcome"], "failed", "{out}");
    assert_eq!(r["metadata"]["failed_step"], "lock", "{out}");
    let message = r["message"].as_str().unwrap_or_default();
    assert!(message.contains(&lock_path), "{out}");
    assert_eq!(sums(&canary), before, "files outside the target changed");
    assert_eq!(fleet.sshd.read(&victim), b"victim\n");
    let left = certdeploy_names(t);
    assert!(left.is_empty(), "{left:?}");
}

/// A holder killed after its write made its temps but before the lock's
/// `writing` rewrite (which travels in the same round trips) was renamed
/// into place leaves a `locked` lock and those temps, a key's in its
/// private staging directory. The worker taking the lock over removes them
/// by the names the dead deployment's id gives them, and nothing else: its
/// backup link stays, as does another deployment's temp.
#[test]
fn a_dead_locked_holders_temps_are_removed_by_the_taker() {
    let fleet = Fleet::new(1, false);
    let t = &fleet.targets[0];
    // Backups kept beyond this deployment's own: the prune leaves the dead
    // deployment's backup alone, so what removes it could only be the taker.
    let cfg = fleet.write_config(&Opts {
        worker_extra: "lock_lease_s = 2\n".into(),
        target_extra: "keep_backups = 3\n".into(),
        ..Opts::default()
    });
    let cert = t.cert.to_str().unwrap();
    let key_name = t.key.file_name().unwrap().to_string_lossy().into_owned();
    let lock = serde_json::json!({
        "v": 1, "token": "d-dead/1/0", "worker": "gone-1", "journal": "elsewhere:/j",
        "deployment_id": "d-dead", "attempt": 1, "phase": "locked",
        "lease_ms": 2000, "seq": 0, "acquired_at_ms": 0, "snapshots": []
    });
    let lock_path = format!("{cert}.certdeploy-lock");
    fleet.sshd.write(&lock_path, lock.to_string().as_bytes(), 0o600);
    let cert_temp = format!("{cert}.certdeploy-tmp.d-dead.0123456789abcdef");
    fleet.sshd.write(&cert_temp, b"half a certificate", 0o644);
    let stage = t.dir.join(format!(".certdeploy-stage.{key_name}.certdeploy-tmp.d-dead.fedcba9876543210"));
    fleet.sshd.mkdir(&stage, 0o700);
    fleet.sshd.write(stage.join("t"), b"KEY BYTES", 0o600);
    let backup = format!("{cert}.certdeploy-bak.d-dead");
    fleet.sshd.write(&backup, b"a backup link", 0o644);
    let other = format!("{cert}.certdeploy-tmp.d-other.0011223344556677");
    fleet.sshd.write(&other, b"someone else's", 0o644);
    for p in [&lock_path, &cert_temp, &backup, &other] {
        let st = Command::new("touch").args(["-h", "-d", "2000-01-01", p]).status().expect("touch");
        assert!(st.success());
    }
    let b = TestCa::new().leaf("locked-dead.example", 2);
    let args = deploy_args(fleet.tmp.path(), "t0", "after-dead-1", &b, false, true);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(result_of(&out, &err)["outcome"], "deployed", "{out}");
    assert!(!fleet.sshd.exists(&cert_temp), "the dead deployment's certificate temp is left\n{err}");
    assert!(!fleet.sshd.exists(&stage), "the dead deployment's key staging directory is left\n{err}");
    assert!(fleet.sshd.exists(&backup), "the dead deployment's backup was removed");
    assert!(fleet.sshd.exists(&other), "another deployment's temp was removed");
    assert_eq!(fleet.sshd.read(&t.cert), b.cert_pem.as_bytes());
}
