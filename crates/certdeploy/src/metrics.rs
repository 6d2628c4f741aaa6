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
/// Total seconds spent flushing; with the flush counter, the mean latency.
pub const JOURNAL_FLUSH_SECONDS: &str = "certdeploy_journal_flush_seconds_total";
pub const AMQP_RECONNECTS: &str = "certdeploy_amqp_reconnects_total";
pub const PUBLISH_SECONDS: &str = "certdeploy_result_publish_duration_seconds";
pub const SSH_MASTERS_OPENED: &str = "certdeploy_ssh_masters_opened_total";
pub const READY: &str = "certdeploy_ready";
/// Expired target locks of dead workers taken over (issue 10).
pub const TAKEOVERS: &str = "certdeploy_lock_takeovers_total";
/// Attempts stopped because their target lock was lost.
pub const LOCKS_LOST: &str = "certdeploy_locks_lost_total";
/// Requests sent to the retry queue because their target was locked.
pub const DEFERRALS: &str = "certdeploy_deferrals_total";

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
    READY,
    TAKEOVERS,
    LOCKS_LOST,
    DEFERRALS,
];

/// Readiness parts, flipped by the worker.
#[derive(Default)]
pub struct Health {
    pub broker: AtomicBool,
    pub journal: AtomicBool,
    pub recovered: AtomicBool,
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
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let builder = PrometheusBuilder::new().set_buckets(&buckets).ok()?;
    let handle = builder.install_recorder().ok()?;
    describe();
    // Counters of rare events exist from the start, at 0: a dashboard or an
    // alert sees "none yet" instead of no series at all.
    for name in [JOURNAL_FLUSHES, AMQP_RECONNECTS, SSH_MASTERS_OPENED, TAKEOVERS, LOCKS_LOST, DEFERRALS] {
        metrics::counter!(name).increment(0);
    }
    Some(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(DEPLOYMENTS, "Deployments finished, by outcome");
    describe_histogram!(STEP_SECONDS, "Duration of each deployment step, by step");
    describe_histogram!(DEPLOY_SECONDS, "Request received to result published");
    describe_gauge!(IN_FLIGHT, "Deployments in flight");
    describe_counter!(JOURNAL_FLUSHES, "Journal flushes (group commits)");
    describe_gauge!(JOURNAL_FLUSH_SECONDS, "Total time spent in journal flushes (sled flush + fsync)");
    describe_counter!(AMQP_RECONNECTS, "Broker reconnections");
    describe_histogram!(PUBLISH_SECONDS, "Result publish latency until confirmed");
    describe_counter!(SSH_MASTERS_OPENED, "SSH ControlMaster connections opened");
    describe_gauge!(READY, "1 when broker, journal and recovery are ready");
}

/// Serve `/metrics`, `/healthz`, `/readyz` until the process ends. A
/// deliberately tiny HTTP/1.0 responder: one request per connection.
pub async fn serve(listener: tokio::net::TcpListener, handle: Option<PrometheusHandle>, health: Arc<Health>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let handle = handle.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => {
                    metrics::gauge!(READY).set(if health.ready() { 1.0 } else { 0.0 });
                    ("200 OK", handle.as_ref().map(|h| h.render()).unwrap_or_default())
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
        });
    }
}
