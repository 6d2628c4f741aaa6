//! Online compaction of the sled journal: it keeps every record, index
//! entry, dedupe result, the id and the sequence, gives the space of
//! collected records back, lets appends wait rather than lose them, and a
//! crash at any step of the swap reopens to exactly the journal it started
//! from.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certdeploy_core::driver::Journal;
use certdeploy_core::testkit::test_plan;
use certdeploy_core::{Event, Outcome, Record, Step, Timestamp};
use certdeploy_journal::{DeploymentStatus, JournalOpenError, JournalOptions, SledJournal, Summary};
use common::{NEW_CERT, begun, finished, open};

const HOUR: u64 = 3_600_000;

fn started(id: &str, at: u64) -> Record {
    let key = b"-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n";
    let (plan, _) = test_plan(id, NEW_CERT, key, None, false, false);
    Record { at: Timestamp(at), event: Event::Started { plan } }
}

/// One deployment's eight records, finished at `at`.
fn deploy(j: &SledJournal, id: &str, at: u64) {
    j.append(id, &started(id, at - 7)).unwrap();
    for (i, step) in
        [Step::Lock, Step::Snapshot, Step::Write, Step::Validate, Step::Reload, Step::Commit].into_iter().enumerate()
    {
        j.append(id, &begun(step, at - 6 + i as u64)).unwrap();
    }
    j.append(id, &finished(id, Outcome::Deployed, at)).unwrap();
}

/// A journal of every kind of entry: `old` finished deployments that gc
/// prunes to their dedupe entry, recent finished ones (one acked) kept
/// whole, one in flight, one holding a record large enough for sled to
/// store as a blob file, and one whose dedupe entry gc dropped.
fn fixture(path: &Path, old: usize) {
    let j = open(path);
    deploy(&j, "expired", 1_000);
    for i in 0..old {
        deploy(&j, &format!("old-{i:05}"), 95 * HOUR);
    }
    for i in 0..5 {
        deploy(&j, &format!("recent-{i}"), 100 * HOUR);
    }
    assert!(j.mark_acked("recent-0").unwrap());
    j.append("running", &started("running", 100 * HOUR)).unwrap();
    j.append("running", &begun(Step::Write, 100 * HOUR + 1)).unwrap();
    j.append("blob", &started("blob", 100 * HOUR)).unwrap();
    let big = Record { at: Timestamp(100 * HOUR + 1), event: Event::Pruned { error: Some("x".repeat(200_000)) } };
    j.append("blob", &big).unwrap();
    // Retention 1 h at 100 h: the old ones lose their records (results
    // kept 10 h), "expired" (at 1 s) loses its result too.
    let stats = j.gc(Duration::from_secs(3_600), Timestamp(12 * HOUR)).unwrap();
    assert_eq!(stats.dedupe_entries_removed, 1, "{stats:?}");
    let stats = j.gc(Duration::from_secs(3_600), Timestamp(100 * HOUR)).unwrap();
    assert_eq!(stats.deployments_pruned as usize, old, "{stats:?}");
    j.close().unwrap();
}

/// What the journal answers: every id's status and records, the list,
/// the in-flight ids, the count and the id.
#[derive(Debug, PartialEq)]
struct Answers {
    id: String,
    count: usize,
    list: Vec<Summary>,
    unfinished: Vec<String>,
    each: BTreeMap<String, (Option<DeploymentStatus>, Vec<Record>)>,
}

fn answers(j: &SledJournal) -> Answers {
    let list = j.list().unwrap();
    let mut each = BTreeMap::new();
    for s in &list {
        let id = &s.deployment_id;
        each.insert(id.clone(), (j.status(id).unwrap(), j.records(id).unwrap()));
    }
    // Asked for an id gc dropped: still unknown.
    each.insert("expired".into(), (j.status("expired").unwrap(), j.records("expired").unwrap()));
    Answers { id: j.id().to_string(), count: j.deployment_count(), list, unfinished: j.unfinished().unwrap(), each }
}

