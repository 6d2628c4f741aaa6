//! `certdeploy worker`: recover, then consume deploy requests, run each
//! through the driver, publish the result with confirms, ack.
//!
//! Ordering of the last steps is the durability contract: the terminal
//! event is journaled (durably) by the driver, *then* the result is
//! published and confirmed, *then* the delivery is acked, *then* the ack is
//! recorded. A crash anywhere in between leaves the message unacked; its
//! redelivery finds the terminal record and re-publishes the same result.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use certdeploy_amqp::{AmqpError, Broker, BrokerConfig, Delivery, Topology};
use certdeploy_core::Report;
use certdeploy_core::group::{Group, GroupResult};
use certdeploy_core::wire::ResultEvent;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError};
use crate::intake;
use crate::metrics::{self as m, Health};
use crate::runtime::{Executed, GroupSink, Runtime, TargetOrder, Turn, order_key};

pub fn broker_config(cfg: &Config, name: &str) -> BrokerConfig {
    let w = &cfg.worker;
    // Round-robin at start: workers of one fleet spread over the nodes of
    // the cluster; each then fails over to the next node.
    let mut urls = w.broker_urls();
    let start = std::process::id() as usize % urls.len();
    urls.rotate_left(start);
    let mut b = BrokerConfig::new(urls[0].clone(), name.to_string());
    b.failover_urls = urls[1..].to_vec();
    b.topology = Topology {
        requests_queue: w.requests_queue.clone(),
        dead_exchange: w.dead_exchange.clone(),
        dead_queue: w.dead_queue.clone(),
        events_exchange: w.events_exchange.clone(),
        delivery_limit: w.delivery_limit,
        retry_queue: w.retry_queue.clone(),
        results_queue: w.results_queue.clone(),
        results_max_length: w.results_queue_max_length,
    };
    b.prefetch = w.concurrency.min(u16::MAX as usize) as u16;
    b.rpc_timeout = Duration::from_secs(30);
    b
}

/// Reload requests (SIGHUP) and the file to re-read on each.
pub struct Reloads {
    pub path: PathBuf,
    pub requests: mpsc::Receiver<()>,
}

