//! The target host as hostile ground, over a real sshd: the target
//! directory is writable by a group that a second local account, the
//! attacker, belongs to; the deploying
//! SSH user owns the directory and can write more than the attacker (the
//! canary files next to it). Each attack gets nowhere: no write outside
//! the target's files, no key byte readable by the attacker, no file
//! handed to their ownership, no hang; the canary files and the target
//! directory are left as they were.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use certdeploy_core::driver::Host;
use certdeploy_core::*;
use certdeploy_ssh::{SshHost, TargetPolicy, check};
use certdeploy_testbed::{ensure_attacker, run_as_attacker};
use common::*;
use sha2::{Digest as _, Sha256};

/// A target directory the attacker's group can write (0775, group
/// `certdeploy_testbed::SHARED_GROUP`), owned by the SSH user.
fn hostile_dir(rig: &Rig, rel: &str) -> PathBuf {
    let (_, shared) = ensure_attacker();
    let d = rig.dir(rel);
    std::os::unix::fs::chown(&d, Some(rig.sshd.uid()), Some(shared)).expect("chown dir");
    rig.sshd.chmod(&d, 0o775);
    d
}

/// Files outside the target that the SSH user could write and the attacker
/// cannot: a deployment steered outside its directory would change them.
struct Canary {
    dir: PathBuf,
    before: BTreeMap<String, (String, u32, u32, u32)>,
}

impl Canary {
    fn new(rig: &Rig, rel: &str) -> Canary {
        let dir = rig.dir(rel);
        for (name, bytes) in
            [("victim.pem", &b"victim certificate\n"[..]), ("victim.key", b"victim key\n"), ("t", b"t\n")]
        {
            rig.sshd.write(dir.join(name), bytes, 0o644);
        }
        let before = Canary::sums(&dir);
        Canary { dir, before }
    }

    /// Name -> (sha256, mode, uid, gid) of every entry, links not followed.
    fn sums(dir: &Path) -> BTreeMap<String, (String, u32, u32, u32)> {
        let mut m = BTreeMap::new();
        for e in std::fs::read_dir(dir).expect("canary dir").flatten() {
            let md = std::fs::symlink_metadata(e.path()).expect("lstat");
            let digest = if md.is_file() {
                hex::encode(Sha256::digest(std::fs::read(e.path()).expect("read")))
            } else {
                "-".into()
            };
            m.insert(e.file_name().to_string_lossy().into_owned(), (digest, md.mode() & 0o7777, md.uid(), md.gid()));
        }
        // The directory itself (a chmod by a swapped name would show here).
        let md = std::fs::symlink_metadata(dir).expect("lstat canary dir");
        m.insert(".".into(), ("-".into(), md.mode() & 0o7777, md.uid(), md.gid()));
        m
    }

