//! Prometheus metrics and health endpoints on `metrics_listen`:
//! `/metrics`, `/healthz` (process up), `/readyz` (broker connected,
//! journal open, recovery done).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const DEPLOYMENTS: &str = "certdeploy_deployments_total";
pub const STEP_SECONDS: &str = "certdeploy_step_duration_seconds";
pub const DEPLOY_SECONDS: &str = "certdeploy_deployment_duration_seconds";
pub const IN_FLIGHT: &str = "certdeploy_deployments_in_flight";
pub const JOURNAL_FLUSHES: &str = "certdeploy_journal_flushes_total";
/// Latency of each journal flush (sled flush, plus fsync when durable): a
/// histogram rendered from the journal's own buckets.
pub const JOURNAL_FLUSH_SECONDS: &str = "certdeploy_journal_flush_duration_seconds";
pub const AMQP_RECONNECTS: &str = "certdeploy_amqp_reconnects_total";
pub const PUBLISH_SECONDS: &str = "certdeploy_result_publish_duration_seconds";
pub const SSH_MASTERS_OPENED: &str = "certdeploy_ssh_masters_opened_total";
/// ssh master processes open now (at most `[ssh] max_masters`).
pub const SSH_MASTERS_OPEN: &str = "certdeploy_ssh_masters_open";
/// Idle ssh masters closed to make room for another under `max_masters`.
pub const SSH_MASTER_EVICTIONS: &str = "certdeploy_ssh_master_evictions_total";
/// SFTP requests sent to the hosts, and the round trips they took (a send
/// while none of the session's earlier requests was awaited: requests that
/// leave together count once); remote commands (exec channels) run.
pub const SFTP_REQUESTS: &str = "certdeploy_sftp_requests_total";
pub const SFTP_ROUND_TRIPS: &str = "certdeploy_sftp_round_trips_total";
pub const SSH_COMMANDS: &str = "certdeploy_ssh_commands_total";
pub const READY: &str = "certdeploy_ready";
/// Expired target locks of dead workers taken over.
pub const TAKEOVERS: &str = "certdeploy_lock_takeovers_total";
/// Attempts stopped because their target lock was lost.
pub const LOCKS_LOST: &str = "certdeploy_locks_lost_total";
/// Requests sent to the retry queue because their target was locked.
pub const DEFERRALS: &str = "certdeploy_deferrals_total";
/// Messages ready in certdeploy's queues (requests, retry, dead letters, results),
/// by queue, polled from the broker.
pub const QUEUE_MESSAGES: &str = "certdeploy_queue_messages";
/// The journal's bytes on disk, and the deployments its index holds.
pub const JOURNAL_SIZE: &str = "certdeploy_journal_size_bytes";
pub const JOURNAL_DEPLOYMENTS: &str = "certdeploy_journal_deployments";
/// When the worker's own journal gc last completed (Unix seconds).
pub const JOURNAL_GC_LAST: &str = "certdeploy_journal_last_gc_timestamp_seconds";
/// Finished deployments whose records the worker's gc removed.
pub const JOURNAL_GC_PRUNED: &str = "certdeploy_journal_gc_pruned_total";
/// Compactions of the journal by the worker, and how long the last one
/// took (consumption held meanwhile).
pub const JOURNAL_COMPACTIONS: &str = "certdeploy_journal_compactions_total";
pub const JOURNAL_COMPACT_SECONDS: &str = "certdeploy_journal_last_compaction_duration_seconds";
/// notAfter (Unix seconds) of the certificate in place on each target, as
/// certdeploy last deployed it.
pub const CERT_EXPIRY: &str = "certdeploy_certificate_expiry_timestamp_seconds";
/// Configuration reloads (SIGHUP), by `result`: `ok` (the new targets are
/// in use) or `error` (refused; the running configuration stays).
pub const CONFIG_RELOADS: &str = "certdeploy_config_reloads_total";
/// Always 1, labelled with the version: which build a worker runs.
pub const BUILD_INFO: &str = "certdeploy_build_info";

/// Results the broker could not route: label `destination` = `events`
/// (no queue bound, `results_queue` disabled) or `reply_to` (the
/// requester's queue is missing).
pub const RESULTS_UNROUTABLE: &str = "certdeploy_results_unroutable_total";

/// Reloads not run because deployments shared one (a shared reload of N
/// deployments saves N - 1).
pub const RELOADS_SAVED: &str = "certdeploy_reloads_saved_total";

