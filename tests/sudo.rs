//! `sudo = true` end to end, with the real binary, a real sshd and the real
//! sudo: the SSH user is an unprivileged account of each test's own that
//! cannot write the target directory (root's, 0755), allowed by a sudoers
//! drop-in (checked by `visudo -cf`, removed when the test ends) to run the
//! SFTP server and exactly the target's validate and reload commands.

#![allow(clippy::type_complexity)] // tests/common/mod.rs (Fleet::files)

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use certdeploy_ssh::sudoers_rule;
use certdeploy_testbed::sudo::{SudoersDropIn, run_as};
use common::*;

const SERVER: &str = "/usr/lib/openssh/sftp-server";
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

fn id(flag: &str, name: &str) -> u32 {
    let db = if flag == "-u" { "passwd" } else { "group" };
    let out = std::process::Command::new("getent").args([db, name]).output().expect("getent");
    String::from_utf8_lossy(&out.stdout).split(':').nth(2).and_then(|s| s.trim().parse().ok()).expect("id")
}

fn write_root(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).expect("write");
    std::os::unix::fs::chown(path, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
}

fn owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// A one-target fleet whose sshd serves `user`; the target directory is
/// root's (0755) and holds root's original files. The reload appends the
/// uid it runs as to the reload log, hangs while `hang` exists and fails
/// once after `fail-reload` appears (removing it); the validate fails while
/// `fail-validate` exists.
struct SudoFleet {
    fleet: Fleet,
    user: String,
    reload: String,
    validate: String,
    old: Bundle,
}

impl SudoFleet {
    fn new(user: &str, with_broker: bool) -> SudoFleet {
        let fleet = Fleet::new_as(1, with_broker, user);
        let t = &fleet.targets[0];
        std::os::unix::fs::chown(&t.dir, Some(0), Some(0)).expect("chown dir");
        fleet.sshd.chmod(&t.dir, 0o755);
        let (code, out) = run_as(user, &["touch", &t.dir.join("probe").display().to_string()]);
        assert_ne!(code, 0, "{user} must not be able to write {}: {out}", t.dir.display());
        let d = t.dir.display();
        let reload = format!(
            "id -u >> {}; test ! -e {d}/hang || sleep 60; ! rm {d}/fail-reload 2>/dev/null",
            t.reload_log.display()
        );
        let validate = format!("test ! -e {d}/fail-validate");
        let ca = TestCa::new();
        let old = ca.leaf_at("old.example", now() - 2 * 86_400, now() + 300 * 86_400);
        write_root(&t.cert, old.cert_pem.as_bytes(), 0o664);
        write_root(&t.key, old.key_pem.as_bytes(), 0o640);
        write_root(&t.chain, old.chain_pem.as_bytes(), 0o664);
        SudoFleet { fleet, user: user.to_string(), reload, validate, old }
    }

    fn target(&self) -> &Target {
        &self.fleet.targets[0]
    }

    /// The sudoers rule this target needs.
    fn rule(&self) -> SudoersDropIn {
        SudoersDropIn::install(&self.user, &sudoers_rule(&self.user, SERVER, &[&self.validate, &self.reload]))
    }

    /// The config: `sudo = true`, configured owners, idle masters closed
    /// quickly (a killed worker leaves its master behind until then).
    fn config(&self) -> PathBuf {
        let path = self.fleet.write_config(&Opts {
            reload_command: Some(self.reload.clone()),
            validate_command: Some(self.validate.clone()),
            target_extra: "sudo = true\ncert_owner = \"root\"\ncert_group = \"www-data\"\n\
                           key_owner = \"www-data\"\nkey_group = \"www-data\"\n"
                .into(),
            ..Opts::default()
        });
        let text = std::fs::read_to_string(&path).expect("read config");
        std::fs::write(&path, text.replacen("[ssh]\n", "[ssh]\nidle_timeout_s = 3\n", 1)).expect("write config");
        path
    }

