//! Opening a connection (one node after another of a cluster) with bounded, jittered backoff.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::watch;

use crate::broker::Broker;
use crate::config::{BrokerConfig, redact_url, url_user};
use crate::error::{AmqpError, bounded};
use crate::{BACKOFF_INITIAL, BACKOFF_MAX};

/// Reconnect delay before attempt `attempt + 1` (0-based): exponential from
/// [`BACKOFF_INITIAL`] doubling up to [`BACKOFF_MAX`], with "equal jitter"
/// (uniform in `[d/2, d]`), so the result is always within 0.25 s..30 s.
#[must_use]
pub fn backoff_delay(attempt: u32) -> Duration {
    let base = BACKOFF_INITIAL.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    let half = base / 2;
    let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(attempt);
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    half + Duration::from_millis(h.finish() % (half_ms + 1))
}

/// Open one connection, enable confirms, declare the topology (idempotent).
///
/// Must be called inside a tokio runtime.
pub async fn connect(cfg: &BrokerConfig) -> Result<Broker, AmqpError> {
    let url = redact_url(&cfg.url);
    let props = ConnectionProperties::default().with_connection_name(LongString::from(cfg.connection_name.clone()));
    let conn = match tokio::time::timeout(cfg.rpc_timeout, Connection::connect(&cfg.url, props)).await {
        Ok(Ok(c)) => c,
        Ok(Err(source)) => return Err(AmqpError::Connect { url, source }),
        Err(_) => {
            return Err(AmqpError::Timeout { op: "connection.open", timeout: cfg.rpc_timeout });
        }
    };

    let (dead_tx, _) = watch::channel(false);
    let dead_tx = Arc::new(dead_tx);
    let mut events = conn.events_listener();
    let tx = Arc::clone(&dead_tx);
    let name = cfg.connection_name.clone();
    let watcher = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                Event::Error(e) => {
                    tracing::warn!(connection = %name, error = %e, "AMQP connection error");
                    tx.send_replace(true);
                }
                Event::ConnectionBlocked(reason) => {
                    tracing::warn!(connection = %name, %reason, "AMQP connection blocked by broker");
                }
                Event::ConnectionUnblocked => {
                    tracing::info!(connection = %name, "AMQP connection unblocked");
                }
                _ => {}
            }
        }
        tx.send_replace(true);
    });

    let publish = bounded("channel.open", cfg.rpc_timeout, conn.create_channel()).await;
    let publish = match publish {
        Ok(c) => c,
        Err(e) => {
            watcher.abort();
            return Err(e);
        }
    };
    let user = url_user(&cfg.url);
    let broker = Broker {
        conn,
        publish,
        topology: cfg.topology.clone(),
        prefetch: cfg.prefetch,
        rpc_timeout: cfg.rpc_timeout,
        dead_tx,
        watcher,
        user,
    };
    bounded("confirm.select", broker.rpc_timeout, broker.publish.confirm_select(ConfirmSelectOptions::default()))
        .await?;
    broker.declare_topology().await?;
    tracing::info!(url = %url, connection = %cfg.connection_name, "connected to AMQP broker");
    Ok(broker)
}

/// [`connect`] until it succeeds, trying `url` then each of
/// `failover_urls` in turn (the nodes of one cluster), sleeping
/// [`backoff_delay`] after each round in which every node failed and
/// logging each failure with `tracing::warn`. Returns
/// [`AmqpError::Shutdown`] as soon as `shutdown` resolves. A
/// [`AmqpError::TopologyMismatch`] is returned immediately (retrying cannot fix it).
pub async fn connect_with_backoff(cfg: &BrokerConfig, shutdown: impl Future<Output = ()>) -> Result<Broker, AmqpError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let urls: Vec<&String> = std::iter::once(&cfg.url).chain(&cfg.failover_urls).collect();
    let mut attempt: u32 = 0;
    let mut round: u32 = 0;
    loop {
        let url = urls[attempt as usize % urls.len()];
        let node = BrokerConfig { url: url.clone(), ..cfg.clone() };
        let result = tokio::select! {
            r = connect(&node) => r,
            () = &mut shutdown => return Err(AmqpError::Shutdown),
        };
        match result {
            Ok(b) => {
                if attempt > 0 {
                    tracing::info!(attempts = attempt + 1, url = %redact_url(url), "reconnected to AMQP broker");
                }
                return Ok(b);
            }
            Err(e @ AmqpError::TopologyMismatch { .. }) => return Err(e),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let next = urls[attempt as usize % urls.len()];
                // Another node to try at once, unless this round is over.
                let delay = if (attempt as usize).is_multiple_of(urls.len()) {
                    round = round.saturating_add(1);
                    backoff_delay(round - 1)
                } else {
                    Duration::ZERO
                };
                tracing::warn!(
                    attempt,
                    url = %redact_url(url),
                    next = %redact_url(next),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %e,
                    "AMQP connect failed; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => return Err(AmqpError::Shutdown),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_bounds() {
        for a in 0..40 {
            let d = backoff_delay(a);
            assert!(d >= Duration::from_millis(250), "{a}: {d:?}");
            assert!(d <= BACKOFF_MAX, "{a}: {d:?}");
        }
        assert!(backoff_delay(0) <= BACKOFF_INITIAL);
        assert!(backoff_delay(20) >= BACKOFF_MAX / 2);
    }
}
