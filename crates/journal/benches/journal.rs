//! Journal throughput under group commit.
//!
//! Each simulated deployment appends 8 records like the driver does
//! (`Started`, `Begun`, results, ..., `Finished`) and waits for durability
//! (`sync`) before each of its 5 "side effects"; results in between are only
//! appended. N deployments run concurrently for a fixed time, for each
//! durability mode. Prints events/s, durable syncs/s, flushes/s, events per
//! flush and the mean flush latency.
//!
//! `cargo bench -p certdeploy-journal` (optionally `-- --secs 3`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use certdeploy_core::driver::Journal;
use certdeploy_journal::{Durability, JournalOptions, SledJournal};

#[path = "common.rs"]
mod common;
use common::deployment;

struct Figures {
    events_per_s: f64,
    syncs_per_s: f64,
    flushes_per_s: f64,
    events_per_flush: f64,
    mean_flush_us: f64,
}

fn run(mode: Durability, concurrency: usize, secs: f64) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(
        SledJournal::open(&dir.path().join("journal"), JournalOptions { durability: mode, ..Default::default() })
            .expect("open"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let syncs = Arc::new(AtomicU64::new(0));
    let (a0, f0) = (journal.appends(), journal.flushes());
    let lat0 = journal.stats().flush_latency;
    let t0 = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let (j, stop, syncs) = (journal.clone(), stop.clone(), syncs.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("bench-{w}-{n}");
                    for (rec, sync) in deployment(&id) {
                        let seq = j.append(&id, &rec).expect("append");
                        if sync {
                            j.sync(seq).await.expect("sync");
                            syncs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
            }));
        }
        // The stop signal comes from a plain thread: with `Durability::Off`
        // a task never waits, so the runtime's timers would never fire.
        let stopper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(secs));
                stop.store(true, Ordering::Relaxed);
            })
        };
        for t in tasks {
            t.await.expect("task");
        }
        stopper.join().expect("stopper");
    });
    let el = t0.elapsed().as_secs_f64();
    let events = (journal.appends() - a0) as f64;
    let flushes = (journal.flushes() - f0) as f64;
    let lat = journal.stats().flush_latency;
    let (lc, ls) = ((lat.count - lat0.count) as f64, (lat.sum_us - lat0.sum_us) as f64);
    Figures {
        events_per_s: events / el,
        syncs_per_s: syncs.load(Ordering::Relaxed) as f64 / el,
        flushes_per_s: flushes / el,
        events_per_flush: if flushes > 0.0 { events / flushes } else { f64::INFINITY },
        mean_flush_us: if lc > 0.0 { ls / lc } else { 0.0 },
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    println!("journal benchmark: 8 events/deployment, 5 durable syncs/deployment, {secs} s per row");
    println!(
        "{:<6} {:>5} {:>12} {:>12} {:>11} {:>13} {:>14}",
        "mode", "conc", "events/s", "syncs/s", "flushes/s", "events/flush", "mean flush µs"
    );
    let mut off = std::collections::BTreeMap::new();
    let mut rows = Vec::new();
    for mode in [Durability::Off, Durability::Flush, Durability::Fsync] {
        for conc in [1usize, 16, 64] {
            let f = run(mode, conc, secs);
            println!(
                "{:<6} {:>5} {:>12.0} {:>12.0} {:>11.0} {:>13.1} {:>14.0}",
                mode.as_str(),
                conc,
                f.events_per_s,
                f.syncs_per_s,
                f.flushes_per_s,
                f.events_per_flush,
                f.mean_flush_us
            );
            if mode == Durability::Off {
                off.insert(conc, f.events_per_s);
            }
            rows.push((mode, conc, f.events_per_s));
        }
    }
    println!("\nthroughput relative to durability=off (the cost of durability):");
    for (mode, conc, eps) in rows.into_iter().filter(|r| r.0 != Durability::Off) {
        println!("{:<6} {:>5}  {:.1}% of off", mode.as_str(), conc, 100.0 * eps / off[&conc]);
    }
}