    fn flag(&self, name: &str, on: bool) {
        let p = self.target().dir.join(name);
        if on {
            write_root(&p, b"", 0o644);
        } else {
            let _ = std::fs::remove_file(p);
        }
    }

    /// (cert, key, chain) on the host are `b`'s, with the configured owners
    /// and modes; no temp or staging name is left.
    fn assert_holds(&self, b: &Bundle, what: &str) {
        let t = self.target();
        assert_eq!(std::fs::read(&t.cert).unwrap(), b.cert_pem.as_bytes(), "{what}: cert");
        assert_eq!(std::fs::read(&t.key).unwrap(), b.key_pem.as_bytes(), "{what}: key");
        assert_eq!(std::fs::read(&t.chain).unwrap(), b.chain_pem.as_bytes(), "{what}: chain");
        let www = (id("-u", "www-data"), id("-g", "www-data"));
        assert_eq!(owner(&t.cert), (0, www.1, CERT_MODE), "{what}: cert owner root, group www-data");
        assert_eq!(owner(&t.chain), (0, www.1, CERT_MODE), "{what}: chain owner root, group www-data");
        assert_eq!(owner(&t.key), (www.0, www.1, KEY_MODE), "{what}: key owner www-data");
        let litter: Vec<String> =
            names_with(&t.dir, ".certdeploy-").into_iter().filter(|n| !n.contains(".certdeploy-bak.")).collect();
        assert!(litter.is_empty(), "{what}: temps left: {litter:?}");
    }

    /// The uids the reloads ran as, one per reload.
    fn reload_uids(&self) -> Vec<String> {
        std::fs::read_to_string(&self.target().reload_log).unwrap_or_default().lines().map(str::to_string).collect()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

async fn result(client: &mut Client, id: &str) -> ResultEvent {
    let seen = client.collect(Duration::from_secs(90), |s| s.contains_key(id)).await;
    seen.get(id).and_then(|v| v.first()).cloned().unwrap_or_else(|| panic!("no result for {id}"))
}

fn meta<'a>(r: &'a ResultEvent, k: &str) -> &'a str {
    r.metadata.get(k).map(String::as_str).unwrap_or("<absent>")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sudo_target_deploys_rolls_back_and_recovers_from_sigkill_like_root() {
    let sf = SudoFleet::new("cd-sudo-e2e", true);
    let _rule = sf.rule();
    let cfg = sf.config();
    let t = sf.target().clone();

    // check: the sudo lines pass.
    let (code, out, err) = run(&cfg, &["check"]);
    assert_eq!(code, 0, "{out}{err}");
    for line in ["[ok] sudo sftp-server", "[ok] sudo validate command", "[ok] sudo reload command"] {
        assert!(out.contains(line), "check prints `{line}`:\n{out}");
    }
    assert!(out.contains("through sudo -n /usr/lib/openssh/sftp-server"), "{out}");

    let ca = TestCa::new();
    let b: Vec<Bundle> =
        (0..4).map(|i| ca.leaf_at(&format!("s{i}.example"), now() - 86_400 + i, now() + 300 * 86_400)).collect();
    let mut client = Client::connect(&sf.fleet).await;
    let mut worker = Proc::worker(&sf.fleet, &cfg, &[], "worker-0");

    // 1. Deployed, with the configured owners; the reload ran as root.
    client.publish(&request("s-1", &t.name, &b[0], true)).await;
    let r = result(&mut client, "s-1").await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    sf.assert_holds(&b[0], "deployed");
    assert_eq!(sf.reload_uids(), ["0"]);

    // 2. The validate fails: rolled back before any reload.
    sf.flag("fail-validate", true);
    client.publish(&request("s-2", &t.name, &b[1], true)).await;
    let r = result(&mut client, "s-2").await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "validate", "{r:?}");
    sf.assert_holds(&b[0], "after a failed validate");
    assert_eq!(sf.reload_uids(), ["0"]);
    sf.flag("fail-validate", false);