type Dump = BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every key and value of every tree, read with sled directly (the
/// journal closed).
fn dump(path: &Path) -> Dump {
    let db = sled::open(path).unwrap();
    let mut out = BTreeMap::new();
    for name in db.tree_names() {
        let t = db.open_tree(&name).unwrap();
        out.insert(name.to_vec(), t.iter().map(|kv| kv.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect());
    }
    out
}

fn sibling(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}.compact", path.file_name().unwrap().to_string_lossy()))
}

fn modes_are_private(path: &Path) {
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(path), 0o700, "{}", path.display());
    let mut stack = vec![path.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                stack.push(p);
            } else {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                files += 1;
            }
        }
    }
    assert!(files >= 3, "only {files} files in {}", path.display());
}

/// The highest sequence number in the journal: the next append's minus one.
fn next_seq(path: &Path) -> u64 {
    let j = open(path);
    let seq = j.append("probe", &started("probe", 200 * HOUR)).unwrap();
    j.close().unwrap();
    seq
}

#[test]
fn compaction_keeps_every_entry_and_gives_the_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    fixture(&path, 3_000);
    let raw = dump(&path);
    let j = open(&path);
    let before = answers(&j);
    assert_eq!(before.count, 3_000 + 5 + 2);
    let id = j.id().to_string();

    let stats = j.compact().unwrap();
    assert!(
        stats.size_after * 4 < stats.size_before,
        "compacting after a gc of most records: {} -> {} bytes",
        stats.size_before,
        stats.size_after
    );
    assert_eq!(stats.size_after, j.size_on_disk().unwrap());
    assert!(stats.entries > 3_000, "{stats:?}");
    // The same answers, at once and from the new files.
    assert_eq!(answers(&j), before);
    assert_eq!(j.status("old-00042").unwrap(), before.each["old-00042"].0, "a dedupe entry whose records gc removed");
    assert!(matches!(j.status("old-00042").unwrap(), Some(DeploymentStatus::Finished { .. })));
    assert_eq!(j.records("blob").unwrap().len(), 2, "a record sled keeps as a blob file");
    assert!(!sibling(&path).exists(), "the old copy is removed");
    // sled may add a file at any time (a blob it relocates); each flush
    // secures what appeared (`journal.rs` tests).
    j.flush_now().unwrap();
    modes_are_private(&path);
    // Still the one process that holds it, by the journal's own lock (the
    // lock file at the path names this process), not only sled's.
    let pid = format!("pid {}", std::process::id());
    let err = SledJournal::open(&path, JournalOptions::default()).unwrap_err();
    assert!(matches!(&err, JournalOpenError::Locked { holder, .. } if holder.contains(&pid)), "{err:?}");
    let child = lock_child(&path);
    assert!(child.contains("in use by another process") && child.contains(&pid), "{child}");

    // Appends go on, with higher sequence numbers, and are durable.
    let seq = j.append("after", &started("after", 300 * HOUR)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(j.sync(seq)).unwrap();
    j.compact().unwrap();
    let seq2 = j.append("after", &begun(Step::Write, 300 * HOUR + 1)).unwrap();
    assert_eq!(seq2, seq + 1);
    j.close().unwrap();

    // Byte for byte what sled held before, plus the two appends.
    let mut after = dump(&path);
    let records = after.get_mut(&b"records"[..]).unwrap();
    let n = records.len();
    records.retain(|(k, _)| !k.starts_with(b"after\0"));
    assert_eq!(n - records.len(), 2);
    after.get_mut(&b"deployments"[..]).unwrap().retain(|(k, _)| k != b"after");
    assert_eq!(after, raw, "a key or value changed");
    let j = open(&path);
    assert_eq!(j.id(), id);
    assert_eq!(j.append("after", &begun(Step::Reload, 300 * HOUR + 2)).unwrap(), seq2 + 1);
    assert!(matches!(j.status("after").unwrap(), Some(DeploymentStatus::InFlight { .. })));
    j.close().unwrap();
}

