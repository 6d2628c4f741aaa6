//! Privilege through sudo over a real sshd and the real sudo: the SSH user
//! is an unprivileged account of each test's own that cannot write the
//! target directory (root's, 0755); a sudoers drop-in (checked by `visudo
//! -cf`, removed when the test ends) allows it the SFTP server and exactly
//! the target's commands.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use certdeploy_core::driver::Host;
use certdeploy_core::lock::{LOCK_VERSION, LockPhase, LockRecord};
use certdeploy_core::*;
use certdeploy_ssh::{HostAddr, SshHost, TargetPolicy, check, sudoers_rule};
use certdeploy_testbed::sudo::{SudoersDropIn, run_as};
use certdeploy_testbed::{ensure_attacker, run_as_attacker};
use common::*;

const SERVER: &str = "/usr/lib/openssh/sftp-server";

/// A directory on the "host" that only root may write (root's, 0755).
fn root_dir(rig: &Rig, rel: &str) -> PathBuf {
    let d = rig.sshd.root_dir_for(ADDR).join(rel);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::os::unix::fs::chown(&d, Some(0), Some(0)).expect("chown root");
    rig.sshd.chmod(&d, 0o755);
    d
}

/// Write a file as root, owned by root.
fn write_root(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).expect("write");
    std::os::unix::fs::chown(path, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
}

fn sudo_addr(rig: &Rig) -> HostAddr {
    rig.addr(ADDR).with_sudo(SERVER)
}

fn sudo_host(rig: &Rig) -> SshHost<'_> {
    SshHost::new(&rig.pool, sudo_addr(rig))
}

fn owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).expect("lstat");
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn uid_of(name: &str) -> u32 {
    let out = std::process::Command::new("id").args(["-u", name]).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("uid")
}

/// The target's reload and validate commands: the reload appends the uid
/// it runs as to a log and fails once after `fail-reload` appears (it
/// removes it); the validate fails while `fail-validate` exists.
struct Commands {
    reload: String,
    validate: String,
    log: PathBuf,
}

