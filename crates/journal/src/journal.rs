//! [`SledJournal`]: layout, queries, retention.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use certdeploy_core::driver::{Journal, JournalError, event_name};
use certdeploy_core::group::GroupRecord;
use certdeploy_core::{Deployment, Event, Outcome, Record, Report, Timestamp};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::watch;

use crate::FORMAT_VERSION;
use crate::codec::{decode, encode, printable_key, record_key, record_prefix, record_seq};
use crate::compact::{self, crash_point};
use crate::error::{Error, JournalOpenError};
use crate::files::{self, SledFiles};
use crate::flusher::{Durable, NO_STORE, Requests, Shared, Store, lock, read, write};
use crate::stats::{Counters, JournalStats};

const RECORDS: &str = "records";
const INDEX: &str = "deployments";
const GROUPS: &str = "groups";
const META: &str = "meta";
const FORMAT_KEY: &str = "format_version";
/// A random id created with the journal: names it in target locks.
const ID_KEY: &str = "journal_id";

/// What a completed `sync` guarantees; see the crate documentation.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// sled flush, then `fsync` of sled's data files: survives power loss.
    #[default]
    Fsync,
    /// sled flush only (`sync_file_range`): survives a process crash.
    Flush,
    /// No flush at all: for overhead benchmarks only.
    Off,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Flush => "flush",
            Durability::Off => "off",
        }
    }
}

#[derive(Clone, Debug)]
pub struct JournalOptions {
    pub durability: Durability,
    /// sled's page cache, bytes (sled's own default is 1 GiB).
    pub cache_capacity: u64,
    /// Group commit: once a sync is requested, the flusher waits this long
    /// for more before flushing, so that concurrent deployments share one
    /// flush. Adds up to this much to every sync. Zero (the default) flushes
    /// at once; syncs arriving during a flush still share the next one, so
    /// a slow disk coalesces by itself. Measured with 20 hosts in parallel
    /// (fsync ~0.7 ms): 2 ms cut flushes/deploy from 3.5 to 1.6 but cost
    /// throughput, and did not lower worker CPU.
    pub group_window: Duration,
}

/// See [`JournalOptions::group_window`].
pub const DEFAULT_GROUP_WINDOW: Duration = Duration::ZERO;

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            durability: Durability::Fsync,
            cache_capacity: 64 * 1024 * 1024,
            group_window: DEFAULT_GROUP_WINDOW,
        }
    }
}

/// Where the latest attempt of a deployment stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// The latest attempt has no `Finished`/`Abandoned` record: recovery
    /// must resume it.
    InFlight,
    /// Terminal with a result (re-publish it on redelivery).
    Finished,
    /// Ended by recovery without a result: the redelivered request deploys
    /// afresh as attempt `attempts + 1`.
    Abandoned,
}

/// The answer to "what about deployment X?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeploymentStatus {
    InFlight { attempt: u32, last_event: String, started_at: Timestamp, updated_at: Timestamp },
    Finished { report: Report, acked: bool },
    Abandoned { attempts: u32, reason: String, updated_at: Timestamp },
}

/// One line of `certdeploy journal list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub deployment_id: String,
    pub target: String,
    pub host: String,
    pub state: DeploymentState,
    /// For finished deployments.
    pub outcome: Option<Outcome>,
    /// For in-flight ones: the state machine's phase (or the last event if
    /// the records cannot be replayed).
    pub phase: Option<String>,
    pub attempts: u32,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    pub acked: bool,
    /// gc removed the records; only the dedupe entry remains.
    pub records_pruned: bool,
}

/// Retention of [`SledJournal::gc_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcPolicy {
    /// Records of terminal deployments older than this are removed.
    pub retention: Duration,
    /// Dedupe entries (id → report) older than this are removed too.
    pub dedupe_retention: Duration,
    /// Never collect each target's latest deployment that put a certificate
    /// in place (`deployed`, `unchanged` or `reverted`), however old: it says what the
    /// target holds now, and what a revert would need.
    pub keep_last_per_target: bool,
}

impl GcPolicy {
    /// Dedupe entries kept for 10 × `retention`; every old record goes.
    pub fn new(retention: Duration) -> GcPolicy {
        GcPolicy { retention, dedupe_retention: retention.saturating_mul(10), keep_last_per_target: false }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Terminal deployments whose records were removed (dedupe entry kept).
    pub deployments_pruned: u64,
    pub records_removed: u64,
    /// Dedupe entries removed (past the dedupe retention).
    pub dedupe_entries_removed: u64,
}

/// The index entry of one deployment (the `deployments` tree). It is
/// rewritten only by the records that change what it says of the
/// deployment's fate ([`is_checkpoint`]) and by ack and gc; the records
/// after `last_seq` (an in-flight deployment's steps) are applied when the
/// entry is read ([`SledJournal::current`]). A step's append is then one
/// sled insert instead of a read, a decode and two inserts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    target: String,
    host: String,
    attempts: u32,
    state: DeploymentState,
    last_event: String,
    started_at: Timestamp,
    updated_at: Timestamp,
    acked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    report: Option<Report>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    last_seq: u64,
    records_pruned: bool,
}

