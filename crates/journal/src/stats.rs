//! Counters for metrics export.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (µs, inclusive) of the flush latency histogram buckets; a
/// last implicit bucket holds everything slower.
pub const FLUSH_LATENCY_BUCKETS_US: [u64; 11] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub appends: AtomicU64,
    pub flushes: AtomicU64,
    pub syncs: AtomicU64,
    pub syncs_already_durable: AtomicU64,
    pub dir_walks: AtomicU64,
    pub flush_sum_us: AtomicU64,
    pub flush_max_us: AtomicU64,
    pub buckets: [AtomicU64; FLUSH_LATENCY_BUCKETS_US.len() + 1],
}

impl Counters {
    pub fn observe_flush(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.flushes.fetch_add(1, Relaxed);
        self.flush_sum_us.fetch_add(us, Relaxed);
        self.flush_max_us.fetch_max(us, Relaxed);
        let i = FLUSH_LATENCY_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(FLUSH_LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> JournalStats {
        JournalStats {
            appends: self.appends.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            syncs: self.syncs.load(Relaxed),
            syncs_already_durable: self.syncs_already_durable.load(Relaxed),
            dir_walks: self.dir_walks.load(Relaxed),
            flush_latency: LatencyHistogram {
                count: self.flushes.load(Relaxed),
                sum_us: self.flush_sum_us.load(Relaxed),
                max_us: self.flush_max_us.load(Relaxed),
                buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            },
        }
    }
}

/// A point-in-time copy of the journal's counters (all monotonic since open).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended.
    pub appends: u64,
    /// Group flushes completed (each: sled flush, plus fsync in `Fsync` mode).
    pub flushes: u64,
    /// `sync` calls.
    pub syncs: u64,
    /// `sync` calls that found their record already durable and returned
    /// without waiting.
    pub syncs_already_durable: u64,
    /// Flushes that listed sled's directories (only after inotify reported
    /// a new or removed entry, or where inotify is unavailable).
    pub dir_walks: u64,
    pub flush_latency: LatencyHistogram,
}

/// Flush latency: count, sum and max in µs, and per-bucket counts
/// (non-cumulative) for [`FLUSH_LATENCY_BUCKETS_US`] plus one overflow bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
    pub buckets: Vec<u64>,
}

impl LatencyHistogram {
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum_us as f64 / self.count as f64 }
    }
}
