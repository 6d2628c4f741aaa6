//! Group commit.
//!
//! One dedicated OS thread performs every flush. Why a thread and not a
//! tokio task: `sled::Db::flush` and `fsync` are blocking syscalls of a
//! millisecond or more; a task would have to `spawn_blocking` each of them
//! anyway, and a thread parked on a condvar costs nothing, does not hold a
//! blocking-pool slot, and works without any runtime (the `journal` CLI
//! commands, tests, the benchmark). Waiters are async: they wait on a tokio
//! `watch` channel, which needs no runtime either.
//!
//! Protocol: `append` inserts under a mutex and then publishes its sequence
//! number in `appended`, so every seq `<= appended` is in sled. A flush reads
//! `appended` *before* calling `sled::Db::flush`, hence covers every record up
//! to that value, and publishes it as `durable` when it completed. `sync(seq)`
//! raises `requested` to `seq` and waits until `durable >= seq`: the flush
//! that satisfies it started after the append. Appends arriving while a flush
//! runs are all covered by the next one: that is the coalescing. Before
//! flushing, the flusher also waits `group_window` for more requests: with
//! many deployments in flight, one fsync then serves many of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::files::SledFiles;
use crate::journal::Durability;
use crate::stats::Counters;

#[derive(Clone, Debug, Default)]
pub(crate) struct Durable {
    /// Every record with a seq up to this one is durable.
    pub seq: u64,
    /// Set forever by the first failed flush.
    pub poisoned: Option<Arc<str>>,
}

#[derive(Default)]
pub(crate) struct Requests {
    pub requested: u64,
    pub shutdown: bool,
}

/// The open sled database: swapped whole by a compaction, so every use
/// goes through [`Shared::store`].
pub(crate) struct Store {
    pub db: sled::Db,
    pub records: sled::Tree,
    pub index: sled::Tree,
    /// Target groups' fan-out records: key = group id ++ `0x00` ++ seq
    /// (the sequence shared with `records`).
    pub groups: sled::Tree,
    /// Held for the whole of a flush (the flusher's or `flush_now`'s).
    pub files: Mutex<SledFiles>,
}

pub(crate) struct Shared {
    /// Read-locked by every append, query and flush (uncontended: one
    /// atomic operation); write-locked only by a compaction, which swaps
    /// the database. `None` only after a compaction that could not reopen
    /// the journal, which also poisons it.
    pub store: RwLock<Option<Store>>,
    pub durability: Durability,
    pub group_window: Duration,
    pub counters: Counters,
    /// Highest seq whose insert has completed.
    pub appended: AtomicU64,
    pub requests: Mutex<Requests>,
    pub wake: Condvar,
    pub durable: watch::Sender<Durable>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Why the journal has no open database (see [`Shared::store`]).
pub(crate) const NO_STORE: &str = "the journal could not be reopened after a compaction; restart the worker";

impl Shared {
    /// Flush everything appended so far; publish it as durable.
    pub fn flush_all(&self) -> Result<(), Arc<str>> {
        if let Some(p) = self.durable.borrow().poisoned.clone() {
            return Err(p);
        }
        let guard = read(&self.store);
        let Some(store) = guard.as_ref() else { return Err(NO_STORE.into()) };
        let mut files = lock(&store.files);
        let target = self.appended.load(Ordering::Acquire);
        let t0 = Instant::now();
        let r = store.db.flush().map_err(|e| format!("sled flush: {e}")).and_then(|_| {
            match self.durability {
                Durability::Fsync => files.fsync(),
                Durability::Flush | Durability::Off => files.sweep_if_changed(false),
            }
            .map_err(|e| format!("fsync of the journal files: {e}"))
        });
        drop(files);
        drop(guard);
        match r {
            Ok(walked) => {
                if walked {
                    self.counters.dir_walks.fetch_add(1, Ordering::Relaxed);
                }
                self.counters.observe_flush(t0.elapsed());
                self.durable.send_if_modified(|d| {
                    let raise = target > d.seq;
                    d.seq = d.seq.max(target);
                    raise
                });
                Ok(())
            }
            Err(msg) => {
                tracing::error!(error = %msg, "journal flush failed; the journal is now read-only for this process");
                let msg: Arc<str> = msg.into();
                self.durable.send_modify(|d| {
                    d.poisoned.get_or_insert_with(|| msg.clone());
                });
                Err(msg)
            }
        }
    }

    pub fn run_flusher(self: Arc<Self>) {
        loop {
            {
                let mut r = lock(&self.requests);
                loop {
                    let durable = self.durable.borrow().seq;
                    if r.requested > durable {
                        break;
                    }
                    if r.shutdown {
                        return;
                    }
                    r = self.wake.wait(r).unwrap_or_else(|e| e.into_inner());
                }
                // Gather: syncs requested within the window share this flush.
                let deadline = Instant::now() + self.group_window;
                while !r.shutdown {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    r = self.wake.wait_timeout(r, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
            if self.flush_all().is_err() {
                return;
            }
        }
    }

    pub fn shutdown(&self) {
        lock(&self.requests).shutdown = true;
        self.wake.notify_all();
    }
}