/// Each target's latest finished deployment that left a certificate in
/// place (`deployed` or `unchanged`), by its last update.
fn last_in_place_per_target(entries: &[(String, Entry)]) -> HashSet<&str> {
    let mut best: HashMap<&str, (&str, Timestamp)> = HashMap::new();
    for (id, e) in entries {
        let in_place = e.state == DeploymentState::Finished
            && e.report
                .as_ref()
                .is_some_and(|r| matches!(r.outcome, Outcome::Deployed | Outcome::Unchanged | Outcome::Reverted));
        if !in_place {
            continue;
        }
        let slot = best.entry(e.target.as_str()).or_insert((id.as_str(), e.updated_at));
        if e.updated_at >= slot.1 {
            *slot = (id.as_str(), e.updated_at);
        }
    }
    best.into_values().map(|(id, _)| id).collect()
}

/// Records after which the index entry is rewritten: a new attempt and the
/// two ends of one.
fn is_checkpoint(event: &Event) -> bool {
    matches!(event, Event::Started { .. } | Event::Finished { .. } | Event::Abandoned { .. })
}

/// The records of `id` with a sequence number above `after`, in order,
/// with their sequence numbers.
fn records_after(records: &sled::Tree, id: &[u8], after: u64) -> impl Iterator<Item = Result<(u64, Record), Error>> {
    records.scan_prefix(record_prefix(id)).filter_map(move |kv| {
        let read = || {
            let (k, v) = kv?;
            let (_, seq) = record_seq(&k)?;
            if seq <= after {
                return Ok(None);
            }
            Ok(Some((seq, decode("record", &k, &v)?)))
        };
        read().transpose()
    })
}

fn records_in(s: &Store, deployment_id: &str) -> Result<Vec<Record>, Error> {
    s.records
        .scan_prefix(record_prefix(deployment_id))
        .map(|kv| {
            let (k, v) = kv?;
            decode("record", &k, &v)
        })
        .collect()
}

fn entry_in(s: &Store, deployment_id: &str) -> Result<Option<Entry>, Error> {
    s.index.get(deployment_id)?.map(|v| decode("index entry", deployment_id.as_bytes(), &v)).transpose()
}

/// The entry with the records after its `last_seq` applied: what it
/// would hold if every append rewrote it. Only an in-flight entry can be
/// behind (every end of an attempt rewrites it).
fn current_in(s: &Store, deployment_id: &str, entry: Option<Entry>) -> Result<Option<Entry>, Error> {
    let Some(mut e) = entry else { return Ok(None) };
    if e.state != DeploymentState::InFlight {
        return Ok(Some(e));
    }
    for r in records_after(&s.records, deployment_id.as_bytes(), e.last_seq) {
        let (seq, rec) = r?;
        e.apply(&rec, seq);
    }
    Ok(Some(e))
}

fn entries_in(s: &Store) -> impl Iterator<Item = Result<(String, Entry), Error>> + '_ {
    s.index.iter().map(|kv| {
        let (k, v) = kv?;
        let e = decode("index entry", &k, &v)?;
        Ok((String::from_utf8_lossy(&k).into_owned(), e))
    })
}

impl Entry {
    fn empty(at: Timestamp) -> Entry {
        Entry {
            target: String::new(),
            host: String::new(),
            attempts: 0,
            state: DeploymentState::InFlight,
            last_event: String::new(),
            started_at: at,
            updated_at: at,
            acked: false,
            report: None,
            reason: None,
            last_seq: 0,
            records_pruned: false,
        }
    }

    fn apply(&mut self, rec: &Record, seq: u64) {
        match &rec.event {
            Event::Started { plan } => {
                self.target = plan.target.clone();
                self.host = plan.host.clone();
                self.attempts = (self.attempts + 1).max(plan.attempt);
                self.state = DeploymentState::InFlight;
                self.started_at = rec.at;
                self.acked = false;
                self.report = None;
                self.reason = None;
            }
            Event::Finished { report } => {
                self.state = DeploymentState::Finished;
                self.report = Some(report.clone());
            }
            Event::Abandoned { reason } => {
                self.state = DeploymentState::Abandoned;
                self.reason = Some(reason.clone());
            }
            _ => {}
        }
        self.last_event = match &rec.event {
            Event::Begun { step } => format!("begun:{step}"),
            e => event_name(e).to_string(),
        };
        self.updated_at = self.updated_at.max(rec.at);
        self.last_seq = seq;
    }

    fn status(&self) -> DeploymentStatus {
        match (self.state, &self.report) {
            (DeploymentState::Finished, Some(report)) => {
                DeploymentStatus::Finished { report: report.clone(), acked: self.acked }
            }
            (DeploymentState::Abandoned, _) => DeploymentStatus::Abandoned {
                attempts: self.attempts,
                reason: self.reason.clone().unwrap_or_default(),
                updated_at: self.updated_at,
            },
            _ => DeploymentStatus::InFlight {
                attempt: self.attempts,
                last_event: self.last_event.clone(),
                started_at: self.started_at,
                updated_at: self.updated_at,
            },
        }
    }
}