    fn assert_unchanged(&self, what: &str) {
        assert_eq!(Canary::sums(&self.dir), self.before, "{what}: files outside the target changed");
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn attacker(cmd: &str) {
    let out = run_as_attacker(cmd);
    assert!(out.status.success(), "attacker `{cmd}`: {}", String::from_utf8_lossy(&out.stderr));
}

fn policy() -> TargetPolicy {
    TargetPolicy::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_of_a_live_path_out_of_its_directory_is_refused() {
    let rig = Rig::new();
    let (attacker_uid, _) = ensure_attacker();
    let d = hostile_dir(&rig, "sym");
    let canary = Canary::new(&rig, "sym-canary");
    rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
    let pem = d.join("site.pem").display().to_string();
    let t = target(&d, "true");

    // 1. The attacker's own link to a file the SSH user can write.
    attacker(&format!("ln -s {} {pem}", canary.file("victim.pem")));
    let host = rig.host().with_policy(policy());
    let r = rig.deploy_on(&host, &t, "sym-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(r.message.contains(&pem), "names the path: {}", r.message);
    assert!(r.message.contains(&format!("owned by uid {attacker_uid}")), "says why: {}", r.message);
    canary.assert_unchanged("attacker's link");
    assert_eq!(rig.sshd.read(d.join("site.key")), key("old"), "nothing written");
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));

    // 2. A link of the SSH user's own (say, planted by a careless admin
    // script) that leads out of the directory, not allowed by link_targets.
    std::fs::remove_file(&pem).unwrap();
    rig.sshd.symlink(canary.file("victim.pem"), &pem);
    let r = rig.deploy_on(&host, &t, "sym-2", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(r.message.contains(&pem) && r.message.contains("outside"), "{}", r.message);
    assert!(r.message.contains(&canary.file("victim.pem")), "names where it leads: {}", r.message);
    canary.assert_unchanged("own link out of the directory");

    // 3. A directory component that is the attacker's link: the path is
    // reached through `<d>/sub -> <canary>`.
    std::fs::remove_file(&pem).unwrap();
    attacker(&format!("ln -s {} {}/sub", canary.dir.display(), d.display()));
    let mut t3 = t.clone();
    t3.cert_path = format!("{}/sub/victim.pem", d.display());
    let r = rig.deploy_on(&host, &t3, "sym-3", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(r.message.contains(&format!("{}/sub", d.display())), "{}", r.message);
    canary.assert_unchanged("attacker's directory link");
    assert_eq!(rig.sshd.read(d.join("site.key")), key("old"), "nothing written");
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));

    // 4. The attacker's link that stays in the directory, onto another file
    // of the SSH user's there: not followed either (the link is theirs).
    std::fs::remove_file(d.join("sub")).unwrap();
    let other = d.join("other.pem");
    rig.sshd.write(&other, b"other certificate\n", 0o644);
    attacker(&format!("ln -s other.pem {pem}"));
    let r = rig.deploy_on(&host, &t, "sym-4", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(r.message.contains(&format!("owned by uid {attacker_uid}")), "{}", r.message);
    assert_eq!(rig.sshd.read(&other), b"other certificate\n");
    assert_eq!(rig.sshd.read(d.join("site.key")), key("old"), "nothing written");
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));
    canary.assert_unchanged("attacker's link inside the directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_allowed_by_link_targets_is_followed() {
    let rig = Rig::new();
    let d = hostile_dir(&rig, "allowed");
    let real = rig.dir("allowed-archive");
    rig.sshd.write(real.join("site-2026.pem"), &cert("old", 100), 0o644);
    rig.sshd.symlink(real.join("site-2026.pem"), d.join("site.pem"));
    let host =
        rig.host().with_policy(TargetPolicy { link_targets: vec![format!("{}/*.pem", real.display())], ..policy() });
    let r = rig.deploy_on(&host, &target(&d, "true"), "allowed-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert!(rig.sshd.stat(d.join("site.pem")).is_symlink);
    assert_eq!(rig.sshd.read(real.join("site-2026.pem")), cert("new", 200));
    // A glob that does not match: refused.
    let host =
        rig.host().with_policy(TargetPolicy { link_targets: vec![format!("{}/*.crt", real.display())], ..policy() });
    let r = rig.deploy_on(&host, &target(&d, "true"), "allowed-2", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert_eq!(rig.sshd.read(real.join("site-2026.pem")), cert("new", 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_owned_by_the_attacker_is_never_handed_to_them() {
    let rig = Rig::new();
    let (attacker_uid, _) = ensure_attacker();
    let d = hostile_dir(&rig, "owned");
    let canary = Canary::new(&rig, "owned-canary");
    let k = d.join("site.key");
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    // The attacker's, and readable to the (unprivileged) SSH user of the
    // test as it would be to a root one.
    rig.sshd.write(&k, &key("old"), 0o644);
    std::os::unix::fs::chown(&k, Some(attacker_uid), None).expect("chown key to the attacker");
    let kp = k.display().to_string();

    let r = rig
        .deploy_on(&rig.host().with_policy(policy()), &target(&d, "true"), "own-1", &cert("new", 200), &key("new"))
        .await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(r.message.contains(&kp) && r.message.contains(&format!("uid {attacker_uid}")), "{}", r.message);
    assert_eq!(rig.sshd.read(&k), key("old"), "not written");
    assert_eq!(rig.sshd.stat(&k).uid, attacker_uid);
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("old", 100), "nothing written");
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));
    canary.assert_unchanged("attacker's key");

    // With the key's owner configured (by name, resolved on the host) the
    // new key is the configured account's, never the attacker's.
    let user = rig.sshd.user().to_string();
    let host = rig.host().with_policy(TargetPolicy {
        key_owner: Some(user.clone()),
        key_group: Some(user.clone()),
        ..policy()
    });
    let r = rig.deploy_on(&host, &target(&d, "true"), "own-2", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    let st = rig.sshd.stat(&k);
    assert_eq!((st.uid, st.gid, st.mode), (rig.sshd.uid(), rig.sshd.gid(), 0o600));
    assert_eq!(rig.sshd.read(&k), key("new"));
    canary.assert_unchanged("configured key owner");

    // An owner that does not exist on the host: failed before any write.
    let host = rig.host().with_policy(TargetPolicy { key_owner: Some("no-such-user-x".into()), ..policy() });
    let r = rig.deploy_on(&host, &target(&d, "true"), "own-3", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "snapshot", "{}", dump(&r));
    assert!(r.message.contains("no-such-user-x"), "{}", r.message);
    assert_eq!(rig.sshd.read(&k), key("new"));
}

/// Names the attacker can guess from the deployment id (the temp and
/// staging names of earlier versions) are planted as links into the
/// canary: they are never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_temp_and_staging_names_are_not_used() {
    let rig = Rig::new();
    let d = hostile_dir(&rig, "planted");
    let canary = Canary::new(&rig, "planted-canary");
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
    let id = "planted-1";
    let planted = [
        format!("site.key.certdeploy-tmp.{id}"),
        format!("site.pem.certdeploy-tmp.{id}"),
        format!(".certdeploy-stage.site.key.certdeploy-tmp.{id}"),
    ];
    attacker(&format!(
        "cd {} && ln -s {} {} && ln -s {} {} && ln -s {} {}",
        d.display(),
        canary.file("victim.key"),
        planted[0],
        canary.file("victim.pem"),
        planted[1],
        canary.dir.display(),
        planted[2]
    ));
    let r =
        rig.deploy_on(&rig.host().with_policy(policy()), &target(&d, "true"), id, &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("new"));
    let st = rig.sshd.stat(d.join("site.key"));
    assert_eq!((st.uid, st.mode), (rig.sshd.uid(), 0o600));
    canary.assert_unchanged("planted names");
    let mut left = leftovers(&rig.sshd, &d);
    left.retain(|n| !planted.contains(n) && !n.contains(".certdeploy-bak."));
    assert!(left.is_empty(), "{left:?}");
}

/// A FIFO at the lock path would block the SFTP server's open for ever;
/// it is refused by its lstat, well within the lock timeout, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_at_the_lock_path_is_refused() {
    let rig = Rig::new();
    let d = hostile_dir(&rig, "fifo");
    let lock = format!("{}/site.pem.certdeploy-lock", d.display());
    attacker(&format!("mkfifo {lock}"));
    let host: SshHost<'_> = rig.host();
    let start = Instant::now();
    let read = host.lock_read(&lock).await;
    let e = read.expect_err("a FIFO is no lock");
    assert!(!e.is_transient(), "{}", e.message);
    assert!(e.message.contains(&lock) && e.message.contains("FIFO"), "{}", e.message);
    let created = host.lock_create(&lock, b"{}").await;
    let e = created.expect_err("a FIFO is no lock");
    assert!(e.message.contains(&lock), "{}", e.message);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    // A symlink at the lock path: refused as well.
    std::fs::remove_file(&lock).unwrap();
    attacker(&format!("ln -s /etc/passwd {lock}"));
    let e = host.lock_read(&lock).await.expect_err("a link is no lock");
    assert!(e.message.contains(&lock) && e.message.contains("symlink"), "{}", e.message);
    let mut left: Vec<String> = rig.sshd.list(&d);
    left.retain(|n| !n.ends_with(".certdeploy-lock"));
    assert!(left.is_empty(), "{left:?}");
}

/// `certdeploy check` reports, per configured path, what the link and owner
/// rules would refuse, with the reason a deployment's snapshot gives, and
/// changes nothing; a configured owner or a clean target passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_what_the_link_and_owner_rules_refuse() {
    let rig = Rig::new();
    let (attacker_uid, _) = ensure_attacker();
    let d = hostile_dir(&rig, "chk");
    let canary = Canary::new(&rig, "chk-canary");
    let pem = d.join("site.pem").display().to_string();
    let k = d.join("site.key");
    let kp = k.display().to_string();
    let chain = d.join("chain.pem");
    // The cert: a link (the SSH user's own) out of the directory; the key:
    // the attacker's file; the chain: a clean file.
    rig.sshd.symlink(canary.file("victim.pem"), &pem);
    rig.sshd.write(&k, &key("old"), 0o644);
    std::os::unix::fs::chown(&k, Some(attacker_uid), None).expect("chown key to the attacker");
    rig.sshd.write(&chain, b"old chain\n", 0o644);
    let mut t = target(&d, "true");
    t.chain_path = Some(chain.display().to_string());
    let listing = rig.sshd.list(&d);

    let lines = check(&rig.pool, &rig.addr(ADDR), &t, &policy()).await;
    let text: Vec<String> = lines.iter().map(|l| format!("{} {}: {}", l.ok, l.name, l.detail)).collect();
    let find = |n: String| lines.iter().find(|l| l.name == n).unwrap_or_else(|| panic!("{n}: {text:?}")).clone();
    let c = find(format!("cert {pem}"));
    assert!(!c.ok && c.detail.contains(&pem) && c.detail.contains("outside"), "{text:?}");
    assert!(c.detail.contains(&canary.file("victim.pem")), "names where it leads: {text:?}");
    let kl = find(format!("key {kp}"));
    assert!(!kl.ok && kl.detail.contains(&kp) && kl.detail.contains(&format!("uid {attacker_uid}")), "{text:?}");
    let ch = find(format!("chain {}", chain.display()));
    assert!(ch.ok, "{text:?}");
    // The other checks still pass: only the path rules fail.
    assert!(lines.iter().filter(|l| !l.ok).count() == 2, "{text:?}");
    // Nothing changed on the host.
    assert_eq!(rig.sshd.list(&d), listing);
    assert_eq!(rig.sshd.stat(&k).uid, attacker_uid);
    assert_eq!(rig.sshd.read(&k), key("old"));
    canary.assert_unchanged("check");

    // The same reason a deployment gives: the cert first, then (the link
    // gone) the key.
    let host = rig.host().with_policy(policy());
    let r = rig.deploy_on(&host, &t, "chk-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert!(r.message.contains(&c.detail), "check: {}\ndeployment: {}", c.detail, r.message);
    std::fs::remove_file(&pem).unwrap();
    rig.sshd.write(&pem, &cert("old", 100), 0o644);
    let r = rig.deploy_on(&host, &t, "chk-2", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert!(r.message.contains(&kl.detail), "check: {}\ndeployment: {}", kl.detail, r.message);

    // The key's owner configured: the key passes (the policy is the
    // target's), the cert, now a plain file, too.
    let user = rig.sshd.user().to_string();
    let configured = TargetPolicy { key_owner: Some(user), ..policy() };
    let lines = check(&rig.pool, &rig.addr(ADDR), &t, &configured).await;
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");

    // A clean target: every path ok.
    let clean = rig.dir("chk-clean");
    rig.sshd.write(clean.join("site.pem"), &cert("old", 100), 0o644);
    rig.sshd.write(clean.join("site.key"), &key("old"), 0o600);
    let lines = check(&rig.pool, &rig.addr(ADDR), &target(&clean, "true"), &policy()).await;
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");
    assert!(lines.iter().any(|l| l.name.starts_with("cert ")) && lines.iter().any(|l| l.name.starts_with("key ")));
}

/// The attacker's own process reads every file in the target directory
/// (and in any directory there it can enter) over and over, holding each
/// open a moment before reading it (a file opened before its mode is set
/// stays readable through that descriptor), and in a tight loop opens every
/// temp name it sees, while ten deployments of a key run: it never gets a byte of any key, old or new, though it reads
/// the certificates and sees certdeploy's temp and backup names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_reader_never_reads_key_bytes() {
    let rig = Rig::new();
    let (attacker_uid, _) = ensure_attacker();
    let d = hostile_dir(&rig, "reader");
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
    let work = tempfile::Builder::new().prefix("cdatk").tempdir_in("/tmp").expect("attacker dir");
    std::os::unix::fs::chown(work.path(), Some(attacker_uid), None).expect("chown");
    // Two loops of the attacker's: one reads every file; the other only
    // opens the temp names, without forking, to open one in the moment
    // between its creation and its chmod, and reads it a little later.
    let script = r#"d=$1; w=$2
exec 2>/dev/null
(while [ ! -e "$w/stop" ]; do
  for f in "$d"/*.certdeploy-tmp.* "$d"/.certdeploy-stage.*/t; do
    command exec 3<"$f" || continue
    sleep 0.005; cat <&3 >> "$w/out"; exec 3<&-
    echo "$f" >> "$w/names"
  done
done) &
(n=0; while [ ! -e "$w/stop" ]; do
  for f in "$d"/* "$d"/.[!.]* "$d"/*/* "$d"/.[!.]*/*; do
    [ -e "$f" ] || continue
    echo "$f" >> "$w/names"
    { exec 3<"$f" && sleep 0.005 && cat <&3; } >> "$w/out" &
  done
  wait
  n=$((n+1)); echo "$n" > "$w/count"
done)
wait"#;
    let child = std::process::Command::new("runuser")
        .args(["-u", certdeploy_testbed::ATTACKER, "--", "sh", "-c", script, "sh"])
        .arg(&d)
        .arg(work.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the reader");
    let mut reader = Reader { child, stop: work.path().join("stop") };
    let count = || std::fs::read_to_string(work.path().join("count")).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let start = Instant::now();
    while count().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the reader does not run");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let host = rig.host().with_policy(policy());
    let t = target(&d, "true");
    for i in 0..10 {
        let r = rig
            .deploy_on(&host, &t, &format!("reader-{i}"), &cert(&format!("c{i}"), 200 + i), &key(&format!("k{i}")))
            .await;
        assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    }
    let status = reader.stop();
    assert!(status.success(), "{status}");
    assert_eq!(rig.sshd.read(d.join("site.key")), key("k9"));
    let out = std::fs::read(work.path().join("out")).unwrap_or_default();
    let names = std::fs::read_to_string(work.path().join("names")).unwrap_or_default();
    let iterations = count().unwrap_or(0);
    let seen = |pat: &str| names.lines().filter(|l| l.contains(pat)).collect::<std::collections::BTreeSet<_>>().len();
    eprintln!(
        "reader: {iterations} passes, {} bytes read; distinct names seen: {} temp, {} staging, {} backup",
        out.len(),
        seen(".certdeploy-tmp."),
        seen(".certdeploy-stage."),
        seen(".certdeploy-bak.")
    );
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("SECRET-KEY") && !text.contains("PRIVATE KEY"), "the attacker read key bytes");
    // It did read: the certificates are public.
    assert!(text.contains("BEGIN CERTIFICATE"), "the reader read nothing");
    assert!(iterations >= 10, "{iterations} passes");
    // It saw the transient names (the temps and the key's staging
    // directory: `.certdeploy-tmp.` in both), not only what stays.
    assert!(seen(".certdeploy-tmp.") > 0, "the reader never saw a temp or staging name: {names}");
}

/// The attacker's reader, stopped (its loops see the stop file) even when
/// the test fails.
struct Reader {
    child: std::process::Child,
    stop: PathBuf,
}

impl Reader {
    fn stop(&mut self) -> std::process::ExitStatus {
        std::fs::write(&self.stop, b"").expect("stop the reader");
        self.child.wait().expect("reader")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