fn commands(dir: &Path) -> Commands {
    let log = dir.join("reloads.log");
    Commands {
        reload: format!("id -u >> {}; ! rm {}/fail-reload 2>/dev/null", log.display(), dir.display()),
        validate: format!("test ! -e {}/fail-validate", dir.display()),
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_and_rolls_back_through_sudo_where_the_ssh_user_cannot_write() {
    let user = "cd-sudo-host";
    let rig = Rig::as_user(user);
    let d = root_dir(&rig, "tls");
    let c = commands(&d);
    let _rule = SudoersDropIn::install(user, &sudoers_rule(user, SERVER, &[&c.validate, &c.reload]));
    write_root(&d.join("site.pem"), &cert("old", 100), 0o644);
    write_root(&d.join("site.key"), &key("old"), 0o600);
    // The SSH user cannot write there by itself.
    let (code, out) = run_as(user, &["touch", &d.join("probe").display().to_string()]);
    assert_ne!(code, 0, "{user} must not be able to write {}: {out}", d.display());

    let mut t = target(&d, &c.reload);
    t.user = user.into();
    t.validate_command = Some(c.validate.clone());
    let www = uid_of("www-data");
    let host =
        sudo_host(&rig).with_policy(TargetPolicy { key_owner: Some("www-data".into()), ..TargetPolicy::default() });

    // 1. Deployed: files written by root, the key handed to the configured
    // owner, the cert kept as root's; the reload ran as root.
    let r = rig.deploy_on(&host, &t, "sudo-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("new", 200));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("new"));
    assert_eq!(owner(&d.join("site.key")), (www, 0, 0o600), "configured key owner, root's group kept");
    assert_eq!(owner(&d.join("site.pem")), (0, 0, 0o644));
    assert_eq!(std::fs::read_to_string(&c.log).unwrap(), "0\n", "the reload ran once, as root");
    assert!(leftovers(&rig.sshd, &d).iter().all(|n| n.contains(".certdeploy-bak.")), "{:?}", rig.sshd.list(&d));

    // 2. The validate fails: rolled back, no reload at all.
    write_root(&d.join("fail-validate"), b"", 0o644);
    let r = rig.deploy_on(&host, &t, "sudo-2", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", dump(&r));
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("new", 200));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("new"));
    assert_eq!(owner(&d.join("site.key")), (www, 0, 0o600));
    assert_eq!(std::fs::read_to_string(&c.log).unwrap(), "0\n");
    std::fs::remove_file(d.join("fail-validate")).unwrap();

    // 3. The reload fails: rolled back, reloaded again on the originals.
    write_root(&d.join("fail-reload"), b"", 0o644);
    let r = rig.deploy_on(&host, &t, "sudo-3", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", dump(&r));
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("new", 200));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("new"));
    assert_eq!(owner(&d.join("site.key")), (www, 0, 0o600));
    assert_eq!(std::fs::read_to_string(&c.log).unwrap(), "0\n0\n0\n", "reload, then the retry");
    assert!(
        leftovers(&rig.sshd, &d).iter().all(|n| n.contains(".certdeploy-bak.")),
        "no temps: {:?}",
        rig.sshd.list(&d)
    );

    // 4. The same account without sudo, through the same pool: its own
    // SFTP session (not the sudo'ed one), which cannot write here.
    let plain = rig.host();
    let r = rig.deploy_on(&plain, &t, "plain-1", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert!(r.message.contains("ermission denied"), "{}", r.message);
    assert_eq!(rig.sshd.read(d.join("site.key")), key("new"));
    // And the sudo'ed one still works.
    let r = rig.deploy_on(&host, &t, "sudo-4", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("newer"));
}

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

/// The lock file is root's (0600), out of the SSH user's reach: the guard
/// reads it over the sudo'ed SFTP session before the command is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_commands_run_only_while_the_root_owned_lock_holds_the_token() {
    let user = "cd-sudo-guard";
    let rig = Rig::as_user(user);
    let d = root_dir(&rig, "guard");
    let marker = d.join("ran");
    let cmd = format!("id -u > {}", marker.display());
    let _rule = SudoersDropIn::install(user, &sudoers_rule(user, SERVER, &[&cmd]));
    let host = sudo_host(&rig);
    let lock = d.join("site.pem.certdeploy-lock").display().to_string();
    let mine = record("d-1/1/0a1b2c");
    assert!(host.lock_create(&lock, &mine.bytes()).await.expect("create").created);
    assert_eq!(owner(Path::new(&lock)), (0, 0, 0o600), "the lock is root's");
    let guard = ExecGuard { lock_path: lock.clone(), token: mine.token.clone() };

    let r = host.exec_guarded(&cmd, 5_000, &guard).await.expect("guarded exec");
    assert_eq!(r.exit_code, Some(0), "{}", r.output);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "0\n", "ran as root");
    std::fs::remove_file(&marker).unwrap();

    host.lock_replace(&lock, &record("d-2/1/3d4e5f").bytes(), false, &|| true).await.expect("replace");
    let e = host.exec_guarded(&cmd, 5_000, &guard).await.expect_err("lock of another token");
    assert!(e.is_lock_lost(), "{e}");
    assert!(e.message.contains(&lock), "{e}");
    assert!(!marker.exists(), "the command did not run");

    host.lock_remove(&lock).await.expect("remove");
    let e = host.exec_guarded(&cmd, 5_000, &guard).await.expect_err("no lock");
    assert!(e.is_lock_lost(), "{e}");
    assert!(!marker.exists(), "the command did not run");
}

