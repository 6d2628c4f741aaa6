//! certdeploy's journal: every [`Record`](certdeploy_core::Record) of every
//! deployment, in order, in an embedded [sled](https://docs.rs/sled/0.34.7)
//! database, made durable by **group commit** before the driver performs the
//! next side effect.
//!
//! # Durability
//!
//! [`Journal::append`](certdeploy_core::driver::Journal::append) only inserts
//! into sled (a few microseconds, no I/O wait) and returns a global sequence
//! number. [`Journal::sync`](certdeploy_core::driver::Journal::sync)`(seq)`
//! returns once a flush that *started after* record `seq` was inserted has
//! completed. One background flusher serves every waiter: a flush covers
//! every record appended before it started, concurrent `sync` calls share it,
//! and a `sync` whose record is already covered returns at once.
//!
//! What "completed" means depends on [`Durability`]:
//!
//! | mode | a record whose `sync` returned survives | cost |
//! |---|---|---|
//! | [`Durability::Fsync`] (default) | process crash (`kill -9`, panic, OOM) **and** kernel crash or power loss, provided the disk honours cache-flush commands | sled `flush()` + `fsync` of sled's data files |
//! | [`Durability::Flush`] | process crash only. sled 0.34.7's `flush()` ends in `sync_file_range(2)`, which writes the dirty pages to the device but neither flushes the device's write cache nor commits file-size metadata: a power loss may lose or truncate the tail | sled `flush()` |
//! | [`Durability::Off`] | nothing: `sync` returns at once; records reach disk when sled's own background flusher runs (every 500 ms) or on [`SledJournal::close`]. Exists only to measure the journal's overhead in benchmarks; never use it for a worker | none |
//!
//! `Fsync` closes sled's gap by calling `fsync(2)` (`File::sync_all`) on a
//! handle of our own to sled's data files after every `flush()`: `fsync`
//! acts on the inode, not the file descriptor, so it persists every page
//! sled wrote and the file's size, and issues the device cache flush. The
//! files are `db` (the log, fsynced on every group flush), `conf` (written
//! once at creation, fsynced at open), and any `blobs/*` or `snap.*` file
//! (fsynced once when first seen, together with their directory).
//!
//! A failed flush or fsync *poisons* the journal: every later `sync` fails
//! (after a failed `fsync` the kernel may have dropped the dirty pages, so a
//! retry that "succeeds" proves nothing). The worker must stop and let a
//! restart recover from what is on disk.
//!
//! Writes that are not records — [`SledJournal::mark_acked`] and
//! [`SledJournal::gc`] — are not synced by themselves; they become durable
//! with the next flush. Losing them in a crash costs at most a redundant
//! re-publish or a later gc pass, never a deployment decision.
//!
//! # Layout
//!
//! Three sled trees, every value `[format version byte] ++ JSON`:
//!
//! - `records`: key = deployment id ++ `0x00` ++ big-endian `u64` global
//!   sequence (ids never contain `0x00`, so a prefix scan of `id ++ 0x00`
//!   yields exactly that deployment's records in append order); value = the
//!   [`Record`](certdeploy_core::Record).
//! - `deployments`: key = deployment id; value = a small index entry: state
//!   (in flight / finished / abandoned), target, attempts, last event, times,
//!   the acked flag, the terminal [`Report`](certdeploy_core::Report), and
//!   whether gc removed the records. Only `Started`, `Finished` and
//!   `Abandoned` (and ack and gc) rewrite the entry; a read applies the
//!   records after the entry's last sequence number, so a query sees what
//!   an entry rewritten by every append would hold, and a step's append is
//!   one sled insert. A checkpoint append writes the record, then the
//!   entry: two plain sled inserts under one mutex, not a sled transaction
//!   (which costs two log writes and about ten thread wake-ups per append;
//!   dropping it took the benchmark's worker CPU from ~4.6 to ~2.9 ms per
//!   deployment). A flush makes both durable. Of the appends after the last
//!   flush a crash may keep any subset, so each open re-derives every index
//!   entry that is behind a checkpoint record, ahead of its records or
//!   missing (the records are the truth; an entry whose records were all
//!   lost, and that gc did not empty, is dropped: its `Started` was never
//!   flushed, so nothing acted on it). The sequence goes on after the
//!   highest record key.
//! - `meta`: `format_version`. A journal written by a newer format is refused
//!   at open ([`JournalOpenError::UnsupportedVersion`]); a value with an
//!   unknown version byte is a typed error ([`Error::UnknownVersion`]), never
//!   misread.
//!
//! # Retention
//!
//! [`SledJournal::gc`] removes the records of terminal (finished or
//! abandoned) deployments whose last event is older than `retention`, but
//! keeps their index entry — the *dedupe entry* (id → terminal report,
//! attempts) — so that a late redelivery still re-publishes the recorded
//! result instead of deploying again. Dedupe entries are pruned only after
//! `10 × retention` ([`GcPolicy::dedupe_retention`]); choose a retention such
//! that no redelivery can arrive later than that (RabbitMQ's delivery limit
//! and message TTL bound it).
//!
//! # Compaction
//!
//! sled 0.34 never gives back the space of the keys gc removes (its
//! `segment_cleanup_threshold` does nothing in this version).
//! [`SledJournal::compact`] rewrites the live keys of every tree into a
//! fresh sled database beside the journal (`<path>.compact`, the walk of
//! `Db::export`/`Db::import`), closes it and fsyncs every file and directory
//! of it, closes the old database, exchanges the two directories in one
//! `renameat2(RENAME_EXCHANGE)`, fsyncs the parent directory, reopens the
//! journal path and removes the old copy. The journal path names a whole
//! journal with the same keys at every instant; whatever a crash leaves at
//! `<path>.compact` is removed by the next open. The copy's lock file is
//! locked before the exchange, and a lock counts only while its file is the
//! one at the journal path, so the one-process lock holds throughout.
//!
//! Appends, queries and flushes take a read lock on the database handle
//! (uncontended: one atomic operation); a compaction takes the write lock,
//! so they wait for it, never see half of it, and never lose a record. The
//! worker compacts only while it takes no deliveries and none are in
//! flight, on a blocking thread.
//!
//! # Security
//!
//! The journal stores only `Record`s, which by construction of the core
//! never contain key material. The journal directory is created `0700` and
//! every file in it is kept `0600` regardless of the umask (re-applied at
//! open and whenever sled creates a new file). A journal is held by one
//! process at a time: a second open fails with [`JournalOpenError::Locked`]
//! naming the path and the holder's pid.
#![forbid(unsafe_code)]

mod codec;
mod compact;
mod error;
mod files;
mod flusher;
mod journal;
mod stats;

pub use error::{Error, JournalOpenError};
pub use journal::{
    CompactStats, DEFAULT_GROUP_WINDOW, DeploymentState, DeploymentStatus, Durability, GcPolicy, GcStats,
    JournalOptions, SledJournal, Summary,
};
pub use stats::{FLUSH_LATENCY_BUCKETS_US, JournalStats, LatencyHistogram};

/// The on-disk format this build writes and the newest it can read.
pub const FORMAT_VERSION: u8 = 1;
