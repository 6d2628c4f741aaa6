//! Journal size and open/recovery time by number of finished deployments.
//!
//! For each N: a fresh journal is filled with N deployed deployments (8
//! records each, as the driver writes them; filled with durability off, as
//! only the result is measured), closed, then opened again and asked what
//! recovery asks (the unfinished deployments), as a restarted worker does.
//! Prints the fill time, the size on disk, the open time (which includes
//! the index/records reconciliation), the recovery query's time and the
//! memory of the process after the open.
//!
//! `cargo bench -p certdeploy-journal --bench scale -- 10000 100000 1000000`
//! (sizes optional; the journals go under `$TMPDIR`, several GB at 1M).

use std::path::Path;
use std::time::Instant;

use certdeploy_core::driver::Journal as _;
use certdeploy_journal::{Durability, JournalOptions, SledJournal};

#[path = "common.rs"]
mod common;
use common::deployment;

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `-- rounds`: 6 rounds of 10,000 deployments, each followed by a gc with
/// zero retention (records go, results stay): the size it settles at.
/// `-- rounds compact`: each gc followed by a compaction, with its time.
fn rounds(compact: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    let j =
        SledJournal::open(&path, JournalOptions { durability: Durability::Off, ..Default::default() }).expect("open");
    let policy = certdeploy_journal::GcPolicy {
        retention: std::time::Duration::ZERO,
        dedupe_retention: std::time::Duration::from_secs(30 * 86_400),
        keep_last_per_target: true,
    };
    println!(
        "{:>6} {:>12} {:>10} {:>14} {:>12} {:>16} {:>12}",
        "round", "deployments", "disk MiB", "sled size MiB", "pruned", "compacted MiB", "compact s"
    );
    for round in 0..6 {
        for i in 0..10_000 {
            let id = format!("r{round}-{i:06}");
            for (rec, _) in deployment(&id) {
                j.append(&id, &rec).expect("append");
            }
        }
        let stats = j.gc_with(&policy, certdeploy_core::Timestamp(1_000)).expect("gc");
        j.flush_now().expect("flush");
        let (disk, size) = (dir_size(&path) as f64 / 1048576.0, j.size_on_disk().expect("size") as f64 / 1048576.0);
        let (after, secs) = if compact {
            let c = j.compact().expect("compact");
            (format!("{:.1}", c.size_after as f64 / 1048576.0), format!("{:.2}", c.duration.as_secs_f64()))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{round:>6} {:>12} {disk:>10.1} {size:>14.1} {:>12} {after:>16} {secs:>12}",
            j.deployment_count(),
            stats.deployments_pruned
        );
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("rounds") {
        return rounds(std::env::args().nth(2).as_deref() == Some("compact"));
    }
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10_000, 100_000] } else { sizes };
    println!(
        "{:>9} {:>9} {:>10} {:>8} {:>10} {:>12} {:>11}",
        "finished", "fill s", "disk MiB", "open s", "recover s", "deployments", "RSS MiB"
    );
    for n in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let t = Instant::now();
        {
            let j = SledJournal::open(&path, JournalOptions { durability: Durability::Off, ..Default::default() })
                .expect("open");
            for i in 0..n {
                let id = format!("renewal-{i:08}");
                for (rec, _) in deployment(&id) {
                    j.append(&id, &rec).expect("append");
                }
            }
            j.flush_now().expect("flush");
            j.close().expect("close");
        }
        let fill = t.elapsed().as_secs_f64();
        let disk = dir_size(&path) as f64 / (1024.0 * 1024.0);
        let t = Instant::now();
        let j = SledJournal::open(&path, JournalOptions::default()).expect("reopen");
        let open = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let unfinished = j.unfinished().expect("unfinished");
        let recover = t.elapsed().as_secs_f64();
        assert!(unfinished.is_empty());
        let count = j.deployment_count();
        assert_eq!(count, n);
        println!("{n:>9} {fill:>9.1} {disk:>10.1} {open:>8.2} {recover:>10.2} {count:>12} {:>11.0}", rss_mib());
        j.close().expect("close");
    }
}
