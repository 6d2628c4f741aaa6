//! Behaviour of the sled journal: group commit, durability counters,
//! recovery queries, retention, format versions, permissions, locking and
//! the absence of key bytes on disk.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use certdeploy_core::driver::{self, Env, Journal};
use certdeploy_core::testkit::{MemClock, MemHost, MemVerifier, Sim, fake_cert_facts, test_plan};
use certdeploy_core::{Event, Outcome, Record, Step, Terminal, Timestamp};
use certdeploy_journal::{
    DeploymentState, DeploymentStatus, Durability, Error, GcPolicy, JournalOpenError, JournalOptions, SledJournal,
};
use common::{NEW_CERT, begun, finished, open, report};

const RELOAD: &str = "systemctl reload nginx";
const KEY_MARKER: &str = "SECRET-KEY-MARKER-c0ffee-9d41";

fn new_key() -> Vec<u8> {
    format!("-----BEGIN PRIVATE KEY-----\n{KEY_MARKER}\n-----END PRIVATE KEY-----\n").into_bytes()
}

fn started(id: &str, at: u64) -> Record {
    let (plan, _) = test_plan(id, NEW_CERT, &new_key(), None, false, false);
    Record { at: Timestamp(at), event: Event::Started { plan } }
}

fn append_sync(j: &SledJournal, id: &str, rec: &Record) -> u64 {
    let seq = j.append(id, rec).expect("append");
    j.flush_now().expect("flush");
    seq
}

/// A journal at `path` holding `id`'s `Started`, then (written into sled
/// directly, behind the journal's back) a `Recovering` record at `seq` whose
/// value carries format `version`.
fn with_raw_record(path: &Path, id: &str, seq: u64, version: u8) {
    let j = open(path);
    append_sync(&j, id, &started(id, 1));
    j.close().unwrap();
    let db = sled::open(path).unwrap();
    let mut key = format!("{id}\0").into_bytes();
    key.extend_from_slice(&seq.to_be_bytes());
    let mut v = vec![version];
    v.extend_from_slice(br#"{"at":2,"event":{"type":"recovering"}}"#);
    db.open_tree("records").unwrap().insert(key, v).unwrap();
    db.flush().unwrap();
}

fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A complete deployment driven by the real driver, journaled in sled: the
/// key's marker must not appear in any byte of any file of the journal.
#[tokio::test]
async fn full_deployment_leaves_no_key_bytes_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let journal = open(&path);
    let sim = Sim::new();
    {
        let mut w = sim.world();
        w.reload_commands.insert(RELOAD.to_string());
        w.served_path = Some("/etc/ssl/site.pem".to_string());
    }
    let (host, verifier, clock) = (MemHost(sim.clone()), MemVerifier(sim.clone()), MemClock(sim.clone()));
    let env = Env { host: &host, verifier: &verifier, journal: &journal, clock: &clock, cert_facts: fake_cert_facts };
    let key = new_key();
    let (plan, payload) = test_plan("d-secret", NEW_CERT, &key, Some(b"NEW CHAIN\n"), true, true);
    let t = driver::start(&env, plan, &payload).await.expect("drive");
    let Terminal::Finished(r) = t else { panic!("abandoned: {t:?}") };
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    // The host really got the key; the journal must not have.
    assert!(sim.get("/etc/ssl/site.key").is_some_and(|(b, _)| b == key));

    let records = journal.records("d-secret").unwrap();
    assert!(records.len() >= 8, "{} records", records.len());
    assert!(matches!(records.last().map(|r| &r.event), Some(Event::Finished { .. })));
    assert_eq!(journal.status("d-secret").unwrap(), Some(DeploymentStatus::Finished { report: r, acked: false }));
    let durable_steps =
        records.iter().filter(|r| matches!(r.event, Event::Started { .. } | Event::Begun { .. })).count() as u64;
    assert!(journal.flushes() >= durable_steps, "{} flushes for {durable_steps} durable steps", journal.flushes());
    journal.flush_now().unwrap();

    let files = all_files(&path);
    assert!(files.iter().any(|p| p.ends_with("db")), "{files:?}");
    let mut scanned = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        scanned += bytes.len();
        assert!(
            !bytes.windows(KEY_MARKER.len()).any(|w| w == KEY_MARKER.as_bytes()),
            "key material found in {}",
            f.display()
        );
    }
    assert!(scanned > 0);
    // The scan is not vacuous: public facts of the deployment are on disk.
    let db = std::fs::read(path.join("db")).unwrap();
    assert!(db.windows(b"d-secret".len()).any(|w| w == b"d-secret"));
    journal.close().unwrap();
}