    // 3. The reload fails once: rolled back, reloaded on the originals.
    sf.flag("fail-reload", true);
    client.publish(&request("s-3", &t.name, &b[2], true)).await;
    let r = result(&mut client, "s-3").await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "reload", "{r:?}");
    sf.assert_holds(&b[0], "after a failed reload");
    assert_eq!(sf.reload_uids(), ["0", "0", "0"]);

    // 4. SIGKILL while the reload runs (the new files are in place), then a
    // restart: recovery rolls back, the redelivered request deploys afresh.
    sf.flag("hang", true);
    client.publish(&request("s-4", &t.name, &b[3], true)).await;
    let start = Instant::now();
    while sf.reload_uids().len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(60), "the reload never started\n{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(&t.cert).unwrap(), b[3].cert_pem.as_bytes(), "killed with the new files in place");
    worker.kill9();
    sf.flag("hang", false);
    let (_, rows, _) = run(&cfg, &["journal", "list"]);
    assert!(rows.contains("inflight"), "the journal holds the interrupted deployment:\n{rows}");
    let worker = Proc::worker(&sf.fleet, &cfg, &[], "worker-1");
    let r = result(&mut client, "s-4").await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}\n{}", r.message, worker.log_text());
    assert!(r.attempts >= 2, "deployed afresh after the rollback: {r:?}");
    let log = worker.log_text();
    assert!(log.contains("recovering 1"), "the restart resumed the deployment:\n{log}");
    sf.assert_holds(&b[3], "after the crash");
    assert!(sf.reload_uids().iter().all(|u| u == "0"), "{:?}", sf.reload_uids());
    let (_, rows, _) = run(&cfg, &["journal", "list"]);
    assert!(!rows.contains("inflight"), "{rows}");
    let _ = &sf.old;
}

#[test]
fn without_the_sudo_rule_check_and_deploy_fail_naming_sudo() {
    let sf = SudoFleet::new("cd-sudo-norule", false);
    let cfg = sf.config();
    let t = sf.target().clone();
    let rule = sf.rule();
    let (code, out, err) = run(&cfg, &["check"]);
    assert_eq!(code, 0, "with the rule: {out}{err}");
    drop(rule);

    // check: exit 1, a line naming sudo, quoting it, with the rule to grant.
    let (code, out, err) = run(&cfg, &["check"]);
    assert_eq!(code, 1, "{out}{err}");
    let line = out.lines().find(|l| l.contains("[FAIL] sudo sftp-server")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&format!("`sudo -n {SERVER}` exited with status 1: sudo: a password is required")), "{line}");
    assert!(line.contains(&format!("{} ALL=(root) NOPASSWD: {SERVER} \"\"", sf.user)), "{line}");

    // deploy: failed at its first step, the message naming sudo; nothing
    // written.
    let ca = TestCa::new();
    let b = ca.leaf_at("n.example", now() - 86_400, now() + 300 * 86_400);
    let args = deploy_args(sf.fleet.tmp.path(), &t.name, "n-1", &b, true, true);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 1, "{out}{err}");
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON result: {out}{err}"));
    let r: ResultEvent = serde_json::from_str(line).expect("result JSON");
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_eq!(meta(&r, "failed_step"), "lock", "{r:?}");
    assert!(r.message.contains(&format!("`sudo -n {SERVER}`")), "{}", r.message);
    assert!(r.message.contains("sudo: a password is required"), "{}", r.message);
    assert_eq!(std::fs::read(&t.cert).unwrap(), sf.old.cert_pem.as_bytes());
    assert_eq!(std::fs::read(&t.key).unwrap(), sf.old.key_pem.as_bytes());
    assert_eq!(owner(&t.key), (0, 0, 0o640));
    assert_eq!(names_with(&t.dir, ".certdeploy-"), Vec::<String>::new());
    assert!(sf.reload_uids().is_empty());
}