/// Every metric name the worker exports (the Grafana dashboard test checks
/// its queries against this list).
pub const ALL: &[&str] = &[
    DEPLOYMENTS,
    STEP_SECONDS,
    DEPLOY_SECONDS,
    IN_FLIGHT,
    JOURNAL_FLUSHES,
    JOURNAL_FLUSH_SECONDS,
    AMQP_RECONNECTS,
    PUBLISH_SECONDS,
    SSH_MASTERS_OPENED,
    SSH_MASTERS_OPEN,
    SSH_MASTER_EVICTIONS,
    SFTP_REQUESTS,
    SFTP_ROUND_TRIPS,
    SSH_COMMANDS,
    READY,
    TAKEOVERS,
    LOCKS_LOST,
    DEFERRALS,
    RESULTS_UNROUTABLE,
    RELOADS_SAVED,
    QUEUE_MESSAGES,
    JOURNAL_SIZE,
    JOURNAL_DEPLOYMENTS,
    JOURNAL_GC_LAST,
    JOURNAL_GC_PRUNED,
    JOURNAL_COMPACTIONS,
    JOURNAL_COMPACT_SECONDS,
    CERT_EXPIRY,
    CONFIG_RELOADS,
    BUILD_INFO,
];

/// The steps the step histogram is labelled with.
pub const STEPS: &[&str] = &["snapshot", "write", "exec", "restore", "cleanup", "prune", "verify", "inspect"];

/// Histogram buckets (seconds): from a millisecond to the default deadline
/// of a deployment (600 s), so a slow step still lands in a finite bucket.
pub const BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Readiness parts, flipped by the worker.
#[derive(Default)]
pub struct Health {
    pub broker: AtomicBool,
    pub journal: AtomicBool,
    pub recovered: AtomicBool,
    /// The open journal, once it is: its flush histogram is rendered on
    /// each scrape.
    pub journal_handle: std::sync::OnceLock<Arc<certdeploy_journal::SledJournal>>,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
            && self.journal.load(Ordering::Relaxed)
            && self.recovered.load(Ordering::Relaxed)
    }
}

/// Install the global recorder (once per process).
pub fn install() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
    let handle = builder.install_recorder().ok()?;
    describe();
    register_at_zero();
    Some(handle)
}