/// 64 concurrent deployments × 20 (append, sync): flushes are shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_coalesces_concurrent_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let journal = Arc::new(open(&path));
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("gc-{t:02}");
            let mut seqs = Vec::new();
            for i in 0..20u64 {
                let rec = if i == 0 { started(&id, t * 100) } else { begun(Step::Write, t * 100 + i) };
                let seq = j.append(&id, &rec).unwrap();
                j.sync(seq).await.unwrap();
                assert!(j.durable_seq() >= seq);
                seqs.push(seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 64 * 20, "sequence numbers are unique");
    let (appends, flushes) = (journal.appends(), journal.flushes());
    let stats = journal.stats();
    eprintln!("appends={appends} flushes={flushes} stats={stats:?}");
    assert_eq!(appends, 64 * 20);
    assert!(flushes < appends / 4, "flushes {flushes} not coalesced for {appends} appends");
    assert_eq!(stats.flush_latency.count, flushes);
    assert_eq!(stats.flush_latency.buckets.iter().sum::<u64>(), flushes);
    drop(journal);

    let j = open(&path);
    for t in 0..64u64 {
        let id = format!("gc-{t:02}");
        let rs = j.records(&id).unwrap();
        assert_eq!(rs.len(), 20, "{id}");
        assert!(matches!(rs[0].event, Event::Started { .. }));
        assert!(rs.windows(2).all(|w| w[0].at < w[1].at), "records of {id} in order");
    }
    assert_eq!(j.unfinished().unwrap().len(), 64);
}

/// `sync(seq)` waits for a flush that started after the append; a second
/// `sync` of a durable seq returns at once without flushing.
#[tokio::test]
async fn sync_waits_for_a_flush_started_after_the_append() {
    let dir = tempfile::tempdir().unwrap();
    let j = open(&dir.path().join("j"));
    for round in 0..5u64 {
        let f0 = j.flushes();
        let seq = j.append("d-1", &begun(Step::Write, round)).unwrap();
        assert!(j.durable_seq() < seq, "not durable before sync");
        j.sync(seq).await.unwrap();
        assert!(j.flushes() > f0, "sync returned without a new flush");
        assert!(j.durable_seq() >= seq);
        let (f1, fast) = (j.flushes(), j.stats().syncs_already_durable);
        j.sync(seq).await.unwrap();
        assert_eq!(j.flushes(), f1, "already durable: no flush");
        assert_eq!(j.stats().syncs_already_durable, fast + 1);
    }
    // A sequence number never handed out is an error, not a hang.
    let bogus = j.durable_seq() + 1000;
    assert!(j.sync(bogus).await.is_err());
}

#[tokio::test]
async fn durability_off_never_flushes_on_sync() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions { durability: Durability::Off, ..JournalOptions::default() };
    let j = SledJournal::open(&dir.path().join("j"), opts).unwrap();
    let f0 = j.flushes();
    for i in 0..10 {
        let seq = j.append("d-off", &begun(Step::Write, i)).unwrap();
        j.sync(seq).await.unwrap();
    }
    assert_eq!(j.flushes(), f0);
    j.close().unwrap();
}

#[test]
fn dedupe_lookup_after_finished_and_acked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let j = open(&path);
    assert_eq!(j.status("d-dup").unwrap(), None);
    append_sync(&j, "d-dup", &started("d-dup", 1_000));
    append_sync(&j, "d-dup", &begun(Step::Snapshot, 1_001));
    assert!(matches!(
        j.status("d-dup").unwrap(),
        Some(DeploymentStatus::InFlight { attempt: 1, ref last_event, .. }) if last_event == "begun:snapshot"
    ));
    append_sync(&j, "d-dup", &finished("d-dup", Outcome::Deployed, 1_050));
    let want = report("d-dup", Outcome::Deployed, 1_050);
    assert_eq!(j.status("d-dup").unwrap(), Some(DeploymentStatus::Finished { report: want.clone(), acked: false }));
    assert!(j.mark_acked("d-dup").unwrap());
    assert!(!j.mark_acked("d-unknown").unwrap());
    j.close().unwrap();

    let j = open(&path);
    assert_eq!(j.status("d-dup").unwrap(), Some(DeploymentStatus::Finished { report: want, acked: true }));
    let list = j.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].outcome, Some(Outcome::Deployed));
    assert!(list[0].acked);
    assert!(j.unfinished().unwrap().is_empty());
}