/// Appends and queries from other threads while compactions run: they
/// wait, and nothing they wrote is lost or reordered.
#[test]
fn appends_during_a_compaction_wait_and_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    fixture(&path, 500);
    let j = Arc::new(open(&path));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (j, done) = (j.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                let mut i = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) || i < 50 {
                    let id = format!("live-{w}-{i}");
                    let a = j.append(&id, &started(&id, 200 * HOUR)).unwrap();
                    let b = j.append(&id, &finished(&id, Outcome::Deployed, 200 * HOUR + 1)).unwrap();
                    assert_eq!(
                        j.status(&id).unwrap().map(|s| matches!(s, DeploymentStatus::Finished { .. })),
                        Some(true)
                    );
                    seqs.push((id, a, b));
                    i += 1;
                }
                seqs
            })
        })
        .collect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(30));
        j.compact().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seqs: Vec<(String, u64, u64)> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(seqs.len() >= 200, "{}", seqs.len());
    let mut all: Vec<u64> = seqs.iter().flat_map(|(_, a, b)| [*a, *b]).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), seqs.len() * 2, "a sequence number given twice");
    let check = |j: &SledJournal| {
        for (id, _, _) in &seqs {
            assert_eq!(j.records(id).unwrap().len(), 2, "{id} lost records");
            assert!(matches!(j.status(id).unwrap(), Some(DeploymentStatus::Finished { .. })), "{id}");
        }
    };
    check(&j);
    let max = *all.last().unwrap();
    Arc::into_inner(j).unwrap().close().unwrap();
    let j = open(&path);
    check(&j);
    assert_eq!(j.append("next", &started("next", 300 * HOUR)).unwrap(), max + 1);
    j.close().unwrap();
}

/// What sits at `<journal>.compact` is removed at open only when it is
/// what a compaction writes; anything else is refused, named, and kept.
#[test]
fn open_removes_a_compactions_leftover_and_refuses_anything_else_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    open(&path).close().unwrap();
    let beside = sibling(&path);
    // Half a copy: sled's files and a lock file.
    std::fs::create_dir_all(beside.join("blobs")).unwrap();
    for f in ["db", "conf", "certdeploy.lock", "snap.0000000000000042"] {
        std::fs::write(beside.join(f), b"x").unwrap();
    }
    open(&path).close().unwrap();
    assert!(!beside.exists(), "the leftover was not removed");
    // Someone else's file in there.
    std::fs::create_dir_all(&beside).unwrap();
    std::fs::write(beside.join("db"), b"x").unwrap();
    std::fs::write(beside.join("notes.txt"), b"mine").unwrap();
    let err = SledJournal::open(&path, JournalOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&beside.display().to_string()) && msg.contains("notes.txt"), "{msg}");
    assert_eq!(std::fs::read(beside.join("notes.txt")).unwrap(), b"mine");
    std::fs::remove_dir_all(&beside).unwrap();
    // Not a directory.
    std::fs::write(&beside, b"a file").unwrap();
    let err = SledJournal::open(&path, JournalOptions::default()).unwrap_err();
    assert!(err.to_string().contains("is not a directory"), "{err}");
    assert_eq!(std::fs::read(&beside).unwrap(), b"a file");
}

const LOCK_CHILD: &str = "CERTDEPLOY_COMPACT_LOCK_CHILD";

/// Run only as the child of the tests above: try to open the journal.
#[test]
fn compact_lock_child() {
    let Ok(path) = std::env::var(LOCK_CHILD) else { return };
    match SledJournal::open(Path::new(&path), JournalOptions::default()) {
        Ok(_) => println!("CHILD-RESULT: opened"),
        Err(e) => println!("CHILD-RESULT: {e}"),
    }
}