/// Runs until `shutdown` flips to true; then stops consuming, lets
/// in-flight deployments finish (bounded by `shutdown_grace_s`) and returns.
/// Each reload request re-reads the configuration ([`reload`]).
pub async fn run(cfg: Config, reloads: Option<Reloads>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    if !cfg.worker.metrics_listen.is_empty() {
        let handle = m::install();
        let listener = tokio::net::TcpListener::bind(&cfg.worker.metrics_listen)
            .await
            .with_context(|| format!("metrics_listen {}", cfg.worker.metrics_listen))?;
        tracing::info!("metrics on http://{}/metrics", cfg.worker.metrics_listen);
        tokio::spawn(m::serve(listener, handle, health.clone()));
    }
    crate::notify::spawn_watchdog();
    // Opening a large journal takes a while (it walks its records, ~70 s at
    // a million deployments kept): off the async threads, and the start
    // timeout extended from here on, through recovery.
    let extending = crate::notify::extend_start_timeout_while_recovering();
    let rt = {
        let c = cfg.clone();
        Arc::new(tokio::task::spawn_blocking(move || Runtime::open(c)).await.context("opening the journal")??)
    };
    if let Some(mut r) = reloads {
        let rt = rt.clone();
        tokio::spawn(async move {
            while r.requests.recv().await.is_some() {
                reload(&rt, &r.path).await;
            }
        });
    }
    let control = Arc::new(crate::admin::Control::default());
    if let Some(sock) = crate::admin::socket_path(&cfg) {
        let (j, cfg2, c) = (rt.journal.clone(), rt.config.clone(), control.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(sock.clone(), j, cfg2, c).await {
                tracing::warn!(socket = %sock.display(), "admin endpoint unavailable: {e}");
            }
        });
    }
    let mut paused = control.paused.subscribe();
    let mut compacting = control.compacting.subscribe();
    health.journal.store(true, Ordering::Relaxed);
    let _ = health.journal_handle.set(rt.journal.clone());
    tokio::spawn(journal_metrics(rt.clone()));
    tokio::spawn(journal_housekeeping(rt.clone(), control.clone()));

    // Finish every interrupted deployment before taking new work.
    let recovered = rt.recover_all().await;
    extending.abort();
    let n = recovered?;
    // Masters up front (opt-in): the first batch does not queue behind handshakes.
    if cfg.ssh.warm_masters {
        rt.warm_masters().await;
    }
    publish_expiry(&rt);
    health.recovered.store(true, Ordering::Relaxed);
    tracing::info!(recovered = n, worker = %rt.worker_name, "recovery done");

    let mut bcfg = broker_config(&cfg, &rt.worker_name);
    let (broker_tx, broker_rx) = watch::channel::<Option<Arc<Broker>>>(None);
    tokio::spawn(queue_metrics(bcfg.topology.clone(), broker_rx.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    // Target groups the journal holds unfinished resume here (their
    // members' deployments were recovered above like any other).
    for id in rt.unfinished_groups()? {
        tracing::info!(group_id = %id, "resuming target group");
        let (rt, brx, control, stop) = (rt.clone(), broker_rx.clone(), control.clone(), shutdown.clone());
        control.in_flight.fetch_add(1, Ordering::SeqCst);
        tasks.spawn(async move {
            let sink = BusSink { brx, worker: rt.worker_name.clone() };
            if let Err(e) = Box::pin(rt.drive_group(&id, None, &sink, stop)).await {
                tracing::error!(group_id = %id, "target group stopped: {e}");
            }
            control.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Kept across reconnects: a redelivered copy queues behind the
    // original that may still be running.
    let mut order = TargetOrder::default();
    let mut connects = 0u64;
    // Set by a delivery that met a poisoned journal: every later journal
    // write fails too, so the worker stops (its deliveries go back to the
    // queue) and only a restart, recovering from what is on disk, makes
    // progress again.
    let (fatal_tx, mut fatal) = watch::channel::<Option<String>>(None);
    let fatal_tx = Arc::new(fatal_tx);
    'outer: loop {
        let stop = wait_true(shutdown.clone());
        let broker = match certdeploy_amqp::connect_with_backoff(&bcfg, stop).await {
            Ok(b) => Arc::new(b),
            Err(certdeploy_amqp::AmqpError::Shutdown) => break,
            Err(e) => return Err(e).context("broker"),
        };
        if connects > 0 {
            metrics::counter!(m::AMQP_RECONNECTS).increment(1);
            tracing::warn!("reconnected to the broker");
        }
        connects += 1;
        let mut consumer = match broker.consume(&format!("certdeploy-{}", rt.worker_name)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("consume failed: {e}; reconnecting");
                broker.close().await;
                continue;
            }
        };
        health.broker.store(true, Ordering::Relaxed);
        let _ = broker_tx.send(Some(broker.clone()));
        tracing::info!(queue = %bcfg.topology.requests_queue, prefetch = bcfg.prefetch, "consuming");
        crate::notify::ready();
        loop {
            tokio::select! {
                d = consumer.next() => match d {
                    Some(Ok(delivery)) => {
                        // One configuration for everything about this
                        // delivery: its place in line, its checks, its plan
                        // (a reload is for the deliveries after it).
                        let cfg = rt.cfg();
                        let mut turn = order.enqueue(order_key(&delivery.body, &cfg));
                        let rt = rt.clone();
                        let brx = broker_rx.clone();
                        let control = control.clone();
                        let fatal_tx = fatal_tx.clone();
                        let stop = shutdown.clone();
                        control.in_flight.fetch_add(1, Ordering::SeqCst);
                        tasks.spawn(async move {
                            if let Err(JournalPoisoned(reason)) = handle(&rt, &cfg, delivery, brx, &mut turn, stop).await {
                                fatal_tx.send_if_modified(|f| f.is_none() && f.replace(reason).is_none());
                            }
                            // Never release the successor before the predecessor is done.
                            turn.wait().await;
                            control.in_flight.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!("consumer error: {e}; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!("consumer closed; reconnecting");
                        break;
                    }
                },
                _ = broker.closed() => {
                    tracing::warn!("broker connection lost; reconnecting");
                    break;
                }
                _ = fatal.changed() => {
                    tracing::error!(
                        "stopping: the journal is poisoned (a flush or fsync failed); no new deliveries; waiting for \
                         {} in-flight; restart the worker",
                        tasks.len()
                    );
                    crate::notify::stopping();
                    let _ = tokio::time::timeout(Duration::from_secs(5), consumer.cancel()).await;
                    break 'outer;
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        tracing::info!("shutting down: no new deliveries; waiting for {} in-flight", tasks.len());
                        crate::notify::stopping();
                        // Best effort and bounded: closing the connection stops deliveries too.
                        let _ = tokio::time::timeout(Duration::from_secs(5), consumer.cancel()).await;
                        break 'outer;
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = until_held(&mut paused, &mut compacting, true) => {
                    // Paused (by the operator, or for a journal
                    // compaction): cancelling the consumer stops new
                    // deliveries (other workers get them); what was taken
                    // finishes and is acked on this connection.
                    let compaction = *compacting.borrow();
                    tracing::info!(in_flight = tasks.len(), compaction, "consumption paused");
                    let _ = tokio::time::timeout(Duration::from_secs(5), consumer.cancel()).await;
                    control.held.send_replace(true);
                    let lost = loop {
                        tokio::select! {
                            () = until_held(&mut paused, &mut compacting, false) => break false,
                            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                            _ = broker.closed() => break true,
                            _ = shutdown.changed() => if *shutdown.borrow() { break 'outer },
                        }
                    };
                    control.held.send_replace(false);
                    if lost {
                        tracing::warn!("broker connection lost while paused; reconnecting");
                        break;
                    }
                    match broker.consume(&format!("certdeploy-{}", rt.worker_name)).await {
                        Ok(c) => consumer = c,
                        Err(e) => {
                            tracing::warn!("consume after resume failed: {e}; reconnecting");
                            break;
                        }
                    }
                    tracing::info!("consumption resumed");
                }
            }
        }
        health.broker.store(false, Ordering::Relaxed);
        let _ = broker_tx.send(None);
        drop(consumer);
        broker.close().await;
        if !bcfg.failover_urls.is_empty() {
            // The node just lost is tried last.
            let lost = std::mem::replace(&mut bcfg.url, bcfg.failover_urls.remove(0));
            bcfg.failover_urls.push(lost);
            tracing::warn!(
                next = %certdeploy_amqp::redact_url(&bcfg.url),
                "failing over to the next node of the cluster"
            );
        }
        if *shutdown.borrow() {
            break;
        }
    }

    // Graceful: in-flight deployments reach a terminal state (bounded).
    let grace = Duration::from_secs(cfg.worker.shutdown_grace_s);
    let deadline = tokio::time::Instant::now() + grace;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    "{} deployment(s) still running after {grace:?}; they resume on next start",
                    tasks.len()
                );
                break;
            }
        }
    }
    if let Some(b) = broker_rx.borrow().clone() {
        // Everything that could be acked is; a connection close that hangs
        // (seen with lapin when a channel is mid-close) must not hold the
        // exit: the socket closes with the process and the broker requeues
        // anything unacked.
        if tokio::time::timeout(Duration::from_secs(5), b.close()).await.is_err() {
            tracing::warn!("closing the broker connection timed out; exiting anyway");
        }
    }
    let _ = rt.journal.flush_now();
    rt.close_ssh().await;
    if let Some(reason) = fatal.borrow().clone() {
        anyhow::bail!("the journal is poisoned, restart the worker: {reason}");
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// A delivery met a poisoned journal (the reason): the worker must stop.
struct JournalPoisoned(String);

/// Re-read the configuration file and its includes, and swap in the new
/// targets (see [`crate::config::LiveConfig::reload`]). Deliveries received
/// from then on are checked against the new set; those received before keep
/// the configuration they were checked with, through every attempt. A file
/// that does not load, or that changes a `[worker]` or `[ssh]` key, is
/// refused and logged, and the running configuration stays. Returns whether
/// the new configuration is in use.
pub async fn reload(rt: &Runtime, path: &Path) -> bool {
    let file = path.display().to_string();
    let p = path.to_path_buf();
    let loaded = match tokio::task::spawn_blocking(move || Config::load(&p)).await {
        Ok(r) => r,
        Err(e) => Err(ConfigError { file: file.clone(), key: "-".into(), problem: format!("reading failed: {e}") }),
    };
    match loaded.and_then(|cfg| rt.config.reload(cfg, &file)) {
        Ok(r) => {
            metrics::counter!(m::CONFIG_RELOADS, "result" => "ok").increment(1);
            tracing::info!(
                targets = r.targets,
                files = r.files,
                "configuration reloaded from {file}: {} target(s); added: {}; removed: {}; changed: {}",
                r.targets,
                some_names(&r.added),
                some_names(&r.removed),
                some_names(&r.changed)
            );
            let cfg = rt.cfg();
            if cfg.ssh.warm_masters {
                let fresh = r.added.iter().chain(&r.changed);
                let targets = fresh.filter_map(|n| cfg.targets.get(n).map(|t| (n.clone(), t.host_addr()))).collect();
                rt.warm(targets).await;
            }
            publish_expiry(rt);
            true
        }
        Err(e) => {
            metrics::counter!(m::CONFIG_RELOADS, "result" => "error").increment(1);
            tracing::error!("configuration reload refused; the running configuration stays: {e}");
            false
        }
    }
}

/// Up to ten names, and how many more.
fn some_names(names: &[String]) -> String {
    match names.len() {
        0 => "-".into(),
        n if n <= 10 => names.join(", "),
        n => format!("{} and {} more", names[..10].join(", "), n - 10),
    }
}

/// Resolves once "consumption held" (the operator's pause, or a journal
/// compaction) is `want` (at once if it already is).
async fn until_held(paused: &mut watch::Receiver<bool>, compacting: &mut watch::Receiver<bool>, want: bool) {
    loop {
        if (*paused.borrow_and_update() || *compacting.borrow_and_update()) == want {
            return;
        }
        // The senders live as long as the worker (in `Control`).
        tokio::select! {
            r = paused.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = compacting.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn journal_metrics(rt: Arc<Runtime>) {
    loop {
        let s = rt.journal.stats();
        metrics::counter!(m::JOURNAL_FLUSHES).absolute(s.flushes);
        metrics::counter!(m::SSH_MASTERS_OPENED).absolute(rt.pool.masters_opened());
        metrics::gauge!(m::SSH_MASTERS_OPEN).set(rt.pool.masters_open() as f64);
        metrics::counter!(m::SSH_MASTER_EVICTIONS).absolute(rt.pool.masters_evicted());
        metrics::counter!(m::SFTP_REQUESTS).absolute(rt.pool.sftp_requests());
        metrics::counter!(m::SFTP_ROUND_TRIPS).absolute(rt.pool.sftp_round_trips());
        metrics::counter!(m::SSH_COMMANDS).absolute(rt.pool.commands_run());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The journal looks after itself: gc every `journal_gc_interval_s` with
/// the retention policy, then a compaction when it is due (see
/// [`compact_when_due`]), and its size exported every minute. The gc runs
/// on a blocking thread (it walks the index), beside deployments, which it
/// never touches while they are in flight.
async fn journal_housekeeping(rt: Arc<Runtime>, control: Arc<crate::admin::Control>) {
    let cfg = rt.cfg();
    let w = &cfg.worker;
    let interval = (w.journal_gc_interval_s > 0).then(|| Duration::from_secs(w.journal_gc_interval_s));
    let tick = interval.map_or(SIZE_EVERY, |i| i.min(SIZE_EVERY));
    let mut next_gc = interval.map(|i| tokio::time::Instant::now() + i);
    let mut compacted: Option<u64> = None;
    loop {
        if next_gc.is_some_and(|t| tokio::time::Instant::now() >= t) {
            let j = rt.journal.clone();
            let policy = w.gc_policy(w.journal_retention_days);
            match tokio::task::spawn_blocking(move || j.gc_with(&policy, crate::clock::now())).await {
                Ok(Ok(stats)) => {
                    metrics::counter!(m::JOURNAL_GC_PRUNED).increment(stats.deployments_pruned);
                    let unix_s = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    metrics::gauge!(m::JOURNAL_GC_LAST).set(unix_s);
                    tracing::info!(
                        pruned = stats.deployments_pruned,
                        records = stats.records_removed,
                        results_dropped = stats.dedupe_entries_removed,
                        "journal gc"
                    );
                }
                Ok(Err(e)) => tracing::warn!("journal gc failed: {e}"),
                Err(e) => tracing::warn!("journal gc task: {e}"),
            }
            if w.journal_compact_min_mb > 0 {
                compact_when_due(&rt, &control, w.journal_compact_min_mb.saturating_mul(1 << 20), &mut compacted).await;
            }
            next_gc = interval.map(|i| tokio::time::Instant::now() + i);
        }
        let j = rt.journal.clone();
        if let Ok((size, n)) = tokio::task::spawn_blocking(move || (j.size_on_disk(), j.deployment_count())).await {
            if let Ok(size) = size {
                metrics::gauge!(m::JOURNAL_SIZE).set(size as f64);
            }
            metrics::gauge!(m::JOURNAL_DEPLOYMENTS).set(n as f64);
        }
        tokio::time::sleep(tick).await;
    }
}

/// A compaction is due when the journal's size on disk has reached both
/// `journal_compact_min_mb` and this multiple of its size right after the
/// last compaction: the disk it takes stays below about twice what its
/// live entries need (or the floor), and the cost of a compaction (a copy
/// of the live entries) is spread over at least as many bytes of growth.
const COMPACT_GROWTH: u64 = 2;

/// How long a compaction waits for the deployments in flight to finish
/// (consumption held meanwhile) before it gives up until the next gc.
const COMPACT_DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Compact the journal if it is due (see [`COMPACT_GROWTH`]): hold
/// consumption, wait (bounded) until nothing is in flight, compact on a
/// blocking thread, resume. Nothing appends to the journal meanwhile: every
/// append comes from a delivery being handled (recovery is over before the
/// main loop first holds consumption). `compacted` is the size after the
/// last compaction of this process.
async fn compact_when_due(rt: &Runtime, control: &crate::admin::Control, floor: u64, compacted: &mut Option<u64>) {
    let j = rt.journal.clone();
    let Ok(Ok(size)) = tokio::task::spawn_blocking(move || j.size_on_disk()).await else { return };
    let due = floor.max(compacted.map_or(0, |c| c.saturating_mul(COMPACT_GROWTH)));
    if size < due {
        return;
    }
    control.compacting.send_replace(true);
    let idle = wait_idle(control, COMPACT_DRAIN_WAIT).await;
    let done = if idle {
        tracing::info!(size, "compacting the journal: consumption held, nothing in flight");
        let j = rt.journal.clone();
        Some(tokio::task::spawn_blocking(move || j.compact()).await)
    } else {
        None
    };
    control.compacting.send_replace(false);
    match done {
        None => tracing::info!(
            size,
            in_flight = control.in_flight.load(Ordering::SeqCst),
            "journal compaction put off: deployments still in flight after {COMPACT_DRAIN_WAIT:?}; the next gc tries again"
        ),
        Some(Ok(Ok(stats))) => {
            metrics::counter!(m::JOURNAL_COMPACTIONS).increment(1);
            metrics::gauge!(m::JOURNAL_COMPACT_SECONDS).set(stats.duration.as_secs_f64());
            metrics::gauge!(m::JOURNAL_SIZE).set(stats.size_after as f64);
            *compacted = Some(stats.size_after);
        }
        Some(Ok(Err(e))) => tracing::warn!(size, "journal compaction failed: {e}"),
        Some(Err(e)) => tracing::warn!("journal compaction task: {e}"),
    }
}

/// Wait until the main loop holds consumption and no delivery is in
/// flight; false if that does not happen within `wait`.
async fn wait_idle(control: &crate::admin::Control, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut held = control.held.subscribe();
    loop {
        if *held.borrow_and_update() && control.in_flight.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        // The in-flight count has no notification: looked at every 50 ms.
        let _ = tokio::time::timeout(Duration::from_millis(50), held.changed()).await;
    }
}

/// How often the journal's size is exported.
const SIZE_EVERY: Duration = Duration::from_secs(60);

/// The backlog of certdeploy's queues, from the current connection.
async fn queue_metrics(t: Topology, rx: watch::Receiver<Option<Arc<Broker>>>) {
    let mut queues = vec![t.requests_queue, t.retry_queue, t.dead_queue];
    if !t.results_queue.is_empty() {
        queues.push(t.results_queue);
    }
    for q in &queues {
        metrics::gauge!(m::QUEUE_MESSAGES, "queue" => q.clone()).set(0.0);
    }
    loop {
        let broker = rx.borrow().clone();
        let Some(b) = broker else {
            // Not connected: look again soon, so the first reading follows the connect.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        for q in &queues {
            match b.queue_depth(q).await {
                Ok(n) => metrics::gauge!(m::QUEUE_MESSAGES, "queue" => q.clone()).set(f64::from(n)),
                Err(e) => tracing::debug!(queue = %q, "queue depth: {e}"),
            }
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
}

/// How often the queue backlog is read from the broker.
const QUEUE_POLL: Duration = Duration::from_secs(15);

/// The broker to publish on: the current connection, waiting a bounded
/// time for a reconnect.
async fn current_broker(rx: &mut watch::Receiver<Option<Arc<Broker>>>) -> Option<Arc<Broker>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(b) = rx.borrow().clone() {
            return Some(b);
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            return None;
        }
    }
}

/// Publish a result `mandatory` with `correlation_id` = its deployment id,
/// and to the request's `reply_to` queue when it named one. An unroutable
/// result (nothing bound: only possible without `results_queue`) and any
/// failure on `reply_to` are logged and counted, never a reason to hold
/// the ack: the journal keeps the result.
/// How long a finished deployment's result publish is retried on a live
/// connection. A nack usually means a queue the result routes to has no
/// leader for a moment (a node of the cluster died and its queues elect a
/// new one, typically within seconds); returning the request at once would
/// spend its deliveries (`x-delivery-limit`) in milliseconds.
const RESULT_PUBLISH_PATIENCE: Duration = Duration::from_secs(10);

/// [`publish`], retried with a doubling pause (250 ms up to 4 s) while the
/// connection is up, for at most [`RESULT_PUBLISH_PATIENCE`]. When that is
/// spent the connection is closed, so the worker reconnects (to the next
/// node of a cluster): RabbitMQ 3.10 keeps nacking a channel that published
/// to a quorum queue while the queue had no leader, also after a new leader
/// was elected; a new connection publishes normally.
async fn publish_patiently(broker: &Broker, report: &Report, worker: &str, reply: &Reply) -> Result<(), AmqpError> {
    let body = ResultEvent::from_report(report, worker).submitted_by(reply.submitted_by.as_deref()).to_json();
    send_patiently(broker, Route::Result, report.outcome.as_str(), &body, &report.deployment_id, reply).await
}

/// Which events a body is published as.
#[derive(Copy, Clone)]
enum Route {
    /// `result.<outcome>`.
    Result,
    /// `group.<outcome>`.
    Group,
}

/// [`publish`] retried; see [`publish_patiently`].
async fn send_patiently(
    broker: &Broker,
    route: Route,
    outcome: &str,
    body: &[u8],
    id: &str,
    reply: &Reply,
) -> Result<(), AmqpError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        match publish(broker, route, outcome, body, id, reply).await {
            Ok(()) => return Ok(()),
            Err(e) if broker.is_connected() && started.elapsed() + pause <= RESULT_PUBLISH_PATIENCE => {
                tracing::warn!(deployment_id = %id, "result publish failed: {e}; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            Err(e) => {
                if broker.is_connected() {
                    tracing::warn!(
                        deployment_id = %id,
                        "result publishes keep failing on this connection ({e}); reconnecting"
                    );
                    broker.close().await;
                }
                return Err(e);
            }
        }
    }
}

async fn publish(
    broker: &Broker,
    route: Route,
    outcome: &str,
    body: &[u8],
    id: &str,
    reply: &Reply,
) -> Result<(), AmqpError> {
    let t = Instant::now();
    let sent = match route {
        Route::Result => broker.publish_event(outcome, body, id).await,
        Route::Group => broker.publish_group_event(outcome, body, id).await,
    };
    match sent {
        Ok(()) => {}
        Err(AmqpError::Unroutable { routing_key, .. }) => {
            metrics::counter!(m::RESULTS_UNROUTABLE, "destination" => "events").increment(1);
            tracing::warn!(deployment_id = %id, %routing_key, "result unroutable: no queue is bound for it (results_queue is disabled); the journal keeps it");
        }
        Err(e) => return Err(e),
    }
    metrics::histogram!(m::PUBLISH_SECONDS).record(t.elapsed().as_secs_f64());
    if let Some(queue) = &reply.reply_to {
        match broker.publish_reply(queue, body, id).await {
            Ok(()) => {}
            Err(AmqpError::Unroutable { .. }) => {
                metrics::counter!(m::RESULTS_UNROUTABLE, "destination" => "reply_to").increment(1);
                tracing::warn!(deployment_id = %id, reply_to = %queue, "reply_to queue does not exist: result not delivered there");
            }
            Err(e) => {
                metrics::counter!(m::RESULTS_UNROUTABLE, "destination" => "reply_to").increment(1);
                tracing::warn!(deployment_id = %id, reply_to = %queue, "publishing to reply_to failed: {e}");
            }
        }
    }
    Ok(())
}

/// What the answer to a delivery carries besides the result: who asked
/// (`submitted_by`), and where else it goes (`reply_to`).
struct Reply {
    submitted_by: Option<String>,
    reply_to: Option<String>,
}

impl Reply {
    fn of(delivery: &Delivery, cfg: &Config) -> Reply {
        let ours = certdeploy_amqp::url_user(&cfg.worker.broker_urls()[0]);
        let w = &cfg.worker;
        // A reply into one of the worker's own queues would come back as
        // a request (or a result nobody asked for): refused.
        let reply_to = delivery.reply_to().map(str::to_string).filter(|q| {
            let own = [&w.requests_queue, &w.retry_queue, &w.dead_queue, &w.results_queue].contains(&q);
            if own {
                tracing::warn!(reply_to = %q, "ignoring reply_to naming one of the worker's own queues");
            }
            !own
        });
        Reply { submitted_by: delivery.submitted_by(&ours), reply_to }
    }
}

/// True on the last delivery the broker will make of a message: returned
/// once more, it would be dead-lettered without an answer. The count is
/// the broker's own (it overwrites the header on every redelivery); a
/// first delivery carries only what its publisher wrote, so it is not
/// believed there.
fn last_delivery(delivery: &Delivery, limit: u32) -> bool {
    delivery.redelivered && delivery.delivery_count.is_some_and(|n| n >= u64::from(limit))
}

async fn handle(
    rt: &Arc<Runtime>,
    cfg: &Arc<Config>,
    delivery: Delivery,
    brx: watch::Receiver<Option<Arc<Broker>>>,
    turn: &mut Turn,
    stop: watch::Receiver<bool>,
) -> Result<(), JournalPoisoned> {
    let now = crate::clock::now();
    let reply = Reply::of(&delivery, cfg);
    if certdeploy_core::wire::salvage_group(&delivery.body).is_some() {
        return handle_group(rt, cfg, delivery, brx, reply, stop).await;
    }
    if delivery.redelivered {
        tracing::debug!(
            deployment_id = %certdeploy_core::wire::salvage_ids(&delivery.body).0.unwrap_or_default(),
            delivery_count = delivery.delivery_count.unwrap_or(0),
            "redelivered message"
        );
    }
    // A redelivery of a finished deployment re-publishes the recorded
    // result before anything else is checked: its certificate may have
    // expired since, but the answer for this id was given.
    // A dry run is answered afresh every time: it is never recorded, and
    // asks what a deployment would do now.
    if let (Some(id), _) = certdeploy_core::wire::salvage_ids(&delivery.body)
        && !certdeploy_core::wire::salvage_dry_run(&delivery.body)
        && let Ok(Some(certdeploy_journal::DeploymentStatus::Finished { report, .. })) = rt.journal.status(&id)
    {
        tracing::info!(deployment_id = %id, outcome = %report.outcome, "already finished: re-publishing its result");
        finish(rt, delivery, brx, report, &reply).await;
        return Ok(());
    }
    // Every message is answered: on the broker's last delivery the worker
    // answers `failed` itself rather than risk dying with it once more.
    // Not while the journal holds an unfinished attempt of it (one running
    // in this process, or one a journal error interrupted): that attempt
    // must end first, and the ordinary path resumes or waits for it and
    // answers with its real outcome.
    let unfinished = |id: &str| {
        matches!(rt.journal.status(id), Ok(Some(certdeploy_journal::DeploymentStatus::InFlight { .. })) | Err(_))
    };
    if last_delivery(&delivery, cfg.worker.delivery_limit)
        && !certdeploy_core::wire::salvage_ids(&delivery.body).0.is_some_and(|id| unfinished(&id))
    {
        let (id, target) = certdeploy_core::wire::salvage_ids(&delivery.body);
        let id = id.unwrap_or_else(|| "unknown".into());
        let target = target.unwrap_or_else(|| "unknown".into());
        let count = delivery.delivery_count.unwrap_or(0);
        let msg = format!(
            "delivery limit reached: delivered {} times without an answer (a worker stopped while holding it); \
             not deployed by this request",
            count + 1
        );
        tracing::error!(deployment_id = %id, target = %target, "{msg}");
        metrics::counter!(m::DEPLOYMENTS, "outcome" => "failed").increment(1);
        let report = Report::delivery_limit(&id, &target, msg.clone(), now);
        answer_and_dead_letter(rt, delivery, brx, report, &reply, &format!("delivery_limit: {msg}")).await;
        return Ok(());
    }
    // Off the async threads: decoding, a sealed key's decryption and the
    // certificate and key checks take CPU time (an RSA key's check tens of
    // milliseconds), and those threads renew the target locks.
    let shared = cfg.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let v = intake::validate_body(&delivery.body, &shared, now);
        (delivery, v)
    })
    .await;
    let (delivery, checked) = match checked {
        Ok(done) => done,
        Err(e) => {
            // The delivery went with the task: unacked, it comes back when
            // the channel closes.
            tracing::error!("request validation did not finish: {e}");
            return Ok(());
        }
    };
    let validated = match checked {
        Ok(v) => v,
        Err(rej) => {
            reject(rt, delivery, brx, rej, &reply, now).await;
            return Ok(());
        }
    };
    tracing::debug!(deployment_id = %validated.deployment_id, target = %validated.target_name, "request checked");
    #[cfg(feature = "failpoints")]
    if let Some(Some(poison)) = fail::eval("worker_crash_on", |arg| arg)
        && poison == validated.deployment_id
    {
        tracing::error!(deployment_id = %poison, "failpoint worker_crash_on: aborting");
        std::process::abort();
    }
    // Deploy after the earlier deliveries of this target. On SIGTERM the
    // deliveries already handed to tasks still run (bounded by the grace
    // period): they are in flight as far as the broker is concerned, and
    // handing them back is worse than finishing them. Returned messages
    // come back in no reliable order (a quorum queue applies the rejects
    // and the returns of a closed channel as they arrive), and an older
    // renewal redelivered after a newer one ends `superseded`.
    turn.wait().await;
    if validated.dry_run {
        match rt.dry_run(&validated).await {
            Ok(report) => answer_unrecorded(rt, delivery, brx, report, &reply).await,
            Err(e) => {
                tracing::error!(deployment_id = %validated.deployment_id, "dry run could not run: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = delivery.reject_requeue().await;
            }
        }
        return Ok(());
    }
    let report = match rt.execute(&validated).await {
        Ok(Executed::Report(r)) => r,
        Ok(Executed::Deferred { holder }) => {
            defer(rt, cfg, delivery, brx, &validated, &holder, &reply).await;
            return Ok(());
        }
        Err(e) => {
            // The journal (or the runtime) failed: nothing is lost, the
            // deployment stays unfinished and is resumed on redelivery.
            tracing::error!(deployment_id = %validated.deployment_id, "deployment could not run: {e}");
            if e.is_journal_poisoned() {
                // Back to the queue at once: this worker stops.
                let _ = delivery.reject_requeue().await;
                return Err(JournalPoisoned(e.to_string()));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery.reject_requeue().await;
            return Ok(());
        }
    };
    if report.outcome.success() {
        metrics::gauge!(m::CERT_EXPIRY, "target" => validated.target_name.clone())
            .set(validated.certificate.not_after as f64);
    }
    finish(rt, delivery, brx, report, &reply).await;
    Ok(())
}

/// A group request: answered from the journal when it holds the group
/// already (a redelivery); else checked, journaled with its key sealed,
/// acked, and driven here to its end (it resumes from the journal after a
/// restart, so the message is not held meanwhile).
async fn handle_group(
    rt: &Arc<Runtime>,
    cfg: &Arc<Config>,
    delivery: Delivery,
    brx: watch::Receiver<Option<Arc<Broker>>>,
    reply: Reply,
    stop: watch::Receiver<bool>,
) -> Result<(), JournalPoisoned> {
    let now = crate::clock::now();
    let sink = BusSink { brx: brx.clone(), worker: rt.worker_name.clone() };
    if let (Some(id), _) = certdeploy_core::wire::salvage_ids(&delivery.body)
        && !id.contains(':')
    {
        match rt.group_state(&id) {
            Ok(Some(g)) => {
                // Redelivered: the group's fan-out is journaled; its result
                // is the recorded one (once it ended), its driver this
                // process's.
                if let Some(result) = &g.result
                    && let Err(e) = sink.group(&g, result).await
                {
                    tracing::warn!(group_id = %id, "re-publishing the group result failed: {e}; returning the message");
                    let _ = delivery.reject_requeue().await;
                    return Ok(());
                }
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(group_id = %id, "ack failed: {e}");
                }
                return drive(rt, &id, None, &sink, stop).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(group_id = %id, "reading the group from the journal failed: {e}");
                let _ = delivery.reject_requeue().await;
                return if e.is_journal_poisoned() { Err(JournalPoisoned(e.to_string())) } else { Ok(()) };
            }
        }
    }
    let shared = cfg.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let v = intake::validate_group_body(&delivery.body, &shared, now);
        (delivery, v)
    })
    .await;
    let Ok((delivery, checked)) = checked else {
        tracing::error!("group request validation did not finish");
        return Ok(());
    };
    let g = match checked {
        Ok(g) => g,
        Err(rej) => {
            reject(rt, delivery, brx, rej, &reply, now).await;
            return Ok(());
        }
    };
    let id = g.spec.group_id.clone();
    match rt.accept_group(&g, reply.reply_to.clone(), reply.submitted_by.clone()).await {
        Ok(_) => {}
        Err(e) => {
            tracing::error!(group_id = %id, "journaling the group failed: {e}");
            let _ = delivery.reject_requeue().await;
            return if e.is_journal_poisoned() { Err(JournalPoisoned(e.to_string())) } else { Ok(()) };
        }
    }
    // Crash tests: the fan-out is journaled, the message not acked.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("group_before_ack");
    tracing::info!(group_id = %id, group = %g.spec.group, members = g.spec.members.len(), waves = g.spec.waves.len(), "target group accepted");
    if let Err(e) = delivery.ack().await {
        tracing::warn!(group_id = %id, "ack failed: {e}; the redelivery finds the group journaled");
    }
    drive(rt, &id, Some(g.members), &sink, stop).await
}

async fn drive(
    rt: &Runtime,
    id: &str,
    members: Option<Vec<intake::Validated>>,
    sink: &BusSink,
    stop: watch::Receiver<bool>,
) -> Result<(), JournalPoisoned> {
    match Box::pin(rt.drive_group(id, members, sink, stop)).await {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!(group_id = %id, "target group stopped: {e}");
            Err(JournalPoisoned(e.to_string()))
        }
    }
}

/// A group's results on the bus: members' as result events (with
/// `group`, `parent_id`), the group's on `group.<outcome>`; every one with
/// `correlation_id` = the group request's id, and to its `reply_to`.
struct BusSink {
    brx: watch::Receiver<Option<Arc<Broker>>>,
    worker: String,
}

impl GroupSink for BusSink {
    async fn child(&self, g: &Group, report: &Report) -> Result<(), String> {
        let mut brx = self.brx.clone();
        let broker = current_broker(&mut brx).await.ok_or("no broker connection")?;
        let body = ResultEvent::from_report(report, &self.worker)
            .submitted_by(g.submitted_by.as_deref())
            .in_group(&g.spec.group, &g.spec.group_id)
            .to_json();
        let reply = Reply { submitted_by: None, reply_to: g.reply_to.clone() };
        send_patiently(&broker, Route::Result, report.outcome.as_str(), &body, &g.spec.group_id, &reply)
            .await
            .map_err(|e| e.to_string())
    }

    async fn group(&self, g: &Group, result: &GroupResult) -> Result<(), String> {
        let mut brx = self.brx.clone();
        let broker = current_broker(&mut brx).await.ok_or("no broker connection")?;
        let reply = Reply { submitted_by: None, reply_to: g.reply_to.clone() };
        send_patiently(&broker, Route::Group, result.outcome.as_str(), &result.to_json(), &g.spec.group_id, &reply)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Publish a result for a request that will not run (rejected, delivery
/// limit), then dead-letter the worker's own copy of it without the key in
/// clear, and ack the original.
/// A refused request (or group request): answered `rejected`, its message
/// dead-lettered with the reason (key material redacted).
async fn reject(
    rt: &Runtime,
    delivery: Delivery,
    brx: watch::Receiver<Option<Arc<Broker>>>,
    rej: intake::Rejection,
    reply: &Reply,
    now: certdeploy_core::Timestamp,
) {
    let id = rej.deployment_id.unwrap_or_else(|| "unknown".into());
    let target = rej.target.unwrap_or_else(|| "unknown".into());
    let reason = rej.error.to_string();
    tracing::warn!(deployment_id = %id, target = %target, "rejected: {reason}");
    let report = Report::rejected(&id, &target, "", format!("request rejected: {reason}"), now);
    metrics::counter!(m::DEPLOYMENTS, "outcome" => "rejected").increment(1);
    answer_and_dead_letter(rt, delivery, brx, report, reply, &reason).await;
}

async fn answer_and_dead_letter(
    rt: &Runtime,
    delivery: Delivery,
    brx: watch::Receiver<Option<Arc<Broker>>>,
    report: Report,
    reply: &Reply,
    reason: &str,
) {
    let Some((broker, delivery)) = publish_or_requeue(rt, delivery, brx, &report, reply).await else { return };
    let body = crate::sealed::redact_body(&delivery.body);
    if let Err(e) = broker.dead_letter_body(&delivery, &body, reason).await {
        tracing::warn!(deployment_id = %report.deployment_id, "dead-lettering failed: {e}");
    }
}

/// Publish the result of a request the journal never records (a dry
/// run), then ack it. A failed publish returns the message, so the answer
/// comes from a later delivery (at least once, like a rejected request's).
async fn answer_unrecorded(
    rt: &Runtime,
    delivery: Delivery,
    brx: watch::Receiver<Option<Arc<Broker>>>,
    report: Report,
    reply: &Reply,
) {
    let Some((_, delivery)) = publish_or_requeue(rt, delivery, brx, &report, reply).await else { return };
    if let Err(e) = delivery.ack().await {
        tracing::warn!(deployment_id = %report.deployment_id, "ack failed: {e}");
    }
}

/// Publish the result of a request no journal record answers for; if that
/// fails, return the message to the queue (a later delivery answers).
/// `None`: nothing more to do with the delivery.
async fn publish_or_requeue(
    rt: &Runtime,
    delivery: Delivery,
    mut brx: watch::Receiver<Option<Arc<Broker>>>,
    report: &Report,
    reply: &Reply,
) -> Option<(Arc<Broker>, Delivery)> {
    let broker = current_broker(&mut brx).await?;
    if let Err(e) = publish_patiently(&broker, report, &rt.worker_name, reply).await {
        tracing::warn!(
            deployment_id = %report.deployment_id,
            "publishing the {} result failed: {e}; message will be redelivered",
            report.outcome
        );
        let _ = delivery.reject_requeue().await;
        return None;
    }
    Some((broker, delivery))
}

/// The expiry gauge of every target the journal knows, from what each last
/// had put in place (after recovery, so recovered deployments count).
fn publish_expiry(rt: &Runtime) {
    let configured: Vec<String> = rt.cfg().targets.keys().cloned().collect();
    match crate::status::targets(&rt.journal, &configured) {
        Ok(rows) => {
            for r in rows {
                if let Some(c) = r.certificate {
                    metrics::gauge!(m::CERT_EXPIRY, "target" => r.target).set(c.not_after as f64);
                }
            }
        }
        Err(e) => tracing::warn!("certificate expiry from the journal: {e}"),
    }
}

/// The target is locked by another worker's live deployment: send the
/// request to wait in the retry queue (it comes back to the requests queue
/// after `defer_delay_ms`), or give up with `failed` after `max_deferrals`.
async fn defer(
    rt: &Runtime,
    cfg: &Config,
    delivery: Delivery,
    mut brx: watch::Receiver<Option<Arc<Broker>>>,
    v: &intake::Validated,
    holder: &str,
    reply: &Reply,
) {
    // Only the worker's own copies carry a count it believes.
    let n = delivery.trusted_deferrals(&certdeploy_amqp::url_user(&cfg.worker.broker_urls()[0]));
    if n >= cfg.worker.max_deferrals {
        let msg = format!(
            "target locked by {holder}; gave up after {n} deferrals of {} ms; the host was not changed by this request",
            cfg.worker.defer_delay_ms
        );
        tracing::warn!(deployment_id = %v.deployment_id, "{msg}");
        let report = Report::lock_failed(&v.deployment_id, &v.target_name, "", msg, crate::clock::now());
        metrics::counter!(m::DEPLOYMENTS, "outcome" => "failed").increment(1);
        return finish(rt, delivery, brx, report, reply).await;
    }
    let Some(broker) = current_broker(&mut brx).await else { return };
    metrics::counter!(m::DEFERRALS).increment(1);
    let delay = Duration::from_millis(cfg.worker.defer_delay_ms);
    // The copy that waits on the bus holds no key in clear when the worker
    // can seal it (to its own first identity).
    let body = match cfg.keyring.first_recipient().and_then(|r| crate::sealed::seal_body(&delivery.body, &r)) {
        Some(Ok(sealed)) => sealed,
        Some(Err(e)) => {
            tracing::warn!(deployment_id = %v.deployment_id, "sealing the deferred copy failed: {e}; returning the message");
            tokio::time::sleep(delay).await;
            let _ = delivery.reject_requeue().await;
            return;
        }
        None => delivery.body.clone(),
    };
    match broker.defer_copy(&delivery, &body, delay, n + 1).await {
        Ok(_) => {
            tracing::info!(deployment_id = %v.deployment_id, deferrals = n + 1, "target locked by {holder}: retrying in {delay:?}")
        }
        Err(e) => {
            tracing::warn!(deployment_id = %v.deployment_id, "deferring failed: {e}; returning the message");
            tokio::time::sleep(delay).await;
            let _ = delivery.reject_requeue().await;
        }
    }
}

/// Publish the result (confirmed), then ack, then record the ack.
async fn finish(
    rt: &Runtime,
    delivery: Delivery,
    mut brx: watch::Receiver<Option<Arc<Broker>>>,
    report: Report,
    reply: &Reply,
) {
    // Crash tests: the outcome is durable, the result not yet published.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("before_result_publish");
    let Some(broker) = current_broker(&mut brx).await else { return };
    if let Err(e) = publish_patiently(&broker, &report, &rt.worker_name, reply).await {
        tracing::warn!(deployment_id = %report.deployment_id, "result publish failed: {e}; will re-publish on redelivery");
        let _ = delivery.reject_requeue().await;
        return;
    }
    // Crash tests: the result publish is confirmed, the message not acked.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("before_ack");
    match delivery.ack().await {
        Ok(true) => {
            if let Err(e) = rt.journal.mark_acked(&report.deployment_id) {
                tracing::warn!(deployment_id = %report.deployment_id, "recording the ack failed: {e}");
            }
        }
        Ok(false) => {
            tracing::info!(deployment_id = %report.deployment_id, "ack lost with the connection; the redelivery re-publishes")
        }
        Err(e) => tracing::warn!(deployment_id = %report.deployment_id, "ack failed: {e}"),
    }
}