#[test]
fn abandoned_reports_attempts_and_a_new_attempt_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let j = open(&dir.path().join("j"));
    append_sync(&j, "d-ab", &started("d-ab", 10));
    append_sync(&j, "d-ab", &begun(Step::Write, 11));
    append_sync(&j, "d-ab", &Record { at: Timestamp(20), event: Event::Recovering });
    append_sync(&j, "d-ab", &Record { at: Timestamp(30), event: Event::Abandoned { reason: "crashed".into() } });
    assert_eq!(
        j.status("d-ab").unwrap(),
        Some(DeploymentStatus::Abandoned { attempts: 1, reason: "crashed".into(), updated_at: Timestamp(30) })
    );
    assert!(j.unfinished().unwrap().is_empty());
    let (mut plan, _) = test_plan("d-ab", NEW_CERT, &new_key(), None, false, false);
    plan.attempt = 2;
    append_sync(&j, "d-ab", &Record { at: Timestamp(40), event: Event::Started { plan } });
    assert_eq!(j.unfinished().unwrap(), vec!["d-ab".to_string()]);
    assert!(matches!(j.status("d-ab").unwrap(), Some(DeploymentStatus::InFlight { attempt: 2, .. })));
    assert_eq!(j.records("d-ab").unwrap().len(), 5);
}

#[test]
fn unfinished_lists_in_flight_deployments_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let j = open(&path);
        for id in ["a-1", "a-10", "b-2"] {
            append_sync(&j, id, &started(id, 1));
        }
        append_sync(&j, "a-1", &begun(Step::Write, 2));
        append_sync(&j, "b-2", &finished("b-2", Outcome::Failed, 3));
        // Dropped without close: the synced records must survive.
    }
    let j = open(&path);
    assert_eq!(j.unfinished().unwrap(), vec!["a-1".to_string(), "a-10".to_string()]);
    // "a-1" must not pick up the records of "a-10" (prefix of another id).
    let a1 = j.records("a-1").unwrap();
    assert_eq!(a1.len(), 2);
    assert_eq!(a1[1], begun(Step::Write, 2));
    let list = j.list().unwrap();
    let a1 = list.iter().find(|s| s.deployment_id == "a-1").unwrap();
    assert_eq!(a1.state, DeploymentState::InFlight);
    assert!(a1.phase.is_some(), "{a1:?}");
    // New appends after reopen continue the sequence.
    let seq = j.append("a-1", &begun(Step::Reload, 4)).unwrap();
    assert!(seq > 4, "seq {seq} restarts after reopen");
    assert_eq!(j.records("a-1").unwrap().last(), Some(&begun(Step::Reload, 4)));
}

/// An append is two sled inserts (record, then index entry), not one
/// transaction; a crash may keep any subset of the unflushed ones. Here
/// the journal's trees are edited directly into each such state, and the
/// next open must re-derive the index from the records.
#[test]
fn index_is_rederived_from_records_after_a_crash_between_the_two_inserts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    {
        let j = open(&path);
        for id in ["x1", "x2", "x3", "x5"] {
            append_sync(&j, id, &started(id, 1));
        }
        append_sync(&j, "x1", &begun(Step::Write, 2));
        append_sync(&j, "x5", &begun(Step::Write, 2));
        j.close().unwrap();
    }
    let raw = || sled::Config::new().path(&path).open().unwrap();
    // x2's entry as it stood after `Started`.
    let x2_started = raw().open_tree("deployments").unwrap().get("x2").unwrap().unwrap();
    {
        let j = open(&path);
        append_sync(&j, "x2", &finished("x2", Outcome::Deployed, 3));
        j.close().unwrap();
    }
    {
        let db = raw();
        let (records, index) = (db.open_tree("records").unwrap(), db.open_tree("deployments").unwrap());
        // x1: its index entry lost entirely.
        index.remove("x1").unwrap();
        // x2: the `Finished` record kept, its index update lost.
        index.insert("x2", x2_started).unwrap();
        // x4: an index entry whose `Started` record was lost.
        index.insert("x4", index.get("x3").unwrap().unwrap()).unwrap();
        // x5: its last record lost, its index update kept.
        let last = records.scan_prefix(b"x5\0").keys().last().unwrap().unwrap();
        records.remove(last).unwrap();
        db.flush().unwrap();
    }
    let j = open(&path);
    assert_eq!(j.unfinished().unwrap(), vec!["x1".to_string(), "x3".to_string(), "x5".to_string()]);
    assert!(
        matches!(j.status("x1").unwrap(), Some(DeploymentStatus::InFlight { ref last_event, .. }) if last_event == "begun:write")
    );
    match j.status("x2").unwrap() {
        Some(DeploymentStatus::Finished { report, acked: false }) => assert_eq!(report.outcome, Outcome::Deployed),
        other => panic!("x2: {other:?}"),
    }
    assert_eq!(j.status("x4").unwrap(), None);
    assert!(
        matches!(j.status("x5").unwrap(), Some(DeploymentStatus::InFlight { ref last_event, .. }) if last_event == "started")
    );
    // The sequence goes on after the highest record, whatever the index said.
    let seq = j.append("x1", &begun(Step::Reload, 4)).unwrap();
    let highest = ["x1", "x2", "x3", "x5"].iter().map(|id| j.records(id).unwrap().len()).sum::<usize>();
    assert!(seq as usize > highest, "seq {seq} after {highest} records");
}