fn lock_child(path: &Path) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "compact_lock_child", "--nocapture", "--test-threads=1"])
        .env(LOCK_CHILD, path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout.lines().find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, r)| r.to_string())).unwrap_or(stdout)
}

#[cfg(feature = "failpoints")]
mod crash {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    const CHILD: &str = "CERTDEPLOY_COMPACT_CRASH_CHILD";

    /// Every step of a compaction, in order.
    const POINTS: &[&str] = &[
        "journal_compact_copying",
        "journal_compact_copied",
        "journal_compact_closed",
        "journal_compact_swapped",
        "journal_compact_synced",
        "journal_compact_removing",
        "journal_compact_removed",
    ];

    /// Run only as the child of the crash test: open the journal, compact
    /// it, and die at the failpoint named in the environment.
    #[test]
    fn compact_crash_child() {
        let Ok(spec) = std::env::var(CHILD) else { return };
        let (point, path) = spec.split_once('=').unwrap();
        std::panic::set_hook(Box::new(|_| std::process::abort()));
        let j = open(Path::new(path));
        fail::cfg(point, "panic").unwrap();
        let r = j.compact();
        println!("CHILD-RESULT: compacted without crashing: {r:?}");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// A process killed at each step of a compaction (copying, copied,
    /// old database closed, directories exchanged, parent synced, old copy
    /// half removed, removed): the next open finds exactly the journal the
    /// compaction started from — every key and value of every tree, the
    /// same answers, no leftover beside it — and appends go on after the
    /// last sequence number.
    #[test]
    fn a_crash_at_each_step_of_a_compaction_reopens_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let fixture_path = dir.path().join("fixture");
        fixture(&fixture_path, 300);
        let raw = dump(&fixture_path);
        let j = open(&fixture_path);
        let expected = answers(&j);
        j.close().unwrap();
        let probe = next_seq(&{
            let p = dir.path().join("probe");
            copy_dir(&fixture_path, &p);
            p
        });
        for point in POINTS {
            let path = dir.path().join(point.trim_start_matches("journal_compact_"));
            copy_dir(&fixture_path, &path);
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "crash::compact_crash_child", "--nocapture", "--test-threads=1"])
                .env(CHILD, format!("{point}={}", path.display()))
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.signal(),
                Some(6),
                "{point}: the child was to abort there: {} {stdout} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            // What the crash left: the sibling (but after its removal), and
            // the compacted copy at the path from the exchange on.
            assert_eq!(sibling(&path).exists(), *point != "journal_compact_removed", "{point}");
            let db_len = |p: &Path| std::fs::metadata(p.join("db")).unwrap().len();
            let swapped =
                POINTS.iter().position(|p| p == point) >= POINTS.iter().position(|p| *p == "journal_compact_swapped");
            assert_eq!(db_len(&path) < db_len(&fixture_path), swapped, "{point}: which copy the path names");
            let j = open(&path);
            assert!(!sibling(&path).exists(), "{point}: a leftover survived the open");
            assert_eq!(answers(&j), expected, "{point}: the journal answers differently");
            j.close().unwrap();
            modes_are_private(&path);
            // (sled opened directly writes files of its own mode: last.)
            assert_eq!(dump(&path), raw, "{point}: a key or value changed");
            assert_eq!(next_seq(&path), probe, "{point}: the sequence did not go on from the last record");
            // And it compacts again from there.
            let j = open(&path);
            let again = answers(&j);
            j.compact().unwrap();
            assert_eq!(answers(&j), again, "{point}: the compaction after the crash");
            j.close().unwrap();
        }
    }
}

#[cfg(not(feature = "failpoints"))]
mod crash {
    #[test]
    #[ignore = "needs --features certdeploy/failpoints (or certdeploy-journal/failpoints)"]
    fn a_crash_at_each_step_of_a_compaction_reopens_exactly() {}
}
