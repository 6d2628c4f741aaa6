//! SshHost against a real sshd, as an unprivileged user, driven by the
//! core's driver. Every test asserts what is on disk afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use certdeploy_core::driver::Host;
use certdeploy_core::*;
use certdeploy_ssh::{HostAddr, SshHost, SshPool, TargetPolicy, check};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_deploy_then_failed_reload_removes_new_files() {
    let rig = Rig::new();
    let d = rig.dir("first");
    let t = target(&d, "true");
    let r = rig.deploy(&t, "first-1", &cert("a", 100), &key("a")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert_eq!(meta(&r, "backup_status_cert"), "no_pre_existing");
    assert_eq!(meta(&r, "backup_status_key"), "no_pre_existing");
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("a", 100));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("a"));
    assert_eq!(rig.sshd.stat(d.join("site.pem")).mode, 0o644);
    assert_eq!(rig.sshd.stat(d.join("site.key")).mode, 0o600);
    assert_eq!(rig.sshd.stat(d.join("site.key")).uid, rig.sshd.uid());
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));
    assert!(!rig.journal_text("first-1").contains("SECRET-KEY"));

    // A fresh directory whose reload fails: the new files are removed.
    let d2 = rig.dir("first-fail");
    let t2 = target(&d2, "echo nginx: config broken >&2; exit 1");
    let r = rig.deploy(&t2, "first-2", &cert("b", 100), &key("b")).await;
    assert!(matches!(r.outcome, Outcome::RolledBack | Outcome::RolledBackDaemonUnknown), "{}", dump(&r));
    assert_eq!(meta(&r, "backup_status_cert"), "removed");
    assert_eq!(meta(&r, "backup_status_key"), "removed");
    assert!(meta(&r, "reload_error").contains("config broken"), "{}", dump(&r));
    assert!(rig.sshd.list(&d2).is_empty(), "{:?}", rig.sshd.list(&d2));
    assert_eq!(rig.pool.masters_opened(), 1, "one master for both deployments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_over_existing_files_restores_bytes_mode_and_inode() {
    let rig = Rig::new();
    let d = rig.dir("redeploy");
    let (pem, k) = (d.join("site.pem"), d.join("site.key"));
    rig.sshd.write(&pem, &cert("old", 100), 0o640);
    rig.sshd.write(&k, &key("old"), 0o600);
    let (ino_c, ino_k) = (rig.sshd.stat(&pem).ino, rig.sshd.stat(&k).ino);

    // Reload fails once, then works: rolled_back.
    let marker = d.join("reloaded-once");
    let reload = format!("if [ -e {m} ]; then exit 0; fi; touch {m}; echo failing; exit 1", m = marker.display());
    let r = rig.deploy(&target(&d, &reload), "redeploy-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", dump(&r));
    assert_eq!(meta(&r, "backup_status_cert"), "restored");
    assert_eq!(meta(&r, "backup_status_key"), "restored");
    assert_eq!(rig.sshd.read(&pem), cert("old", 100));
    assert_eq!(rig.sshd.read(&k), key("old"));
    let (sc, sk) = (rig.sshd.stat(&pem), rig.sshd.stat(&k));
    assert_eq!((sc.mode, sc.ino, sc.nlink), (0o640, ino_c, 1), "cert inode restored, no backup link left");
    assert_eq!((sk.mode, sk.ino, sk.nlink), (0o600, ino_k, 1));
    assert_eq!(rig.sshd.list(&d), vec!["reloaded-once", "site.key", "site.pem"]);

    // A successful redeploy keeps this attempt's backup (the old inode).
    let r = rig.deploy(&target(&d, "true"), "redeploy-2", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert_eq!(meta(&r, "backup_status_cert"), "snapshotted");
    assert_eq!(rig.sshd.read(&pem), cert("new", 200));
    assert_eq!(rig.sshd.stat(&pem).mode, 0o644);
    let bak = d.join("site.pem.certdeploy-bak.redeploy-2");
    assert_eq!(rig.sshd.stat(&bak).ino, ino_c);
    assert_eq!(rig.sshd.read(&bak), cert("old", 100));

    // The next deployment prunes it (keep = 1: only its own backup stays).
    let r = rig.deploy(&target(&d, "true"), "redeploy-3", &cert("newer", 300), &key("newer")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    let left = leftovers(&rig.sshd, &d);
    assert_eq!(left, vec!["site.key.certdeploy-bak.redeploy-3", "site.pem.certdeploy-bak.redeploy-3"]);
    assert_eq!(rig.sshd.read(d.join(&left[1])), cert("new", 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reload_fails_daemon_unknown() {
    let rig = Rig::new();
    let d = rig.dir("unknown");
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
    // Fails while the marker exists, i.e. on the reload and the retry.
    let marker = d.join("broken");
    rig.sshd.write(&marker, b"", 0o644);
    let reload = format!("test -e {} && {{ echo still broken; exit 2; }}; exit 0", marker.display());
    let r = rig.deploy(&target(&d, &reload), "unknown-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::RolledBackDaemonUnknown, "{}", dump(&r));
    assert_eq!(meta(&r, "daemon_state_unknown"), "true");
    assert!(meta(&r, "retry_reload_error").contains("still broken"), "{}", dump(&r));
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("old", 100));
    assert_eq!(rig.sshd.read(d.join("site.key")), key("old"));
    assert!(leftovers(&rig.sshd, &d).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_fails_when_directory_turns_read_only() {
    let rig = Rig::new();
    let d = rig.dir("rofail");
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
    // The reload takes write permission away, then fails.
    let reload = format!("chmod 0555 {}; exit 1", d.display());
    let r = rig.deploy(&target(&d, &reload), "rofail-1", &cert("new", 200), &key("new")).await;
    rig.sshd.chmod(&d, 0o755);
    assert_eq!(r.outcome, Outcome::RollbackFailed, "{}", dump(&r));
    assert_eq!(meta(&r, "manual_action_required"), "true");
    assert_eq!(meta(&r, "backup_status_cert"), "restore_failed");
    let bak = d.join("site.pem.certdeploy-bak.rofail-1");
    assert_eq!(meta(&r, "backup_path_cert"), bak.display().to_string());
    assert!(r.message.contains(&bak.display().to_string()), "{}", r.message);
    assert!(meta(&r, "rollback_error").contains("Permission denied"), "{}", dump(&r));
    // The backup is intact, for the operator.
    assert_eq!(rig.sshd.read(&bak), cert("old", 100));
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("new", 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failing_mid_way_is_rolled_back() {
    let rig = Rig::new();
    let d = rig.dir("midway");
    let kd = rig.dir("midway-private");
    let pem = d.join("site.pem");
    rig.sshd.write(&pem, &cert("old", 100), 0o644);
    let ino = rig.sshd.stat(&pem).ino;
    rig.sshd.chmod(&kd, 0o555);
    let mut t = target(&d, "true");
    t.key_path = kd.join("site.key").display().to_string();
    let r = rig.deploy(&t, "midway-1", &cert("new", 200), &key("new")).await;
    rig.sshd.chmod(&kd, 0o755);
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", dump(&r));
    assert_eq!(meta(&r, "failed_step"), "write");
    assert!(r.message.contains("Permission denied"), "{}", r.message);
    assert_eq!(meta(&r, "backup_status_cert"), "restored");
    assert_eq!(meta(&r, "backup_status_key"), "removed");
    assert_eq!(rig.sshd.read(&pem), cert("old", 100));
    assert_eq!(rig.sshd.stat(&pem).ino, ino);
    assert!(leftovers(&rig.sshd, &d).is_empty(), "{:?}", rig.sshd.list(&d));
    assert!(rig.sshd.list(&kd).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_content_is_unchanged() {
    let rig = Rig::new();
    let d = rig.dir("same");
    rig.sshd.write(d.join("site.pem"), &cert("a", 100), 0o644);
    rig.sshd.write(d.join("site.key"), &key("a"), 0o600);
    let before = rig.sshd.stat(d.join("site.key"));
    let reload = format!("touch {}/reloaded", d.display());
    let r = rig.deploy(&target(&d, &reload), "same-1", &cert("a", 100), &key("a")).await;
    assert_eq!(r.outcome, Outcome::Unchanged, "{}", dump(&r));
    assert_eq!(rig.sshd.stat(d.join("site.key")), before);
    assert!(leftovers(&rig.sshd, &d).is_empty(), "backup links removed: {:?}", rig.sshd.list(&d));
    assert!(!rig.sshd.exists(d.join("reloaded")), "no reload for unchanged files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_cert_is_written_through() {
    let rig = Rig::new();
    let d = rig.dir("link");
    let real = rig.dir("link-real");
    rig.sshd.write(real.join("site-2026.pem"), &cert("old", 100), 0o644);
    rig.sshd.symlink("../link-real/site-2026.pem", d.join("site.pem"));
    // A link owned by the SSH user, out of its directory into one that
    // the target's link_targets allow (such a link is followed; the refusals are in
    // hostile_host.rs).
    let host = rig.host().with_policy(certdeploy_ssh::TargetPolicy {
        link_targets: vec![format!("{}/*.pem", real.display())],
        ..Default::default()
    });
    let r = rig.deploy_on(&host, &target(&d, "true"), "link-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    assert!(rig.sshd.stat(d.join("site.pem")).is_symlink, "the link stays a link");
    assert_eq!(rig.sshd.read(real.join("site-2026.pem")), cert("new", 200));
    assert!(rig.sshd.exists(real.join("site-2026.pem.certdeploy-bak.link-1")));

    // And a failed reload restores the target, link untouched.
    let r = rig.deploy_on(&host, &target(&d, "false"), "link-2", &cert("newer", 300), &key("newer")).await;
    assert!(matches!(r.outcome, Outcome::RolledBackDaemonUnknown), "{}", dump(&r));
    assert!(rig.sshd.stat(d.join("site.pem")).is_symlink);
    assert_eq!(rig.sshd.read(d.join("site.pem")), cert("new", 200));
}

/// A root poller stats every key-related name in the directory as fast as
/// it can while deployments run; no key file (temp or live) may ever be
/// readable by group or others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_is_never_readable_by_others() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::AtomicU64;
    let rig = Rig::new();
    let d = rig.dir("secret");
    let stop = Arc::new(AtomicBool::new(false));
    // Files seen inside a key's staging directory (the temp being filled).
    let seen_temp = Arc::new(AtomicU64::new(0));
    let poller = {
        let (d, stop, seen_temp) = (d.clone(), stop.clone(), seen_temp.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Every entry, recursively: the key's temp lives in a
                // staging directory (`.certdeploy-stage.site.key.*/t`).
                let mut dirs = vec![(d.clone(), false)];
                while let Some((dir, in_stage)) = dirs.pop() {
                    let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let Ok(m) = std::fs::symlink_metadata(e.path()) else { continue };
                        let about_key = in_stage || name.contains("site.key");
                        let open_to_others = m.mode() & 0o077 != 0;
                        if m.is_dir() {
                            // A key's staging directory is private whenever it exists.
                            if about_key && open_to_others {
                                bad.push(format!("directory {name} {:o}", m.mode() & 0o7777));
                            }
                            dirs.push((e.path(), about_key));
                        } else if in_stage {
                            seen_temp.fetch_add(1, Ordering::Relaxed);
                            // Inside the private directory, its own mode is
                            // set before any content.
                            if open_to_others && m.size() > 0 {
                                bad.push(format!("staged {name} {:o} size {}", m.mode() & 0o7777, m.size()));
                            }
                        } else if about_key && open_to_others {
                            bad.push(format!("{name} {:o} size {}", m.mode() & 0o7777, m.size()));
                        }
                    }
                }
            }
            bad
        })
    };
    // At least 15 deployments, and more until the poller has caught a key
    // temp in its staging directory at least once (bounded).
    let mut i: u32 = 0;
    while i < 15 || (seen_temp.load(Ordering::Relaxed) == 0 && i < 300) {
        let r = rig
            .deploy(
                &target(&d, "true"),
                &format!("secret-{i}"),
                &cert(&format!("c{i}"), 100 + i),
                &key(&format!("k{i}")),
            )
            .await;
        assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let bad = poller.join().expect("poller");
    let seen = seen_temp.load(Ordering::Relaxed);
    eprintln!("poller saw a staged key temp {seen} times over {i} deployments");
    assert!(bad.is_empty(), "key readable by others: {bad:?}");
    assert!(seen > 0, "the poller never saw a key temp in {i} deployments: it proves nothing");
    assert_eq!(rig.sshd.stat(d.join("site.key")).mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_mismatch_fails_without_sftp() {
    let rig = Rig::with(&[ADDR], Some(|s| s.mismatched_known_hosts()));
    let d = rig.dir("mismatch");
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    let r = rig.deploy(&target(&d, "true"), "mismatch-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert!(r.message.to_lowercase().contains("host key"), "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "snapshot");
    assert_eq!(rig.sshd.list(&d), vec!["site.pem"]);
    let log = rig.sshd.log();
    assert!(!log.contains("subsystem request for sftp"), "{log}");
    assert!(!log.contains("Accepted publickey"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_fails_without_sftp() {
    let rig = Rig::with(&[ADDR], Some(|s| s.empty_known_hosts()));
    let d = rig.dir("unknown-host");
    let r = rig.deploy(&target(&d, "true"), "unknown-host-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Failed, "{}", dump(&r));
    assert!(r.message.contains("host key verification failed"), "{}", r.message);
    assert!(rig.sshd.list(&d).is_empty());
    assert_eq!(std::fs::read_to_string(rig.sshd.empty_known_hosts()).unwrap_or_default(), "", "never trusted silently");
    assert!(!rig.sshd.log().contains("subsystem request for sftp"));
}

/// sshd's connections die while the reload runs: the deployment is
/// retried or rolled back, never left half-deployed, and the pool reopens
/// its master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_deployment() {
    let rig = Arc::new(Rig::new());
    for round in 0..3u32 {
        let d = rig.dir(&format!("killed-{round}"));
        rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
        rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
        let t = target(&d, "sleep 1");
        let rig2 = rig.clone();
        let id = format!("killed-{round}");
        let task = tokio::spawn(async move { rig2.deploy(&t, &id, &cert("new", 200), &key("new")).await });
        tokio::time::sleep(Duration::from_millis(150 + 250 * round as u64)).await;
        let killed = rig.sshd.kill_connections();
        let r = task.await.expect("deploy task");
        let (c, k) = (rig.sshd.read(d.join("site.pem")), rig.sshd.read(d.join("site.key")));
        eprintln!("round {round}: killed {killed} processes: {}", dump(&r));
        match r.outcome {
            Outcome::Deployed => assert_eq!((c, k), (cert("new", 200), key("new"))),
            Outcome::RolledBack | Outcome::RolledBackDaemonUnknown => {
                assert_eq!((c, k), (cert("old", 100), key("old")))
            }
            o => panic!("unexpected outcome {o}: {}", dump(&r)),
        }
        assert!(!leftovers(&rig.sshd, &d).iter().any(|n| n.contains("tmp")));
    }
    assert!(rig.pool.masters_opened() >= 2, "master reopened after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_status_output_and_timeouts() {
    let rig = Rig::with(&[ADDR, "127.0.0.3"], None);
    let host = rig.host();
    let r = host.exec("echo out; echo err >&2; exit 3", 5_000).await.expect("exec");
    assert_eq!(r.exit_code, Some(3));
    assert!(r.output.contains("out") && r.output.contains("err"), "{r:?}");
    let nf = host.exec("nosuchprog --reload", 5_000).await.expect("exec of a missing program");
    assert_eq!(nf.exit_code, Some(127));
    assert!(nf.output.contains("not found"), "{nf:?}");
    let big = host.exec("head -c 10000 /dev/zero | tr '\\0' x", 5_000).await.expect("exec");
    assert!(big.output.len() < 4200 && big.output.ends_with("[truncated]"));
    let started = std::time::Instant::now();
    let e = host.exec("sleep 5", 300).await.expect_err("timeout");
    assert!(e.is_transient() && e.message.contains("timed out after 300 ms; outcome unknown"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The master survives a timed-out command.
    assert_eq!(host.exec("true", 5_000).await.expect("exec").exit_code, Some(0));
    assert_eq!(rig.pool.masters_opened(), 1);
    // A second host address gets its own master.
    let other = SshHost::new(&rig.pool, rig.addr("127.0.0.3"));
    assert_eq!(other.exec("true", 5_000).await.expect("exec").exit_code, Some(0));
    assert_eq!(rig.pool.masters_opened(), 2);
    // Concurrent commands beyond per_host_concurrency queue, not fail.
    let many = futures_join(&host, 12).await;
    assert!(many.iter().all(|r| r.as_ref().is_ok_and(|r| r.success())), "{many:?}");
    assert_eq!(rig.pool.masters_opened(), 2);
}

async fn futures_join(host: &SshHost<'_>, n: usize) -> Vec<Result<ExecResult, StepError>> {
    futures_util::future::join_all((0..n).map(|_| host.exec("sleep 0.2", 5_000))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_precise_problems() {
    let rig = Rig::new();
    let ok = rig.dir("check-ok");
    let ro = rig.dir("check-ro");
    rig.sshd.chmod(&ro, 0o555);
    let mut t = target(&ok, "nosuchprog --reload");
    t.key_path = ro.join("site.key").display().to_string();
    t.chain_path = Some(ok.join("../check-missing/chain.pem").display().to_string());
    let lines = check(&rig.pool, &rig.addr(ADDR), &t, &TargetPolicy::default()).await;
    let text: Vec<String> = lines.iter().map(|l| format!("{} {} {}", l.ok, l.name, l.detail)).collect();
    let find = |n: &str| lines.iter().find(|l| l.name.starts_with(n)).unwrap_or_else(|| panic!("{n}: {text:?}"));
    assert!(find("connect").ok);
    assert!(find("sftp posix-rename").ok && find("sftp fsync").ok && find("sftp hardlink").ok);
    let okd = find(&format!("directory {}", ok.display()));
    assert!(okd.ok, "{text:?}");
    let rod = find(&format!("directory {}", ro.display()));
    assert!(!rod.ok && rod.detail.contains("not writable") && rod.detail.contains("Permission denied"), "{text:?}");
    let missing = lines.iter().find(|l| l.name.contains("check-missing")).expect("missing dir line");
    assert!(!missing.ok && missing.detail.contains("does not exist"), "{text:?}");
    let reload = find("reload command");
    assert!(!reload.ok && reload.detail.contains("`nosuchprog`") && reload.detail.contains("not found"), "{text:?}");
    // Nothing changed.
    assert!(rig.sshd.list(&ok).is_empty() && rig.sshd.list(&ro).is_empty());

    let t2 = target(&ok, "true");
    let good = check(&rig.pool, &rig.addr(ADDR), &t2, &TargetPolicy::default()).await;
    assert!(good.iter().all(|l| l.ok), "{good:?}");

    // Wrong host key.
    let control = tempfile::Builder::new().prefix("cdc").tempdir_in("/tmp").expect("dir");
    let pool = SshPool::new(config(&rig.sshd, control.path(), &rig.sshd.mismatched_known_hosts())).expect("pool");
    let lines =
        check(&pool, &HostAddr::new(ADDR, rig.sshd.port(), rig.sshd.user()), &t2, &TargetPolicy::default()).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(!lines[0].ok && lines[0].detail.contains("host key verification failed"), "{lines:?}");
    assert!(lines[0].detail.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"), "{lines:?}");
}

/// With `max_masters = 2`, ten concurrent deployments over five hosts all
/// deploy, and no more than two master processes ever exist (sampled from
/// the process table, and the pool's own count) while they run; then the
/// least recently used idle master is the one closed for a new host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_masters_bounds_master_processes_and_closes_the_least_recently_used_idle_one() {
    let addrs = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
    let rig = Rig::with(&addrs, None);
    let control = tempfile::Builder::new().prefix("cdc").tempdir_in("/tmp").expect("control dir");
    let pool = SshPool::new(certdeploy_ssh::SshConfig {
        max_masters: 2,
        ..config(&rig.sshd, control.path(), rig.sshd.known_hosts_path())
    })
    .expect("pool");

    // Sample the process table and the pool's count until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pool) = (stop.clone(), pool.clone());
        std::thread::spawn(move || {
            let (mut procs, mut open, mut samples) = (0, 0, 0u64);
            while !stop.load(Ordering::SeqCst) {
                procs = procs.max(certdeploy_testbed::ssh_masters_under(pool.control_dir()));
                open = open.max(pool.masters_open());
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (procs, open, samples)
        })
    };
    let jobs: Vec<(HostAddr, TargetSpec, String)> = (0..10)
        .map(|i| {
            let a = addrs[i % addrs.len()];
            let d = rig.sshd.root_dir_for(a).join(format!("cap-{i}"));
            rig.sshd.mkdir(&d, 0o755);
            (rig.addr(a), target(&d, "sleep 0.1"), format!("cap-{i}"))
        })
        .collect();
    // One SshHost per deployment, as the worker makes them: it keeps its
    // master busy from its first operation until the deployment ends.
    let reports = futures_util::future::join_all(jobs.iter().map(|(a, t, id)| {
        let pool = &pool;
        let rig = &rig;
        async move { rig.deploy_on(&SshHost::new(pool, a.clone()), t, id, &cert(id, 100), &key(id)).await }
    }))
    .await;
    stop.store(true, Ordering::SeqCst);
    let (procs, open, samples) = sampler.join().expect("sampler");
    for r in &reports {
        assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(r));
    }
    eprintln!(
        "{samples} samples: at most {procs} master processes, pool count at most {open}; {} opened, {} evicted",
        pool.masters_opened(),
        pool.masters_evicted()
    );
    assert!(procs <= 2, "{procs} ssh master processes at once with max_masters = 2");
    assert!(open <= 2, "the pool counted {open} masters at once");
    assert!(procs >= 1 && pool.masters_evicted() >= 3, "five hosts through two places evict");

    // Least recently used first: use A, B, A, then C closes B (idle
    // longest), so A needs no new master afterwards.
    let on = |a: &str| SshHost::new(&pool, rig.addr(a));
    for a in ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.4"] {
        assert_eq!(on(a).exec("true", 10_000).await.expect("exec").exit_code, Some(0));
    }
    let opened = pool.masters_opened();
    assert_eq!(on("127.0.0.2").exec("true", 10_000).await.expect("exec").exit_code, Some(0));
    assert_eq!(pool.masters_opened(), opened, "A was used after B: B's master was closed, not A's");
    assert!(certdeploy_testbed::ssh_masters_under(pool.control_dir()) <= 2);
    pool.close_all().await;
}

/// A deployment keeps its master from its first operation to its end
/// (while its `SshHost` lives): with one place, another host waits instead
/// of closing the master between two operations of that deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_deployment_keeps_its_master_between_operations() {
    let rig = Rig::with(&["127.0.0.2", "127.0.0.3"], None);
    let control = tempfile::Builder::new().prefix("cdc").tempdir_in("/tmp").expect("control dir");
    let pool = SshPool::new(certdeploy_ssh::SshConfig {
        max_masters: 1,
        ..config(&rig.sshd, control.path(), rig.sshd.known_hosts_path())
    })
    .expect("pool");
    let a = SshHost::new(&pool, rig.addr("127.0.0.2"));
    assert_eq!(a.exec("true", 10_000).await.expect("exec").exit_code, Some(0));
    let other = {
        let (pool, addr) = (pool.clone(), rig.addr("127.0.0.3"));
        tokio::spawn(async move { SshHost::new(&pool, addr).exec("true", 10_000).await })
    };
    // The other host's first operation waits for a place, or takes A's.
    let start = std::time::Instant::now();
    while pool.masters_waiting() == 0 && pool.masters_evicted() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the other host neither waited nor evicted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(pool.masters_evicted(), 0, "A's master was closed while its deployment was running");
    assert_eq!(a.exec("true", 10_000).await.expect("exec").exit_code, Some(0));
    assert_eq!(pool.masters_opened(), 1, "A's second operation used its first master");
    drop(a);
    assert_eq!(other.await.expect("task").expect("exec").exit_code, Some(0));
    assert_eq!((pool.masters_opened(), pool.masters_evicted()), (2, 1));
    pool.close_all().await;
}

/// `kex_algorithms` reaches ssh: sshd's debug log names the algorithm the
/// connection chose. An algorithm ssh does not know is refused when the
/// pool is made, quoting ssh; a value that is no list of names is refused
/// before ssh sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kex_algorithms_reach_ssh_and_a_bogus_one_is_refused() {
    let sshd = certdeploy_testbed::SshdFixture::start_logging(&[ADDR], certdeploy_testbed::TEST_USER, "DEBUG");
    let control = tempfile::Builder::new().prefix("cdc").tempdir_in("/tmp").expect("control dir");
    let with = |kex: &str| certdeploy_ssh::SshConfig {
        kex_algorithms: Some(kex.into()),
        ..config(&sshd, control.path(), sshd.known_hosts_path())
    };
    let pool = SshPool::new(with("curve25519-sha256")).expect("pool");
    let host = SshHost::new(&pool, HostAddr::new(ADDR, sshd.port(), sshd.user()));
    assert_eq!(host.exec("true", 10_000).await.expect("exec").exit_code, Some(0));
    let start = std::time::Instant::now();
    while !sshd.log().contains("kex: algorithm: curve25519-sha256") {
        assert!(start.elapsed() < Duration::from_secs(30), "sshd's log never named it:\n{}", sshd.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.close_all().await;

    let e = SshPool::new(with("bogus-kex-alg")).expect_err("an unknown algorithm").to_string();
    assert!(e.contains("Bad SSH2 KexAlgorithms 'bogus-kex-alg'"), "{e}");
    let e = SshPool::new(with("curve25519-sha256\n  ProxyCommand touch /tmp/x")).expect_err("two lines").to_string();
    assert!(e.contains("expected algorithm names separated by commas"), "{e}");
}

/// Prune and the lock sweep read directory listings that end at the first
/// answer shorter than a full one (OpenSSH's sftp-server sends 100 entries
/// per answer until the end): in a directory of several hundred entries
/// every old backup is still found, wherever it comes in the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_finds_every_old_backup_in_a_directory_longer_than_one_listing_answer() {
    let rig = Rig::new();
    let d = rig.dir("long");
    for i in 0..250 {
        rig.sshd.write(d.join(format!("filler-{i:03}")), b"x", 0o644);
    }
    for i in 0..150 {
        rig.sshd.write(d.join(format!("site.pem.certdeploy-bak.old-{i:03}")), &cert("older", 50), 0o644);
    }
    rig.sshd.write(d.join("site.pem"), &cert("old", 100), 0o644);
    rig.sshd.write(d.join("site.key"), &key("old"), 0o600);
    let r = rig.deploy(&target(&d, "true"), "long-1", &cert("new", 200), &key("new")).await;
    assert_eq!(r.outcome, Outcome::Deployed, "{}", dump(&r));
    let backups: Vec<String> = rig.sshd.list(&d).into_iter().filter(|n| n.contains(".certdeploy-bak.")).collect();
    assert_eq!(
        backups,
        vec!["site.key.certdeploy-bak.long-1", "site.pem.certdeploy-bak.long-1"],
        "only this deployment's own backups are kept (keep_backups = 1)"
    );
    assert_eq!(rig.sshd.list(&d).iter().filter(|n| n.starts_with("filler-")).count(), 250);
}