#[test]
fn only_checkpoints_rewrite_the_index_and_reads_apply_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let raw_entry = |path: &Path| -> Vec<u8> {
        let db = sled::Config::new().path(path).open().unwrap();
        db.open_tree("deployments").unwrap().get("d-c").unwrap().unwrap().to_vec()
    };
    {
        let j = open(&path);
        append_sync(&j, "d-c", &started("d-c", 10));
        j.close().unwrap();
    }
    let after_started = raw_entry(&path);
    {
        let j = open(&path);
        append_sync(&j, "d-c", &begun(Step::Write, 20));
        append_sync(&j, "d-c", &begun(Step::Reload, 30));
        // Read back as if each append had rewritten the entry.
        let expect = DeploymentStatus::InFlight {
            attempt: 1,
            last_event: "begun:reload".into(),
            started_at: Timestamp(10),
            updated_at: Timestamp(30),
        };
        assert_eq!(j.status("d-c").unwrap(), Some(expect.clone()));
        let listed = j.list().unwrap();
        assert_eq!((listed[0].updated_at, listed[0].state), (Timestamp(30), DeploymentState::InFlight));
        j.close().unwrap();
        // The step records did not touch the entry, and reopening (which
        // reconciles) leaves it so: being behind step records is normal.
        assert_eq!(raw_entry(&path), after_started);
        let j = open(&path);
        assert_eq!(j.status("d-c").unwrap(), Some(expect));
        j.close().unwrap();
        assert_eq!(raw_entry(&path), after_started);
    }
    let j = open(&path);
    append_sync(&j, "d-c", &finished("d-c", Outcome::Deployed, 40));
    match j.status("d-c").unwrap() {
        Some(DeploymentStatus::Finished { report, acked: false }) => assert_eq!(report.finished_at, Timestamp(40)),
        other => panic!("{other:?}"),
    }
    j.close().unwrap();
    assert_ne!(raw_entry(&path), after_started, "Finished rewrites the entry");
}