/// The sled-backed journal. Share it behind an `Arc`; dropping it stops the
/// flusher after a last flush (use [`SledJournal::close`] to see errors).
pub struct SledJournal {
    path: PathBuf,
    shared: Arc<Shared>,
    /// Next sequence number; held across an append's insert so that
    /// `appended` only ever covers completed inserts.
    next_seq: Mutex<u64>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// The process lock on the journal directory's lock file (replaced by
    /// the new directory's when a compaction swaps it in).
    lock: Mutex<File>,
    /// One compaction at a time.
    compacting: Mutex<()>,
    cache_capacity: u64,
    id: String,
    /// Entries of the index: counted once at open, then kept up to date
    /// by `append` (a new id) and `gc` (an entry dropped), so that the
    /// metric does not walk the index.
    deployments: AtomicUsize,
}

impl std::fmt::Debug for SledJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledJournal")
            .field("path", &self.path)
            .field("durability", &self.shared.durability)
            .finish_non_exhaustive()
    }
}

fn sled_err(path: &Path) -> impl Fn(sled::Error) -> JournalOpenError + '_ {
    move |source| match &source {
        sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
            JournalOpenError::Locked { path: path.to_path_buf(), holder: String::new() }
        }
        _ => JournalOpenError::Sled { path: path.to_path_buf(), source },
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<Error>>;

/// The open database, read-locked for as long as it is used.
struct StoreRef<'a>(RwLockReadGuard<'a, Option<Store>>);

impl std::ops::Deref for StoreRef<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        self.0.as_ref().expect("checked when taken")
    }
}

/// What [`SledJournal::compact`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactStats {
    /// Bytes sled's files took before, and after.
    pub size_before: u64,
    pub size_after: u64,
    /// Keys copied (records, index entries, meta).
    pub entries: u64,
    /// From the call to the return, waiting for the journal included.
    pub duration: Duration,
}

fn tx_err(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Sled(e),
    }
}

/// Make the index agree with the records. A checkpoint append is two sled
/// inserts (the record, then its index entry); every append a flush covered
/// is intact in both, but of the appends after the last flush a crash may
/// keep any subset. The records are the truth: an entry behind a checkpoint
/// record gets the missing records applied (behind only other records is
/// how an in-flight entry normally is), an entry ahead of them (its record
/// was lost) or missing is re-derived from them, and an entry with no
/// records left that gc did not remove (its `Started` was lost: the
/// deployment never reached a side effect, which waits for a flush) is
/// removed. Returns how many entries were repaired, and the highest
/// sequence number of the records and the index. An index entry that
/// cannot be read is an error.
fn reconcile(records: &sled::Tree, index: &sled::Tree) -> Result<(usize, u64), Error> {
    // Keys sort by id, then seq: the last key of each id has its last seq.
    let mut last: Vec<(Vec<u8>, u64)> = Vec::new();
    for k in records.iter().keys() {
        let k = k?;
        let Ok((id, seq)) = record_seq(&k) else { continue };
        match last.last_mut() {
            Some((prev, s)) if prev.as_slice() == id => *s = seq,
            _ => last.push((id.to_vec(), seq)),
        }
    }
    let mut repaired = 0;
    // The sequence goes on after the highest record (an in-flight entry is
    // behind its own records), even one that cannot be read: a deployment's
    // records must stay in sequence order.
    let mut last_seq = last.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
    let mut with_records = std::collections::HashSet::new();
    for (id_bytes, max_seq) in &last {
        with_records.insert(id_bytes.clone());
        // A deployment whose records or entry cannot be read is left as it
        // is: its own queries report the problem.
        match repair(records, index, id_bytes, *max_seq) {
            Ok(true) => repaired += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(deployment_id = %printable_key(id_bytes), error = %e, "journal index not repaired")
            }
        }
    }
    let mut orphans = Vec::new();
    for kv in index.iter() {
        let (k, v) = kv?;
        let e: Entry = decode("index entry", &k, &v)?;
        if !with_records.contains(k.as_ref()) && !e.records_pruned {
            orphans.push(k);
        } else {
            last_seq = last_seq.max(e.last_seq);
        }
    }
    for k in orphans {
        index.remove(k)?;
        repaired += 1;
    }
    Ok((repaired, last_seq))
}

/// [`reconcile`] for one deployment whose last record has `max_seq`;
/// `Ok(true)` if its entry was rewritten.
fn repair(records: &sled::Tree, index: &sled::Tree, id_bytes: &[u8], max_seq: u64) -> Result<bool, Error> {
    let old: Option<Entry> = index.get(id_bytes)?.map(|v| decode("index entry", id_bytes, &v)).transpose()?;
    let (mut entry, after, behind) = match old {
        Some(e) if e.last_seq == max_seq => return Ok(false),
        Some(e) if e.last_seq < max_seq => {
            let after = e.last_seq;
            (e, after, true)
        }
        Some(e) => {
            // Ahead of its records: rebuilt, keeping what gc decided.
            let mut fresh = Entry::empty(e.started_at);
            fresh.records_pruned = e.records_pruned;
            (fresh, 0, false)
        }
        None => (Entry::empty(Timestamp(0)), 0, false),
    };
    let tail = records_after(records, id_bytes, after).collect::<Result<Vec<_>, _>>()?;
    // Behind step records only: how an in-flight entry normally is.
    if behind && !tail.iter().any(|(_, rec)| is_checkpoint(&rec.event)) {
        return Ok(false);
    }
    let mut first = after == 0;
    for (seq, rec) in &tail {
        if first {
            entry.started_at = rec.at;
            entry.updated_at = rec.at;
            first = false;
        }
        entry.apply(rec, *seq);
    }
    index.insert(id_bytes, encode("index entry", &entry)?)?;
    Ok(true)
}

