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