#[test]
fn a_record_at_the_last_sequence_number_fails_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    with_raw_record(&path, "d-max", u64::MAX, 1);
    match SledJournal::open(&path, JournalOptions::default()) {
        Err(e @ JournalOpenError::Corrupt { .. }) => assert!(e.to_string().contains("sequence"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gc_removes_records_but_keeps_dedupe_entries() {
    let dir = tempfile::tempdir().unwrap();
    let j = open(&dir.path().join("j"));
    let hour = 3_600_000u64;
    for id in ["old-1", "old-2"] {
        append_sync(&j, id, &started(id, 1_000));
        append_sync(&j, id, &begun(Step::Write, 1_001));
        append_sync(&j, id, &finished(id, Outcome::Deployed, 2_000));
    }
    append_sync(&j, "recent", &started("recent", 5 * hour));
    append_sync(&j, "recent", &finished("recent", Outcome::RolledBack, 5 * hour));
    append_sync(&j, "running", &started("running", 0));

    let now = Timestamp(2_000 + 2 * hour);
    let stats = j.gc(Duration::from_secs(3_600), now).unwrap();
    assert_eq!(stats.deployments_pruned, 2);
    assert_eq!(stats.records_removed, 6);
    assert_eq!(stats.dedupe_entries_removed, 0);
    for id in ["old-1", "old-2"] {
        assert!(j.records(id).unwrap().is_empty());
        assert_eq!(
            j.status(id).unwrap(),
            Some(DeploymentStatus::Finished { report: report(id, Outcome::Deployed, 2_000), acked: false }),
            "dedupe entry of {id} kept"
        );
    }
    assert_eq!(j.records("recent").unwrap().len(), 2);
    assert_eq!(j.records("running").unwrap().len(), 1, "in-flight never collected");
    assert!(j.list().unwrap().iter().find(|s| s.deployment_id == "old-1").unwrap().records_pruned);
    // Idempotent.
    assert_eq!(j.gc(Duration::from_secs(3_600), now).unwrap().records_removed, 0);

    // Past 10 × retention the dedupe entries go too; in-flight stays.
    let later = Timestamp(2_000 + 11 * hour);
    let stats = j.gc(Duration::from_secs(3_600), later).unwrap();
    assert_eq!(stats.dedupe_entries_removed, 2);
    assert_eq!(j.status("old-1").unwrap(), None);
    assert!(j.status("recent").unwrap().is_some());
    assert_eq!(j.unfinished().unwrap(), vec!["running".to_string()]);
}

/// The deployments gauge is a counter kept by `append` and `gc` (no walk
/// of the index): it agrees with the index through appends to new and
/// known ids, a gc that drops entries, and a reopen.
#[test]
fn deployment_count_follows_appends_gc_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let j = open(&path);
    let hour = 3_600_000u64;
    for id in ["a", "b", "c"] {
        append_sync(&j, id, &started(id, 1_000));
        append_sync(&j, id, &finished(id, Outcome::Deployed, 2_000));
    }
    append_sync(&j, "running", &started("running", 0));
    assert_eq!(j.deployment_count(), 4);
    assert_eq!(j.deployment_count(), j.list().unwrap().len());
    // Pruned records keep the entry; past 10 × retention it goes.
    j.gc(Duration::from_secs(3_600), Timestamp(2_000 + 2 * hour)).unwrap();
    assert_eq!(j.deployment_count(), 4);
    let stats = j.gc(Duration::from_secs(3_600), Timestamp(2_000 + 11 * hour)).unwrap();
    assert_eq!(stats.dedupe_entries_removed, 3);
    assert_eq!(j.deployment_count(), 1);
    assert_eq!(j.deployment_count(), j.list().unwrap().len());
    j.close().unwrap();
    let j = open(&path);
    assert_eq!(j.deployment_count(), 1);
    append_sync(&j, "d", &started("d", 5 * hour));
    assert_eq!(j.deployment_count(), 2);
}

#[test]
fn future_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    open(&path).close().unwrap();
    {
        let db = sled::open(&path).unwrap();
        db.open_tree("meta").unwrap().insert("format_version", &[9u8]).unwrap();
        db.flush().unwrap();
    }
    let err = SledJournal::open(&path, JournalOptions::default()).unwrap_err();
    assert!(matches!(err, JournalOpenError::UnsupportedVersion { found: 9, supported: 1, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("version 9") && msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn record_with_unknown_version_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    with_raw_record(&path, "d-v", 1_000_000, 7);
    let j = open(&path);
    let err = j.records("d-v").unwrap_err();
    assert!(matches!(err, Error::UnknownVersion { found: 7, supported: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("d-v#"), "{err}");
}

#[test]
fn directory_is_0700_and_files_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("journal");
    let j = open(&path);
    append_sync(&j, "d-perm", &started("d-perm", 1));
    let check = |path: &Path| {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(path), 0o700, "{}", path.display());
        let files = all_files(path);
        assert!(files.len() >= 3, "{files:?}");
        for f in files {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    };
    check(&path);
    j.close().unwrap();
    // Loosened by someone else: tightened again at open.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(path.join("conf"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let j = open(&path);
    check(&path);
    j.close().unwrap();
}

#[test]
fn a_blob_sled_adds_later_is_secured_by_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let j = open(&path);
    append_sync(&j, "d-blob", &started("d-blob", 1));
    let blobs = |path: &Path| all_files(&path.join("blobs"));
    assert!(blobs(&path).is_empty());
    // Flushes that add no file do not list sled's directories.
    let walks = j.stats().dir_walks;
    for i in 0..5 {
        append_sync(&j, &format!("d-quiet-{i}"), &started(&format!("d-quiet-{i}"), 1));
    }
    assert_eq!(j.stats().dir_walks, walks, "flushes that added no file walked sled's directories");
    // Over sled's inline limit (a quarter segment): stored as a blob file,
    // created by sled with the process umask's mode.
    let big = Record { at: Timestamp(2), event: Event::Pruned { error: Some("x".repeat(200_000)) } };
    append_sync(&j, "d-blob", &big);
    let found = blobs(&path);
    assert!(!found.is_empty(), "no blob written");
    assert!(j.stats().dir_walks > walks, "the flush after sled added a blob did not walk");
    for f in found {
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777, 0o600, "{}", f.display());
    }
    assert_eq!(j.records("d-blob").unwrap().len(), 2);
    j.close().unwrap();
}

const CHILD_ENV: &str = "CERTDEPLOY_JOURNAL_LOCK_CHILD";

/// Run only as the child of `second_process_cannot_open_a_held_journal`.
#[test]
fn lock_child_helper() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    match SledJournal::open(Path::new(&path), JournalOptions::default()) {
        Ok(_) => println!("CHILD-RESULT: opened"),
        Err(e) => println!("CHILD-RESULT: {e}"),
    }
}

#[test]
fn second_process_cannot_open_a_held_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held");
    let j = open(&path);
    append_sync(&j, "d-lock", &started("d-lock", 1));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_child_helper", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("in use by another process"), "{line}");
    assert!(line.contains(&path.display().to_string()), "{line}");
    assert!(line.contains(&format!("pid {}", std::process::id())), "{line}");
    // The same process cannot open it twice either.
    let err = SledJournal::open(&path, JournalOptions::default()).unwrap_err();
    assert!(matches!(err, JournalOpenError::Locked { .. }), "{err:?}");
    // Released on close: the child can open it now.
    j.close().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_child_helper", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHILD-RESULT: opened"));
}