impl SledJournal {
    /// Open (or create) the journal at `path`; see the crate documentation
    /// for permissions, locking and format checks.
    pub fn open(path: &Path, opts: JournalOptions) -> Result<SledJournal, JournalOpenError> {
        files::prepare_dir(path)?;
        let lock_file = files::lock(path)?;
        // A compaction interrupted by a crash leaves its sibling directory:
        // the journal path is whole whenever the crash came, the sibling is
        // garbage (see `compact`).
        if let Some(sibling) = compact::sibling(path) {
            match compact::remove_leftover(&sibling) {
                Ok(true) => tracing::info!(
                    path = %path.display(),
                    removed = %sibling.display(),
                    "removed what an interrupted journal compaction left"
                ),
                Ok(false) => {}
                Err(problem) => return Err(JournalOpenError::Corrupt { path: path.to_path_buf(), problem }),
            }
        }
        let db = compact::open_sled(path, opts.cache_capacity).map_err(sled_err(path))?;
        let meta = db.open_tree(META).map_err(sled_err(path))?;
        let records = db.open_tree(RECORDS).map_err(sled_err(path))?;
        let index = db.open_tree(INDEX).map_err(sled_err(path))?;
        let groups = db.open_tree(GROUPS).map_err(sled_err(path))?;
        match meta.get(FORMAT_KEY).map_err(sled_err(path))? {
            Some(v) => match v.as_ref() {
                [found] if *found > FORMAT_VERSION => {
                    return Err(JournalOpenError::UnsupportedVersion {
                        path: path.to_path_buf(),
                        found: *found,
                        supported: FORMAT_VERSION,
                    });
                }
                [found] if *found >= 1 => {}
                other => {
                    return Err(JournalOpenError::Corrupt {
                        path: path.to_path_buf(),
                        problem: format!("invalid format_version {other:?} in the meta tree"),
                    });
                }
            },
            None => {
                if !records.is_empty() || !index.is_empty() {
                    return Err(JournalOpenError::Corrupt {
                        path: path.to_path_buf(),
                        problem: "holds records but no format_version: not a certdeploy journal?".into(),
                    });
                }
                meta.insert(FORMAT_KEY, &[FORMAT_VERSION]).map_err(sled_err(path))?;
            }
        }
        let id = match meta.get(ID_KEY).map_err(sled_err(path))? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = random_id().map_err(|source| JournalOpenError::Io {
                    path: path.to_path_buf(),
                    action: "reading /dev/urandom for the journal id",
                    source,
                })?;
                meta.insert(ID_KEY, id.as_bytes()).map_err(sled_err(path))?;
                id
            }
        };
        db.flush().map_err(sled_err(path))?;

        let corrupt = |e: Error| match e {
            Error::Sled(source) => sled_err(path)(source),
            e => JournalOpenError::Corrupt { path: path.to_path_buf(), problem: e.to_string() },
        };
        let (repaired, last_seq) = reconcile(&records, &index).map_err(corrupt)?;
        // Group records share the sequence: it goes on after theirs too.
        let last_seq = last_seq.max(groups_max_seq(&groups).map_err(corrupt)?);
        if last_seq == u64::MAX {
            return Err(JournalOpenError::Corrupt {
                path: path.to_path_buf(),
                problem: "a record holds the highest sequence number: no record can follow it".into(),
            });
        }
        if repaired > 0 {
            tracing::info!(path = %path.display(), repaired, "journal index re-derived from the records after a crash");
            db.flush().map_err(sled_err(path))?;
        }

        let files = SledFiles::open(path)?;
        let (durable, _) = watch::channel(Durable { seq: last_seq, poisoned: None });
        let deployments = AtomicUsize::new(index.len());
        let store = Store { db, records, index, groups, files: Mutex::new(files) };
        let shared = Arc::new(Shared {
            store: RwLock::new(Some(store)),
            durability: opts.durability,
            group_window: opts.group_window,
            counters: Counters::default(),
            appended: last_seq.into(),
            requests: Mutex::new(Requests { requested: last_seq, shutdown: false }),
            wake: Condvar::new(),
            durable,
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new().name("journal-flusher".into()).spawn(move || shared.run_flusher()).map_err(
                |source| JournalOpenError::Io {
                    path: path.to_path_buf(),
                    action: "starting the flusher thread",
                    source,
                },
            )?
        };
        tracing::info!(path = %path.display(), durability = opts.durability.as_str(), last_seq, "journal opened");
        Ok(SledJournal {
            deployments,
            path: path.to_path_buf(),
            shared,
            next_seq: Mutex::new(last_seq + 1),
            flusher: Mutex::new(Some(flusher)),
            lock: Mutex::new(lock_file),
            compacting: Mutex::new(()),
            cache_capacity: opts.cache_capacity,
            id,
        })
    }

    /// The open database, read-locked (waits while a compaction runs).
    fn store(&self) -> Result<StoreRef<'_>, Error> {
        let g = read(&self.shared.store);
        if g.is_none() {
            return Err(Error::Poisoned(NO_STORE.into()));
        }
        Ok(StoreRef(g))
    }

    /// The journal's random id, created with it (128 bits, hex): unique
    /// even for two workers with the same host name and journal path.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Append a record (not yet durable); returns its global sequence number.
    pub fn append_record(&self, deployment_id: &str, record: &Record) -> Result<u64, Error> {
        if deployment_id.is_empty() || deployment_id.len() > 1024 || deployment_id.as_bytes().contains(&0) {
            return Err(Error::InvalidId(deployment_id.to_string()));
        }
        let value = encode("record", record)?;
        let s = self.store()?;
        let mut next = lock(&self.next_seq);
        let seq = *next;
        let key = record_key(deployment_id, seq);
        // Plain inserts, the record first, under `next_seq` (the only writer
        // of both trees). Not a sled transaction: one costs two log writes
        // and a dozen thread wake-ups per append (measured). A crash between
        // the two is repaired at open, see `reconcile`. Most records leave
        // the index entry alone (see `Entry`).
        // One index lookup per append, as before the deployments counter:
        // a checkpoint reads the entry anyway, and tells whether it is new.
        let (entry, new_id) = if is_checkpoint(&record.event) || !s.index.contains_key(deployment_id)? {
            // The skipped records since the last checkpoint changed only
            // what this one overwrites (last event, last seq; `updated_at`
            // unless the clock went back).
            let existing = entry_in(&s, deployment_id)?;
            let new_id = existing.is_none();
            let mut entry = existing.unwrap_or_else(|| Entry::empty(record.at));
            entry.apply(record, seq);
            (Some(encode("index entry", &entry)?), new_id)
        } else {
            (None, false)
        };
        s.records.insert(key.as_slice(), value.as_slice())?;
        if let Some(ev) = entry {
            s.index.insert(deployment_id.as_bytes(), ev)?;
        }
        if new_id {
            self.deployments.fetch_add(1, Ordering::Relaxed);
        }
        *next = seq + 1;
        self.shared.appended.store(seq, Ordering::Release);
        drop(next);
        drop(s);
        self.shared.counters.appends.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// Append a target group's record (not yet durable; [`Self::sync_seq`]
    /// the returned sequence number). The record holds no key in clear:
    /// the caller keeps the request sealed.
    pub fn append_group(&self, group_id: &str, record: &GroupRecord) -> Result<u64, Error> {
        if group_id.is_empty() || group_id.len() > 1024 || group_id.as_bytes().contains(&0) {
            return Err(Error::InvalidId(group_id.to_string()));
        }
        let value = encode("group record", record)?;
        let s = self.store()?;
        let mut next = lock(&self.next_seq);
        let seq = *next;
        s.groups.insert(record_key(group_id, seq).as_slice(), value.as_slice())?;
        *next = seq + 1;
        self.shared.appended.store(seq, Ordering::Release);
        drop(next);
        drop(s);
        self.shared.counters.appends.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// Every record of group `group_id`, in append order (empty if unknown).
    pub fn group_records(&self, group_id: &str) -> Result<Vec<GroupRecord>, Error> {
        let s = self.store()?;
        s.groups
            .scan_prefix(record_prefix(group_id))
            .map(|kv| {
                let (k, v) = kv?;
                decode("group record", &k, &v)
            })
            .collect()
    }

    /// The ids of every group the journal holds records of, in id order.
    pub fn group_ids(&self) -> Result<Vec<String>, Error> {
        let s = self.store()?;
        let mut out: Vec<String> = Vec::new();
        for k in s.groups.iter().keys() {
            let k = k?;
            let (id, _) = record_seq(&k)?;
            let id = String::from_utf8_lossy(id);
            if out.last().map(String::as_str) != Some(&*id) {
                out.push(id.into_owned());
            }
        }
        Ok(out)
    }

    /// Remove every record of group `group_id` (gc of an ended group).
    pub fn remove_group(&self, group_id: &str) -> Result<usize, Error> {
        let s = self.store()?;
        let _g = lock(&self.next_seq);
        let keys: Vec<sled::IVec> = s.groups.scan_prefix(record_prefix(group_id)).keys().collect::<Result<_, _>>()?;
        for k in &keys {
            s.groups.remove(k)?;
        }
        Ok(keys.len())
    }

    /// Wait until every record up to `seq` is durable (per [`Durability`]).
    pub async fn sync_seq(&self, seq: u64) -> Result<(), Error> {
        let shared = &self.shared;
        shared.counters.syncs.fetch_add(1, Ordering::Relaxed);
        if shared.durability == Durability::Off {
            return Ok(());
        }
        let mut rx = shared.durable.subscribe();
        {
            let d = rx.borrow_and_update();
            if let Some(p) = &d.poisoned {
                return Err(Error::Poisoned(p.to_string()));
            }
            if d.seq >= seq {
                shared.counters.syncs_already_durable.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let last = shared.appended.load(Ordering::Acquire);
        if seq > last {
            return Err(Error::UnknownSeq { seq, last });
        }
        {
            let mut r = lock(&shared.requests);
            if r.shutdown {
                return Err(Error::Closed);
            }
            r.requested = r.requested.max(seq);
        }
        shared.wake.notify_one();
        let d = rx.wait_for(|d| d.seq >= seq || d.poisoned.is_some()).await.map_err(|_| Error::Closed)?.clone();
        match d.poisoned {
            Some(p) if d.seq < seq => Err(Error::Poisoned(p.to_string())),
            _ => Ok(()),
        }
    }

    /// Flush (and fsync, in `Fsync` mode) everything appended so far, now,
    /// in the calling thread. Done regardless of the durability mode.
    pub fn flush_now(&self) -> Result<(), Error> {
        self.shared.flush_all().map_err(|p| Error::Poisoned(p.to_string()))
    }

    /// All records of `id` in append order (empty if unknown or pruned by gc).
    pub fn records(&self, deployment_id: &str) -> Result<Vec<Record>, Error> {
        records_in(&*self.store()?, deployment_id)
    }

    /// Where deployment `id` stands; `None` if the journal never saw it (or
    /// its dedupe entry was pruned).
    pub fn status(&self, deployment_id: &str) -> Result<Option<DeploymentStatus>, Error> {
        let s = self.store()?;
        Ok(current_in(&s, deployment_id, entry_in(&s, deployment_id)?)?.map(|e| e.status()))
    }

    /// Ids whose latest attempt has no `Finished`/`Abandoned` record, in id
    /// order: what recovery must resume before consuming new messages.
    pub fn unfinished(&self) -> Result<Vec<String>, Error> {
        let s = self.store()?;
        let mut out = Vec::new();
        for r in entries_in(&s) {
            let (id, e) = r?;
            if e.state == DeploymentState::InFlight {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Note that the result of `id` was published and the message acked.
    /// Returns false for an unknown id. Durable with the next flush.
    pub fn mark_acked(&self, deployment_id: &str) -> Result<bool, Error> {
        let s = self.store()?;
        let _g = lock(&self.next_seq);
        let Some(mut e) = entry_in(&s, deployment_id)? else {
            return Ok(false);
        };
        if !e.acked {
            e.acked = true;
            s.index.insert(deployment_id, encode("index entry", &e)?)?;
        }
        Ok(true)
    }

    /// Every deployment, in id order.
    pub fn list(&self) -> Result<Vec<Summary>, Error> {
        let s = self.store()?;
        let mut out = Vec::new();
        for r in entries_in(&s) {
            let (id, e) = r?;
            let Some(e) = current_in(&s, &id, Some(e))? else { continue };
            let phase = match e.state {
                DeploymentState::InFlight => {
                    let replayed = records_in(&s, &id).ok().and_then(|rs| Deployment::replay(&rs).ok());
                    Some(replayed.map_or_else(|| e.last_event.clone(), |d| d.phase_name().to_string()))
                }
                _ => None,
            };
            out.push(Summary {
                target: e.target,
                host: e.host,
                state: e.state,
                outcome: e.report.as_ref().map(|r| r.outcome),
                phase,
                attempts: e.attempts,
                started_at: e.started_at,
                updated_at: e.updated_at,
                acked: e.acked,
                records_pruned: e.records_pruned,
                deployment_id: id,
            });
        }
        Ok(out)
    }

    /// [`SledJournal::gc_with`] with dedupe entries kept for 10 × `retention`.
    pub fn gc(&self, retention: Duration, now: Timestamp) -> Result<GcStats, Error> {
        self.gc_with(&GcPolicy::new(retention), now)
    }

    /// Remove the records of terminal deployments whose last event is older
    /// than `policy.retention` (keeping their dedupe entry), and dedupe
    /// entries older than `policy.dedupe_retention`. In-flight deployments
    /// are never touched. Durable with the next flush.
    pub fn gc_with(&self, policy: &GcPolicy, now: Timestamp) -> Result<GcStats, Error> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (retention, dedupe) = (ms(policy.retention), ms(policy.dedupe_retention).max(ms(policy.retention)));
        let mut stats = GcStats::default();
        let candidates: Vec<(String, Entry)> = {
            let s = self.store()?;
            entries_in(&s).collect::<Result<_, _>>()?
        };
        let kept: HashSet<String> = if policy.keep_last_per_target {
            last_in_place_per_target(&candidates).into_iter().map(str::to_string).collect()
        } else {
            HashSet::new()
        };
        for (id, e) in candidates {
            if e.state == DeploymentState::InFlight || kept.contains(id.as_str()) {
                continue;
            }
            let age = now.since(e.updated_at);
            let drop_entry = age >= dedupe;
            if !drop_entry && (age < retention || e.records_pruned) {
                continue;
            }
            // No append may interleave; re-check the entry under the lock.
            // The store is taken per deployment: a compaction waits for one
            // removal, not for the whole gc.
            let s = self.store()?;
            let _g = lock(&self.next_seq);
            let Some(mut cur) = entry_in(&s, &id)? else { continue };
            if cur.last_seq != e.last_seq || cur.state == DeploymentState::InFlight {
                continue;
            }
            let keys: Vec<sled::IVec> = s.records.scan_prefix(record_prefix(&id)).keys().collect::<Result<_, _>>()?;
            cur.records_pruned = true;
            let new_entry = if drop_entry { None } else { Some(encode("index entry", &cur)?) };
            (&s.records, &s.index)
                .transaction(|(records, index)| -> TxResult<()> {
                    for k in &keys {
                        records.remove(k.as_ref())?;
                    }
                    match &new_entry {
                        Some(v) => index.insert(id.as_bytes(), v.as_slice())?,
                        None => index.remove(id.as_bytes())?,
                    };
                    Ok(())
                })
                .map_err(tx_err)?;
            stats.records_removed += keys.len() as u64;
            if drop_entry {
                self.deployments.fetch_sub(1, Ordering::Relaxed);
                stats.dedupe_entries_removed += 1;
            } else {
                stats.deployments_pruned += 1;
            }
            tracing::debug!(deployment_id = %id, removed = keys.len(), dedupe_removed = drop_entry, key = %printable_key(id.as_bytes()), "journal gc");
        }
        // Target groups whose result was published, older than the
        // dedupe retention (a redelivery of the group request re-publishes
        // its result until then): every record goes.
        for id in self.group_ids()? {
            let records = self.group_records(&id)?;
            let published = records.iter().any(|r| matches!(r.event, certdeploy_core::group::GroupEvent::Published));
            let over = published && records.last().is_some_and(|r| now.since(r.at) >= dedupe);
            if over {
                stats.records_removed += self.remove_group(&id)? as u64;
                stats.dedupe_entries_removed += 1;
            }
        }
        Ok(stats)
    }

    /// Deployments the index holds (one entry each, pruned or not); a
    /// counter, not a walk of the index.
    pub fn deployment_count(&self) -> usize {
        self.deployments.load(Ordering::Relaxed)
    }

    /// Bytes sled's files take on disk.
    pub fn size_on_disk(&self) -> Result<u64, Error> {
        Ok(self.store()?.db.size_on_disk()?)
    }

    /// Rewrite the journal into a fresh sled database and swap it in.
    /// sled 0.34 never gives back the space of the keys gc removes; a copy
    /// of the live keys takes only what they need.
    ///
    /// Appends, queries and flushes wait while it runs (it holds the
    /// journal's write lock), so it must not run on an async thread; the
    /// worker runs it on a blocking thread while it takes no deliveries and
    /// none are in flight. Afterwards every key, the id, the sequence and
    /// the lock are as before, and every record appended before it is
    /// durable.
    ///
    /// Crash-safe at every instant: the copy is written beside the journal
    /// (`<path>.compact`), flushed, closed, and every file and directory of
    /// it fsynced; then the two directories are exchanged in one
    /// `renameat2(RENAME_EXCHANGE)` and the parent directory is fsynced;
    /// then the old one is removed. The journal path always names a whole
    /// journal with the same entries; [`SledJournal::open`] removes what
    /// the sibling holds.
    ///
    /// A failure before the exchange (a file system without
    /// `RENAME_EXCHANGE`, say) leaves the journal as it was, open. A failed
    /// flush of the old database or fsync of the parent directory poisons
    /// the journal like a failed flush would.
    pub fn compact(&self) -> Result<CompactStats, Error> {
        let _one = lock(&self.compacting);
        let t0 = Instant::now();
        let sibling = compact::sibling(&self.path).ok_or_else(|| {
            Error::Compaction(format!("{}: no directory name to compact beside", self.path.display()))
        })?;
        let mut guard = write(&self.shared.store);
        if let Some(p) = self.shared.durable.borrow().poisoned.clone() {
            return Err(Error::Poisoned(p.to_string()));
        }
        let Some(store) = guard.as_ref() else { return Err(Error::Poisoned(NO_STORE.into())) };
        let size_before = store.db.size_on_disk()?;
        // Everything appended is in the old database too, should the swap
        // not happen.
        if let Err(e) = store.db.flush() {
            let e = Error::Compaction(format!("sled flush before compacting: {e}"));
            self.poison(&e);
            return Err(e);
        }
        compact::remove_leftover(&sibling).map_err(Error::Compaction)?;
        let (new_lock, entries) = match compact::write_copy(&store.db, &sibling, self.cache_capacity) {
            Ok(c) => c,
            Err(e) => {
                self.discard_copy(&sibling);
                return Err(e);
            }
        };
        crash_point!("journal_compact_copied");
        // No append can run: every one so far is in the copy.
        let appended = self.shared.appended.load(Ordering::Acquire);
        // sled finds its blob and snapshot files by path, and the path is
        // about to name the copy: the old database is closed before the
        // exchange, the copy opened at the path after it.
        drop(guard.take());
        crash_point!("journal_compact_closed");
        if let Err(e) = compact::exchange(&self.path, &sibling) {
            // Nothing moved: the journal path holds the old database.
            drop(new_lock);
            self.discard_copy(&sibling);
            let e = Error::Compaction(format!("exchanging the copy with the journal: {e}"));
            if let Err(r) = self.reopen(&mut guard) {
                self.poison(&r);
                return Err(r);
            }
            return Err(e);
        }
        // The path names the copy, and its lock file: locked since it was
        // made, it is the journal's lock now. The old one goes with the
        // old directory.
        drop(std::mem::replace(&mut *lock(&self.lock), new_lock));
        crash_point!("journal_compact_swapped");
        let reopened = compact::sync_parent(&self.path)
            .map_err(|e| Error::Compaction(format!("fsync of the journal's parent directory: {e}")))
            .and_then(|()| {
                crash_point!("journal_compact_synced");
                self.reopen(&mut guard)
            });
        if let Err(e) = reopened {
            // Both directories hold the whole journal; which one a crash
            // keeps is not known. A restart opens the path and removes the
            // sibling.
            self.poison(&e);
            return Err(e);
        }
        // Flushed, fsynced and swapped in: durable.
        self.shared.durable.send_if_modified(|d| {
            let raise = appended > d.seq;
            d.seq = d.seq.max(appended);
            raise
        });
        let size_after = guard.as_ref().map_or(Ok(0), |s| s.db.size_on_disk())?;
        drop(guard);
        if let Err(e) = compact::remove(&sibling) {
            tracing::warn!(dir = %sibling.display(), error = %e, "removing the journal's old copy failed; the next open removes it");
        }
        let stats = CompactStats { size_before, size_after, entries, duration: t0.elapsed() };
        tracing::info!(
            path = %self.path.display(),
            size_before, size_after, entries,
            duration_ms = stats.duration.as_millis() as u64,
            "journal compacted"
        );
        Ok(stats)
    }

    /// Open the database at the journal path into `slot` (after a
    /// compaction closed it), checking that it is this journal.
    fn reopen(&self, slot: &mut Option<Store>) -> Result<(), Error> {
        let db = compact::open_sled(&self.path, self.cache_capacity)?;
        let meta = db.open_tree(META)?;
        let records = db.open_tree(RECORDS)?;
        let index = db.open_tree(INDEX)?;
        let groups = db.open_tree(GROUPS)?;
        let id = meta.get(ID_KEY)?.map(|v| String::from_utf8_lossy(&v).into_owned());
        if id.as_deref() != Some(self.id.as_str()) {
            return Err(Error::Compaction(format!(
                "{} reopened with journal id {id:?}, expected {}",
                self.path.display(),
                self.id
            )));
        }
        let files = SledFiles::open(&self.path).map_err(|e| Error::Compaction(e.to_string()))?;
        *slot = Some(Store { db, records, index, groups, files: Mutex::new(files) });
        Ok(())
    }

    /// Remove a copy that will not be swapped in.
    fn discard_copy(&self, sibling: &Path) {
        if let Err(e) = compact::remove_leftover(sibling) {
            tracing::warn!(error = %e, "removing an unfinished journal compaction failed; the next open removes it");
        }
    }

    /// As a failed flush: every later sync fails.
    fn poison(&self, e: &Error) {
        tracing::error!(error = %e, "journal compaction failed; the journal is now read-only for this process");
        let msg: Arc<str> = e.to_string().into();
        self.shared.durable.send_modify(|d| {
            d.poisoned.get_or_insert(msg);
        });
    }

    pub fn appends(&self) -> u64 {
        self.shared.counters.appends.load(Ordering::Relaxed)
    }

    pub fn flushes(&self) -> u64 {
        self.shared.counters.flushes.load(Ordering::Relaxed)
    }

    /// Every counter, including the flush latency histogram.
    pub fn stats(&self) -> JournalStats {
        self.shared.counters.snapshot()
    }

    /// Highest sequence number known durable.
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable.borrow().seq
    }

    fn stop_flusher(&self) {
        self.shared.shutdown();
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
    }

    /// Stop the flusher, flush and fsync everything, release the journal.
    pub fn close(self) -> Result<(), Error> {
        self.stop_flusher();
        self.flush_now()
    }
}

impl Drop for SledJournal {
    fn drop(&mut self) {
        let running = lock(&self.flusher).is_some();
        if running {
            self.stop_flusher();
            if let Err(e) = self.flush_now() {
                tracing::warn!(path = %self.path.display(), error = %e, "journal: final flush failed");
            }
        }
    }
}

impl Journal for SledJournal {
    fn append(&self, deployment_id: &str, record: &Record) -> Result<u64, JournalError> {
        self.append_record(deployment_id, record).map_err(Into::into)
    }

    async fn sync(&self, seq: u64) -> Result<(), JournalError> {
        self.sync_seq(seq).await.map_err(Into::into)
    }
}

/// The highest sequence number in the groups tree.
fn groups_max_seq(groups: &sled::Tree) -> Result<u64, Error> {
    let mut max = 0;
    for k in groups.iter().keys() {
        max = max.max(record_seq(&k?)?.1);
    }
    Ok(max)
}

/// 128 random bits from the kernel, in hex.
fn random_id() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