/// Every series exists from the first scrape: a counter that has never
/// moved is `0`, not absent, so rules and dashboards see it.
fn register_at_zero() {
    // One series per outcome, so a rate over any of them exists at once.
    for o in certdeploy_core::Outcome::ALL {
        metrics::counter!(DEPLOYMENTS, "outcome" => o.as_str()).increment(0);
    }
    for s in STEPS {
        let _ = metrics::histogram!(STEP_SECONDS, "step" => *s);
    }
    let _ = metrics::histogram!(DEPLOY_SECONDS);
    let _ = metrics::histogram!(PUBLISH_SECONDS);
    metrics::gauge!(IN_FLIGHT).set(0.0);
    metrics::gauge!(SSH_MASTERS_OPEN).set(0.0);
    for c in [
        JOURNAL_FLUSHES,
        AMQP_RECONNECTS,
        SSH_MASTERS_OPENED,
        SSH_MASTER_EVICTIONS,
        SFTP_REQUESTS,
        SFTP_ROUND_TRIPS,
        SSH_COMMANDS,
        TAKEOVERS,
        LOCKS_LOST,
        DEFERRALS,
        JOURNAL_GC_PRUNED,
        JOURNAL_COMPACTIONS,
        RELOADS_SAVED,
    ] {
        metrics::counter!(c).increment(0);
    }
    metrics::gauge!(READY).set(0.0);
    for d in ["events", "reply_to"] {
        metrics::counter!(RESULTS_UNROUTABLE, "destination" => d).increment(0);
    }
    for r in ["ok", "error"] {
        metrics::counter!(CONFIG_RELOADS, "result" => r).increment(0);
    }
    for g in [JOURNAL_SIZE, JOURNAL_DEPLOYMENTS, JOURNAL_GC_LAST, JOURNAL_COMPACT_SECONDS] {
        metrics::gauge!(g).set(0.0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The journal's flush latency as a Prometheus histogram, in the text
/// format, from the journal's own cumulative counters (it keeps buckets of
/// its own, so every flush is counted without a call per flush).
pub fn render_journal_flushes(h: &certdeploy_journal::LatencyHistogram) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP {JOURNAL_FLUSH_SECONDS} Latency of journal flushes (sled flush, plus fsync when durable)"
    );
    let _ = writeln!(out, "# TYPE {JOURNAL_FLUSH_SECONDS} histogram");
    let mut cumulative = 0u64;
    for (i, bound) in certdeploy_journal::FLUSH_LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += h.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "{JOURNAL_FLUSH_SECONDS}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
    }
    let _ = writeln!(out, "{JOURNAL_FLUSH_SECONDS}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{JOURNAL_FLUSH_SECONDS}_sum {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{JOURNAL_FLUSH_SECONDS}_count {}", h.count);
    out
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(DEPLOYMENTS, "Deployments finished, by outcome");
    describe_histogram!(STEP_SECONDS, "Duration of each deployment step, by step");
    describe_histogram!(DEPLOY_SECONDS, "Request received to result published");
    describe_gauge!(IN_FLIGHT, "Deployments in flight");
    describe_counter!(JOURNAL_FLUSHES, "Journal flushes (group commits)");
    describe_counter!(AMQP_RECONNECTS, "Broker reconnections");
    describe_histogram!(PUBLISH_SECONDS, "Result publish latency until confirmed");
    describe_counter!(SSH_MASTERS_OPENED, "SSH ControlMaster connections opened");
    describe_gauge!(SSH_MASTERS_OPEN, "SSH master processes open now (at most [ssh] max_masters)");
    describe_counter!(SSH_MASTER_EVICTIONS, "Idle SSH masters closed to make room for another under max_masters");
    describe_counter!(SFTP_REQUESTS, "SFTP requests sent to the hosts");
    describe_counter!(
        SFTP_ROUND_TRIPS,
        "SFTP round trips: sends while none of the session's earlier requests was awaited (requests sent together count once)"
    );
    describe_counter!(SSH_COMMANDS, "Remote commands run over SSH (exec channels)");
    describe_counter!(
        RELOADS_SAVED,
        "Validate-and-reload runs saved by deployments to one host account sharing them (reload_coalesce_ms)"
    );
    describe_counter!(RESULTS_UNROUTABLE, "Results the broker returned as unroutable, by destination");
    describe_gauge!(READY, "1 when broker, journal and recovery are ready");
    describe_counter!(TAKEOVERS, "Expired target locks of dead workers taken over");
    describe_counter!(LOCKS_LOST, "Deployment attempts stopped because their target lock was lost");
    describe_counter!(DEFERRALS, "Requests sent to the retry queue because their target was locked");
    describe_gauge!(QUEUE_MESSAGES, "Messages ready in certdeploy's queues, by queue (polled every 15 s)");
    describe_gauge!(JOURNAL_SIZE, "Bytes the journal's files take on disk");
    describe_gauge!(JOURNAL_DEPLOYMENTS, "Deployments the journal's index holds (finished ones included)");
    describe_gauge!(JOURNAL_GC_LAST, "Unix time of the worker's last completed journal gc (0: none yet)");
    describe_counter!(JOURNAL_GC_PRUNED, "Finished deployments whose records the worker's journal gc removed");
    describe_counter!(JOURNAL_COMPACTIONS, "Compactions of the journal by the worker (rewritten into fresh files)");
    describe_gauge!(
        JOURNAL_COMPACT_SECONDS,
        "Duration of the worker's last journal compaction, consumption held meanwhile (0: none yet)"
    );
    describe_gauge!(CERT_EXPIRY, "notAfter (Unix seconds) of the certificate certdeploy last put in place, by target");
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (SIGHUP), by result: ok, or error (refused, the running configuration stays)"
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the running build");
}

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole exchange of one connection (request read, response written).
pub const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serve `/metrics`, `/healthz`, `/readyz` until the process ends. A
/// deliberately tiny HTTP/1.0 responder: one request per connection, at
/// most [`MAX_CONNECTIONS`] at once (further clients wait in the backlog,
/// costing the worker no task and no descriptor), each closed after
/// [`EXCHANGE_TIMEOUT`] whatever it does; after a failed accept (out of
/// descriptors, say) it waits before the next instead of spinning.
pub async fn serve(listener: tokio::net::TcpListener, handle: Option<PrometheusHandle>, health: Arc<Health>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => {
                backoff = std::time::Duration::from_millis(10);
                sock
            }
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let handle = handle.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&mut sock, handle, &health)).await;
        });
    }
}

/// One request and its response.
async fn exchange(sock: &mut tokio::net::TcpStream, handle: Option<PrometheusHandle>, health: &Health) {
    let mut buf = [0u8; 2048];
    let n = match sock.read(&mut buf).await {
        Ok(n) => n,
        Err(_) => return,
    };
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/metrics" => {
            metrics::gauge!(READY).set(if health.ready() { 1.0 } else { 0.0 });
            let mut text = handle.as_ref().map(|h| h.render()).unwrap_or_default();
            if let Some(j) = health.journal_handle.get() {
                text.push_str(&render_journal_flushes(&j.stats().flush_latency));
            }
            ("200 OK", text)
        }
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" => {
            if health.ready() {
                ("200 OK", "ready\n".to_string())
            } else {
                let part = |b: &AtomicBool| if b.load(Ordering::Relaxed) { "yes" } else { "no" };
                (
                    "503 Service Unavailable",
                    format!(
                        "not ready: broker={} journal={} recovery_done={}\n",
                        part(&health.broker),
                        part(&health.journal),
                        part(&health.recovered)
                    ),
                )
            }
        }
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}