#[test]
fn gc_keeps_each_targets_last_certificate_in_place_however_old() {
    let dir = tempfile::tempdir().unwrap();
    let j = open(&dir.path().join("j"));
    let hour = 3_600_000u64;
    // One target (web1): two deployments that landed, then one rolled back.
    for (id, at, outcome) in [
        ("first", 1_000, Outcome::Deployed),
        ("second", 1_500, Outcome::Deployed),
        ("third", 1_800, Outcome::RolledBack),
    ] {
        append_sync(&j, id, &started(id, at));
        append_sync(&j, id, &finished(id, outcome, at + 10));
    }
    let policy = GcPolicy { keep_last_per_target: true, ..GcPolicy::new(Duration::from_secs(3_600)) };
    let stats = j.gc_with(&policy, Timestamp(2 * hour)).unwrap();
    assert_eq!(stats.deployments_pruned, 2, "{stats:?}");
    assert!(j.records("first").unwrap().is_empty());
    assert!(j.records("third").unwrap().is_empty(), "a rollback left nothing in place");
    assert_eq!(j.records("second").unwrap().len(), 2, "what web1 holds now is kept");
    // Past the dedupe retention too.
    let stats = j.gc_with(&policy, Timestamp(100 * hour)).unwrap();
    assert_eq!(stats.dedupe_entries_removed, 2, "{stats:?}");
    assert_eq!(j.records("second").unwrap().len(), 2);
    assert!(j.status("second").unwrap().is_some());
    // Without the policy, it goes like the others.
    assert_eq!(j.gc(Duration::from_secs(3_600), Timestamp(100 * hour)).unwrap().dedupe_entries_removed, 1);
}

/// A failed fsync poisons the journal: that flush fails, and so does every
/// later one, even once fsync works again (a retried fsync proves nothing).
#[test]
#[cfg(feature = "failpoints")]
fn a_failed_fsync_poisons_the_journal() {
    let _scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let j = open(&dir.path().join("j"));
    append_sync(&j, "d-before", &started("d-before", 1));
    fail::cfg("journal_fsync", "return").unwrap();
    j.append("d-failed", &started("d-failed", 2)).expect("append");
    let first = j.flush_now().expect_err("the flush whose fsync failed");
    assert!(first.to_string().contains("injected failure"), "{first}");
    fail::remove("journal_fsync");
    let later = j.flush_now().expect_err("a flush after a failed fsync");
    assert!(later.to_string().contains("injected failure"), "poisoned by the first failure: {later}");
    let sync = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
        let seq = j.append("d-after", &started("d-after", 3));
        match seq {
            Ok(seq) => certdeploy_core::driver::Journal::sync(&j, seq).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    assert!(sync.is_err(), "a sync after a failed fsync succeeded");
}

#[test]
#[cfg(not(feature = "failpoints"))]
#[ignore = "needs --features certdeploy/failpoints (or certdeploy-journal/failpoints)"]
fn a_failed_fsync_poisons_the_journal() {}