/// Under sudo "the SSH user" of the link and owner rules is the user sudo
/// runs as (root here): links and files of the login account are not
/// trusted any more than the attacker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sudo_only_root_and_the_user_sudo_runs_as_are_trusted() {
    let user = "cd-sudo-hostile";
    let rig = Rig::as_user(user);
    let (attacker_uid, shared) = ensure_attacker();
    let login_uid = rig.sshd.uid();
    // Root's directory, writable by the attacker's group.
    let d = root_dir(&rig, "hostile");
    std::os::unix::fs::chown(&d, Some(0), Some(shared)).unwrap();
    rig.sshd.chmod(&d, 0o775);
    let c = commands(&d);
    let _rule = SudoersDropIn::install(user, &sudoers_rule(user, SERVER, &[&c.reload]));
    let canary = root_dir(&rig, "canary");
    write_root(&canary.join("victim.pem"), b"victim\n", 0o644);
    write_root(&d.join("site.key"), &key("old"), 0o600);
    let pem = d.join("site.pem");
    let t = target(&d, &c.reload);
    let host = sudo_host(&rig);

    // 1. The attacker's link out of the directory.
    let out = run_as_attacker(&format!("ln -s {} {}", canary.join("victim.pem").display(), pem.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = rig.deploy_on(&host, &t, "h-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(
        r.message.contains(&format!("owned by uid {attacker_uid}, neither root nor the user sudo runs as (uid 0)")),
        "{}",
        r.message
    );
    std::fs::remove_file(&pem).unwrap();

    // 2. A link of the login account's, staying in the directory: trusted
    // without sudo (it is the SSH user's), not under sudo.
    write_root(&d.join("other.pem"), b"other\n", 0o644);
    std::os::unix::fs::symlink("other.pem", &pem).unwrap();
    std::os::unix::fs::lchown(&pem, Some(login_uid), None).unwrap();
    let r = rig.deploy_on(&host, &t, "h-2", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(
        r.message.contains(&format!("owned by uid {login_uid}, neither root nor the user sudo runs as")),
        "{}",
        r.message
    );
    let lines = check(&rig.pool, &rig.addr(ADDR), &t, &TargetPolicy::default()).await;
    let plain = lines.iter().find(|l| l.name.starts_with("cert ")).expect("cert line");
    assert!(plain.ok, "without sudo the login account's own link is followed: {lines:?}");
    std::fs::remove_file(&pem).unwrap();

    // 3. A key of the login account's: not kept as it is under sudo.
    std::os::unix::fs::chown(d.join("site.key"), Some(login_uid), None).unwrap();
    let r = rig.deploy_on(&host, &t, "h-3", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(
        r.message.contains(&format!("owned by uid {login_uid}, neither root nor the user sudo runs as")),
        "{}",
        r.message
    );

    // Nothing was written anywhere; the canary is as it was.
    assert_eq!(rig.sshd.read(d.join("site.key")), key("old"));
    assert!(!pem.exists());
    assert_eq!(rig.sshd.read(canary.join("victim.pem")), b"victim\n");
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));
    assert!(!c.log.exists(), "no reload ran");

    // 4. A root key: deployed; the new cert (no file before) is root's.
    std::os::unix::fs::chown(d.join("site.key"), Some(0), None).unwrap();
    let r = rig.deploy_on(&host, &t, "h-4", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert_eq!(owner(&pem), (0, 0, 0o644));
}

/// Without a sudo rule the SFTP session does not start: a permanent error
/// quoting sudo, before anything is written; `check` says the same on a
/// line of its own with the rule to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sudo_rule_nothing_starts_and_the_error_names_sudo() {
    let user = "cd-sudo-none";
    let rig = Rig::as_user(user);
    let d = root_dir(&rig, "none");
    let host = sudo_host(&rig);
    let e = host.resolve_path(&d.join("site.pem").display().to_string()).await.expect_err("no sudo rule");
    assert!(!e.is_transient(), "retrying cannot help: {e}");
    assert!(e.message.contains(&format!("`sudo -n {SERVER}` exited with status 1")), "{e}");
    assert!(e.message.contains("sudo: a password is required"), "{e}");

    let t = target(&d, "systemctl reload nginx");
    let lines = check(&rig.pool, &sudo_addr(&rig), &t, &TargetPolicy::default()).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!((l.name.as_str(), l.ok), ("sudo sftp-server", false), "{lines:?}");
    assert!(l.detail.contains("sudo: a password is required"), "{}", l.detail);
    let rule = format!("{user} ALL=(root) NOPASSWD: {SERVER} \"\", /bin/sh -c systemctl reload nginx");
    assert!(l.detail.contains(&rule), "shows the rule to grant: {}", l.detail);

    // With a rule for the server alone, check names the command sudo refuses.
    let _rule = SudoersDropIn::install(user, &sudoers_rule(user, SERVER, &[]));
    let lines = check(&rig.pool, &sudo_addr(&rig), &t, &TargetPolicy::default()).await;
    let server = lines.iter().find(|l| l.name == "sudo sftp-server").expect("sudo line");
    assert!(server.ok && server.detail.contains("as uid 0"), "{lines:?}");
    let reload = lines.iter().find(|l| l.name == "sudo reload command").expect("sudo reload line");
    assert!(!reload.ok, "{lines:?}");
    assert!(reload.detail.contains("sudo -n refuses `/bin/sh -c systemctl reload nginx`"), "{}", reload.detail);
    assert!(
        reload.detail.contains(&format!("{user} ALL=(root) NOPASSWD: /bin/sh -c systemctl reload nginx")),
        "{}",
        reload.detail
    );
}

/// The sudoers rule `sudoers_rule` writes allows exactly the commands it
/// names, as sudo itself judges (`sudo -n -l`): with special characters,
/// wildcards and runs of blanks, and nothing that differs by a character.
#[test]
fn the_sudoers_rule_allows_exactly_its_commands() {
    let user = "cd-sudo-rule";
    certdeploy_testbed::ensure_user(user);
    let commands = [
        "systemctl reload nginx",
        "nginx -t",
        "rm -f /tmp/a*.pem",
        "test ! -e /x || echo a, b: c=d #e",
        "echo a  b\tc",
        r"printf '%s\n' ok",
        "kill -HUP $(cat /run/nginx.pid) [x]?",
    ];
    let rule = SudoersDropIn::install(user, &sudoers_rule(user, SERVER, &commands));
    let allowed = |argv: &[&str]| {
        let mut a = vec!["sudo", "-n", "-l"];
        a.extend_from_slice(argv);
        run_as(user, &a)
    };
    for c in commands {
        let (code, out) = allowed(&["/bin/sh", "-c", c]);
        assert_eq!(code, 0, "`{c}` must be allowed by\n{}\n{out}", rule.text());
    }
    let (code, out) = allowed(&[SERVER]);
    assert_eq!(code, 0, "{out}");
    let refused = [
        vec!["/bin/sh", "-c", "systemctl reload nginx; id"],
        vec!["/bin/sh", "-c", "systemctl reload  nginx"],
        vec!["/bin/sh", "-c", "nginx -T"],
        vec!["/bin/sh", "-c", "rm -f /tmp/a.pem /etc/shadow #.pem"],
        vec!["/bin/sh", "-c", "rm -f /tmp/aX.pem"],
        vec!["/bin/sh", "-c", "echo a b c"],
        vec!["/bin/sh", "-c", "kill -HUP $(cat /run/nginx.pid) x?"],
        vec!["/bin/sh", "-c", "kill -HUP $(cat /run/nginx.pid) [x]Z"],
        vec!["/bin/sh", "-c", "id"],
        vec!["/bin/sh"],
        vec![SERVER, "-d", "/"],
        vec!["/bin/bash", "-c", "nginx -t"],
    ];
    for argv in refused {
        let (code, out) = allowed(&argv);
        assert_ne!(code, 0, "{argv:?} must be refused by\n{}\n{out}", rule.text());
    }
}

/// "The SSH user" of the link and owner rules is the user sudo runs as,
/// whoever that is: here sudoers makes it `www-data` (`runas_default`),
/// so a `www-data` key is kept as it is, the new files are `www-data`'s,
/// the commands run as `www-data`, and a root-only directory is out of
/// reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trusted_user_is_the_one_sudo_runs_as() {
    let user = "cd-sudo-runas";
    let rig = Rig::as_user(user);
    let www = uid_of("www-data");
    let d = root_dir(&rig, "svc");
    std::os::unix::fs::chown(&d, Some(www), Some(0)).unwrap();
    let c = commands(&d);
    let rule = sudoers_rule(user, SERVER, &[&c.reload]).replace("ALL=(root)", "ALL=(www-data)");
    let _rule = SudoersDropIn::install(user, &format!("Defaults:{user} runas_default=www-data\n{rule}"));
    write_root(&d.join("site.key"), &key("old"), 0o600);
    std::os::unix::fs::chown(d.join("site.key"), Some(www), None).unwrap();
    let t = target(&d, &c.reload);
    let host = sudo_host(&rig);

    let lines = check(&rig.pool, &sudo_addr(&rig), &t, &TargetPolicy::default()).await;
    let server = lines.iter().find(|l| l.name == "sudo sftp-server").expect("sudo line");
    assert!(server.ok && server.detail.contains(&format!("as uid {www}")), "{lines:?}");

    let r = rig.deploy_on(&host, &t, "runas-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    // (Its group stays www-data's own: www-data may not give a file to
    // group root, and keeping an owner is best effort.)
    let (uid, _, mode) = owner(&d.join("site.key"));
    assert_eq!((uid, mode), (www, 0o600), "the www-data key kept as www-data's");
    assert_eq!(owner(&d.join("site.pem")).0, www, "a new file is the user sudo runs as's");
    assert_eq!(std::fs::read_to_string(&c.log).unwrap(), format!("{www}\n"), "the reload ran as www-data");

    // A key of the login account's is not trusted.
    std::os::unix::fs::chown(d.join("site.key"), Some(rig.sshd.uid()), None).unwrap();
    let r = rig.deploy_on(&host, &t, "runas-2", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert!(r.message.contains(&format!("neither root nor the user sudo runs as (uid {www})")), "{}", r.message);
}
